"""Generate the demo masks for the spatial-control examples (deterministic, no external assets).

    python scripts/make_demo_masks.py [--out configs/demo]

Writes ``mask_land.png`` (white above the demo content's horizon: sky, hills, houses) and
``mask_water.png`` (its complement: the lake), both 384x288 grayscale with a 2-pixel feather,
matching ``content.png`` from ``make_demo_images.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

W, H = 384, 288
HORIZON = 180  # as in make_demo_images.py


def make_masks() -> dict[str, Image.Image]:
    land = np.zeros((H, W), np.uint8)
    land[:HORIZON] = 255
    img = Image.fromarray(land, "L").filter(ImageFilter.GaussianBlur(2))
    water = Image.fromarray(255 - np.asarray(img), "L")
    return {"mask_land.png": img, "mask_water.png": water}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo"))
    out = Path(p.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    for name, img in make_masks().items():
        img.save(out / name, optimize=True)
        print(out / name)


if __name__ == "__main__":
    main()
