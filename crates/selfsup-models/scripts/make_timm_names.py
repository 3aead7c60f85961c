"""Names and shapes of full-size timm state_dicts, for the full-size loading test.

Run: python crates/selfsup-models/scripts/make_timm_names.py
Writes crates/selfsup-models/tests/fixtures/timm_names.json: for each timm model below
(random init, no download), every state_dict entry as [name, shape]. tests/timm_names.rs
checks that selfsup builds the same variables (after `remap_key` / `remap_tensor`), so a real
timm checkpoint of these variants loads by name, without weights in the repository.
"""
import json
import pathlib

import timm

MODELS = [
    "resnet18", "resnet50",
    "convnextv2_atto", "convnextv2_nano", "convnextv2_tiny",
    "vit_tiny_patch16_224", "vit_small_patch16_224",
]
out = {"timm": timm.__version__, "models": {}}
for name in MODELS:
    m = timm.create_model(name, pretrained=False)
    out["models"][name] = [[k, list(v.shape)] for k, v in m.state_dict().items()]
path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "timm_names.json"
path.write_text(json.dumps(out, separators=(",", ":")))
print(f"wrote {path} ({path.stat().st_size} bytes)")
