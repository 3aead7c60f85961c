#!/usr/bin/env python3
"""Raw-pixel Euclidean kNN on Fashion-MNIST with scikit-learn: the reference for
selfsup_eval::knn::knn_euclidean.

Prints top-1 accuracy for k = 1, 5, 20 (KNeighborsClassifier defaults: uniform weights,
Euclidean distance) on
  - the full split: 60k training images as the bank, 10k test images as queries
    (the standard baselines: 84.97 / 85.54 / 84.15 %), and
  - the subset the Rust test uses: the first 10k training images, the first 2k test images.
Pixels are scaled to [0, 1] (the ranking is the same as on raw bytes).

Needs numpy and scikit-learn; reads the IDX files Debian's dataset-fashion-mnist installs.
Usage: python3 crates/selfsup-eval/scripts/fmnist_raw_knn.py [dir] [--subset-only]
"""
import gzip
import sys

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

DIR = "/usr/share/datasets/fashion-mnist"


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def run(xb, yb, xq, yq, what):
    for k in (1, 5, 20):
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", n_jobs=-1).fit(xb, yb)
        acc = 100.0 * (clf.predict(xq) == yq).mean()
        print(f"{what}: k={k:2d} top-1 {acc:.2f} %", flush=True)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    d = args[0] if args else DIR
    xb = idx(f"{d}/train-images-idx3-ubyte.gz").reshape(60000, -1).astype(np.float32) / 255.0
    yb = idx(f"{d}/train-labels-idx1-ubyte.gz")
    xq = idx(f"{d}/t10k-images-idx3-ubyte.gz").reshape(10000, -1).astype(np.float32) / 255.0
    yq = idx(f"{d}/t10k-labels-idx1-ubyte.gz")
    run(xb[:10000], yb[:10000], xq[:2000], yq[:2000], "subset (10k bank, 2k queries)")
    if "--subset-only" not in sys.argv:
        run(xb, yb, xq, yq, "full (60k bank, 10k queries)")


if __name__ == "__main__":
    main()
