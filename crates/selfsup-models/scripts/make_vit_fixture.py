"""Golden fixture for selfsup-models' ViT, from timm.

Run: python crates/selfsup-models/scripts/make_vit_fixture.py
Writes crates/selfsup-models/tests/fixtures/vit.safetensors, read by tests/vit_golden.rs: a
small timm VisionTransformer (img 32, patch 8, dim 24, depth 2, 3 heads, class token, learned
position embedding, global_pool='token') with random weights, a 2x3x32x32 input, every token
after the final norm, and the pooled (class-token) features.
"""
import pathlib

import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

torch.manual_seed(0)
m = VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=0, embed_dim=24, depth=2, num_heads=3,
                      global_pool="token").eval()
with torch.no_grad():
    for name, p in m.named_parameters():
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    x = torch.randn(2, 3, 32, 32)
    tokens = m.forward_features(x)
    pooled = m.forward_head(tokens, pre_logits=True)
out = {k: v.contiguous() for k, v in m.state_dict().items()}
out.update({"__input": x, "__tokens": tokens.contiguous(), "__pooled": pooled.contiguous()})
path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "vit.safetensors"
save_file(out, str(path), metadata={"timm": timm.__version__, "torch": torch.__version__})
print(f"wrote {path} ({path.stat().st_size} bytes)")
