//! Mobile-Former (Chen et al., CVPR 2022), channels-last, with the reference's weight names.
//!
//! Reference: the unofficial `AAboys/MobileFormer` (METHODS.md 1.3; no official code was
//! released), `dna_blocks.py` and `mobile_former.py` at `b19a2a7`. Weight names are the
//! reference's PyTorch module names, so its state_dict loads by name ([`remap_key`] only drops
//! `num_batches_tracked` and the final classifier `classifier.classifier.1`):
//! - `tokens.weight` (the `nn.Embedding(token_num, token_dim)` of global tokens);
//! - stem `Conv 3x3 s2 -> BN -> ReLU6`: `stem.0`, `stem.1`;
//! - `features.i` is a `DnaBlock3` or a `DnaBlock` (spec `[type, e1, c, n, stride, e2]`):
//!   - conv-only `DnaBlock3` (`e1 == 1` or `e2 == 0`): `conv.0` dw 3x3 (channel multiplier
//!     e1, stride) -> `conv.1` BN -> ReLU6 -> [channel shuffle, `inp` groups] -> `conv.4`
//!     pointwise (`group_num` groups) -> `conv.5` BN; identity skip if stride 1 and
//!     `inp == oup`; the tokens pass through untouched;
//!   - `DnaBlock3`: `local_global` (Mobile->Former) -> `global_block` (Former) on the tokens;
//!     then `conv1` dw 3x3 (multiplier e1, stride) + BN [+ shuffle, `inp` groups] -> dynamic
//!     ReLU (`hyper1`) -> `conv2` pointwise + BN, kept as `out_cp` -> `conv3` dw 3x3 (multiplier
//!     e2) + BN [+ shuffle, `oup` groups] -> dynamic ReLU (`hyper3`) -> `conv4` pointwise + BN
//!     -> `+ out_cp` -> `global_local` (Former->Mobile) -> identity skip as above;
//!   - `DnaBlock`: the same bridges around `conv1` pointwise (e1) + BN [+ shuffle,
//!     `group_num` groups] -> dyReLU (`hyper1`) -> `conv2` dw 3x3 (stride) + BN -> dyReLU
//!     (`hyper2`) -> `conv3` pointwise + BN [+ shuffle] -> identity skip -> `global_local`;
//! - `local_global`: a last Mobile->Former bridge on the final map;
//! - `classifier` (`MergeClassifier`): [shuffle] -> `conv.1` pointwise C -> 6C -> `conv.2` BN
//!   -> ReLU6 -> global average pool -> h-swish, concatenated with token 0 -> `fc.0` Linear ->
//!   `fc.1` BatchNorm1d -> h-swish: the pre-logits ([`Backbone::forward_pooled`]); then
//!   Dropout -> `classifier.1` Linear, which is the head, not part of the backbone.
//!
//! Bridges, as the reference computes them with its settings `gbr_type='attn'`,
//! `gbr_dynamic=[True, False, False]`, `gbr_ffn=True`, `gbr_norm='post'`,
//! `remove_proj_local=True`:
//! - Mobile->Former (`Local2Global`, 2 heads): `q` Linear(D, C) of the tokens; keys = values =
//!   the raw map (channels split into heads in order); scale `(C/2)^-0.5`; the output times
//!   `2 h_sigmoid(alpha.0(tokens))`, then `proj` Linear(C, D), residual, post-`layer_norm`.
//! - Former (`GlobalBlock`): **4 heads** (the blocks never pass `attn_num_heads`, so the
//!   default 4 stays), `q` Linear(D, D), keys = values = the tokens, `channel_mlp`, residual,
//!   post-`layer_norm`; then `ffn` Linear(D, 2D) -> GELU (erf) -> Linear(2D, D), residual,
//!   `ffn_norm`.
//! - Former->Mobile (`Global2Local`, 2 heads): queries = the raw map, `k` and `proj` (the
//!   values) Linear(D, C) of the tokens, scale `(C/2)^-0.5`, added to the map.
//! - Dynamic ReLU (`HyperFunc` + `DyReLU`, `num_func=2`): `hyper.0` Linear(D, D/4) -> ReLU ->
//!   `hyper.2` Linear(D/4, 2C) -> h_sigmoid on token 0; `a1 = 2 (a[:C] - 0.5) + 1`,
//!   `a2 = 2 (a[C:] - 0.5)`, `y = max(x a1, x a2)`. `h_sigmoid(x) = ReLU6(x + 3) / 6`.
//!
//! Choices:
//! - Tokens are held batch-first `(b, T, D)` (the reference uses `(T, b, D)`); this changes no
//!   value. Feature maps are channels-last; grouped pointwise convs are one batched matmul
//!   over the groups, channel shuffles a reshape + transpose, depthwise convs (with channel
//!   multiplier) run through `selfsup_ops::dwconv`, attention softmaxes through
//!   `selfsup_ops::softmax` (candle's fused softmax drops gradients).
//! - Init as the reference's `_initialize_weights`: convs N(0, sqrt(2 / (k*k*C_out))), Linear
//!   N(0, 0.01) with bias 0, BatchNorm 1/0, LayerNorm 1/0 (eps 1e-5), the token embedding
//!   N(0, 1) (PyTorch's `nn.Embedding` default, which `_initialize_weights` leaves alone).
//! - Output channels are the spec's `c` (the reference's `_make_divisible(c * 1.0, 4)`, which
//!   is `c` for every spec value: all are multiples of 4). No `width_mult`.
//! - Drop-path as the reference, where `cnn_drop_path_rate` is overwritten by
//!   `drop_path_rate`: block `i` of `n` specs (0-based) drops with `rate * (i + 1) / n` its
//!   three bridge branches and its conv branch (`DnaBlock3`: `conv4`'s output before `+
//!   out_cp`; `DnaBlock`: the conv path before the identity skip, only where there is one); the
//!   last `local_global` drops with `rate`. timm's `DropPath` draws one decision per entry of
//!   the first axis, which for the reference's `(T, b, D)` tokens means **per token, shared by
//!   the batch**; selfsup draws the same way (per token) on tokens and per sample on maps.
//!   The recipes all use 0.
//! - [`Backbone::forward_features`] is the output of the last block (`features`), before the
//!   last Mobile->Former bridge and the classifier's 1x1 conv; [`Backbone::forward_stages`]
//!   returns the last map at each resolution (strides 2, 4, 8, 16, 32: the stem output or the
//!   last block before each stride-2 block, then the final map), five maps for every variant.
//! - Only the reference's variants' settings are implemented (`dw_conv='dw'`,
//!   `hyper_token_id=0`, `last_act='relu'`, which `MergeClassifier` maps to ReLU6,
//!   `cls_token_num=1`, `gbr_before_skip=False`, no branch drop); `DnaBlock` specs with `e1 == 1`
//!   or `e2 == 0` are rejected (the reference's conv-only `DnaBlock` reads a `drop_path` it
//!   never creates, and no variant uses it). The registry has no narrow form (`widths`).
//!
//! Checked: [`Config::num_params`] equals the reference's parameter count for all seven
//! variants (3.2M .. 14.0M with the 1000-way classifier, the README's figures) and the built
//! model's; [`Config::macs`] equals `torch.utils.flop_counter` on the reference (the README's
//! FLOPs are 2-9% higher); `tests/mobile_former_golden.rs` loads state_dicts of the vendored
//! reference (`scripts/make_mobile_former_fixture.py`: 26M's blocks with group_num 4, 294M's
//! first three blocks, narrow tokens) by name and matches its pre-logits and logits to ~1e-6.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::Init;
use serde::{Deserialize, Serialize};

use crate::layers::{drop_path, BatchNorm, LayerNorm};
use crate::store::Vb;
use crate::{Backbone, Mode};

const LN_EPS: f64 = 1e-5;
/// Heads of the Mobile<->Former bridges (`attn_num_heads=2`).
const BRIDGE_HEADS: usize = 2;
/// Heads of the Former (`GlobalBlock`'s default).
const FORMER_HEADS: usize = 4;
/// `hyper_reduction_ratio`: the dynamic-ReLU MLP squeezes D to D/4.
const HYPER_REDUCTION: usize = 4;
/// `last_exp`: the classifier's 1x1 conv widens C to 6C.
const LAST_EXP: usize = 6;
/// `GlobalBlock.ffn_exp`.
const FFN_EXP: usize = 2;

/// The two block types of `dna_blocks.py`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    /// dw (e1, stride) -> pw -> dw (e2) -> pw, with an inner residual; conv-only if e2 == 0.
    DnaBlock3,
    /// pw (e1) -> dw (stride) -> pw: an inverted bottleneck.
    DnaBlock,
}

/// One row of the reference's `dna_blocks` table: `[type, e1, c, n, stride, e2]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    pub kind: BlockKind,
    pub e1: usize,
    /// Output channels.
    pub c: usize,
    /// Repeats (the first has `stride`, the others stride 1).
    pub n: usize,
    pub stride: usize,
    pub e2: usize,
}

const fn b3(e1: usize, c: usize, stride: usize, e2: usize) -> BlockConfig {
    BlockConfig { kind: BlockKind::DnaBlock3, e1, c, n: 1, stride, e2 }
}

const fn b(e1: usize, c: usize, e2: usize) -> BlockConfig {
    BlockConfig { kind: BlockKind::DnaBlock, e1, c, n: 1, stride: 1, e2 }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub blocks: Vec<BlockConfig>,
    pub in_chans: usize,
    pub stem_chs: usize,
    pub token_num: usize,
    pub token_dim: usize,
    /// Width of the pre-logits features (`MergeClassifier`'s `oup`).
    pub num_features: usize,
    /// Groups of every pointwise conv (4 in 26M, else 1), with channel shuffles.
    pub group_num: usize,
    #[serde(default)]
    pub drop_path_rate: f64,
}

impl Config {
    fn new(
        blocks: &[BlockConfig],
        stem_chs: usize,
        (token_num, token_dim): (usize, usize),
        num_features: usize,
        group_num: usize,
        in_chans: usize,
    ) -> Self {
        Self {
            blocks: blocks.to_vec(),
            in_chans,
            stem_chs,
            token_num,
            token_dim,
            num_features,
            group_num,
            drop_path_rate: 0.0,
        }
    }

    pub fn mf508m(in_chans: usize) -> Self {
        let blocks = [
            b3(2, 24, 1, 0),
            b3(6, 40, 2, 4),
            b(3, 40, 3),
            b3(6, 72, 2, 4),
            b(3, 72, 3),
            b3(6, 128, 2, 4),
            b(4, 128, 4),
            b(6, 176, 4),
            b(6, 176, 4),
            b3(6, 240, 2, 4),
            b(6, 240, 4),
            b(6, 240, 4),
        ];
        Self::new(&blocks, 24, (6, 192), 1920, 1, in_chans)
    }

    pub fn mf294m(in_chans: usize) -> Self {
        let blocks = [
            b3(2, 16, 1, 0),
            b3(6, 24, 2, 4),
            b(4, 24, 4),
            b3(6, 48, 2, 4),
            b(4, 48, 4),
            b3(6, 96, 2, 4),
            b(4, 96, 4),
            b(6, 128, 4),
            b(6, 128, 4),
            b3(6, 192, 2, 4),
            b(6, 192, 4),
            b(6, 192, 4),
        ];
        Self::new(&blocks, 16, (6, 192), 1920, 1, in_chans)
    }

    pub fn mf214m(in_chans: usize) -> Self {
        let blocks = [
            b3(2, 12, 1, 0),
            b3(6, 20, 2, 4),
            b(3, 20, 4),
            b3(6, 40, 2, 4),
            b(4, 40, 4),
            b3(6, 80, 2, 4),
            b(4, 80, 4),
            b(6, 112, 4),
            b(6, 112, 4),
            b3(6, 160, 2, 4),
            b(6, 160, 4),
            b(6, 160, 4),
        ];
        Self::new(&blocks, 12, (6, 192), 1600, 1, in_chans)
    }

    pub fn mf151m(in_chans: usize) -> Self {
        let blocks = [
            b3(2, 12, 1, 0),
            b3(6, 16, 2, 4),
            b(3, 16, 3),
            b3(6, 32, 2, 4),
            b(3, 32, 3),
            b3(6, 64, 2, 4),
            b(4, 64, 4),
            b(6, 88, 4),
            b(6, 88, 4),
            b3(6, 128, 2, 4),
            b(6, 128, 4),
            b(6, 128, 4),
        ];
        Self::new(&blocks, 12, (6, 192), 1280, 1, in_chans)
    }

    pub fn mf96m(in_chans: usize) -> Self {
        let blocks = [
            b3(2, 12, 1, 0),
            b3(6, 16, 2, 4),
            b3(6, 32, 2, 4),
            b(3, 32, 3),
            b3(6, 64, 2, 4),
            b(4, 64, 4),
            b(6, 88, 4),
            b3(6, 128, 2, 4),
            b(6, 128, 4),
        ];
        Self::new(&blocks, 12, (4, 128), 1280, 1, in_chans)
    }

    /// 52M and 26M share their blocks; 26M groups its pointwise convs by 4.
    const BLOCKS_52M: [BlockConfig; 9] = [
        b3(3, 12, 2, 0),
        b(3, 12, 3),
        b3(6, 24, 2, 4),
        b(3, 24, 3),
        b3(6, 48, 2, 4),
        b(4, 48, 4),
        b(6, 64, 4),
        b3(6, 96, 2, 4),
        b(6, 96, 4),
    ];

    pub fn mf52m(in_chans: usize) -> Self {
        Self::new(&Self::BLOCKS_52M, 8, (3, 128), 1024, 1, in_chans)
    }

    pub fn mf26m(in_chans: usize) -> Self {
        Self::new(&Self::BLOCKS_52M, 8, (3, 128), 1024, 4, in_chans)
    }

    pub fn with_drop_path_rate(mut self, rate: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&rate) {
            candle_core::bail!("mobile_former: drop_path_rate must lie in [0, 1), got {rate}")
        }
        self.drop_path_rate = rate;
        Ok(self)
    }

    /// Every block expanded (`n` repeats), with its input channels and the index of its spec.
    fn expanded(&self) -> Vec<(usize, usize, BlockConfig)> {
        let mut out = Vec::new();
        let mut inp = self.stem_chs;
        for (idx, spec) in self.blocks.iter().enumerate() {
            for i in 0..spec.n {
                let stride = if i == 0 { spec.stride } else { 1 };
                out.push((idx, inp, BlockConfig { stride, n: 1, ..*spec }));
                inp = spec.c;
            }
        }
        out
    }

    /// Channels of the last block's map.
    pub fn last_channels(&self) -> usize {
        self.blocks.last().map_or(self.stem_chs, |s| s.c)
    }

    /// Checks the shapes the reference's reshapes need.
    pub fn validate(&self) -> Result<()> {
        let (d, g) = (self.token_dim, self.group_num);
        let bad = |what: String| -> Result<()> { candle_core::bail!("mobile_former: {what}") };
        if self.blocks.is_empty() || self.in_chans == 0 || self.stem_chs == 0 || self.token_num == 0 || g == 0 {
            return bad(format!("needs blocks, in_chans, stem_chs, token_num and group_num > 0: {self:?}"));
        }
        if d == 0 || !d.is_multiple_of(FORMER_HEADS) || !d.is_multiple_of(HYPER_REDUCTION) {
            return bad(format!("token_dim {d} must be a positive multiple of {FORMER_HEADS}"));
        }
        for (_, inp, s) in self.expanded() {
            let conv_only = conv_only(&s);
            if s.kind == BlockKind::DnaBlock && conv_only {
                return bad(format!("a DnaBlock needs e1 > 1 and e2 > 0, got {s:?}"));
            }
            if s.e1 == 0 || s.c == 0 || !(1..=2).contains(&s.stride) {
                return bad(format!("block {s:?}: e1 and c must be positive, stride 1 or 2"));
            }
            // Bridges split the channels into 2 heads; grouped convs need whole groups.
            let widths = [inp, s.c, inp * s.e1, s.c * s.e2];
            let even = inp.is_multiple_of(BRIDGE_HEADS) && s.c.is_multiple_of(BRIDGE_HEADS);
            if !conv_only && !even {
                return bad(format!("block {s:?} on {inp} channels: bridge widths must be even"));
            }
            if !widths.iter().all(|w| w.is_multiple_of(g)) {
                return bad(format!("block {s:?} on {inp} channels: widths {widths:?} must divide by {g} groups"));
            }
        }
        if !self.last_channels().is_multiple_of(BRIDGE_HEADS) {
            return bad(format!("the last map's {} channels must be even", self.last_channels()));
        }
        Ok(())
    }

    /// Trainable parameters, plus a `classes`-way classifier when `classes > 0` (the paper's
    /// counts include the 1000-way one). `classifier.fc` (pre-logits) is always counted.
    pub fn num_params(&self, classes: usize) -> usize {
        let (d, g) = (self.token_dim, self.group_num);
        let bn = |c: usize| 2 * c;
        let dw = |c_out: usize| 9 * c_out + bn(c_out);
        let pw = |c_in: usize, c_out: usize| c_in / g * c_out + bn(c_out);
        let hyper = |c: usize| d * (d / HYPER_REDUCTION) + d / HYPER_REDUCTION + (d / HYPER_REDUCTION) * 2 * c + 2 * c;
        let l2g = |c: usize| 3 * d * c + 2 * c + d + 2 * d;
        let former = 2 * (d * d + d) + 2 * d + (d * FFN_EXP * d + FFN_EXP * d) + (FFN_EXP * d * d + d) + 2 * d;
        let g2l = |c: usize| 2 * (d * c + c);
        let mut n = self.token_num * d + self.in_chans * self.stem_chs * 9 + bn(self.stem_chs);
        for (_, inp, s) in self.expanded() {
            let (h1, oup) = (inp * s.e1, s.c);
            n += match (s.kind, conv_only(&s)) {
                (_, true) => dw(h1) + pw(h1, oup),
                (BlockKind::DnaBlock3, false) => {
                    let h2 = oup * s.e2;
                    dw(h1) + hyper(h1) + pw(h1, oup) + dw(h2) + hyper(h2) + pw(h2, oup)
                }
                (BlockKind::DnaBlock, false) => pw(inp, h1) + hyper(h1) + dw(h1) + hyper(h1) + pw(h1, oup),
            };
            if !conv_only(&s) {
                n += l2g(inp) + former + g2l(oup);
            }
        }
        let (c, nf) = (self.last_channels(), self.num_features);
        n += l2g(c) + pw(c, LAST_EXP * c) + (LAST_EXP * c + d) * nf + nf + bn(nf);
        n + if classes > 0 { nf * classes + classes } else { 0 }
    }

    /// Multiply-accumulates of one `size x size` forward with a 1000-way classifier, counting
    /// convs, Linear layers (once per token) and the attention products, as
    /// `torch.utils.flop_counter` does (no norms or elementwise ops). The README's FLOPs are
    /// 2-9% higher (they must count something more; it does not say what).
    pub fn macs(&self, size: usize) -> usize {
        let (d, g, t) = (self.token_dim, self.group_num, self.token_num);
        let out_side = |side: usize, stride: usize| (side + 2 - 3) / stride + 1;
        let hyper = |c: usize| d * (d / HYPER_REDUCTION) + (d / HYPER_REDUCTION) * 2 * c;
        // q, alpha, scores, weighted sum, proj.
        let l2g = |c: usize, hw: usize| 2 * t * d * c + 2 * t * hw * c + t * c * d;
        let former = 2 * t * d * d + 2 * t * t * d + 2 * FFN_EXP * t * d * d;
        let g2l = |c: usize, hw: usize| 2 * t * d * c + 2 * hw * t * c;
        let mut side = out_side(size, 2);
        let mut macs = side * side * self.in_chans * self.stem_chs * 9;
        for (_, inp, s) in self.expanded() {
            let (h1, oup) = (inp * s.e1, s.c);
            let hw_in = side * side;
            side = out_side(side, s.stride);
            let hw = side * side;
            macs += match (s.kind, conv_only(&s)) {
                (_, true) => hw * (9 * h1 + h1 / g * oup),
                (BlockKind::DnaBlock3, false) => {
                    let h2 = oup * s.e2;
                    hw * (9 * h1 + h1 / g * oup + 9 * h2 + h2 / g * oup) + hyper(h1) + hyper(h2)
                }
                (BlockKind::DnaBlock, false) => hw_in * inp / g * h1 + hw * (9 * h1 + h1 / g * oup) + 2 * hyper(h1),
            };
            if !conv_only(&s) {
                macs += l2g(inp, hw_in) + former + g2l(oup, hw);
            }
        }
        let (c, nf) = (self.last_channels(), self.num_features);
        macs + l2g(c, side * side) + side * side * c / g * LAST_EXP * c + (LAST_EXP * c + d) * nf + nf * 1000
    }
}

fn conv_only(s: &BlockConfig) -> bool {
    s.e1 == 1 || s.e2 == 0
}

/// `Linear` with the reference's init: weight N(0, 0.01), bias 0.
fn linear(d_in: usize, d_out: usize, vb: Vb) -> Result<selfsup_ops::linear::Linear> {
    let w = vb.params.get_with_hints((d_out, d_in), "weight", Init::Randn { mean: 0.0, stdev: 0.01 })?;
    let b = vb.params.get_with_hints(d_out, "bias", Init::Const(0.0))?;
    Ok(selfsup_ops::linear::Linear::new(w, Some(b)))
}

/// `ReLU6(x + 3) / 6`.
fn h_sigmoid(xs: &Tensor) -> Result<Tensor> {
    (xs + 3.0)?.clamp(0f32, 6f32)? / 6.0
}

fn h_swish(xs: &Tensor) -> Result<Tensor> {
    xs * h_sigmoid(xs)?
}

fn relu6(xs: &Tensor) -> Result<Tensor> {
    xs.clamp(0f32, 6f32)
}

/// `ChannelShuffle(groups)` on the last axis: channel `i * (c / groups) + j` moves to
/// `j * groups + i`.
fn channel_shuffle(xs: &Tensor, groups: usize) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let c = dims[dims.len() - 1];
    let mut split = dims[..dims.len() - 1].to_vec();
    split.extend([groups, c / groups]);
    let r = split.len();
    xs.reshape(split)?.transpose(r - 2, r - 1)?.contiguous()?.reshape(dims)
}

/// Timm's `DropPath` on tokens (b, T, D) as the reference's `(T, b, D)` layout draws it: one
/// decision per token, shared by the batch.
fn drop_path_tokens(ts: &Tensor, p: f64, key: u64, layer: u64) -> Result<Tensor> {
    drop_path(&ts.transpose(0, 1)?, p, key, layer)?.transpose(0, 1)?.contiguous()
}

/// Softmax over the last axis with a backward.
fn softmax(xs: &Tensor) -> Result<Tensor> {
    selfsup_ops::softmax::softmax_last_dim(xs)
}

/// `Conv2d` (no bias) + `BatchNorm2d`, each `nn.Sequential` index named by the caller.
struct ConvBn {
    weight: Tensor,
    kind: ConvKind,
    bn: BatchNorm,
}

#[derive(Debug, Clone, Copy)]
enum ConvKind {
    /// Dense 3x3 (the stem).
    Dense { stride: usize },
    /// Depthwise 3x3 with a channel multiplier.
    Depthwise { stride: usize },
    /// 1x1 with `groups` groups.
    Pointwise { groups: usize },
}

impl ConvBn {
    /// `conv` and `bn` are the names of the conv and its BatchNorm under `vb`.
    fn new(c_in: usize, c_out: usize, kind: ConvKind, vb: &Vb, conv: &str, bn: &str) -> Result<Self> {
        let (k, c_in_w) = match kind {
            ConvKind::Dense { .. } => (3, c_in),
            ConvKind::Depthwise { .. } => (3, 1),
            ConvKind::Pointwise { groups } => (1, c_in / groups),
        };
        let stdev = (2.0 / (k * k * c_out) as f64).sqrt();
        let weight =
            vb.pp(conv).params.get_with_hints((c_out, c_in_w, k, k), "weight", Init::Randn { mean: 0.0, stdev })?;
        Ok(Self { weight, kind, bn: BatchNorm::new(c_out, vb.pp(bn))? })
    }

    /// xs: (b, h, w, c_in) -> (b, h', w', c_out)
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let ys = match self.kind {
            ConvKind::Dense { stride } => selfsup_ops::conv2d_nhwc(xs, &self.weight, stride, 1)?,
            ConvKind::Depthwise { stride } => {
                selfsup_ops::dwconv::depthwise_conv2d_nhwc(xs, &self.weight, None, stride, 1)?
            }
            ConvKind::Pointwise { groups: 1 } => selfsup_ops::conv2d_nhwc(xs, &self.weight, 1, 0)?,
            ConvKind::Pointwise { groups } => {
                // One matmul per group, batched: (g, n, c_in/g) x (g, c_in/g, c_out/g).
                let (b, h, w, c) = xs.dims4()?;
                let c_out = self.weight.dim(0)?;
                let n = b * h * w;
                let xs = xs.reshape((n, groups, c / groups))?.transpose(0, 1)?.contiguous()?;
                let wt = self.weight.reshape((groups, c_out / groups, c / groups))?.transpose(1, 2)?.contiguous()?;
                xs.matmul(&wt)?.transpose(0, 1)?.contiguous()?.reshape((b, h, w, c_out))?
            }
        };
        self.bn.forward_t(&ys, train)
    }
}

/// `HyperFunc`: dynamic-ReLU coefficients (b, 2C) from token 0 (b, D).
struct HyperFunc {
    fc1: selfsup_ops::linear::Linear,
    fc2: selfsup_ops::linear::Linear,
}

impl HyperFunc {
    fn new(d: usize, c: usize, vb: Vb) -> Result<Self> {
        let vb = vb.pp("hyper");
        Ok(Self { fc1: linear(d, d / HYPER_REDUCTION, vb.pp(0))?, fc2: linear(d / HYPER_REDUCTION, 2 * c, vb.pp(2))? })
    }

    /// xs: (b, h, w, c), token0: (b, D) -> `max(x a1, x a2)` (`DyReLU`, num_func 2, scale 2).
    fn dy_relu(&self, xs: &Tensor, token0: &Tensor) -> Result<Tensor> {
        let c = xs.dim(3)?;
        let a = h_sigmoid(&self.fc2.forward(&self.fc1.forward(token0)?.relu()?)?)?;
        let a = a.reshape((a.dim(0)?, 1, 1, 2 * c))?;
        let a1 = (((a.narrow(3, 0, c)? - 0.5)? * 2.0)? + 1.0)?;
        let a2 = ((a.narrow(3, c, c)? - 0.5)? * 2.0)?;
        xs.broadcast_mul(&a1)?.maximum(&xs.broadcast_mul(&a2)?)
    }
}

/// Mobile->Former (`Local2Global`): tokens attend to the map's positions.
struct Local2Global {
    q: selfsup_ops::linear::Linear,
    alpha: selfsup_ops::linear::Linear,
    proj: selfsup_ops::linear::Linear,
    layer_norm: LayerNorm,
    drop_path: f64,
    layer: u64,
}

impl Local2Global {
    fn new(c: usize, d: usize, drop_path: f64, layer: u64, vb: Vb) -> Result<Self> {
        Ok(Self {
            q: linear(d, c, vb.pp("q"))?,
            alpha: linear(d, c, vb.pp("alpha.0"))?,
            proj: linear(c, d, vb.pp("proj"))?,
            layer_norm: LayerNorm::new(d, LN_EPS, vb.pp("layer_norm"))?,
            drop_path,
            layer,
        })
    }

    /// xs: (b, h, w, c), tokens: (b, T, D) -> tokens (b, T, D).
    fn forward(&self, xs: &Tensor, tokens: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let t = tokens.dim(1)?;
        let dh = c / BRIDGE_HEADS;
        let q = self.q.forward(tokens)?.reshape((b, t, BRIDGE_HEADS, dh))?.transpose(1, 2)?.contiguous()?;
        // Keys and values: the raw map, channels split into heads: (b, heads, hw, dh).
        let k = xs.reshape((b, h * w, BRIDGE_HEADS, dh))?.transpose(1, 2)?.contiguous()?;
        let attn = softmax(&(q.matmul(&k.transpose(2, 3)?)? * (dh as f64).powf(-0.5))?)?;
        let t_a = attn.matmul(&k)?.transpose(1, 2)?.reshape((b, t, c))?;
        let alp = (h_sigmoid(&self.alpha.forward(tokens)?)? * 2.0)?;
        let mut t_sum = self.proj.forward(&(t_a * alp)?)?;
        if let Mode::Train { key } = mode {
            t_sum = drop_path_tokens(&t_sum, self.drop_path, key, self.layer)?;
        }
        self.layer_norm.forward(&(tokens + t_sum)?)
    }
}

/// Former (`GlobalBlock`): token self-attention (keys = values = tokens) and an FFN.
struct GlobalBlock {
    q: selfsup_ops::linear::Linear,
    channel_mlp: selfsup_ops::linear::Linear,
    layer_norm: LayerNorm,
    ffn1: selfsup_ops::linear::Linear,
    ffn2: selfsup_ops::linear::Linear,
    ffn_norm: LayerNorm,
    drop_path: f64,
    layer: u64,
}

impl GlobalBlock {
    fn new(d: usize, drop_path: f64, layer: u64, vb: Vb) -> Result<Self> {
        Ok(Self {
            q: linear(d, d, vb.pp("q"))?,
            channel_mlp: linear(d, d, vb.pp("channel_mlp"))?,
            layer_norm: LayerNorm::new(d, LN_EPS, vb.pp("layer_norm"))?,
            ffn1: linear(d, FFN_EXP * d, vb.pp("ffn.0"))?,
            ffn2: linear(FFN_EXP * d, d, vb.pp("ffn.2"))?,
            ffn_norm: LayerNorm::new(d, LN_EPS, vb.pp("ffn_norm"))?,
            drop_path,
            layer,
        })
    }

    /// tokens: (b, T, D) -> same.
    fn forward(&self, tokens: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, t, d) = tokens.dims3()?;
        let dh = d / FORMER_HEADS;
        let heads = |x: &Tensor| x.reshape((b, t, FORMER_HEADS, dh))?.transpose(1, 2)?.contiguous();
        let (q, k) = (heads(&self.q.forward(tokens)?)?, heads(tokens)?);
        let attn = softmax(&(q.matmul(&k.transpose(2, 3)?)? * (dh as f64).powf(-0.5))?)?;
        let t_a = attn.matmul(&k)?.transpose(1, 2)?.reshape((b, t, d))?;
        let mut t_sum = self.channel_mlp.forward(&t_a)?;
        if let Mode::Train { key } = mode {
            t_sum = drop_path_tokens(&t_sum, self.drop_path, key, self.layer)?;
        }
        let tokens = self.layer_norm.forward(&(tokens + t_sum)?)?;
        let ffn = self.ffn2.forward(&selfsup_ops::gelu::gelu_erf(&self.ffn1.forward(&tokens)?)?)?;
        self.ffn_norm.forward(&(tokens + ffn)?)
    }
}

/// Former->Mobile (`Global2Local`): the map's positions attend to the tokens.
struct Global2Local {
    k: selfsup_ops::linear::Linear,
    proj: selfsup_ops::linear::Linear,
    drop_path: f64,
    layer: u64,
}

impl Global2Local {
    fn new(c: usize, d: usize, drop_path: f64, layer: u64, vb: Vb) -> Result<Self> {
        Ok(Self { k: linear(d, c, vb.pp("k"))?, proj: linear(d, c, vb.pp("proj"))?, drop_path, layer })
    }

    /// xs: (b, h, w, c), tokens: (b, T, D) -> (b, h, w, c).
    fn forward(&self, xs: &Tensor, tokens: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let t = tokens.dim(1)?;
        let dh = c / BRIDGE_HEADS;
        let heads = |x: &Tensor| x.reshape((b, t, BRIDGE_HEADS, dh))?.transpose(1, 2)?.contiguous();
        let (k, v) = (heads(&self.k.forward(tokens)?)?, heads(&self.proj.forward(tokens)?)?);
        let q = xs.reshape((b, h * w, BRIDGE_HEADS, dh))?.transpose(1, 2)?.contiguous()?;
        let attn = softmax(&(q.matmul(&k.transpose(2, 3)?)? * (dh as f64).powf(-0.5))?)?;
        let mut g_a = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, h, w, c))?;
        if let Mode::Train { key } = mode {
            g_a = drop_path(&g_a, self.drop_path, key, self.layer)?;
        }
        xs + g_a
    }
}

/// The three bridges of a block: Mobile->Former, Former, Former->Mobile.
struct Bridges {
    local_global: Local2Global,
    global_block: GlobalBlock,
    global_local: Global2Local,
}

impl Bridges {
    fn new(inp: usize, oup: usize, d: usize, drop_path: f64, layer: u64, vb: &Vb) -> Result<Self> {
        Ok(Self {
            local_global: Local2Global::new(inp, d, drop_path, layer, vb.pp("local_global"))?,
            global_block: GlobalBlock::new(d, drop_path, layer + 1, vb.pp("global_block"))?,
            global_local: Global2Local::new(oup, d, drop_path, layer + 2, vb.pp("global_local"))?,
        })
    }

    /// Mobile->Former then Former: the tokens a block's dynamic ReLUs and Former->Mobile read.
    fn tokens(&self, xs: &Tensor, tokens: &Tensor, mode: Mode) -> Result<Tensor> {
        self.global_block.forward(&self.local_global.forward(xs, tokens, mode)?, mode)
    }
}

/// `DnaBlock3` with `e1 == 1 or e2 == 0`: dw -> BN -> ReLU6 -> [shuffle] -> pw -> BN.
struct ConvOnly {
    dw: ConvBn,
    pw: ConvBn,
    shuffle: Option<usize>,
}

/// `DnaBlock3`: dw -> pw -> dw -> pw with dynamic ReLUs and an inner residual.
struct DnaBlock3 {
    conv1: ConvBn,
    hyper1: HyperFunc,
    conv2: ConvBn,
    conv3: ConvBn,
    hyper3: HyperFunc,
    conv4: ConvBn,
    /// Shuffle groups after conv1 and conv3 (`inp`, `oup`) when `group_num > 1`.
    shuffles: Option<(usize, usize)>,
    bridges: Bridges,
}

/// `DnaBlock`: pw -> dw -> pw with dynamic ReLUs.
struct DnaBlock {
    conv1: ConvBn,
    hyper1: HyperFunc,
    conv2: ConvBn,
    hyper2: HyperFunc,
    conv3: ConvBn,
    shuffle: Option<usize>,
    bridges: Bridges,
}

enum Body {
    ConvOnly(ConvOnly),
    DnaBlock3(DnaBlock3),
    DnaBlock(DnaBlock),
}

/// One entry of `features`.
struct Block {
    body: Body,
    identity: bool,
    stride: usize,
    /// Drop probability of the conv branch and the key of its draw.
    drop_path: f64,
    layer: u64,
}

impl Block {
    /// Block `index` (over expanded blocks) of spec `spec_idx`, on `inp` channels.
    fn new(cfg: &Config, spec_idx: usize, index: usize, inp: usize, s: &BlockConfig, vb: Vb) -> Result<Self> {
        let (g, d, oup) = (cfg.group_num, cfg.token_dim, s.c);
        let shuffle = |groups: usize| (g > 1).then_some(groups);
        let rate = cfg.drop_path_rate * (spec_idx + 1) as f64 / cfg.blocks.len() as f64;
        // Four draws per block: the three bridges, then the conv branch.
        let layer = 4 * index as u64;
        let pw = ConvKind::Pointwise { groups: g };
        let body = match (s.kind, conv_only(s)) {
            (_, true) => {
                let dw =
                    ConvBn::new(inp, inp * s.e1, ConvKind::Depthwise { stride: s.stride }, &vb, "conv.0", "conv.1")?;
                let pw = ConvBn::new(inp * s.e1, oup, pw, &vb, "conv.4", "conv.5")?;
                Body::ConvOnly(ConvOnly { dw, pw, shuffle: shuffle(inp) })
            }
            (BlockKind::DnaBlock3, false) => {
                let (h1, h2) = (inp * s.e1, oup * s.e2);
                let dw1 = ConvKind::Depthwise { stride: s.stride };
                Body::DnaBlock3(DnaBlock3 {
                    conv1: ConvBn::new(inp, h1, dw1, &vb, "conv1.0", "conv1.1")?,
                    hyper1: HyperFunc::new(d, h1, vb.pp("hyper1"))?,
                    conv2: ConvBn::new(h1, oup, pw, &vb, "conv2.0", "conv2.1")?,
                    conv3: ConvBn::new(oup, h2, ConvKind::Depthwise { stride: 1 }, &vb, "conv3.0", "conv3.1")?,
                    hyper3: HyperFunc::new(d, h2, vb.pp("hyper3"))?,
                    conv4: ConvBn::new(h2, oup, pw, &vb, "conv4.0", "conv4.1")?,
                    shuffles: (g > 1).then_some((inp, oup)),
                    bridges: Bridges::new(inp, oup, d, rate, layer, &vb)?,
                })
            }
            (BlockKind::DnaBlock, false) => {
                let h = inp * s.e1;
                Body::DnaBlock(DnaBlock {
                    conv1: ConvBn::new(inp, h, pw, &vb, "conv1.0", "conv1.1")?,
                    hyper1: HyperFunc::new(d, h, vb.pp("hyper1"))?,
                    conv2: ConvBn::new(h, h, ConvKind::Depthwise { stride: s.stride }, &vb, "conv2.0", "conv2.1")?,
                    hyper2: HyperFunc::new(d, h, vb.pp("hyper2"))?,
                    conv3: ConvBn::new(h, oup, pw, &vb, "conv3.0", "conv3.1")?,
                    shuffle: shuffle(g),
                    bridges: Bridges::new(inp, oup, d, rate, layer, &vb)?,
                })
            }
        };
        let identity = s.stride == 1 && inp == oup;
        Ok(Self { body, identity, stride: s.stride, drop_path: rate, layer: layer + 3 })
    }

    fn drop(&self, xs: Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Train { key } => drop_path(&xs, self.drop_path, key, self.layer),
            Mode::Eval => Ok(xs),
        }
    }

    /// xs: (b, h, w, inp), tokens: (b, T, D) -> (map (b, h', w', oup), tokens).
    fn forward(&self, xs: &Tensor, tokens: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let train = mode.is_train();
        let shuffle = |ys: Tensor, groups: Option<usize>| match groups {
            Some(g) => channel_shuffle(&ys, g),
            None => Ok(ys),
        };
        match &self.body {
            Body::ConvOnly(m) => {
                let ys = relu6(&m.dw.forward(xs, train)?)?;
                let ys = m.pw.forward(&shuffle(ys, m.shuffle)?, train)?;
                let ys = if self.identity { (ys + xs)? } else { ys };
                Ok((ys, tokens.clone()))
            }
            Body::DnaBlock3(m) => {
                let tokens = m.bridges.tokens(xs, tokens, mode)?;
                let token0 = tokens.narrow(1, 0, 1)?.squeeze(1)?;
                let ys = shuffle(m.conv1.forward(xs, train)?, m.shuffles.map(|s| s.0))?;
                let ys = m.conv2.forward(&m.hyper1.dy_relu(&ys, &token0)?, train)?;
                let out_cp = ys.clone();
                let ys = shuffle(m.conv3.forward(&ys, train)?, m.shuffles.map(|s| s.1))?;
                let ys = m.conv4.forward(&m.hyper3.dy_relu(&ys, &token0)?, train)?;
                let ys = (self.drop(ys, mode)? + out_cp)?;
                let ys = m.bridges.global_local.forward(&ys, &tokens, mode)?;
                let ys = if self.identity { (ys + xs)? } else { ys };
                Ok((ys, tokens))
            }
            Body::DnaBlock(m) => {
                let tokens = m.bridges.tokens(xs, tokens, mode)?;
                let token0 = tokens.narrow(1, 0, 1)?.squeeze(1)?;
                let ys = shuffle(m.conv1.forward(xs, train)?, m.shuffle)?;
                let ys = m.conv2.forward(&m.hyper1.dy_relu(&ys, &token0)?, train)?;
                let ys = shuffle(m.conv3.forward(&m.hyper2.dy_relu(&ys, &token0)?, train)?, m.shuffle)?;
                let ys = if self.identity { (self.drop(ys, mode)? + xs)? } else { ys };
                Ok((m.bridges.global_local.forward(&ys, &tokens, mode)?, tokens))
            }
        }
    }
}

/// `MergeClassifier` up to the pre-logits (its Dropout and final Linear are the head).
struct MergeClassifier {
    conv: ConvBn,
    shuffle: Option<usize>,
    fc: selfsup_ops::linear::Linear,
    fc_bn: BatchNorm,
}

/// A Mobile-Former backbone: everything but the final classifier Linear.
pub struct MobileFormer {
    tokens: Tensor,
    stem: ConvBn,
    features: Vec<Block>,
    local_global: Local2Global,
    classifier: MergeClassifier,
    cfg: Config,
}

impl MobileFormer {
    pub fn new(cfg: &Config, vb: Vb) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.token_dim;
        let tokens =
            vb.params.get_with_hints((cfg.token_num, d), "tokens.weight", Init::Randn { mean: 0.0, stdev: 1.0 })?;
        let stem = ConvBn::new(cfg.in_chans, cfg.stem_chs, ConvKind::Dense { stride: 2 }, &vb, "stem.0", "stem.1")?;
        let expanded = cfg.expanded();
        let mut features = Vec::with_capacity(expanded.len());
        for (index, (spec_idx, inp, s)) in expanded.iter().enumerate() {
            features.push(Block::new(cfg, *spec_idx, index, *inp, s, vb.pp(format!("features.{index}")))?);
        }
        let c = cfg.last_channels();
        let last = 4 * expanded.len() as u64;
        let local_global = Local2Global::new(c, d, cfg.drop_path_rate, last, vb.pp("local_global"))?;
        let head = vb.pp("classifier");
        let g = cfg.group_num;
        let classifier = MergeClassifier {
            conv: ConvBn::new(c, LAST_EXP * c, ConvKind::Pointwise { groups: g }, &head, "conv.1", "conv.2")?,
            shuffle: (g > 1).then_some(g),
            fc: linear(LAST_EXP * c + d, cfg.num_features, head.pp("fc.0"))?,
            fc_bn: BatchNorm::new(cfg.num_features, head.pp("fc.1"))?,
        };
        Ok(Self { tokens, stem, features, local_global, classifier, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// xs: (b, c, h, w) -> (the last map of each resolution, channels-last; the final tokens
    /// (b, T, D) after the last block).
    pub fn forward_stages_nhwc(&self, xs: &Tensor, mode: Mode) -> Result<(Vec<Tensor>, Tensor)> {
        let (b, c, _, _) = xs.dims4()?;
        if c != self.cfg.in_chans {
            candle_core::bail!("mobile_former: input has {c} channels, the model expects {}", self.cfg.in_chans)
        }
        let xs = xs.permute((0, 2, 3, 1))?.contiguous()?;
        let mut tokens = self.tokens.unsqueeze(0)?.repeat((b, 1, 1))?;
        let mut xs = relu6(&self.stem.forward(&xs, mode.is_train())?)?;
        let mut stages = Vec::with_capacity(5);
        for block in &self.features {
            if block.stride > 1 {
                stages.push(xs.clone());
            }
            (xs, tokens) = block.forward(&xs, &tokens, mode)?;
        }
        stages.push(xs);
        Ok((stages, tokens))
    }

    /// xs: (b, c, h, w) -> the pre-logits features (b, num_features): everything of the
    /// reference's forward up to `classifier.fc`, before Dropout and the classifier Linear.
    pub fn forward_pre_logits(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let (mut stages, tokens) = self.forward_stages_nhwc(xs, mode)?;
        let xs = stages.pop().expect("at least one stage");
        let tokens = self.local_global.forward(&xs, &tokens, mode)?;
        let head = &self.classifier;
        let xs = match head.shuffle {
            Some(g) => channel_shuffle(&xs, g)?,
            None => xs,
        };
        let xs = relu6(&head.conv.forward(&xs, mode.is_train())?)?;
        let pooled = h_swish(&xs.mean((1, 2))?)?;
        let token0 = tokens.narrow(1, 0, 1)?.squeeze(1)?;
        let ys = head.fc.forward(&Tensor::cat(&[pooled, token0], D::Minus1)?)?;
        h_swish(&head.fc_bn.forward_t(&ys, mode.is_train())?)
    }
}

impl Backbone for MobileFormer {
    fn forward_features(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_stages_nhwc(xs, mode)?.0.pop().expect("at least one stage").permute((0, 3, 1, 2))
    }

    fn forward_stages(&self, xs: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        self.forward_stages_nhwc(xs, mode)?.0.into_iter().map(|t| t.permute((0, 3, 1, 2))).collect()
    }

    fn forward_pooled(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_pre_logits(xs, mode)
    }

    fn num_features(&self) -> usize {
        self.cfg.num_features
    }

    fn stride(&self) -> usize {
        32
    }
}

/// Maps a reference state_dict key to selfsup's: the names are the same; `None` for
/// `num_batches_tracked` and the final classifier `classifier.classifier.1.*` (the head).
pub fn remap_key(key: &str) -> Option<String> {
    if key.ends_with("num_batches_tracked") || key.starts_with("classifier.classifier.") {
        None
    } else {
        Some(key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Vars;
    use candle_core::{DType, Device};

    fn all() -> [(&'static str, Config); 7] {
        [
            ("26m", Config::mf26m(3)),
            ("52m", Config::mf52m(3)),
            ("96m", Config::mf96m(3)),
            ("151m", Config::mf151m(3)),
            ("214m", Config::mf214m(3)),
            ("294m", Config::mf294m(3)),
            ("508m", Config::mf508m(3)),
        ]
    }

    /// The README's parameter counts (with the 1000-way classifier), to its rounding; exactly
    /// the reference's `sum(p.numel())` (counted with the fixture script's vendored classes).
    #[test]
    fn parameter_counts_match_the_reference() {
        let readme = [3.2, 3.5, 4.6, 7.6, 9.4, 11.4, 14.0];
        let reference = [3_232_788, 3_469_092, 4_585_252, 7_595_828, 9_425_920, 11_422_648, 13_976_976];
        for (((name, cfg), m), exact) in all().iter().zip(readme).zip(reference) {
            let n = cfg.num_params(1000);
            assert_eq!(n, exact, "{name}");
            assert!((n as f64 / 1e6 - m).abs() <= 0.05, "{name}: {n} vs the README's {m}M");
        }
        // The built model holds exactly the counted parameters (without the classifier).
        let cfg = Config::mf26m(3);
        let vars = Vars::new(0);
        MobileFormer::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(vars.params.num_elements(), cfg.num_params(0));
        assert_eq!(cfg.num_params(0) + 1024 * 1000 + 1000, cfg.num_params(1000));
    }

    /// Multiply-accumulates at 224: exactly what `torch.utils.flop_counter` counts for the
    /// reference (convs, Linear layers, attention matmuls; FLOPs / 2), and within 10% of the
    /// README's FLOPs, which count a little more (2-3% more for 151M and up, 9% for 26M: the
    /// README does not say what; elementwise ops such as the dynamic ReLUs would fit).
    #[test]
    fn macs_match_the_reference() {
        let torch = [23_550_208, 49_290_496, 92_017_040, 146_249_168, 208_374_240, 286_732_160, 498_467_680];
        let readme = [26e6, 52e6, 96e6, 151e6, 214e6, 294e6, 508e6];
        for (((name, cfg), exact), m) in all().iter().zip(torch).zip(readme) {
            let macs = cfg.macs(224);
            assert_eq!(macs, exact, "{name}");
            assert!((macs as f64 / m - 1.0).abs() < 0.1, "{name}: {macs} vs the README's {m:.3e}");
        }
    }

    #[test]
    fn reference_names_and_shapes() {
        let vars = Vars::new(0);
        let m = MobileFormer::new(&Config::mf26m(1), vars.vb(DType::F32, &Device::Cpu)).unwrap();
        for name in [
            "tokens.weight",
            "stem.0.weight",
            "features.0.conv.0.weight",
            "features.0.conv.4.weight",
            "features.1.hyper2.hyper.2.bias",
            "features.2.conv4.0.weight",
            "features.2.local_global.alpha.0.weight",
            "features.2.global_block.ffn.2.weight",
            "features.2.global_local.k.bias",
            "local_global.layer_norm.weight",
            "classifier.conv.1.weight",
            "classifier.fc.0.weight",
            "classifier.fc.1.bias",
        ] {
            assert!(vars.params.get(name).is_some(), "{name}");
        }
        assert!(vars.buffers.get("classifier.fc.1.running_var").is_some());
        // Grouped pointwise weights hold c_in / 4 inputs per output.
        assert_eq!(vars.params.get("features.0.conv.4.weight").unwrap().dims(), [12, 6, 1, 1]);
        assert_eq!(remap_key("classifier.classifier.1.weight"), None);
        assert_eq!(remap_key("features.0.conv.1.num_batches_tracked"), None);
        assert_eq!(remap_key("classifier.fc.0.bias").as_deref(), Some("classifier.fc.0.bias"));
        let xs = Tensor::ones((2, 1, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let stages = m.forward_stages(&xs, Mode::Eval).unwrap();
        let dims: Vec<_> = stages.iter().map(|t| t.dims().to_vec()).collect();
        assert_eq!(dims, [[2, 8, 32, 32], [2, 12, 16, 16], [2, 24, 8, 8], [2, 64, 4, 4], [2, 96, 2, 2]]);
        assert_eq!(m.forward_pooled(&xs, Mode::Eval).unwrap().dims(), [2, 1024]);
        let bad = Tensor::ones((2, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
        assert!(m.forward_pooled(&bad, Mode::Eval).unwrap_err().to_string().contains("3 channels"));
    }

    /// Channel shuffle as `ChannelShuffle`: (g, c/g) -> (c/g, g).
    #[test]
    fn channel_shuffle_transposes_groups() {
        let xs = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((1, 1, 1, 6)).unwrap();
        let ys = channel_shuffle(&xs, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ys, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    fn bad_configs_are_errors() {
        let mut cfg = Config::mf52m(3);
        cfg.blocks[1].e2 = 0;
        assert!(cfg.validate().unwrap_err().to_string().contains("DnaBlock needs"));
        let cfg = Config { token_dim: 30, ..Config::mf52m(3) };
        assert!(cfg.validate().is_err());
        let cfg = Config { group_num: 5, ..Config::mf52m(3) };
        assert!(cfg.validate().unwrap_err().to_string().contains("groups"));
        assert!(Config::mf52m(3).with_drop_path_rate(1.0).is_err());
        // The registry: ids `mf26m`..`mf508m`, and no narrow form.
        assert_eq!(serde_json::to_string(&crate::Arch::Mf294m).unwrap(), "\"mf294m\"");
        let arch = serde_json::from_str("\"mf26m\"").unwrap();
        let model = crate::ModelConfig {
            arch,
            in_chans: 3,
            widths: Some(vec![8, 16]),
            drop_path_rate: 0.0,
            img_size: None,
            imagenet_stem: false,
            irpe: false,
        };
        assert!(model.family().unwrap_err().to_string().contains("`widths` is not supported"));
        let model = crate::ModelConfig { widths: None, ..model };
        assert_eq!(model.family().unwrap(), crate::Family::MobileFormer(Config::mf26m(3)));
        assert_eq!(model.cost(224).unwrap(), (Config::mf26m(3).num_params(0), Config::mf26m(3).macs(224)));
    }
}
