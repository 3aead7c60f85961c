//! [`Source`]: random access to labelled images, decoded on demand — what the loader reads.
//!
//! An [`ImageSet`] (IDX, CIFAR, shard stores) hands out its fixed-size records without
//! copying; an LMDB store ([`crate::lmdb::LmdbStore`]) decodes its encoded images on every
//! read, at their own sizes, and may find a corrupt one: that is an error naming the record,
//! which the loader skips and counts.

use std::borrow::Cow;
use std::sync::Arc;

use crate::dataset::ImageSet;
use crate::error::Result;

/// One decoded image: `c x h x w` u8 pixels, channel-first.
#[derive(Debug, Clone)]
pub struct Image<'a> {
    pub pixels: Cow<'a, [u8]>,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

pub trait Source: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Channels of every decoded image.
    fn channels(&self) -> usize;
    fn label(&self, i: usize) -> Option<u32>;
    fn num_classes(&self) -> usize;
    /// Image `i`; an error names the record.
    fn image(&self, i: usize) -> Result<Image<'_>>;
    /// The record's key, for messages.
    fn key(&self, i: usize) -> String {
        format!("record {i}")
    }
    /// Every label, or `None` for an unlabelled source.
    fn labels(&self) -> Option<Vec<u32>> {
        (0..self.len()).map(|i| self.label(i)).collect()
    }
}

/// The first `n` records of a source (all, if it has fewer).
pub fn take(src: Arc<dyn Source>, n: usize) -> Arc<dyn Source> {
    if n >= src.len() {
        return src;
    }
    Arc::new(Take { inner: src, n })
}

struct Take {
    inner: Arc<dyn Source>,
    n: usize,
}

impl Source for Take {
    fn len(&self) -> usize {
        self.n
    }
    fn channels(&self) -> usize {
        self.inner.channels()
    }
    fn label(&self, i: usize) -> Option<u32> {
        self.inner.label(i)
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn image(&self, i: usize) -> Result<Image<'_>> {
        assert!(i < self.n, "record {i} of the first {}", self.n);
        self.inner.image(i)
    }
    fn key(&self, i: usize) -> String {
        self.inner.key(i)
    }
}

impl Source for ImageSet {
    fn len(&self) -> usize {
        self.n
    }
    fn channels(&self) -> usize {
        self.c
    }
    fn label(&self, i: usize) -> Option<u32> {
        self.labels.as_ref().map(|l| l[i])
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn image(&self, i: usize) -> Result<Image<'_>> {
        Ok(Image { pixels: Cow::Borrowed(ImageSet::image(self, i)), c: self.c, h: self.h, w: self.w })
    }
}
