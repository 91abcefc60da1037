"""What a sweep directory shows, rebuilt from the cells' run directories (which stay the source
of truth):

- summary.csv: one row per cell: axis values (columns `axis.<key>`), labels, status, every
  final loss term (the objective's per-layer terms included), counts and seconds, and
  `metric.<name>` columns (the reference evaluation in each cell's run.json: comparable
  across cells whatever their loss);
- summary_seeds.csv (when `seed` is an axis): mean and std over the seeds of every numeric
  column, per combination of the other axes (image pairs included: the per-pair breakdown):
  the noise floor of the comparison;
- summary_mean.csv (with seeds or image pairs, `pairs:`): per combination of the other axes,
  each metric's mean over pairs and seeds with its std, 95% t band and n;
- report.html: one self-contained page with all of it (`nstjax.report`), also rewritten after
  each group while the sweep runs;
- contact_sheet.png: the final images, labelled (with `sweep.label_metric`, also that metric);
- plots/<group>.png: loss curves per structure group; plots/axis-<key>.png: per axis, the
  metrics (y, one shared axis per metric) against the axis values (x), across all groups.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

import nstjax.sweep.store as store
from nstjax import runtime
from nstjax.report import ForeignFile, mean_std
from nstjax.sweep.plan import Group
from nstjax.sweep.spec import Cell, Sweep, canon, safe_name

SUMMARY_TAIL = ("status", "error", "total", "content", "style", "tv", "iterations",
                "evaluations", "compile_seconds", "solve_seconds", "batch_solve_seconds",
                "batch_compile_seconds")
TERMS = ("total", "content", "style", "tv")
COUNTS = ("iterations", "evaluations", "compile_seconds", "solve_seconds",
          "batch_solve_seconds", "batch_compile_seconds")
PLOT_METRICS = ("swd", "color", "weave", "structure", "style")  # no-loss metrics first


def _record(out: Path, c: Cell) -> dict:
    return store.record(store.cell_dir(out, c)) or {}


def _num(v: Any) -> str:
    return f"{v:.9g}" if isinstance(v, float) else ("" if v is None else str(v))


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def summary_rows(out: Path, sw: Sweep, cells: list[Cell]) -> list[dict]:
    """One row per cell: axis values, labels, status, error, every final loss term, counts,
    seconds and `metric.<name>` (strings, as written to summary.csv; missing values empty)."""
    rows = []
    for c in cells:
        rec = _record(out, c)
        fin = _dict(rec.get("final_loss"))
        status = rec.get("status") if isinstance(rec.get("status"), str) else ""
        status = status or ("failed" if c.error else "pending")
        row = {"cell": c.name, "group": c.group, "dir": f"cells/{c.dir or c.name}",
               **{axis_col(k): (canon(v) if isinstance(v, (list, dict)) else _num(v))
                  for k, v in c.values.items()},
               **{_label_col(sw, j): s for j, s in c.labels.items()},
               "status": status, "error": rec.get("error") or c.error,
               **{k: _num(fin.get(k)) for k in TERMS},
               **{k: _num(rec.get(k)) for k in COUNTS},
               **{k: _num(v) for k, v in fin.items() if k not in TERMS},
               **{f"metric.{k}": _num(v) for k, v in _dict(rec.get("metrics")).items()}}
        rows.append(row)
    return rows


AXIS = "axis."  # axis columns: `axis.<dotted key>`, never a loss term's or metric's name


def axis_col(key: str) -> str:
    """The column of an axis key in summary.csv and `results.Sweep.rows()`: `axis.<key>`
    (an axis `style` is `axis.style`, the style loss term stays `style`)."""
    return AXIS + key


def _columns(sw: Sweep, rows: list[dict]) -> list[str]:
    """cell, group, dir, axis columns (`axis.<key>`), labels, SUMMARY_TAIL, further terms
    (sorted), metrics (style, content, then the rest sorted)."""
    labels = [_label_col(sw, j) for j, d in enumerate(sw.dims) if d.labels]
    head = ["cell", "group", "dir", *map(axis_col, sw.keys), *labels, *SUMMARY_TAIL]
    rest = {k for r in rows for k in r} - set(head)
    metrics = sorted((k for k in rest if k.startswith("metric.")),
                     key=lambda k: (k not in ("metric.style", "metric.content"), k))
    return [*head, *sorted(rest - set(metrics)), *metrics]


def _label_col(sw: Sweep, j: int) -> str:
    labelled = [i for i, d in enumerate(sw.dims) if d.labels]
    return "label" if len(labelled) == 1 else f"label{labelled.index(j)}"


def _csv(cols: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def summary_csv(out: Path, sw: Sweep, cells: list[Cell]) -> str:
    rows = summary_rows(out, sw, cells)
    return _csv(_columns(sw, rows), rows)


def _float(text: str) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def seed_stats(sw: Sweep, cells: list[Cell], rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Mean and std (n - 1 in the denominator) over the `seed` axis of every numeric result
    column, per combination of the other axes, over the finished cells: (columns, rows)."""
    others = [k for k in sw.keys if k != "seed"]
    cols = _columns(sw, rows)
    skip = {"cell", "group", "dir", "status", "error", *map(axis_col, sw.keys), *COUNTS}
    skip |= {k for k in cols if k.startswith("label")}
    numeric = [k for k in cols if k not in skip]
    by: dict[str, list[tuple[Cell, dict]]] = {}
    for c, r in zip(cells, rows):
        if r["status"] in store.FINISHED:
            by.setdefault(canon([c.values.get(k) for k in others]), []).append((c, r))
    out_rows = []
    for members in by.values():
        c0 = members[0][0]
        row = {axis_col(k): (canon(c0.values[k]) if isinstance(c0.values[k], (list, dict))
                             else _num(c0.values[k])) for k in others}
        row["seeds"] = str(len(members))
        for k in numeric:
            vs = [v for v in (_float(r.get(k)) for _, r in members) if v is not None]
            if not vs:
                continue
            mean, std = mean_std(vs)
            row[f"{k}.mean"], row[f"{k}.std"] = _num(mean), _num(std) if len(vs) > 1 else ""
        out_rows.append(row)
    stat_cols = [f"{k}.{s}" for k in numeric for s in ("mean", "std")]
    return [*map(axis_col, others), "seeds", *stat_cols], out_rows


def summarize(out: str | Path, sw: Sweep, cells: list[Cell], groups: list[Group]) -> list[Path]:
    """(Re)build summary.csv (and summary_seeds.csv with a seed axis), contact_sheet.png,
    plots/<group>.png and plots/axis-<key>.png from the cell directories."""
    out = Path(out)
    rows = summary_rows(out, sw, cells)
    runtime.write_atomic(out / "summary.csv", _csv(_columns(sw, rows), rows))
    paths = [out / "summary.csv"]
    if "seed" in sw.keys:
        cols, srows = seed_stats(sw, cells, rows)
        runtime.write_atomic(out / "summary_seeds.csv", _csv(cols, srows))
        paths.append(out / "summary_seeds.csv")
    from nstjax import report as html_report
    from nstjax import results

    mean = html_report.replicate_csv(results.load_sweep(out))
    if mean is not None:
        runtime.write_atomic(out / "summary_mean.csv", mean)
        paths.append(out / "summary_mean.csv")
    sheet = contact_sheet(out, sw, cells, rows=rows)
    runtime.write_atomic(out / "contact_sheet.png", sheet)
    paths.append(out / "contact_sheet.png")
    (out / "plots").mkdir(exist_ok=True)
    for g in groups:
        png = loss_plot(out, g)
        if png:
            runtime.write_atomic(out / "plots" / f"{g.name}.png", png)
            paths.append(out / "plots" / f"{g.name}.png")
    for j, d in enumerate(sw.dims):
        if len(d) < 2:
            continue
        png = axis_plot(out, sw, j)
        if png:
            p = out / "plots" / f"axis-{safe_name('_'.join(d.keys), 64)}.png"
            runtime.write_atomic(p, png)
            paths.append(p)
    try:
        paths.append(write_page(out, sw))
    except ForeignFile as e:  # a report.html of the user's: left alone, the rest is written
        print(f"nstjax: warning: {e}", file=sys.stderr)
    return paths


def write_page(out: Path, sw: Sweep) -> Path:
    """report.html (`nstjax.report`), rewritten atomically; with summary.csv, after each
    group of a running sweep (`progress`) and at its end. A report.html that nstjax did not
    write is left alone (UserError)."""
    from nstjax import report as html_report

    return html_report.write(out, sw.label_metric)


def progress(out: str | Path, sw: Sweep, cells: list[Cell]) -> None:
    """The cheap part of `summarize` (summary.csv, report.html), so that a long sweep can be
    watched by reloading its page."""
    out = Path(out)
    rows = summary_rows(out, sw, cells)
    runtime.write_atomic(out / "summary.csv", _csv(_columns(sw, rows), rows))
    write_page(out, sw)


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


def metric_text(name: str, value: str) -> str:
    """A tile's metric caption, e.g. `style=1.23e+04` (`style=?` without a value)."""
    v = _float(value)
    return f"{name}={v:.3g}" if v is not None else f"{name}=?"


def contact_sheet(out: Path, sw: Sweep, cells: list[Cell], size: int = 192,
                  rows: list[dict] | None = None) -> bytes:
    """PNG grid of the cells' final images, labelled (and with `sw.label_metric`'s value); a
    2-D grid when two dims vary."""
    from PIL import Image, ImageDraw

    size = max(64, min(size, 6000 // max(1, math.ceil(math.sqrt(len(cells))))))
    rows = rows if rows is not None else summary_rows(out, sw, cells)
    status = {r["cell"]: r["status"] for r in rows}
    metric = {r["cell"]: metric_text(sw.label_metric, r.get(f"metric.{sw.label_metric}", ""))
              for r in rows} if sw.label_metric else {}
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
        top, cap = line + 2 * pad, line if metric else 0
    else:
        n = len(cells)
        cols = min(n, 6) if n <= 12 else math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        pos = {c.name: divmod(i, cols) for i, c in enumerate(cells)}
        left, top = 0, 0
        cap = line * (max(1, len(varying)) + bool(metric)) + pad
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
            texts = [] if len(varying) == 2 else [c.texts[k] for k in varying] or [c.label]
            texts += [metric[c.name]] if metric else []
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
    return _png(fig, f"{g.name} ({g.hw[1]}x{g.hw[0]}, {g.settings.name})")


def _png(fig, title: str) -> bytes:
    """A titled matplotlib Figure as PNG bytes."""
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def axis_plot(out: Path, sw: Sweep, j: int) -> bytes | None:
    """PNG: for dim `j`, each metric of PLOT_METRICS (one panel each) against the dim's values:
    per combination of the other varying dims (seed excluded), the mean over seeds with the
    std as error bars (`nstjax.report.axis_series`, as report.html draws it); categorical
    dims as grouped points, numeric dims as lines; finished cells only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from nstjax import report as html_report
    from nstjax import results, svg

    rsw = results.load_sweep(out)
    dims = html_report._dims(rsw)
    if j >= len(dims):
        return None
    d = dims[j]
    panels = [(m, html_report.axis_series(rsw, dims, j, m)) for m in PLOT_METRICS]
    panels = [(m, ss) for m, ss in panels if any(s.ys for s in ss)]
    if not panels:
        return None
    fig = Figure(figsize=(5 * len(panels) + 1, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (m, series) in zip(axes, panels):
        ys = [y for s in series for y in s.ys]
        for s in series:
            errs = [e if math.isfinite(e) else 0.0 for e in s.errs or []]
            ax.errorbar(s.xs, s.ys, yerr=errs if any(errs) else None, label=s.name,
                        fmt="o-" if d["numeric"] else "o", lw=1.2, capsize=3)
        if svg.want_log(ys):
            ax.set_yscale("log")
        if d["numeric"]:
            vals = [float(v[0]) for v in d["values"]]
            if svg.want_log(vals):
                ax.set_xscale("log")
            ax.set_xticks(vals, [svg.fmt(v) for v in vals], fontsize=8)
        else:
            ax.set_xticks(range(len(d["texts"])), d["texts"],
                          rotation=30 if len(d["texts"]) > 4 else 0, fontsize=8)
        ax.set_title(f"metric.{m}")
        ax.set_xlabel(", ".join(d["keys"]))
        ax.grid(alpha=0.3)
    if len(panels[0][1]) > 1:
        axes[0].legend(fontsize=7, loc="best")
    seeds = " (mean and std over seeds)" if "seed" in sw.keys else ""
    return _png(fig, f"{sw.name}: {', '.join(d['keys'])}{seeds}")
