"""Assemble gallery images (docs/gallery/) from finished runs and sweeps (it runs no stylization).

    python scripts/make_gallery.py demo-images                    # small demo copies + CREDITS.md
    python scripts/make_gallery.py pair RUN_DIR [RUN_DIR ...]      # content | style | result(s)
    python scripts/make_gallery.py sheet SWEEP_DIR --metric style  # contact sheet, metric labels
    python scripts/make_gallery.py plot RUN_DIR [RUN_DIR ...]      # loss curves

Outputs go to docs/gallery/ by default (`--out-dir`), as small JPEGs (photos) and PNGs (plots).
`pair` takes the content and style from the first run's config.yaml; each further run adds one
result tile. `sheet` lays out a 2-axis sweep as a grid (rows: first axis), otherwise a row-major
grid; each tile is labelled with its axis values and, with `--metric NAME[,NAME...]`, run.json's
`metrics[NAME]` (default: the final `style` loss when the cell has no metrics); several metrics
go on a second label line.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nstjax import results  # noqa: E402
from nstjax.errors import UserError  # noqa: E402

CREDITS = """# Demo images

Small copies (longer side {size} px, JPEG quality {quality}) of three classic inputs of neural
style transfer, made by `python scripts/make_gallery.py demo-images`.

- `tubingen.jpg`: "Neckarfront in Tübingen", photograph by Andreas Praefcke (the content image
  of Gatys et al. 2015), resized. Licence: CC BY 3.0
  (https://creativecommons.org/licenses/by/3.0/); attribution required.
- `starry_night.jpg`: Vincent van Gogh, The Starry Night (1889), resized. Public domain.
- `the_scream.jpg`: Edvard Munch, The Scream (1893), resized. Public domain.

Keep this credit line wherever the photograph or a work derived from it (a stylized result) is
shown: "Neckarfront in Tübingen" by Andreas Praefcke, CC BY 3.0, resized.
"""
DEMO = {"tubingen.jpg": "tubingen.jpg", "starry_night.jpg": "starry_night.jpg",
        "the_scream.jpg": "the_scream.jpg"}
LABEL_H = 18
SHORT = {"style_to_content_ratio": "ratio", "style_weights": "style_w", "tv_weight": "tv",
         "content_layers": "content", "style_layers": "style", "maxiter": "iters",
         "content_weights": "content_w", "learning_rate": "lr"}


def _font(size: int = 12):
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def labelled(img: Image.Image, text: str) -> Image.Image:
    """img with a white strip below it holding `text`, one strip line per text line (each
    shortened to fit)."""
    lines = text.split("\n")
    out = Image.new("RGB", (img.width, img.height + LABEL_H * len(lines)), "white")
    out.paste(img.convert("RGB"), (0, 0))
    d = ImageDraw.Draw(out)
    f = _font()
    for i, line in enumerate(lines):
        d.text((2, img.height + 2 + i * LABEL_H), _fit_text(d, line, f, img.width),
               fill="black", font=f)
    return out


def fit_height(img: Image.Image, h: int) -> Image.Image:
    img = ImageOps.exif_transpose(img).convert("RGB")
    return img.resize((max(1, round(img.width * h / img.height)), h), Image.Resampling.LANCZOS)


def row(tiles: list[Image.Image], gap: int = 4) -> Image.Image:
    w = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    out = Image.new("RGB", (w, max(t.height for t in tiles)), "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    return out


def grid(tiles: list[Image.Image], cols: int, gap: int = 4) -> Image.Image:
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / cols)
    out = Image.new("RGB", (cols * tw + gap * (cols - 1), rows * th + gap * (rows - 1)), "white")
    for i, t in enumerate(tiles):
        out.paste(t, ((i % cols) * (tw + gap), (i // cols) * (th + gap)))
    return out


def save(img: Image.Image, path: Path, quality: int = 85) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.convert("RGB").save(path, quality=quality, optimize=True)
    else:
        img.save(path, optimize=True)
    return path


def _input(run: results.Run, key: str) -> Path:
    v = run.config.get(key)
    v = v[0] if isinstance(v, list) else v
    if not v:
        raise UserError(f"{run.dir / 'config.yaml'}: no {key!r} image recorded")
    p = Path(v)
    if not p.is_absolute():
        p = run.dir / p
    if not p.is_file():
        raise UserError(f"{run.dir / 'config.yaml'}: {key} {p} not found")
    return p


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read image ({e})") from None


def _result(run: results.Run) -> Image.Image:
    p = run.image_path
    if p is None:
        raise UserError(f"{run.dir}: no final image (status {run.status or 'unknown'})")
    return _open(p)


# ---------------------------------------------------------------- commands


def demo_images(src: Path, out: Path, size: int, quality: int) -> list[Path]:
    """Small JPEG copies of the demo pair (longer side `size`) and their CREDITS.md."""
    paths = []
    for name, target in DEMO.items():
        img = ImageOps.exif_transpose(_open(src / name)).convert("RGB")
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        paths.append(save(img, out / target, quality))
        if paths[-1].stat().st_size > 200_000:
            raise UserError(f"{paths[-1]}: {paths[-1].stat().st_size} bytes, over 200 KB; "
                            "lower --size or --quality")
    (out / "CREDITS.md").write_text(CREDITS.format(size=size, quality=quality), encoding="utf-8")
    return [*paths, out / "CREDITS.md"]


def pair(run_dirs: list[str], out: Path, height: int, labels: list[str] | None,
         quality: int = 85, peers: list[str] | None = None,
         zoom: tuple[float, float, float, float] | None = None) -> Path:
    """content | style | each run's result | each peer image, at one height, labelled. With
    `zoom` (x, y, w, h as fractions of the image), a second row shows that crop of each result
    and peer image, resampled to the same height with nearest neighbours (no smoothing: a fine
    pattern stays visible)."""
    runs = [results.load_run(d) for d in run_dirs]
    first = runs[0]
    tiles = [labelled(fit_height(_open(_input(first, "content")), height), "content"),
             labelled(fit_height(_open(_input(first, "style")), height), "style")]
    images = []
    for i, r in enumerate(runs):
        text = labels[i] if labels and i < len(labels) else r.dir.name
        images.append((_result(r), text))
    for p in peers or []:
        images.append((_open(Path(p)), f"peer: {Path(p).stem}"))
    # Every result at the first result's size, so 1x and the crops compare like for like.
    size = ImageOps.exif_transpose(images[0][0]).size if images else None
    for img, text in images:
        img = ImageOps.exif_transpose(img).convert("RGB")
        if size and img.size != size:
            img = img.resize(size, Image.Resampling.LANCZOS)
        tiles.append(labelled(fit_height(img, height), text))
    out_img = row(tiles)
    if zoom is not None and images:
        crops = []
        for img, text in images:
            img = ImageOps.exif_transpose(img).convert("RGB")
            if img.size != size:
                img = img.resize(size, Image.Resampling.LANCZOS)
            x, y, w, h = (round(v * d) for v, d in zip(zoom, (*size, *size)))
            c = img.crop((x, y, x + w, y + h))
            scale = height / c.height
            c = c.resize((round(c.width * scale), height), Image.Resampling.NEAREST)
            crops.append(labelled(c, f"{text} ({scale:.0f}x crop)"))
        top, bottom = out_img, row(crops)
        out_img = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height + 4),
                            "white")
        out_img.paste(top, (0, 0))
        out_img.paste(bottom, (0, top.height + 4))
    return save(out_img, out, quality)


def _value_text(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ",".join(_value_text(x) for x in v) + "]"
    if isinstance(v, str) and "/" in v:
        return Path(v).stem
    return str(v)


def _cell_text(sw: results.Sweep, c: results.Cell, metric: str | None) -> str:
    """Each dim's label (zip groups) or key=value, then the metric."""
    labels = iter(c.labels.values())
    parts = []
    for dim in sw.dims or [{"keys": [k]} for k in sw.keys]:
        if dim.get("labels"):
            parts.append(next(labels, "?"))
        else:
            parts += [f"{SHORT.get(k.rsplit('.', 1)[-1], k.rsplit('.', 1)[-1])}="
                      f"{_value_text(c.values.get(k))}" for k in dim["keys"]]
    if not sw.dims:
        parts = list(labels) + parts
    if not metric:
        return " ".join(parts)
    names = [m.strip() for m in metric.split(",") if m.strip()]
    values = []
    for name in names:
        v = c.metrics.get(name)
        src = "metric"
        if v is None:
            v, src = (c.record.get("final_loss") or {}).get(name), "loss"
        short = _short_metric(name)
        values.append(f"{short}={v:.3g}" if isinstance(v, (int, float)) else f"{short}=n/a")
        if src == "loss" and v is not None:
            values[-1] += " (own loss)"
    # One metric shares the values' line; several get a line of their own.
    if len(names) == 1:
        return " ".join(parts + values)
    return " ".join(parts) + "\n" + " ".join(values)


def _short_metric(name: str) -> str:
    """`style.block4_conv1` -> `style.b4c1` (tile labels are narrow)."""
    return re.sub(r"block(\d)_conv(\d)", r"b\1c\2", name)


def sheet(sweep_dir: str, out: Path, tile: int, metric: str | None, quality: int = 85) -> Path:
    """The sweep's final images in a grid, each labelled with its values (and a metric)."""
    sw = results.load_sweep(sweep_dir)
    if not sw.cells:
        raise UserError(f"{sweep_dir}: the sweep has no cells")
    tiles = []
    for c in sw.cells:
        try:
            img = fit_height(_result(c.run()), tile)
        except UserError:
            img = Image.new("RGB", (tile, tile), (200, 200, 200))
        tiles.append(labelled(img, f"{c.status}: {_cell_text(sw, c, metric)}"
                              if c.status not in ("done", "converged")
                              else _cell_text(sw, c, metric)))
    # Two dims (an axis or a zip group each): the second's size is the number of columns.
    firsts = {}
    for c in sw.cells:
        firsts.setdefault(repr(c.values.get(sw.keys[0])) if sw.keys else "", []).append(c)
    per_row = len(next(iter(firsts.values())))
    cols = per_row if len(firsts) > 1 and per_row > 1 else math.ceil(math.sqrt(len(tiles)))
    return save(grid(tiles, cols), out, quality)


def plot(run_dirs: list[str], out: Path, labels: list[str] | None, column: str) -> Path:
    """`column` (default total) against iterations for each run, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for i, d in enumerate(run_dirs):
        r = results.load_run(d)
        if column not in r.history:
            raise UserError(f"{r.dir / 'history.csv'}: no column {column!r}; columns: "
                            f"{', '.join(r.history)}")
        ax.plot(r.history["iter"], r.history[column],
                label=labels[i] if labels and i < len(labels) else r.dir.name)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"{column} loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "gallery")
    p.add_argument("--jpeg-quality", type=int, default=85, help="pair and sheet JPEGs")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo-images", help="small copies of the demo pair with CREDITS.md")
    d.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "images")
    d.add_argument("--dest", type=Path, default=ROOT / "configs" / "demo")
    d.add_argument("--size", type=int, default=512)
    d.add_argument("--quality", type=int, default=85)
    a = sub.add_parser("pair", help="content | style | results")
    a.add_argument("runs", nargs="+")
    a.add_argument("--name", default="pair.jpg")
    a.add_argument("--height", type=int, default=256)
    a.add_argument("--labels", nargs="*")
    a.add_argument("--peer", action="append", default=[],
                   help="a peer's published result to show beside ours (repeatable)")
    a.add_argument("--zoom", type=float, nargs=4, metavar=("X", "Y", "W", "H"),
                   help="add a row of crops (fractions of the image), nearest-neighbour zoom")
    s = sub.add_parser("sheet", help="a sweep's contact sheet with metric labels")
    s.add_argument("sweep")
    s.add_argument("--name", default="sweep.jpg")
    s.add_argument("--tile", type=int, default=160)
    s.add_argument("--metric", default="style",
                   help="run.json metric(s) for the labels, comma-separated (content,style)")
    g = sub.add_parser("plot", help="loss curves of runs")
    g.add_argument("runs", nargs="+")
    g.add_argument("--name", default="loss.png")
    g.add_argument("--labels", nargs="*")
    g.add_argument("--column", default="total")
    args = p.parse_args(argv)
    try:
        if args.cmd == "demo-images":
            paths = demo_images(args.src, args.dest, args.size, args.quality)
        elif args.cmd == "pair":
            paths = [pair(args.runs, args.out_dir / args.name, args.height, args.labels,
                          args.jpeg_quality, args.peer, args.zoom)]
        elif args.cmd == "sheet":
            paths = [sheet(args.sweep, args.out_dir / args.name, args.tile, args.metric,
                           args.jpeg_quality)]
        else:
            paths = [plot(args.runs, args.out_dir / args.name, args.labels, args.column)]
    except UserError as e:
        print(f"nstjax: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
