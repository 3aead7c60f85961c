"""Golden fixture for selfsup-models' ResNet, from timm.

Run: python crates/selfsup-models/scripts/make_resnet_fixture.py
Writes crates/selfsup-models/tests/fixtures/resnet.safetensors, read by tests/resnet_golden.rs:
two small timm ResNets with the ImageNet stem (7x7/2 conv + 3x3/2 max-pool), one per block type
(`basic.`: BasicBlock, layers 1,1,1,1; `bottleneck.`: Bottleneck, layers 1,2,1,1), stem width 64
(timm's default stem ignores `stem_width`)
and stage widths 8,16,16,16, in eval mode with random weights and BatchNorm statistics; a
2x3x32x32 input, the final feature map and the pooled features.
"""
import pathlib

import timm
import torch
from safetensors.torch import save_file
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

torch.manual_seed(0)
x = torch.randn(2, 3, 32, 32)
out = {"input": x}
for prefix, block, layers in [("basic", BasicBlock, (1, 1, 1, 1)), ("bottleneck", Bottleneck, (1, 2, 1, 1))]:
    m = ResNet(block=block, layers=layers, channels=(8, 16, 16, 16), stem_width=8, num_classes=0).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("bn1.weight") or ".bn" in name and name.endswith("weight") else 0.0))
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
        feats = m.forward_features(x)
        pooled = m.forward_head(feats, pre_logits=True)
    for k, v in m.state_dict().items():
        out[f"{prefix}.{k}"] = v.contiguous()
    out[f"{prefix}.__features"] = feats.contiguous()
    out[f"{prefix}.__pooled"] = pooled.contiguous()
path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "resnet.safetensors"
save_file(out, str(path), metadata={"timm": timm.__version__, "torch": torch.__version__})
print(f"wrote {path} ({path.stat().st_size} bytes)")
