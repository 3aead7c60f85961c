"""The PyTorch peer of benches/benches/data.rs: torchvision + PIL through a DataLoader.

Reads the JPEG folder the Rust bench wrote (its path is in target/criterion/data-bench.json),
with the same worker count and batch size, and times one warm-up epoch then the median of three:
- decode: PIL open + convert('RGB') (ImageFolder's loader) and nothing else;
- byol_2view_224: BYOL's two views (torchvision transforms on PIL images, as the BYOL/MoCo
  reference code composes them);
- fcmae_1view_224: RandomResizedCrop(224, scale 0.2-1, bicubic) + flip (MAE/FCMAE).
Writes target/criterion/torch-data.json. Without torch/torchvision it says so and exits 0.
"""
import json
import pathlib
import statistics
import sys
import time

try:
    import torch
    import torchvision
    from torchvision import transforms as T
except ImportError as e:
    print(f"torch_data.py: skipped ({e}); install torch and torchvision to compare")
    sys.exit(0)

root = pathlib.Path(__file__).resolve().parents[1] / "target" / "criterion"
cfg = json.loads((root / "data-bench.json").read_text())
workers, folder = cfg["workers"], cfg["jpeg_dir"]
normalize = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def byol(second):
    return T.Compose([
        T.RandomResizedCrop(224),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=0.1 if second else 1.0),
        T.RandomSolarize(128, p=0.2 if second else 0.0),
        T.ToTensor(),
        normalize,
    ])


class Views:
    def __init__(self, *ts):
        self.ts = ts

    def __call__(self, img):
        return [t(img) for t in self.ts]


cases = {
    "decode": lambda img: 0,
    "byol_2view_224": Views(byol(False), byol(True)),
    "fcmae_1view_224": T.Compose([
        T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize,
    ]),
}
results = {}
for name, transform in cases.items():
    ds = torchvision.datasets.ImageFolder(folder, transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=workers,
                                         persistent_workers=True, drop_last=True)
    rates = []
    for epoch in range(4):
        t = time.perf_counter()
        n = 0
        for batch in loader:
            n += 64
        if epoch > 0:
            rates.append(n / (time.perf_counter() - t))
    results[name] = statistics.median(rates)
    print(f"pytorch data/{name}: {results[name]:.0f} images/s ({workers} workers)")
(root / "torch-data.json").write_text(json.dumps({"workers": workers, "images_per_sec": results,
                                                  "torch": torch.__version__,
                                                  "torchvision": torchvision.__version__}))
