#!/usr/bin/env python3
"""PyTorch peers of benches/benches/train_step.rs, for `cargo xtask bench`.

The same five training steps, batch 32 at 64 px, full-width backbones, AdamW (lr 1e-4, betas
(0.9, 0.95), wd 0.05) and the objective's state update, timed as the mean of the steps after two
warm-up steps. PyTorch uses every core (as rayon does on the Rust side). The models are timm's
(resnet18, convnextv2_atto); the objective code follows the reference repositories as
METHODS.md describes them, written plainly:

- FCMAE: PyTorch has no submanifold conv, so its step is the masked-dense computation of the
  authors' JAX reference (mask before and after every depthwise and downsample conv, GRN over
  visible positions), the computation selfsup's `reference` row also does.
- LoMaR: ViT-Tiny/8 with LoMaR's iRPE contextual key bias (q @ table gathered by bucket),
  2 windows of 7x7 per image on the 8x8 grid, 39 of 49 masked.
- DenseCL: MoCo v2 + dense head, 65,536-key queues, keys encoded in 8 chunks (selfsup's
  single-device shuffle-BN).
- BYOL: 4096-256 projector/predictor, symmetric loss, EMA target.
- CARE: BYOL + 5 BoTNet blocks on layer3 (4x4 at 64 px), con + con2 + 100 fea, EMA teacher.

Usage: python3 benches/torch_train_step.py [out.json] (default target/criterion/torch-steps.json).
Exits 0 with a message if torch is missing (timm is needed by the ResNet steps only).

On a GPU (issues 6 and 8), the peers of `gpu-steps` (benches/src/bin/gpu_steps.rs):
SELFSUP_STEP_DEVICE=cuda SELFSUP_STEP_SIZE=224 SELFSUP_STEP_BATCH=128 runs FCMAE/ConvNeXt V2-atto
(masked dense) and LoMaR/ViT-B/16 (4 windows of 7x7, iRPE) at 224 px instead of the five
64 px steps, with a synchronize after every step; times are then the median step.
"""
import copy
import json
import os
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as e:
    print(f"torch_train_step.py: {e}; skipping the PyTorch column")
    sys.exit(0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = torch.device(os.environ.get("SELFSUP_STEP_DEVICE", "cpu"))
B = int(os.environ.get("SELFSUP_STEP_BATCH", "32"))
S = int(os.environ.get("SELFSUP_STEP_SIZE", "64"))
if DEV.type == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
else:
    torch.backends.cudnn.benchmark = True
torch.manual_seed(0)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)


@torch.no_grad()
def ema(target, online, m):
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(m).add_(o.detach(), alpha=1 - m)


def mlp_bn(d_in, hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


def regression(p, z):
    return (2 - 2 * (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(1)).mean()


def patchify(imgs, p):
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def norm_pix_mse(pred, target, removed):
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * removed).sum() / removed.sum()


# ----------------------------------------------------------------------------- FCMAE (masked dense)
class Grn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(d))
        self.beta = nn.Parameter(torch.zeros(d))

    def forward(self, x, m):  # x (n, h, w, c), m (n, h, w, 1)
        gx = torch.norm(x * m, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class CnxBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.grn = Grn(4 * d)

    def forward(self, x, m):  # x (n, c, h, w), m (n, 1, h, w)
        y = (self.dw(x * m) * m).permute(0, 2, 3, 1)
        mc = m.permute(0, 2, 3, 1)
        y = self.fc2(self.grn(F.gelu(self.fc1(self.norm(y))), mc)).permute(0, 3, 1, 2)
        return (x + y) * m


class MaskedConvNeXt(nn.Module):
    def __init__(self, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)):
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 4, 4)
        self.stem_norm = nn.LayerNorm(dims[0], eps=1e-6)
        self.down = nn.ModuleList(
            [nn.ModuleList([nn.LayerNorm(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], 2, 2)]) for i in range(1, 4)])
        self.stages = nn.ModuleList([nn.ModuleList([CnxBlock(d) for _ in range(n)]) for n, d in zip(depths, dims)])

    def forward(self, x, mask):  # mask (n, g, g), 1 = removed
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        vis = 1 - mask.unsqueeze(1).repeat_interleave(8, 2).repeat_interleave(8, 3)
        x = x * vis
        for i, blocks in enumerate(self.stages):
            if i > 0:
                norm, conv = self.down[i - 1]
                vis_next = F.max_pool2d(vis, 2)
                x = conv(norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * vis) * vis_next
                vis = vis_next
            for blk in blocks:
                x = blk(x, vis)
        return x


class Fcmae(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = MaskedConvNeXt()
        self.proj = nn.Conv2d(320, 512, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 512, 1, 1))
        self.decoder = CnxBlock(512)
        self.pred = nn.Conv2d(512, 32 * 32 * 3, 1)

    def forward(self, imgs):
        n, g = imgs.shape[0], imgs.shape[2] // 32
        noise = torch.randn(n, g * g, device=imgs.device)
        keep = int(g * g * 0.4)
        ids = torch.argsort(noise, 1)
        mask = torch.ones(n, g * g, device=imgs.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, torch.argsort(ids, 1))
        m = mask.reshape(n, 1, g, g)
        x = self.proj(self.encoder(imgs, mask.reshape(n, g, g)))
        x = x * (1 - m) + self.mask_token * m
        x = self.pred(self.decoder(x, torch.ones_like(m)))
        pred = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)
        return norm_pix_mse(pred, patchify(imgs, 32), mask)


# ----------------------------------------------------------------------------- LoMaR
def irpe_buckets(h, w, ratio=1.9, skip=1):
    import math
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    beta_int = int(beta)

    def pw(x):
        a = abs(x)
        if a <= alpha:
            return x
        y = min(round(alpha + math.log(a / alpha) / math.log(gamma / alpha) * (beta - alpha)), beta)
        return int(math.copysign(int(y), x))

    s = 2 * beta_int + 1
    nb, n = s * s, h * w
    out = torch.full((n + skip, n + skip), nb, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            out[i + skip, j + skip] = (pw(i // w - j // w) + beta_int) * s + pw(i % w - j % w) + beta_int
    return out, nb + skip


class IrpeBlock(nn.Module):
    def __init__(self, d, heads, buckets, nb):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.table = nn.Parameter(torch.zeros(1, self.hd, nb))
        self.register_buffer("buckets", buckets)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.hd ** -0.5
        ctx = q @ self.table  # (b, h, n, nb)
        attn = attn + torch.gather(ctx, 3, self.buckets.expand(b, self.heads, n, n))
        x = x + self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Lomar(nn.Module):
    def __init__(self, d=192, depth=12, heads=3, p=8, ws=7, nw=2):
        super().__init__()
        buckets, nb = irpe_buckets(ws, ws)
        self.p, self.ws, self.nw = p, ws, nw
        self.patch = nn.Conv2d(3, d, p, p)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList([IrpeBlock(d, heads, buckets, nb) for _ in range(depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.pred = nn.Linear(d, p * p * 3)

    def forward(self, imgs):
        x = self.patch(imgs).flatten(2).transpose(1, 2)  # (b, L, d)
        b, L, d = x.shape
        g, ws, n = imgs.shape[2] // self.p, self.ws, self.ws * self.ws
        idx = []
        for _ in range(b):
            tops, lefts = torch.randperm(g - ws + 1)[: self.nw], torch.randperm(g - ws + 1)[: self.nw]
            for t, l in zip(tops.tolist(), lefts.tolist()):
                idx.append(torch.tensor([(t + y) * g + l + xx for y in range(ws) for xx in range(ws)]))
        idx = torch.stack(idx).reshape(b, self.nw * n).to(imgs.device)
        win = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, d)).reshape(b * self.nw, n, d)
        masked = torch.zeros(b * self.nw, n, device=imgs.device)
        masked.scatter_(1, torch.argsort(torch.rand(b * self.nw, n, device=imgs.device), 1)[:, : int(n * 0.8)], 1.0)
        m = masked.unsqueeze(-1)
        win = win * (1 - m) + self.mask_token * m
        x = torch.cat([self.cls.expand(b * self.nw, -1, -1), win], 1)
        for blk in self.blocks:
            x = blk(x)
        pred = self.pred(self.norm(x))[:, 1:]
        target = patchify(imgs, self.p)
        target = torch.gather(target, 1, idx.unsqueeze(-1).expand(-1, -1, target.shape[-1])).reshape(b * self.nw, n, -1)
        return norm_pix_mse(pred, target, masked)


# ----------------------------------------------------------------------------- ResNet objectives
def resnet18():
    import timm

    return timm.create_model("resnet18", num_classes=0, global_pool="")


class DenseCl(nn.Module):
    def __init__(self, dim=128, K=65536, m=0.999, t=0.2, splits=8):
        super().__init__()
        self.q = nn.ModuleDict({"backbone": resnet18(), "mlp": nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, dim)),
                                "mlp2": nn.Sequential(nn.Conv2d(512, 512, 1), nn.ReLU(), nn.Conv2d(512, dim, 1))})
        self.k = copy.deepcopy(self.q)
        for p in self.k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue2", F.normalize(torch.randn(dim, K), dim=0))
        self.ptr, self.K, self.m, self.t, self.splits = 0, K, m, t, splits

    def heads(self, enc, x):
        f = enc["backbone"](x)
        g = enc["mlp"](f.mean((2, 3)))
        dense = enc["mlp2"](f).flatten(2)
        return F.normalize(g, dim=1), F.normalize(dense, dim=1), F.normalize(dense.mean(2), dim=1), F.normalize(f.flatten(2), dim=1)

    def contrast(self, pos, neg):
        logits = torch.cat([pos, neg], 1) / self.t
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))

    def forward(self, im_q, im_k):
        q, q_grid, _, q_b = self.heads(self.q, im_q)
        with torch.no_grad():
            perm = torch.randperm(im_k.shape[0])
            outs = [self.heads(self.k, c) for c in im_k[perm].chunk(self.splits)]
            inv = torch.argsort(perm)
            k, k_grid, k2, k_b = (torch.cat([o[i] for o in outs])[inv] for i in range(4))
        single = self.contrast((q * k).sum(1, keepdim=True), q @ self.queue)
        idx = torch.matmul(q_b.permute(0, 2, 1), k_b).max(dim=2)[1]
        matched = torch.gather(k_grid, 2, idx.unsqueeze(1).expand(-1, k_grid.size(1), -1))
        pos = (q_grid * matched).sum(1).reshape(-1, 1)
        qg = q_grid.permute(0, 2, 1).reshape(-1, q_grid.size(1))
        dense = self.contrast(pos, qg @ self.queue2)
        self.pending = (k, k2)
        return 0.5 * single + 0.5 * dense

    @torch.no_grad()
    def after_step(self):
        ema(self.k, self.q, self.m)
        k, k2 = self.pending
        n = k.shape[0]
        self.queue[:, self.ptr:self.ptr + n] = k.T
        self.queue2[:, self.ptr:self.ptr + n] = k2.T
        self.ptr = (self.ptr + n) % self.K


class Byol(nn.Module):
    def __init__(self, hidden=4096, dim=256):
        super().__init__()
        self.online = nn.ModuleDict({"backbone": resnet18(), "projector": mlp_bn(512, hidden, dim)})
        self.predictor = mlp_bn(dim, hidden, dim)
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad = False

    @staticmethod
    def embed(enc, x):
        return enc["projector"](enc["backbone"](x).mean((2, 3)))

    def forward(self, v1, v2):
        p1, p2 = self.predictor(self.embed(self.online, v1)), self.predictor(self.embed(self.online, v2))
        with torch.no_grad():
            z1, z2 = self.embed(self.target, v1), self.embed(self.target, v2)
        return regression(p1, z2) + regression(p2, z1)

    def after_step(self):
        ema(self.target, self.online, 0.996)


class AbsAttention(nn.Module):
    """BoTNet's MHSA with an absolute position embedding (lucidrains, as CARE's trans.py)."""

    def __init__(self, dim, fmap, heads=4, dim_head=128):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.height = nn.Parameter(torch.randn(fmap, dim_head) * self.scale)
        self.width = nn.Parameter(torch.randn(fmap, dim_head) * self.scale)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, -1, h * w).transpose(2, 3) for t in (q, k, v))
        q = q * self.scale
        emb = (self.height[:, None, :] + self.width[None, :, :]).reshape(h * w, -1)
        sim = q @ k.transpose(2, 3) + q @ emb.T
        out = sim.softmax(-1) @ v
        return out.transpose(2, 3).reshape(b, -1, h, w)


class BottleBlock(nn.Module):
    def __init__(self, dim, fmap, dim_out, downsample, heads=4, dim_head=128, proj_factor=4):
        super().__init__()
        k, s, p = (3, 2, 1) if downsample else (1, 1, 0)
        self.shortcut = nn.Sequential(nn.Conv2d(dim, dim_out, k, s, p, bias=False), nn.BatchNorm2d(dim_out), nn.ReLU()) \
            if dim != dim_out or downsample else nn.Identity()
        a_in, a_out = dim_out // proj_factor, heads * dim_head
        self.net = nn.Sequential(nn.Conv2d(dim, a_in, 1, bias=False), nn.BatchNorm2d(a_in), nn.ReLU(),
                                 AbsAttention(a_in, fmap, heads, dim_head), nn.AvgPool2d(2) if downsample else nn.Identity(),
                                 nn.BatchNorm2d(a_out), nn.ReLU(), nn.Conv2d(a_out, dim_out, 1, bias=False), nn.BatchNorm2d(dim_out))
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, x):
        return F.relu(self.net(x) + self.shortcut(x))


class CareStream(nn.Module):
    def __init__(self, student, fmap=4, hidden=4096, dim=256):
        super().__init__()
        self.backbone = resnet18()
        self.trans = nn.Sequential(*[BottleBlock(256 if i == 0 else 512, fmap if i == 0 else fmap // 2, 512, i == 0) for i in range(5)])
        self.projector, self.trans_projector = mlp_bn(512, hidden, dim), mlp_bn(512, hidden, dim)
        self.predictors = nn.ModuleList([mlp_bn(dim, hidden, dim), mlp_bn(dim, hidden, dim)]) if student else None

    def forward(self, x):
        r = self.backbone
        x = r.maxpool(r.act1(r.bn1(r.conv1(x))))
        c4 = r.layer3(r.layer2(r.layer1(x)))
        c5 = r.layer4(c4)
        q, t = self.projector(c5.mean((2, 3))), self.trans_projector(self.trans(c4).mean((2, 3)))
        if self.predictors is not None:
            q, t = self.predictors[0](q), self.predictors[1](t)
        return F.normalize(q, dim=1), F.normalize(t, dim=1)


class Care(nn.Module):
    def __init__(self):
        super().__init__()
        self.student = CareStream(True)
        self.teacher = CareStream(False)
        own = dict(self.student.named_parameters())
        with torch.no_grad():
            for n, p in self.teacher.named_parameters():
                p.copy_(own[n])
                p.requires_grad = False

    def forward(self, x1, x2):
        q1, t1 = self.student(x1)
        q2, t2 = self.student(x2)
        with torch.no_grad():
            k1, tk1 = self.teacher(x2)
            k2, tk2 = self.teacher(x1)
        con = (4 - 2 * ((q1 * k1).sum(1) + (q2 * k2).sum(1))).mean()
        con2 = (4 - 2 * ((t1 * tk1).sum(1) + (t2 * tk2).sum(1))).mean()
        fea = F.mse_loss(q1, t1.detach()) + F.mse_loss(q2, t2.detach()) + F.mse_loss(k1, tk1) + F.mse_loss(k2, tk2)
        return con + con2 + 100 * fea

    @torch.no_grad()
    def after_step(self):
        own = dict(self.student.named_parameters())
        for n, p in self.teacher.named_parameters():
            p.mul_(0.99).add_(own[n], alpha=0.01)


def time_step(model, views, steps=5):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params)
    model.train()

    def one():
        loss = model(*views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(model, "after_step"):
            model.after_step()

    for _ in range(2):
        one()
    if DEV.type == "cuda":
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            one()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t0) / steps


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/criterion/torch-steps.json")
    one = [torch.randn(B, 3, S, S, device=DEV)]
    two = [torch.randn(B, 3, S, S, device=DEV), torch.randn(B, 3, S, S, device=DEV)]
    if S == 64 and DEV.type == "cpu":
        cases = {
            "step_fcmae_convnextv2_atto_64px": (Fcmae, one),
            "step_lomar_vit_tiny_64px": (Lomar, one),
            "step_densecl_resnet18_64px": (DenseCl, two),
            "step_byol_resnet18_64px": (Byol, two),
            "step_care_resnet18_64px": (Care, two),
        }
    else:
        windows = 4 if S // 16 >= 14 else 1
        cases = {
            f"step_fcmae_convnextv2_atto_{S}px": (Fcmae, one),
            f"step_lomar_vit_base_{S}px": (lambda: Lomar(d=768, depth=12, heads=12, p=16, ws=7, nw=windows), one),
        }
    only = os.environ.get("SELFSUP_BENCH_FILTER")
    results = {}
    for name, (cls, views) in cases.items():
        if only and only not in name:
            continue
        secs = time_step(cls().to(DEV), views, steps=10 if DEV.type == "cuda" else 5)
        results[name] = secs
        print(f"{name}: {secs * 1e3:.0f} ms/step, {B / secs:.1f} images/s (PyTorch {torch.__version__})")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
