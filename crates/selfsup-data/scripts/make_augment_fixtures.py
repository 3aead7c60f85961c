"""Golden fixtures for selfsup-data's augmentations, from torchvision + PIL.

Run: python crates/selfsup-data/scripts/make_augment_fixtures.py
Writes crates/selfsup-data/tests/fixtures/augment.json (read by tests/augment_golden.rs).

Covers the deterministic parts: PIL's crop + resize (bilinear and bicubic, up- and
downscaling, grey and RGB), torchvision's Resize + CenterCrop, and the tensor colour ops with
fixed factors (adjust_brightness / contrast / saturation / hue, rgb_to_grayscale), and
gaussian_blur.
"""
import json
import pathlib

import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as F
from PIL import Image

rng = np.random.default_rng(0)
H, W = 13, 17
# A smooth gradient plus noise, so resampling has structure to get wrong.
yy, xx = np.mgrid[0:H, 0:W]
base = np.stack([xx * 15, yy * 19, (xx + yy) * 8], axis=-1).astype(np.float64)
rgb = np.clip(base + rng.integers(-40, 40, size=(H, W, 3)), 0, 255).astype(np.uint8)
grey = np.clip(yy * 17 + xx * 5 + rng.integers(-30, 30, size=(H, W)), 0, 255).astype(np.uint8)


def chw(a):
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    return a.transpose(2, 0, 1).reshape(-1).tolist()


modes = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
resizes = []
for name, img in [("rgb", rgb), ("grey", grey)]:
    pil = Image.fromarray(img)
    for interp, resample in modes.items():
        # (top, left, height, width), output side
        for (top, left, h, w), size in [((2, 3, 8, 9), 16), ((0, 0, 13, 17), 5), ((1, 0, 12, 7), 7), ((0, 0, 13, 17), 13)]:
            out = pil.crop((left, top, left + w, top + h)).resize((size, size), resample)
            resizes.append({"image": name, "interp": interp, "crop": [top, left, h, w], "size": size, "out": chw(out)})

center = []
for name, img in [("rgb", rgb), ("grey", grey)]:
    pil = Image.fromarray(img)
    for interp, resample in modes.items():
        for resize, size in [(11, 9), (20, 16), (7, 6)]:
            t = torchvision.transforms.Compose([
                torchvision.transforms.Resize(resize, interpolation=F.InterpolationMode(interp)),
                torchvision.transforms.CenterCrop(size),
            ])
            center.append({"image": name, "interp": interp, "resize": resize, "size": size, "out": chw(t(pil))})

x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
g = torch.from_numpy(grey)[None].float() / 255.0
ops = []


def r7(t):
    return [round(v, 7) for v in t.reshape(-1).tolist()]


for op, f in [("brightness", 1.3), ("brightness", 0.5), ("contrast", 0.6), ("contrast", 1.4),
              ("saturation", 1.5), ("saturation", 0.3), ("hue", 0.2), ("hue", -0.35), ("hue", 0.5)]:
    fn = getattr(F, f"adjust_{op}")
    ops.append({"image": "rgb", "op": op, "factor": f, "out": r7(fn(x, f))})
ops.append({"image": "grey", "op": "contrast", "factor": 0.6, "out": r7(F.adjust_contrast(g, 0.6))})
ops.append({"image": "rgb", "op": "grayscale", "factor": 0, "out": r7(F.rgb_to_grayscale(x, 3))})

# GaussianBlur on a square 40x40 image: selfsup's kernel side is ~10% of the size (5 here).
square = rng.integers(0, 256, size=(3, 40, 40)).astype(np.float32) / 255.0
blur = []
for sigma in [0.6, 1.7]:
    out_b = F.gaussian_blur(torch.from_numpy(square), [5, 5], [sigma, sigma])
    blur.append({"sigma": sigma, "out": r7(out_b)})

out = {
    "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "PIL": Image.__version__},
    "height": H,
    "width": W,
    "rgb": chw(rgb),
    "grey": chw(grey),
    "resize": resizes,
    "center_crop": center,
    "ops": ops,
    "square": r7(torch.from_numpy(square)),
    "blur": blur,
}
path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "augment.json"
path.write_text(json.dumps(out, separators=(",", ":")))
print(f"wrote {path} ({path.stat().st_size} bytes)")
