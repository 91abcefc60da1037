"""What 8-bit quantization may cost `imagenet_q8` (the float VGG19 file is not reachable here).

Each quantized kernel weight stands for some float weight in its k-means cell (between the
midpoints to the neighbouring levels). This draws float weight sets uniformly within those cells
(a sample of the float networks consistent with the file), runs the demo images through each
and through the quantized network, and prints per layer: the kernel's relative RMS change, the
features' relative RMS difference, and the Gram matrices' relative Frobenius difference (what
the style loss compares). It bounds nothing about the true float file; it shows how much weights
that round to the same levels can differ in what the loss sees.

    python scripts/q8_cost.py [--size 256] [--draws 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nstjax import image, vgg16, weights  # noqa: E402


def cells(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per weight, the lower and upper edge of its k-means cell (midpoints to neighbours; the
    outermost levels' cells extend by their inner half-width)."""
    levels = np.unique(kernel)
    mids = (levels[1:] + levels[:-1]) / 2
    lo = np.concatenate([[levels[0] - (mids[0] - levels[0]) if len(mids) else levels[0]], mids])
    hi = np.concatenate([mids, [levels[-1] + (levels[-1] - mids[-1]) if len(mids) else
                                levels[-1]]])
    i = np.searchsorted(levels, kernel)
    return lo[i], hi[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--draws", type=int, default=3)
    a = ap.parse_args()
    params, _ = weights.load("imagenet_q8", arch="vgg19", quiet=True)
    layers = vgg16.names("vgg19")
    demo = ROOT / "configs" / "demo"
    xs = []
    for name in ("tubingen.jpg", "starry_night.jpg"):
        img = image.read(demo / name)
        img = image.resize(img, image.target_size(img.size, a.size))
        xs.append(image.preprocess(np.asarray(img, np.float32)))
    rng = np.random.default_rng(0)
    feats = [vgg16.features(params, x, layers, "max", arch="vgg19") for x in xs]
    rows = {n: [] for n in layers}
    for _ in range(a.draws):
        drawn = {}
        for n, p in params.items():
            lo, hi = cells(p["kernel"])
            drawn[n] = {"kernel": rng.uniform(lo, hi).astype(np.float32), "bias": p["bias"]}
        for x, fq in zip(xs, feats):
            fd = vgg16.features(drawn, x, layers, "max", arch="vgg19")
            for n in layers:
                k_q, k_d = params[n]["kernel"], drawn[n]["kernel"]
                a_q = np.asarray(fq[n], np.float64).reshape(-1, fq[n].shape[-1])
                a_d = np.asarray(fd[n], np.float64).reshape(-1, fd[n].shape[-1])
                g_q, g_d = a_q.T @ a_q, a_d.T @ a_d
                rows[n].append((np.linalg.norm(k_d - k_q) / np.linalg.norm(k_q),
                                np.linalg.norm(a_d - a_q) / np.linalg.norm(a_q),
                                np.linalg.norm(g_d - g_q) / np.linalg.norm(g_q)))
    print("| layer | levels | kernel rel. RMS change | features rel. diff | Gram rel. diff |")
    print("|---|---:|---:|---:|---:|")
    for n in layers:
        r = np.array(rows[n])
        print(f"| {n} | {len(np.unique(params[n]['kernel']))} | {r[:, 0].mean():.4f} | "
              f"{r[:, 1].mean():.4f} (max {r[:, 1].max():.4f}) | {r[:, 2].mean():.4f} "
              f"(max {r[:, 2].max():.4f}) |")


if __name__ == "__main__":
    main()
