#!/usr/bin/env python3
"""PyTorch peers of benches/benches/forward.rs, for `cargo xtask bench`: eval-mode forward of
timm's resnet18, convnextv2_atto and vit_tiny_patch16_224 and transformers' CvT-13 (pooled
features, no classifier), batch 32 at 224 px, `torch.inference_mode()`, every core. Mean
seconds per batch after two warm-up batches, written to target/criterion/torch-forward.json.

Usage: python3 benches/torch_forward.py [out.json]. Exits 0 with a message without torch/timm.
"""
import json
import os
import sys
import time

try:
    import torch
    import timm
    from transformers import CvtConfig, CvtModel
except ImportError as e:
    print(f"torch_forward.py: {e}; skipping the PyTorch column")
    sys.exit(0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(os.cpu_count() or 1)


def cvt13():
    model = CvtModel(CvtConfig())  # the default config is CvT-13
    return lambda x: model(x).cls_token_value


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/criterion/torch-forward.json")
    x = torch.randn(32, 3, 224, 224)
    cases = {
        "forward_resnet18_224px": lambda: timm.create_model("resnet18", num_classes=0).eval(),
        "forward_convnextv2_atto_224px": lambda: timm.create_model("convnextv2_atto", num_classes=0).eval(),
        "forward_cvt13_224px": cvt13,
        "forward_vit_tiny_patch16_224px": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=0).eval(),
    }
    only = os.environ.get("SELFSUP_BENCH_FILTER")
    results = {}
    for name, make in cases.items():
        if only and only not in name:
            continue
        model = make()
        with torch.inference_mode():
            for _ in range(2):
                model(x)
            t0 = time.perf_counter()
            n = 6
            for _ in range(n):
                model(x)
            secs = (time.perf_counter() - t0) / n
        results[name] = secs
        print(f"{name}: {secs * 1e3:.0f} ms/batch, {32 / secs:.1f} images/s (PyTorch {torch.__version__})")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
