"""Generate the project's own demo images procedurally (deterministic, no external assets).

    python scripts/make_demo_images.py [--out configs/demo]

Writes ``content.png`` (a simple landscape with clear edges) and ``style.png`` (swirling,
colourful brush strokes), both 384x288.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 384, 288
HORIZON = 180
SEED = 2015

SKY_TOP = np.array([40, 90, 170], float)
SKY_LOW = np.array([250, 190, 120], float)
PALETTE = [
    (18, 42, 110),
    (30, 80, 170),
    (60, 130, 210),
    (120, 185, 235),
    (250, 215, 60),
    (245, 170, 30),
    (250, 245, 215),
    (30, 140, 130),
    (215, 80, 40),
    (12, 20, 60),
]


def _vertical_gradient(top: np.ndarray, bottom: np.ndarray, h: int, w: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h)[:, None, None] ** 1.4
    return np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3))


def _scene_above_water() -> Image.Image:
    """Sky, sun, two ranges of hills and a row of houses, down to the horizon."""
    sky = _vertical_gradient(SKY_TOP, SKY_LOW, HORIZON, W)
    img = Image.fromarray(sky.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    glow = Image.new("L", (W, HORIZON), 0)
    ImageDraw.Draw(glow).ellipse((230, 30, 330, 130), fill=120)
    img.paste((255, 235, 170), (0, 0), glow.filter(ImageFilter.GaussianBlur(18)))
    draw.ellipse((258, 58, 302, 102), fill=(255, 248, 210))

    xs = np.arange(W + 1)
    far = 120 + 18 * np.sin(xs / 47.0) + 10 * np.sin(xs / 19.0 + 1.0)
    near = 150 + 14 * np.sin(xs / 61.0 + 2.0) + 6 * np.sin(xs / 23.0)
    draw.polygon([(0, HORIZON), *zip(xs, far, strict=True), (W, HORIZON)], fill=(90, 110, 150))
    draw.polygon([(0, HORIZON), *zip(xs, near, strict=True), (W, HORIZON)], fill=(50, 110, 60))

    houses = [(40, 34, (200, 70, 50)), (95, 28, (230, 210, 170)), (150, 40, (180, 120, 60))]
    for x, size, wall in houses:
        base = HORIZON - 2
        top = base - size
        draw.rectangle((x, top, x + size, base), fill=wall, outline=(40, 30, 30))
        draw.polygon(
            [(x - 6, top), (x + size // 2, top - size // 2), (x + size + 6, top)],
            fill=(110, 40, 35),
            outline=(40, 30, 30),
        )
        draw.rectangle((x + 6, top + 8, x + 14, top + 16), fill=(255, 230, 120))
        draw.rectangle((x + size - 14, base - 14, x + size - 6, base), fill=(70, 45, 30))
    for tx in (215, 235, 345):  # trees: trunk plus round crown
        draw.rectangle((tx - 2, HORIZON - 20, tx + 2, HORIZON - 2), fill=(70, 50, 30))
        draw.ellipse((tx - 11, HORIZON - 44, tx + 11, HORIZON - 16), fill=(30, 85, 40))
    return img


def make_content() -> Image.Image:
    """A landscape with a lake that mirrors it, rippled and tinted."""
    rng = np.random.default_rng(SEED)
    top = np.asarray(_scene_above_water(), float)
    depth = H - HORIZON
    rows = HORIZON - 1 - np.arange(depth)  # mirror about the horizon
    mirror = top[rows]
    shift = np.rint(3 * np.sin(np.arange(depth) / 2.3) * np.linspace(0.3, 1, depth)).astype(int)
    for i, s in enumerate(shift):  # horizontal ripples grow towards the viewer
        mirror[i] = np.roll(mirror[i], s, axis=0)
    water = np.array([30, 70, 110], float)
    mirror = 0.6 * mirror + 0.4 * water
    out = np.concatenate([top, mirror], axis=0)
    out[HORIZON : HORIZON + 2] *= 0.7  # shoreline
    out += rng.normal(0, 0.6, out.shape)  # a little sensor-like noise
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def _flow_angle(x: float, y: float, vortices: np.ndarray) -> float:
    """Direction of a swirling flow field made of a few vortices over a gentle drift."""
    vx, vy = 1.0, 0.25
    for cx, cy, strength in vortices:
        dx, dy = x - cx, y - cy
        r2 = dx * dx + dy * dy + 400.0
        vx += -strength * dy / r2 * 60
        vy += strength * dx / r2 * 60
    return math.atan2(vy, vx)


def _stroke(
    draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour: tuple, width: int
) -> None:
    """A thick polyline with round caps."""
    draw.line(points, fill=colour, width=width, joint="curve")
    r = width / 2 - 0.5
    for px, py in (points[0], points[-1]):
        draw.ellipse((px - r, py - r, px + r, py + r), fill=colour)


def make_style() -> Image.Image:
    """Thick colourful strokes that follow a swirling flow field, painted back to front.

    Drawn at 2x and box-downsampled, which anti-aliases the edges.
    """
    rng = np.random.default_rng(SEED + 1)
    vortices = np.array([[100, 90, 1.0], [280, 70, -0.8], [200, 210, 1.2], [340, 230, -1.0]])
    s = 2
    img = Image.new("RGB", (W * s, H * s), PALETTE[1])
    draw = ImageDraw.Draw(img)
    for _ in range(1400):
        x, y = rng.uniform(-20, W + 20), rng.uniform(-20, H + 20)
        colour = np.array(PALETTE[rng.integers(len(PALETTE))], float)
        colour = tuple(int(c) for c in np.clip(colour + rng.normal(0, 6, 3), 0, 255))
        width = int(rng.integers(3, 8))
        points = [(x * s, y * s)]
        for _ in range(int(rng.integers(8, 20))):  # walk along the flow
            a = _flow_angle(x, y, vortices)
            x, y = x + 2 * math.cos(a), y + 2 * math.sin(a)
            points.append((x * s, y * s))
        _stroke(draw, points, colour, width * s)
    for _ in range(60):  # dabs of bright paint, like stars
        x, y, r = rng.uniform(0, W) * s, rng.uniform(0, H) * s, rng.uniform(2, 5) * s
        draw.ellipse((x - r, y - r, x + r, y + r), fill=PALETTE[rng.choice([4, 6])])
    return img.resize((W, H), Image.Resampling.BOX)


def main(argv: list[str] | None = None) -> None:
    """Write content.png and style.png to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("configs/demo"), help="output directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, img in (("content.png", make_content()), ("style.png", make_style())):
        path = args.out / name
        img.save(path, "PNG", optimize=True)
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
