"""PyTorch peers of crates/selfsup-kernels/examples/gpu_bench.rs on the same GPU (issue 6).

Same shapes, same timing (CUDA-event medians of 20 runs after 5 warm-ups, milliseconds):
- windowed attention forward + backward: 1024 windows of 50 tokens, 12 heads of 64, as a
  fused qkv (g, 50, 3, 12, 64) split into heads + F.scaled_dot_product_attention;
- dense 7x7 depthwise conv (cuDNN) forward + backward on (128, 40, 56, 56), channels-last: the
  peer of both the sparse conv at mask ratio 0.6 and the dense one.

Usage: python3 torch_kernels_gpu.py OUT.json [SELFSUP.json]. With the selfsup-kernels JSON
(written next to OUT.json by run.sh) it prints the speed ratios too.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F


def median_ms(fn):
    for _ in range(5):
        fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main():
    out_path = sys.argv[1]
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    res = {}

    g, l, h, d = 1024, 50, 12, 64
    qkv = torch.randn(g, l, 3, h, d, device=dev, requires_grad=True)
    dout = torch.randn(g, h, l, d, device=dev)

    def attention():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=0.125)
        o.backward(dout)

    res["attention_lomar_vitb_fwd_bwd"] = median_ms(attention)

    b, hw, c = 128, 56, 40
    x = torch.randn(b, c, hw, hw, device=dev).to(memory_format=torch.channels_last).requires_grad_()
    conv = torch.nn.Conv2d(c, c, 7, padding=3, groups=c).to(dev).to(memory_format=torch.channels_last)
    dy = torch.randn(b, c, hw, hw, device=dev).to(memory_format=torch.channels_last)

    def dwconv():
        conv(x).backward(dy)

    ms = median_ms(dwconv)
    res["sparse_dwconv7_mask0.6_fwd_bwd"] = ms  # the dense cuDNN conv is the masked-dense peer
    res["dense_dwconv7_fwd_bwd"] = ms
    res["device"] = torch.cuda.get_device_name()
    res["torch"] = torch.__version__
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)

    ours_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(out_path), "selfsup-kernels.json")
    if os.path.exists(ours_path):
        ours = json.load(open(ours_path))
        print(f"| kernel ({res['device']}) | selfsup ms | PyTorch ms | speed vs PyTorch |")
        print("|---|---|---|---|")
        for key, ms in ours.items():
            if key in res:
                print(f"| {key} | {ms:.3f} | {res[key]:.3f} | {res[key] / ms:.2f}x |")


if __name__ == "__main__":
    main()
