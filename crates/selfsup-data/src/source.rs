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
    Arc::new(Range { inner: src, start: 0, n })
}

/// The records after the first `n` (none, if it has fewer): with [`take`], a split of one
/// source into two disjoint parts, e.g. a held-out validation set.
pub fn skip(src: Arc<dyn Source>, n: usize) -> Arc<dyn Source> {
    let start = n.min(src.len());
    let n = src.len() - start;
    Arc::new(Range { inner: src, start, n })
}

/// Records `start .. start + n` of `inner`.
struct Range {
    inner: Arc<dyn Source>,
    start: usize,
    n: usize,
}

impl Source for Range {
    fn len(&self) -> usize {
        self.n
    }
    fn channels(&self) -> usize {
        self.inner.channels()
    }
    fn label(&self, i: usize) -> Option<u32> {
        self.inner.label(self.start + i)
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn image(&self, i: usize) -> Result<Image<'_>> {
        assert!(i < self.n, "record {i} of a range of {}", self.n);
        self.inner.image(self.start + i)
    }
    fn key(&self, i: usize) -> String {
        self.inner.key(self.start + i)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `take` and `skip` split one source into two disjoint parts that keep every record's
    /// label, pixels and key.
    #[test]
    fn take_and_skip_split_a_source() {
        let set: Arc<dyn Source> = Arc::new(crate::dataset::synthetic_stripes(10, 8, 3, 4));
        let (head, tail) = (take(set.clone(), 7), skip(set.clone(), 7));
        assert_eq!((head.len(), tail.len()), (7, 3));
        for i in 0..3 {
            assert_eq!(tail.label(i), set.label(7 + i));
            assert_eq!(tail.key(i), set.key(7 + i));
            assert_eq!(tail.image(i).unwrap().pixels, set.image(7 + i).unwrap().pixels);
        }
        assert_eq!(head.labels().unwrap(), set.labels().unwrap()[..7]);
        assert_eq!(skip(set.clone(), 0).len(), 10);
        assert!(skip(set.clone(), 12).is_empty());
        assert_eq!(take(set, 12).len(), 10);
    }
}
