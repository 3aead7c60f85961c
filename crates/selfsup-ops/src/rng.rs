//! A small, seedable, serialisable pseudo-random generator.
//!
//! candle's CPU device cannot be seeded (`Device::set_seed` fails on CPU), and selfsup needs
//! every random draw to be a pure function of a seed: weight init is a function of
//! `(seed, parameter name)`, an augmentation of `(seed, epoch, index)`. SplitMix64 is enough
//! for that: tiny, fast, and its whole state is one `u64`.

/// SplitMix64 (Steele, Lea & Flood 2014).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator whose stream is a pure function of several keys (seed, epoch, index, ...).
    pub fn from_keys(keys: &[u64]) -> Self {
        let mut state = 0x243F_6A88_85A3_08D3u64;
        for &k in keys {
            state = mix(state ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        Self { state }
    }

    /// A generator keyed by a seed and a string, e.g. a parameter name.
    pub fn from_name(seed: u64, name: &str) -> Self {
        // FNV-1a over the bytes, then mixed with the seed.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self::from_keys(&[seed, h])
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n); `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// True with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Standard normal (Box-Muller; one value per call, kept simple and stateless).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_keys_same_stream_different_keys_differ() {
        let a: Vec<u64> = (0..4).map(|_| Rng::from_keys(&[1, 2, 3]).next_u64()).collect();
        assert!(a.iter().all(|&x| x == a[0]));
        assert_ne!(Rng::from_keys(&[1, 2, 3]).next_u64(), Rng::from_keys(&[1, 2, 4]).next_u64());
        assert_ne!(Rng::from_name(0, "a.weight").next_u64(), Rng::from_name(0, "b.weight").next_u64());
    }

    #[test]
    fn moments_are_right() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let (mut su, mut sn, mut sn2) = (0.0, 0.0, 0.0);
        for _ in 0..n {
            su += r.uniform();
            let z = r.normal();
            sn += z;
            sn2 += z * z;
        }
        let n = n as f64;
        assert!((su / n - 0.5).abs() < 0.01);
        assert!((sn / n).abs() < 0.01);
        assert!((sn2 / n - 1.0).abs() < 0.02);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[r.below(5)] += 1;
        }
        assert!(counts.iter().all(|&c| (c as i64 - 10_000).abs() < 600), "{counts:?}");
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut xs: Vec<usize> = (0..100).collect();
        Rng::new(3).shuffle(&mut xs);
        assert_ne!(xs, (0..100).collect::<Vec<_>>());
        xs.sort();
        assert_eq!(xs, (0..100).collect::<Vec<_>>());
    }
}
