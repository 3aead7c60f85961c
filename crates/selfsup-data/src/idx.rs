//! IDX files (LeCun's MNIST format), raw or gzipped, as Debian's `dataset-fashion-mnist`
//! installs them. <http://yann.lecun.com/exdb/mnist/>: a big-endian header
//! `0x00 0x00 <type> <ndims>`, then `ndims` u32 sizes, then the data. Only unsigned bytes
//! (type 0x08) are used by the MNIST family, and only those are accepted.

use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};

/// A decoded IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads `path`, gunzipping when it starts with the gzip magic, and checks that it holds a
/// u8 array with `ndims` dimensions.
pub fn read(path: &Path, ndims: u8) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| DataError::io(path, e))?;
        out
    } else {
        raw
    };
    parse(&bytes, ndims).map_err(|e| match e {
        ParseError::Magic(found) => DataError::BadMagic { path: path.into(), found, expected: 0x0800 | ndims as u32 },
        ParseError::Short { expected, found } => DataError::Truncated { path: path.into(), expected, found },
    })
}

/// Writes a u8 array as an (uncompressed) IDX file.
pub fn write(path: &Path, dims: &[usize], data: &[u8]) -> Result<()> {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for &d in dims {
        bytes.extend_from_slice(&(d as u32).to_be_bytes());
    }
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).map_err(|e| DataError::io(path, e))
}

#[derive(Debug, PartialEq, Eq)]
enum ParseError {
    Magic(u32),
    Short { expected: usize, found: usize },
}

fn parse(bytes: &[u8], ndims: u8) -> std::result::Result<IdxArray, ParseError> {
    let header = 4 + 4 * ndims as usize;
    if bytes.len() < 4 {
        return Err(ParseError::Short { expected: header, found: bytes.len() });
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != 0x0800 | ndims as u32 {
        return Err(ParseError::Magic(magic));
    }
    if bytes.len() < header {
        return Err(ParseError::Short { expected: header, found: bytes.len() });
    }
    let dims: Vec<usize> = (0..ndims as usize)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let n = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).unwrap_or(usize::MAX);
    let expected = header.saturating_add(n);
    if bytes.len() < expected {
        return Err(ParseError::Short { expected, found: bytes.len() });
    }
    Ok(IdxArray { dims, data: bytes[header..expected].to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_and_rejects() {
        let ok = encode(&[2, 1, 2], &[1, 2, 3, 4]);
        assert_eq!(parse(&ok, 3).unwrap(), IdxArray { dims: vec![2, 1, 2], data: vec![1, 2, 3, 4] });
        assert_eq!(parse(&ok, 1), Err(ParseError::Magic(0x0803)));
        assert_eq!(parse(&ok[..10], 3), Err(ParseError::Short { expected: 16, found: 10 }));
        assert_eq!(parse(&ok[..18], 3), Err(ParseError::Short { expected: 20, found: 18 }));
        assert_eq!(parse(&[], 1), Err(ParseError::Short { expected: 8, found: 0 }));
        // A header whose sizes overflow is "short", not a panic.
        let huge = encode(&[u32::MAX, u32::MAX, u32::MAX], &[]);
        assert!(matches!(parse(&huge, 3), Err(ParseError::Short { .. })));
    }

    #[test]
    fn reads_gzip_and_names_the_file() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&encode(&[3], &[7, 8, 9])).unwrap();
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        assert_eq!(read(&p, 1).unwrap().data, vec![7, 8, 9]);
        let e = read(&p, 3).unwrap_err().to_string();
        assert!(e.contains("x.gz") && e.contains("0x00000801"), "{e}");
        let e = read(&dir.path().join("missing"), 1).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    /// Random bytes, with and without a valid magic, never panic the parser.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = selfsup_ops::rng::Rng::new(3);
        for trial in 0..5000 {
            let ndims = (trial % 4) as u8;
            let mut bytes = if trial % 2 == 0 { vec![0, 0, 8, ndims] } else { Vec::new() };
            let n = rng.below(64);
            bytes.extend((0..n).map(|_| rng.next_u64() as u8));
            if let Ok(a) = parse(&bytes, ndims) {
                assert_eq!(a.data.len(), a.dims.iter().product::<usize>());
            }
        }
    }
}
