"""Golden fixture for selfsup-models' CvT, from HF transformers.

Run: python crates/selfsup-models/scripts/make_cvt_fixture.py
Writes crates/selfsup-models/tests/fixtures/cvt.safetensors, read by tests/cvt_golden.rs: a small
`CvtForImageClassification` (CvT-13 topology: embeddings 7/4/2, 3/2/1, 3/2/1, dw_bn q/k/v
projections with k/v stride 2, class token in the last stage; dims 8,12,16, heads 1,2,2, depths
1,2,3 (HF indexes its per-layer drop-path rates by the stage number, so each stage needs
more layers than its index)) in eval mode with random weights and BatchNorm statistics, a 2x3x64x64 input, the last
feature map, and the class token after `layernorm`. HF uses exact GELU where the official code
uses QuickGELU; the Rust test sets `quick_gelu = false` accordingly.
"""
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from transformers import CvtConfig, CvtForImageClassification

torch.manual_seed(0)
cfg = CvtConfig(num_channels=3, embed_dim=[8, 12, 16], num_heads=[1, 2, 2], depth=[1, 2, 3], num_labels=3)
m = CvtForImageClassification(cfg).eval()
with torch.no_grad():
    for name, p in m.named_parameters():
        is_scale = name.endswith("weight") and ("normalization" in name or "layernorm" in name)
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_scale else 0.0))
    for name, b in m.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(torch.randn_like(b) * 0.1)
        elif name.endswith("running_var"):
            b.copy_(torch.rand_like(b) + 0.5)
    x = torch.randn(2, 3, 64, 64)
    out = m.cvt(x)
    pooled = m.layernorm(out.cls_token_value.squeeze(1))
tensors = {k: v.contiguous() for k, v in m.state_dict().items()}
tensors.update({"__input": x, "__features": out.last_hidden_state.contiguous(), "__pooled": pooled.contiguous()})
path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cvt.safetensors"
save_file(tensors, str(path), metadata={"transformers": transformers.__version__, "torch": torch.__version__})
print(f"wrote {path} ({path.stat().st_size} bytes)")
