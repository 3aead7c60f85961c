//! Launch configurations and the argument structs the kernels take, in plain Rust: the same
//! numbers drive a CUDA launch (feature `cuda`) and an emulated one (feature
//! `host-emulation`), and the tests here check them on any machine.

use crate::KernelError;

/// Grid or block extent, laid out as CUDA's `dim3`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl Dim3 {
    pub const fn x(x: u32) -> Self {
        Self { x, y: 1, z: 1 }
    }

    pub fn count(&self) -> u64 {
        self.x as u64 * self.y as u64 * self.z as u64
    }
}

/// One kernel launch: grid, block and dynamic shared memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: Dim3,
    pub block: Dim3,
    pub smem: u32,
}

/// Threads per block of the grid-stride (elementwise) kernels.
pub const BLOCK: u32 = 256;
/// Most blocks a grid-stride kernel is given; the loop covers the rest.
pub const MAX_GRID: u32 = 1 << 16;
/// CUDA's limit on grid.y and grid.z.
pub const MAX_GRID_YZ: u32 = 65_535;
/// Shared memory a block may use without opting in (`cudaFuncAttributeMaxDynamicSharedMemorySize`).
pub const SMEM_DEFAULT: u32 = 48 * 1024;
/// Largest head dim the attention kernels take: each thread keeps up to four rows of this many
/// floats in registers.
pub const MAX_HEAD_DIM: usize = 128;
/// Items (sites, or output rows) a weight-gradient block sums at least before the partials are
/// reduced.
pub const WGRAD_CHUNK: usize = 64;
/// Most partial rows per weight gradient: larger inputs get longer chunks, which bounds the
/// partial buffer and the ordered reduction (FCMAE-atto's first stage at 224 px, batch 128 and
/// mask ratio 0.6, has about 160k sites: 157 per chunk).
pub const MAX_CHUNKS: usize = 1024;

/// A grid-stride launch over `total` elements (at least one block, so `total == 0` launches
/// threads that do nothing).
pub fn elementwise(total: usize) -> Launch {
    let blocks = total.div_ceil(BLOCK as usize).clamp(1, MAX_GRID as usize) as u32;
    Launch { grid: Dim3::x(blocks), block: Dim3::x(BLOCK), smem: 0 }
}

/// The two launches of a deterministic weight gradient: `partial` gives block z the items
/// `[z * chunk, (z + 1) * chunk)` for every (channel, row) and writes `(chunks, rows, channels)`
/// partial sums; `reduce` sums them in chunk order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkedSum {
    pub partial: Launch,
    pub reduce: Launch,
    pub chunk: u32,
    pub chunks: u32,
    pub rows: u32,
}

impl ChunkedSum {
    /// f32 elements of the partial buffer.
    pub fn partial_len(&self, channels: usize) -> usize {
        self.chunks as usize * self.rows as usize * channels
    }
}

/// `items` summed per (row, channel) for `rows` rows (taps, plus one for a bias).
pub fn chunked_sum(items: usize, channels: usize, rows: usize) -> Result<ChunkedSum, KernelError> {
    if rows == 0 || rows > MAX_GRID_YZ as usize {
        return Err(KernelError::Shape(format!("weight gradient: {rows} rows (taps + bias) out of 1..={MAX_GRID_YZ}")));
    }
    // Chunks of at least WGRAD_CHUNK items, and at most MAX_CHUNKS of them.
    let chunk = WGRAD_CHUNK.max(items.div_ceil(MAX_CHUNKS));
    let chunks = items.div_ceil(chunk).max(1);
    let block = (channels.div_ceil(32) * 32).clamp(32, 128) as u32;
    let partial = Launch {
        grid: Dim3 { x: channels.div_ceil(block as usize).max(1) as u32, y: rows as u32, z: chunks as u32 },
        block: Dim3::x(block),
        smem: 0,
    };
    Ok(ChunkedSum {
        partial,
        reduce: elementwise(rows * channels),
        chunk: chunk as u32,
        chunks: chunks as u32,
        rows: rows as u32,
    })
}

/// Geometry of a dense depthwise conv, as `DwGeom` in `kernels/dwconv.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DwGeom {
    pub b: i32,
    pub h: i32,
    pub w: i32,
    pub ci: i32,
    pub co: i32,
    pub ho: i32,
    pub wo: i32,
    pub kh: i32,
    pub kw: i32,
    pub stride: i32,
    pub pad: i32,
    pub mult: i32,
}

impl DwGeom {
    /// Input (b, h, w, ci), kernel kh x kw, channel multiplier, stride and zero padding.
    pub fn new(
        (b, h, w, ci): (usize, usize, usize, usize),
        (kh, kw): (usize, usize),
        mult: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self, KernelError> {
        if stride == 0 || mult == 0 || kh == 0 || kw == 0 {
            return Err(KernelError::Shape(format!(
                "depthwise conv: stride {stride}, multiplier {mult} and kernel {kh}x{kw} must be positive"
            )));
        }
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        if hp < kh || wp < kw {
            return Err(KernelError::Shape(format!(
                "depthwise conv: kernel {kh}x{kw} larger than padded input {hp}x{wp}"
            )));
        }
        let (ho, wo) = ((hp - kh) / stride + 1, (wp - kw) / stride + 1);
        let big = [b * h * w * ci, b * ho * wo * ci * mult];
        if big.iter().any(|&n| n > i32::MAX as usize) {
            return Err(KernelError::Shape(format!("depthwise conv: ({b}, {h}, {w}, {ci}) too large for i32 indices")));
        }
        let i = |v: usize| v as i32;
        Ok(Self {
            b: i(b),
            h: i(h),
            w: i(w),
            ci: i(ci),
            co: i(ci * mult),
            ho: i(ho),
            wo: i(wo),
            kh: i(kh),
            kw: i(kw),
            stride: i(stride),
            pad: i(pad),
            mult: i(mult),
        })
    }

    pub fn taps(&self) -> usize {
        (self.kh * self.kw) as usize
    }

    pub fn in_len(&self) -> usize {
        (self.b * self.h * self.w * self.ci) as usize
    }

    pub fn out_len(&self) -> usize {
        (self.b * self.ho * self.wo * self.co) as usize
    }
}

/// Sizes and scalars of one attention call, as `AttnDims` in `kernels/attention.cu`. q lives in
/// a (g, lq, sq, h, d) tensor at slot `qs`, k and v in a (g, lk, skv, h, d) tensor at slots `ks`
/// and `vs`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnDims {
    pub g: i32,
    pub lq: i32,
    pub lk: i32,
    pub h: i32,
    pub sq: i32,
    pub qs: i32,
    pub skv: i32,
    pub ks: i32,
    pub vs: i32,
    pub scale: f32,
    /// 0 without a window mask.
    pub n_masks: i32,
    /// 0 without a contextual table, else 1 or h.
    pub table_heads: i32,
    pub n_buckets: i32,
    pub ctx_scale: f32,
}

impl AttnDims {
    /// q and a separate kv stack: q (g, lq, 1, h, d), kv (g, lk, 2, h, d) with k then v.
    pub fn separate(g: usize, lq: usize, lk: usize, h: usize, scale: f32) -> Self {
        let i = |v: usize| v as i32;
        Self {
            g: i(g),
            lq: i(lq),
            lk: i(lk),
            h: i(h),
            sq: 1,
            qs: 0,
            skv: 2,
            ks: 0,
            vs: 1,
            scale,
            n_masks: 0,
            table_heads: 0,
            n_buckets: 0,
            ctx_scale: 0.0,
        }
    }

    /// One fused qkv tensor (g, l, 3, h, d).
    pub fn fused(g: usize, l: usize, h: usize, scale: f32) -> Self {
        Self { sq: 3, skv: 3, ks: 1, vs: 2, ..Self::separate(g, l, l, h, scale) }
    }

    /// Elements of the q source and of the kv source for head dim `d`.
    pub fn src_lens(&self, d: usize) -> (usize, usize) {
        let (g, h) = (self.g as usize, self.h as usize);
        (g * self.lq as usize * self.sq as usize * h * d, g * self.lk as usize * self.skv as usize * h * d)
    }

    /// Elements of the output (g, lq, h, d).
    pub fn out_len(&self, d: usize) -> usize {
        (self.g * self.lq * self.h) as usize * d
    }

    /// Rows of the log-sum-exp (g, h, lq).
    pub fn rows(&self) -> usize {
        (self.g * self.h * self.lq) as usize
    }

    /// (h, lq, lk) pairs of the bias.
    pub fn pairs(&self) -> usize {
        (self.h * self.lq * self.lk) as usize
    }

    fn check(&self, d: usize) -> Result<(), KernelError> {
        if d == 0 || d > MAX_HEAD_DIM {
            return Err(KernelError::Shape(format!("attention: head dim {d} out of 1..={MAX_HEAD_DIM}")));
        }
        if self.g <= 0 || self.lq <= 0 || self.lk <= 0 || self.h <= 0 {
            return Err(KernelError::Shape(format!(
                "attention: empty input (windows {}, lq {}, lk {}, heads {})",
                self.g, self.lq, self.lk, self.h
            )));
        }
        Ok(())
    }
}

/// Threads per block for a kernel with one thread per row: a multiple of 32, at most 256.
fn row_block(rows: usize) -> u32 {
    (rows.div_ceil(32) * 32).clamp(32, 256) as u32
}

fn per_window(
    a: &AttnDims,
    rows: usize,
    smem_floats: usize,
    smem_limit: u32,
    what: &str,
) -> Result<Launch, KernelError> {
    let smem = smem_floats * 4;
    if smem > smem_limit as usize {
        return Err(KernelError::Shape(format!(
            "attention {what}: a window needs {smem} bytes of shared memory, the device allows {smem_limit} \
             (lq {}, lk {}); split the window",
            a.lq, a.lk
        )));
    }
    Ok(Launch { grid: Dim3::x((a.g * a.h) as u32), block: Dim3::x(row_block(rows)), smem: smem as u32 })
}

/// Forward and the dq backward: one block per (window, head), K and V in shared memory.
pub fn attention_kv_resident(a: &AttnDims, d: usize, smem_limit: u32) -> Result<Launch, KernelError> {
    a.check(d)?;
    per_window(a, a.lq as usize, 2 * a.lk as usize * d, smem_limit, "forward")
}

/// The dk/dv backward: one block per (window, head), Q, dO, lse and delta in shared memory.
pub fn attention_q_resident(a: &AttnDims, d: usize, smem_limit: u32) -> Result<Launch, KernelError> {
    a.check(d)?;
    let lq = a.lq as usize;
    per_window(a, a.lk as usize, 2 * lq * d + 2 * lq, smem_limit, "dk/dv backward")
}

/// Whether the attention kernels take windows of `lq` queries and `lk` keys with head dim `d`
/// under a shared-memory limit (forward and both backward kernels). Callers with another path
/// (selfsup-ops' composition of candle ops) use it to choose before launching.
pub fn attention_fits(lq: usize, lk: usize, d: usize, smem_limit: u32) -> bool {
    let a = AttnDims::separate(1, lq, lk, 1, 1.0);
    attention_kv_resident(&a, d, smem_limit).is_ok() && attention_q_resident(&a, d, smem_limit).is_ok()
}

/// For each bucket, the (i * lk + j) pairs that fall in it, as a CSR list: pairs of bucket b
/// are `pairs[start[b]..start[b + 1]]`, ascending. The table-gradient kernel sums in this order.
pub fn bucket_pairs(buckets: &[u32], n_buckets: usize) -> Result<(Vec<u32>, Vec<u32>), KernelError> {
    let mut start = vec![0u32; n_buckets + 1];
    for &b in buckets {
        if b as usize >= n_buckets {
            return Err(KernelError::Shape(format!("attention: bucket {b} out of range for {n_buckets} buckets")));
        }
        start[b as usize + 1] += 1;
    }
    for i in 0..n_buckets {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut pairs = vec![0u32; buckets.len()];
    for (p, &b) in buckets.iter().enumerate() {
        pairs[fill[b as usize] as usize] = p as u32;
        fill[b as usize] += 1;
    }
    Ok((start, pairs))
}

/// The gather map of a k x k "same" submanifold conv over the visible positions of a (batch, h,
/// w) grid, without candle: the visible sites in raster order, and for each site and tap
/// (row-major (ky, kx)) the row of the visible neighbour or `u32::MAX`. The same table as
/// `selfsup_ops::sparse::SiteMap::neighbours` (tested there), for users of the kernels alone.
pub fn neighbour_table(
    visible: &[bool],
    batch: usize,
    h: usize,
    w: usize,
    k: usize,
) -> Result<(usize, Vec<u32>), KernelError> {
    if visible.len() != batch * h * w || k.is_multiple_of(2) {
        return Err(KernelError::Shape(format!(
            "neighbour_table: {} flags for a ({batch}, {h}, {w}) grid, kernel {k} (must be odd)",
            visible.len()
        )));
    }
    let mut lookup = vec![u32::MAX; visible.len()];
    let mut sites = Vec::new();
    for (i, &v) in visible.iter().enumerate() {
        if v {
            lookup[i] = sites.len() as u32;
            sites.push(i);
        }
    }
    let r = (k / 2) as isize;
    let mut nb = Vec::with_capacity(sites.len() * k * k);
    for &s in &sites {
        let (b, y, x) = (s / (h * w), ((s / w) % h) as isize, (s % w) as isize);
        for t in 0..k * k {
            let (ny, nx) = (y + (t / k) as isize - r, x + (t % k) as isize - r);
            let inside = ny >= 0 && nx >= 0 && (ny as usize) < h && (nx as usize) < w;
            nb.push(if inside { lookup[(b * h + ny as usize) * w + nx as usize] } else { u32::MAX });
        }
    }
    Ok((sites.len(), nb))
}

/// Errors unless a buffer holds `want` elements.
pub(crate) fn check_len(what: &str, got: usize, want: usize) -> Result<(), KernelError> {
    if got == want {
        Ok(())
    } else {
        Err(KernelError::Shape(format!("{what}: {got} elements, expected {want}")))
    }
}

/// Checks the positional terms of an attention call against its dims: the lengths of the bias
/// (h, lq, lk), the window mask (n_masks, lq, lk) and the contextual table (table_heads, d,
/// n_buckets), and the buckets (lq * lk, each below n_buckets).
pub(crate) fn check_pos(
    a: &AttnDims,
    d: usize,
    bias: Option<usize>,
    mask: Option<usize>,
    table: Option<usize>,
    buckets: Option<&[u32]>,
) -> Result<(), KernelError> {
    let pairs = (a.lq * a.lk) as usize;
    if let Some(b) = bias {
        check_len("attention bias", b, a.pairs())?;
    }
    match (mask, a.n_masks) {
        (None, 0) => {}
        (Some(m), n) if n > 0 && a.g % n == 0 => check_len("attention mask", m, n as usize * pairs)?,
        _ => {
            return Err(KernelError::Shape(format!(
                "attention: a window mask needs n_masks > 0 dividing the {} windows (n_masks {})",
                a.g, a.n_masks
            )))
        }
    }
    match (table, buckets, a.table_heads) {
        (None, None, 0) => {}
        (Some(t), Some(b), th) if th == 1 || th == a.h => {
            check_len("attention ctx table", t, th as usize * d * a.n_buckets as usize)?;
            check_len("attention buckets", b.len(), pairs)?;
            bucket_pairs(b, a.n_buckets as usize)?;
        }
        _ => {
            return Err(KernelError::Shape(format!(
                "attention: a contextual table needs its buckets and table_heads 1 or {} (got {})",
                a.h, a.table_heads
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element index of a grid-stride launch is visited exactly once.
    fn grid_stride_cover(l: &Launch, total: usize) -> Vec<u32> {
        let mut seen = vec![0u32; total];
        let threads = l.grid.count() * l.block.count();
        for t in 0..threads {
            let mut e = t as usize;
            while e < total {
                seen[e] += 1;
                e += threads as usize;
            }
        }
        seen
    }

    #[test]
    fn elementwise_covers_every_element_once() {
        for total in [0, 1, 255, 256, 257, 10_000, 3 * (1 << 24) + 5] {
            let l = elementwise(total);
            assert!(l.grid.x >= 1 && l.grid.x <= MAX_GRID && l.block.x == BLOCK, "{l:?}");
            if total <= 10_000 {
                assert!(grid_stride_cover(&l, total).iter().all(|&c| c == 1), "total {total}");
            } else {
                assert_eq!(l.grid.x, MAX_GRID, "a large total saturates the grid and loops");
            }
        }
    }

    #[test]
    fn chunked_sum_covers_items_and_channels() {
        for (items, channels, rows) in [(1, 1, 1), (63, 5, 50), (64, 40, 10), (1000, 96, 50), (300_000_000, 8, 2)] {
            let s = chunked_sum(items, channels, rows).unwrap();
            let p = s.partial;
            assert!(p.block.x.is_multiple_of(32) && p.block.x <= 1024);
            assert!(p.grid.y as usize == rows && p.grid.z as usize <= MAX_CHUNKS);
            assert!(p.grid.x as usize * p.block.x as usize >= channels, "channels covered");
            // The chunks tile the items: the last chunk starts inside, the one after is past.
            let (chunk, chunks) = (s.chunk as usize, s.chunks as usize);
            assert!(chunk * chunks >= items && chunk * (chunks - 1) < items.max(1), "{items} items: {s:?}");
            assert_eq!(s.partial_len(channels), chunks * rows * channels);
        }
        assert!(chunked_sum(10, 4, 0).is_err());
    }

    #[test]
    fn dw_geometry_matches_the_conv_arithmetic() {
        let g = DwGeom::new((2, 7, 9, 3), (5, 3), 2, 2, 1).unwrap();
        assert_eq!((g.ho, g.wo, g.co), ((7 + 2 - 5) / 2 + 1, (9 + 2 - 3) / 2 + 1, 6));
        assert_eq!(g.out_len(), 2 * 3 * 5 * 6);
        let err = DwGeom::new((1, 2, 2, 1), (7, 7), 1, 1, 1).unwrap_err().to_string();
        assert!(err.contains("7x7") && err.contains("4x4"), "{err}");
        assert!(DwGeom::new((1, 8, 8, 1), (3, 3), 1, 0, 1).is_err());
    }

    #[test]
    fn attention_launches_size_shared_memory_and_refuse_what_does_not_fit() {
        // LoMaR's 1 + 49 tokens, 3 heads of 64: K and V fit in 48 KiB.
        let a = AttnDims::fused(8, 50, 3, 0.125);
        let l = attention_kv_resident(&a, 64, SMEM_DEFAULT).unwrap();
        assert_eq!((l.grid.x, l.block.x, l.smem), (24, 64, 2 * 50 * 64 * 4));
        let l = attention_q_resident(&a, 64, SMEM_DEFAULT).unwrap();
        assert_eq!(l.smem, (2 * 50 * 64 + 2 * 50) * 4);
        // ViT-B/16 global attention: 197 tokens of 64 need the opt-in shared memory of an H100.
        let vit = AttnDims::fused(2, 197, 12, 0.125);
        let err = attention_kv_resident(&vit, 64, SMEM_DEFAULT).unwrap_err().to_string();
        assert!(err.contains("100864 bytes") && err.contains("49152"), "{err}");
        assert!(attention_kv_resident(&vit, 64, 227 * 1024).is_ok());
        assert_eq!(attention_kv_resident(&vit, 64, 227 * 1024).unwrap().block.x, 224);
        // Head dims beyond the register budget and empty inputs are refused by name.
        assert!(attention_kv_resident(&a, 256, u32::MAX).unwrap_err().to_string().contains("head dim 256"));
        let empty = AttnDims::separate(0, 4, 4, 1, 1.0);
        assert!(attention_q_resident(&empty, 8, SMEM_DEFAULT).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn attention_fits_lomar_and_vit_but_not_cvt_stage_one_on_an_h100() {
        let h100 = 227 * 1024;
        assert!(attention_fits(50, 50, 64, SMEM_DEFAULT), "LoMaR's windows fit without opting in");
        assert!(attention_fits(197, 197, 64, h100), "ViT-B/16 global attention");
        assert!(!attention_fits(197, 197, 64, SMEM_DEFAULT));
        // CvT-13 stage 1: 56x56 queries over 28x28 keys of 64: 401 KB of K and V.
        assert!(!attention_fits(3136, 784, 64, h100));
        // The dk/dv kernel holds Q and dO: long queries over few keys are refused too.
        assert!(!attention_fits(2000, 16, 64, h100));
        assert!(!attention_fits(4, 4, 256, h100), "head dim beyond the register budget");
    }

    #[test]
    fn source_lengths_follow_the_layouts() {
        let f = AttnDims::fused(3, 5, 2, 1.0);
        assert_eq!(f.src_lens(4), (3 * 5 * 3 * 2 * 4, 3 * 5 * 3 * 2 * 4));
        let s = AttnDims::separate(3, 5, 7, 2, 1.0);
        assert_eq!(s.src_lens(4), (3 * 5 * 2 * 4, 3 * 7 * 2 * 2 * 4));
        assert_eq!((s.out_len(4), s.rows(), s.pairs()), (3 * 5 * 2 * 4, 3 * 2 * 5, 2 * 5 * 7));
    }

    #[test]
    fn bucket_pairs_group_every_pair_once_in_order() {
        let buckets = [2, 0, 2, 1, 0, 2];
        let (start, pairs) = bucket_pairs(&buckets, 4).unwrap();
        assert_eq!(start, vec![0, 2, 3, 6, 6]);
        assert_eq!(pairs, vec![1, 4, 3, 0, 2, 5]);
        assert!(bucket_pairs(&buckets, 2).unwrap_err().to_string().contains("bucket 2"));
    }
}
