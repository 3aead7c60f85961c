#!/usr/bin/env python3
"""Times PyTorch (CPU) on the cases of benches/benches/ops.rs, for `cargo xtask bench`.

Reads the case list the Rust bench wrote (target/criterion/ops-cases.json) and writes the mean
seconds per iteration of each case to target/criterion/torch-ops.json. PyTorch runs with as many
threads as the machine has cores (the Rust side uses rayon's default, the same). Each case is the
natural PyTorch code for the operation:

- conv / dwconv: F.conv2d on NCHW tensors (groups=C for depthwise), with bias for depthwise.
- sparse_dwconv: PyTorch has no submanifold conv; its peer is the masked-dense path
  (mask, depthwise conv, mask), as FCMAE's JAX reference does.
- layer_norm: F.layer_norm over the last axis of a channels-last map.
- batch_norm: F.batch_norm (training) + ReLU on NCHW.
- grn: timm's GRN formula on a channels-last map.
- attention: q, k, v from the same layouts as the Rust op, permuted to (g, heads, tokens, dim),
  then F.scaled_dot_product_attention; LoMaR's iRPE contextual keys have no SDPA form, so that
  case is LoMaR's own code (q @ k^T * scale + gathered q @ table, softmax, @ v).
- matmul: torch.mm.

Usage: python3 benches/torch_ops.py [cases.json] [out.json]. Exits 0 with a message if torch is
missing, so `cargo xtask bench` still prints the Rust numbers.
"""
import json
import os
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("torch_ops.py: PyTorch is not installed; skipping the PyTorch column "
          "(pip install torch, or point SELFSUP_PYTHON at a Python that has it)")
    sys.exit(0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def irpe_product_buckets(h, w, ratio, skip):
    """Same as selfsup_ops::attention::irpe_product_buckets (iRPE's get_bucket_ids_2d)."""
    import math
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    beta_int = int(beta)

    def piecewise(x):
        a = abs(x)
        if a <= alpha:
            return x
        y = min(round(alpha + math.log(a / alpha) / math.log(gamma / alpha) * (beta - alpha)), beta)
        return int(math.copysign(int(y), x))

    s = 2 * beta_int + 1
    nb = s * s
    n = h * w
    out = torch.empty(n + skip, n + skip, dtype=torch.long)
    for i in range(n + skip):
        for j in range(n + skip):
            if i < skip or j < skip:
                out[i, j] = nb
                continue
            pi, pj = i - skip, j - skip
            r = piecewise(pi // w - pj // w) + beta_int
            c = piecewise(pi % w - pj % w) + beta_int
            out[i, j] = r * s + c
    return out, nb + skip


def build(case):
    """Returns (inputs needing grad, fn(inputs) -> output)."""
    k, p = case["kind"], case["params"]
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    if k in ("conv", "dwconv"):
        cin = p.get("cin", p.get("c"))
        cout = p.get("cout", p.get("c"))
        groups = cin if k == "dwconv" else 1
        x = rnd(p["b"], cin, p["h"], p["w"])
        w = rnd(cout, cin // groups, p["k"], p["k"])
        b = rnd(cout) if k == "dwconv" else None
        ins = [x, w] + ([b] if b is not None else [])
        return ins, lambda t: F.conv2d(t[0], t[1], t[2] if len(t) > 2 else None, p["stride"], p["pad"], 1, groups)
    if k == "sparse_dwconv":
        x = rnd(p["b"], p["c"], p["h"], p["w"])
        w, b = rnd(p["c"], 1, p["k"], p["k"]), rnd(p["c"])
        grid = p["grid"]
        keep = int(grid * grid * (1 - p["ratio"]))
        noise = torch.rand(p["b"], grid * grid, generator=g)
        vis = torch.zeros(p["b"], grid * grid)
        vis.scatter_(1, noise.argsort(1)[:, :keep], 1.0)
        up = p["h"] // grid
        mask = vis.view(p["b"], 1, grid, grid).repeat_interleave(up, 2).repeat_interleave(up, 3)
        return [x, w, b], lambda t: F.conv2d(t[0] * mask, t[1], t[2], 1, p["k"] // 2, 1, p["c"]) * mask
    if k == "layer_norm":
        x, w, b = rnd(p["b"], p["h"], p["w"], p["c"]), rnd(p["c"]), rnd(p["c"])
        return [x, w, b], lambda t: F.layer_norm(t[0], (p["c"],), t[1], t[2], 1e-6)
    if k == "batch_norm":
        x, w, b = rnd(p["b"], p["c"], p["h"], p["w"]), rnd(p["c"]), rnd(p["c"])
        return [x, w, b], lambda t: F.relu(F.batch_norm(t[0], None, None, t[1], t[2], True, 0.1, 1e-5))
    if k == "grn":
        x, gamma, beta = rnd(p["b"], p["h"], p["w"], p["c"]), rnd(p["c"]), rnd(p["c"])

        def grn(t):
            gx = torch.norm(t[0], p=2, dim=(1, 2), keepdim=True)
            nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
            return t[1] * (t[0] * nx) + t[2] + t[0]
        return [x, gamma, beta], grn
    if k == "attention":
        G, lq, lk, h, d = p["g"], p["lq"], p["lk"], p["heads"], p["dim"]
        scale = d ** -0.5
        if lq == lk:
            qkv = rnd(G, lq, 3, h, d)
            if p["ctx"]:
                buckets, nb = irpe_product_buckets(7, 7, 1.9, 1)
                table = rnd(1, d, nb)
                flat = (buckets + torch.arange(lq).view(-1, 1) * nb).flatten()

                def lomar(t):
                    q, k_, v = t[0].permute(2, 0, 3, 1, 4)
                    attn = (q @ k_.transpose(-2, -1)) * scale
                    qr = torch.matmul(q, t[1])  # (G, h, lq, nb), table shared by heads
                    attn = attn + qr.flatten(2)[:, :, flat].view(G, h, lq, lk)
                    return (attn.softmax(-1) @ v).transpose(1, 2)
                return [qkv, table], lomar

            def sdpa(t):
                q, k_, v = t[0].permute(2, 0, 3, 1, 4)
                return F.scaled_dot_product_attention(q, k_, v).transpose(1, 2)
            return [qkv], sdpa
        q, k_, v = rnd(G, lq, h, d), rnd(G, lk, h, d), rnd(G, lk, h, d)
        return [q, k_, v], lambda t: F.scaled_dot_product_attention(
            t[0].transpose(1, 2), t[1].transpose(1, 2), t[2].transpose(1, 2)).transpose(1, 2)
    if k == "info_nce":
        pos, q = rnd(p["n"], 1), rnd(p["n"], p["d"])
        bank = rnd(p["k"], p["d"], grad=False)
        target = torch.zeros(p["n"], dtype=torch.long)
        return [pos, q], lambda t: F.cross_entropy(torch.cat([t[0], t[1] @ bank.T], 1) / p["t"], target)
    if k == "matmul":
        n = p["n"]
        return [rnd(n, n, grad=False), rnd(n, n, grad=False)], lambda t: torch.mm(t[0], t[1])
    raise ValueError(f"unknown case kind {k}")


def time_case(case, budget=3.0):
    ins, fn = build(case)
    bwd = case["mode"] == "fwd_bwd"

    def once():
        if bwd:
            for t in ins:
                t.grad = None
            fn(ins).sum().backward()
        else:
            with torch.no_grad():
                fn(ins)

    for _ in range(2):
        once()
    n, start = 0, time.perf_counter()
    while n < 10 or (time.perf_counter() - start < budget and n < 1000):
        once()
        n += 1
    return (time.perf_counter() - start) / n


def main():
    cases_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/criterion/ops-cases.json")
    out_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "target/criterion/torch-ops.json")
    torch.set_num_threads(os.cpu_count())
    with open(cases_path) as f:
        cases = json.load(f)
    only = os.environ.get("SELFSUP_BENCH_FILTER")
    out = {"torch_version": torch.__version__, "threads": torch.get_num_threads(), "seconds": {}}
    for case in cases:
        if only and only not in case["group"]:
            continue
        s = time_case(case)
        out["seconds"][case["group"]] = s
        print(f"{case['group']:40s} {s * 1e3:10.2f} ms  {case['flops'] / s / 1e9:7.1f} GFLOP/s", flush=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
