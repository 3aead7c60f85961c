"""Golden fixture for selfsup-models' ConvNeXt V2, from timm.

Run: python crates/selfsup-models/scripts/make_convnextv2_fixture.py
Writes crates/selfsup-models/tests/fixtures/convnextv2.safetensors, read by
tests/convnextv2_golden.rs: for two small timm ConvNeXt V2 models (depths 1,1,2,1, dims
8,16,24,32; GRN, no layer scale), one with Linear MLPs (as timm's tiny and larger) under the
prefix `linear.`, one with 1x1-conv MLPs (as timm's atto..nano, `conv_mlp=True`) under `conv.`:
random weights (GRN and norms too, so nothing is an identity), a 2x3x64x32 input, the final
feature map and the pooled, head-normed features.
"""
import pathlib

import timm
import torch
from safetensors.torch import save_file
from timm.models.convnext import ConvNeXt

torch.manual_seed(0)
x = torch.randn(2, 3, 64, 32)
out = {"input": x}
for prefix, conv_mlp in [("linear", False), ("conv", True)]:
    m = ConvNeXt(in_chans=3, num_classes=0, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), use_grn=True,
                 ls_init_value=None, conv_mlp=conv_mlp).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
        feats = m.forward_features(x)
        pooled = m.forward_head(feats, pre_logits=True)
    for k, v in m.state_dict().items():
        out[f"{prefix}.{k}"] = v.contiguous()
    out[f"{prefix}.__features"] = feats.contiguous()
    out[f"{prefix}.__pooled"] = pooled.contiguous()
path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "convnextv2.safetensors"
save_file(out, str(path), metadata={"timm": timm.__version__, "torch": torch.__version__})
print(f"wrote {path} ({path.stat().st_size} bytes)")
