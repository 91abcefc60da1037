"""What a sweep directory shows: summary.csv, contact_sheet.png and plots/<group>.png, rebuilt
from the cells' run directories (which stay the source of truth)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import nstjax.sweep.store as store
from nstjax import runtime
from nstjax.sweep.plan import Group
from nstjax.sweep.spec import Cell, Sweep, canon

SUMMARY_TAIL = ("status", "error", "total", "content", "style", "tv", "iterations",
                "evaluations", "compile_seconds", "solve_seconds")


def _record(out: Path, c: Cell) -> dict:
    return store.record(store.cell_dir(out, c)) or {}


def _num(v: Any) -> str:
    return f"{v:.9g}" if isinstance(v, float) else ("" if v is None else str(v))


def summary_rows(out: Path, sw: Sweep, cells: list[Cell]) -> list[dict]:
    """One row per cell: axis values, status, error, final losses, iterations, seconds."""
    rows = []
    for c in cells:
        rec = _record(out, c)
        fin = rec.get("final_loss") if isinstance(rec.get("final_loss"), dict) else {}
        status = rec.get("status") if isinstance(rec.get("status"), str) else ""
        status = status or ("failed" if c.error else "pending")
        row = {"cell": c.name, "group": c.group, "dir": f"cells/{c.dir or c.name}",
               **{k: (canon(v) if isinstance(v, (list, dict)) else _num(v))
                  for k, v in c.values.items()},
               **{_label_col(sw, j): s for j, s in c.labels.items()},
               "status": status, "error": rec.get("error") or c.error,
               **{k: _num(fin.get(k)) for k in ("total", "content", "style", "tv")},
               **{k: _num(rec.get(k)) for k in ("iterations", "evaluations", "compile_seconds",
                                                "solve_seconds")}}
        rows.append(row)
    return rows


def _label_col(sw: Sweep, j: int) -> str:
    labelled = [i for i, d in enumerate(sw.dims) if d.labels]
    return "label" if len(labelled) == 1 else f"label{labelled.index(j)}"


def summary_csv(out: Path, sw: Sweep, cells: list[Cell]) -> str:
    labels = [_label_col(sw, j) for j, d in enumerate(sw.dims) if d.labels]
    cols = ["cell", "group", "dir", *sw.keys, *labels, *SUMMARY_TAIL]
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, lineterminator="\n")
    w.writeheader()
    w.writerows(summary_rows(out, sw, cells))
    return buf.getvalue()


def summarize(out: str | Path, sw: Sweep, cells: list[Cell], groups: list[Group]) -> list[Path]:
    """(Re)build summary.csv, contact_sheet.png and plots/<group>.png from the cell dirs."""
    out = Path(out)
    runtime.write_atomic(out / "summary.csv", summary_csv(out, sw, cells))
    paths = [out / "summary.csv"]
    sheet = contact_sheet(out, sw, cells)
    runtime.write_atomic(out / "contact_sheet.png", sheet)
    paths.append(out / "contact_sheet.png")
    (out / "plots").mkdir(exist_ok=True)
    for g in groups:
        png = loss_plot(out, g)
        if png:
            runtime.write_atomic(out / "plots" / f"{g.name}.png", png)
            paths.append(out / "plots" / f"{g.name}.png")
    return paths


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _tile(out: Path, c: Cell, status: str, size: int):
    """The cell's final image fitted in size x size (grey with the status if there is none)."""
    from PIL import Image, ImageDraw

    fmt = c.cfg.output.format if c.cfg is not None else "png"
    p = store.cell_dir(out, c) / f"final.{fmt}"
    tile = Image.new("RGB", (size, size), (60, 60, 60))
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            scale = size / max(im.size)
            wh = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            resample = Image.NEAREST if scale > 1 else Image.LANCZOS
            im = im.resize(wh, resample)
            tile.paste(im, ((size - wh[0]) // 2, (size - wh[1]) // 2))
    except (OSError, ValueError):
        pass
    if status not in store.FINISHED:
        d = ImageDraw.Draw(tile)
        d.rectangle([0, 0, size - 1, size - 1], outline=(220, 40, 40), width=3)
        d.text((8, 8), status, fill=(255, 90, 90), font=_font(14))
    return tile


def contact_sheet(out: Path, sw: Sweep, cells: list[Cell], size: int = 192) -> bytes:
    """PNG grid of the cells' final images, labelled; a 2-D grid when two dims vary."""
    from PIL import Image, ImageDraw

    size = max(64, min(size, 6000 // max(1, math.ceil(math.sqrt(len(cells))))))
    status = {r["cell"]: r["status"] for r in summary_rows(out, sw, cells)}
    font = _font(12)
    line = 16
    pad = 6
    varying = [j for j, d in enumerate(sw.dims) if len(d) > 1]
    if len(varying) == 2:
        a, b = varying
        rows, cols = len(sw.dims[a]), len(sw.dims[b])
        pos = {c.name: (c.combo[a], c.combo[b]) for c in cells}
        first = {}
        for c in cells:
            first.setdefault(c.combo[a], c.texts[a])
            first.setdefault(-1 - c.combo[b], c.texts[b])
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left = min(240, max(int(probe.textlength(first[i], font=font)) for i in range(rows))
                   + 2 * pad)
        top, cap = line + 2 * pad, 0
    else:
        n = len(cells)
        cols = min(n, 6) if n <= 12 else math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        pos = {c.name: divmod(i, cols) for i, c in enumerate(cells)}
        left, top = 0, 0
        cap = line * max(1, len(varying)) + pad
    cw, ch = size + pad, size + pad + cap
    sheet = Image.new("RGB", (left + cols * cw + pad, top + rows * ch + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if len(varying) == 2:
        for i in range(rows):
            y = top + i * ch + pad + size // 2 - line // 2
            draw.text((pad, y), _fit(draw, first[i], font, left - pad), fill=(0, 0, 0), font=font)
        for j in range(cols):
            x = left + j * cw + pad
            draw.text((x, pad), _fit(draw, first[-1 - j], font, size), fill=(0, 0, 0), font=font)
    for c in cells:
        i, j = pos[c.name]
        x, y = left + j * cw + pad, top + i * ch + pad
        sheet.paste(_tile(out, c, status[c.name], size), (x, y))
        if cap:
            texts = [c.texts[k] for k in varying] or [c.label]
            for k, t in enumerate(texts):
                draw.text((x, y + size + 2 + k * line), _fit(draw, t, font, size),
                          fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def _history(d: Path) -> list[dict]:
    try:
        with open(d / "history.csv", newline="") as f:
            return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    except (OSError, ValueError, TypeError):
        return []


def loss_plot(out: Path, g: Group) -> bytes | None:
    """PNG of total, style and content loss against iteration for each cell of a group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [(c, _history(store.cell_dir(out, c))) for c in g.cells]
    curves = [(c, h) for c, h in curves if h]
    if not curves:
        return None
    fig = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, term in zip(axes, ("total", "style", "content")):
        for c, h in curves:
            ys = [r[term] for r in h]
            ax.plot([r["iter"] for r in h], ys, label=c.label, lw=1.2)
        if all(r[term] > 0 for _, h in curves for r in h):
            ax.set_yscale("log")
        ax.set_title(term)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{g.name} ({g.hw[1]}x{g.hw[0]}, {g.settings.name})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

