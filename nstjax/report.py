"""report.html: one self-contained page per sweep directory or run directory, built from the
directory alone (`nstjax.results`), that opens from disk with no server and no network.

A sweep's page: its axes and base config, a sortable table of the cells (axis values, status,
`metric.*`, loss terms, counts, seconds; each linked to its directory), the final images as
thumbnails grouped by the axes (each a link to the full image), per metric and axis the mean
and std over seeds (error bars; categorical axes as grouped points, numeric axes as lines) and
the loss curves of each structure group. A run's page: its status, metrics, final image and
snapshots, loss curves and resolved config. Charts are inline SVG (`nstjax.svg`); images are
relative links to the files in the directory; the only script sorts the table.

    nstjax report runs/sweeps/ratio        # or a run directory; prints the page's path
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nstjax import results, runtime, svg
from nstjax.errors import UserError

PAGE = "report.html"
TERMS = ("total", "content", "style", "tv")
COUNTS = ("iterations", "evaluations", "compile_seconds", "solve_seconds",
          "batch_solve_seconds", "batch_compile_seconds")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;
color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid
#ddd;padding-bottom:4px}h3{font-size:15px;margin:16px 0 6px}
.muted{color:#666}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;max-height:420px}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:3px 7px;
text-align:right;white-space:nowrap}th{background:#f0f0f0;position:sticky;top:0}
td.t,th.t{text-align:left}table.cells th{cursor:pointer;user-select:none}
table.cells th.asc::after{content:" \\25B2"}table.cells th.desc::after{content:" \\25BC"}
.scroll{overflow:auto;max-height:70vh;border:1px solid #ddd}
.s-done,.s-converged{color:#17702a}.s-failed,.s-interrupted,.s-killed{color:#b00020}
.s-running,.s-pending{color:#8a6d00}
.grid{display:flex;flex-wrap:wrap;gap:10px}.tile{width:180px;font-size:12px}
.tile img{width:180px;height:180px;object-fit:contain;background:#333;display:block}
.tile .none{width:180px;height:180px;background:#555;color:#fff;display:flex;
align-items:center;justify-content:center}
table.sheet td{vertical-align:top;text-align:center}table.sheet th{text-align:right;
white-space:normal;max-width:200px}
.charts{display:flex;flex-wrap:wrap;gap:12px}svg.chart{background:#fff;font-size:11px;
border:1px solid #ddd}dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}
dt{font-weight:600}dd{margin:0}
"""

SORT_JS = """
document.querySelectorAll('table.cells').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var asc=!th.classList.contains('asc');
    t.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc')});
    th.classList.add(asc?'asc':'desc');
    var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    function key(r){var s=r.cells[i].getAttribute('data-v')||r.cells[i].textContent;
      var n=parseFloat(s);return isNaN(n)?s:n}
    rows.sort(function(a,b){var x=key(a),y=key(b);
      if(typeof x!==typeof y){x=String(x);y=String(y)}
      return (x<y?-1:x>y?1:0)*(asc?1:-1)});
    rows.forEach(function(r){body.appendChild(r)});
  })});
});
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _href(root: Path, p: Path) -> str:
    """A relative URL from the page in `root` to `p` (percent-encoded)."""
    return quote(Path(os.path.relpath(p, root)).as_posix())


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def _value_text(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else _num(v)


GENERATOR = '<meta name="generator" content="nstjax report">'  # marks a page as ours
_LEGACY = "document.querySelectorAll('table.cells')"  # in every page before the mark
MAX_PAGE_BYTES = 64 << 20  # a report.html larger than this is not one of ours


class ForeignFile(UserError):
    """A report.html that nstjax did not write is in the way (replaced only with `force`)."""


def ours(path: Path) -> bool:
    """Whether the file at `path` is a report page nstjax wrote (or there is none): the only
    report.html `write` replaces without `force`."""
    try:
        if not path.exists() and not path.is_symlink():
            return True
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_PAGE_BYTES:
            return False
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return GENERATOR in text[:4096] or (text.startswith("<!DOCTYPE html>") and _LEGACY in text
                                          and "<title>" in text[:2048])


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + GENERATOR
            + f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + f"\n<script>{SORT_JS}</script>\n</body></html>\n")


def _final_image(d: Path) -> Path | None:
    for p in sorted(d.glob("final.*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return p
    return None


def _history(d: Path) -> dict:
    try:
        return results.read_history(d / "history.csv")
    except (UserError, OSError, ValueError):
        return {}


# ---------------------------------------------------------------- sweeps


SHORT = 28  # characters of a value's label in tables and legends; the full text on hover


def short(text: str, n: int = SHORT) -> str:
    """`text` cut to n characters (with an ellipsis)."""
    return text if len(text) <= n else text[: n - 1].rstrip() + "\u2026"


def _dims(sw: results.Sweep) -> list[dict]:
    """Each dim: keys, value texts (`texts`: the zip label or the values, cut to SHORT
    characters; `full`: every key=value), `head` (short key names) and `head_full`, and per
    cell the index of its value (None if unknown)."""
    from nstjax.sweep.spec import _PATH_KEYS as PATH_KEYS
    from nstjax.sweep.spec import short_names, value_text

    names = short_names([k for dim in sw.dims for k in dim.get("keys") or []])
    out = []
    for dim in sw.dims:
        keys, values = list(dim.get("keys") or []), list(dim.get("values") or [])
        labels = dim.get("labels") or []
        full = ["; ".join(f"{k}={_value_text(x)}" for k, x in zip(keys, v)) for v in values]
        if len(keys) == 1:
            texts = [(value_text(keys[0], v[0]) if keys[0] in PATH_KEYS else _value_text(v[0]))
                     if v else "" for v in values]
        else:
            texts = ["_".join(value_text(k, x) for k, x in zip(keys, v)) for v in values]
        texts = [labels[i] if i < len(labels) and labels[i] else short(t)
                 for i, t in enumerate(texts)]
        canon = [json.dumps(list(v), sort_keys=True) for v in values]
        index = {}
        for c in sw.cells:
            key = json.dumps([c.values.get(k) for k in keys], sort_keys=True)
            index[c.name] = canon.index(key) if key in canon else None
        numeric = len(keys) == 1 and not labels and all(
            isinstance(v[0], (int, float)) and not isinstance(v[0], bool) for v in values)
        head = ("pair" if keys == ["content", "style"] else "+".join(names.get(k, k) for k in keys)
                if len(keys) > 1 else " + ".join(keys))
        out.append({"keys": keys, "values": values, "texts": texts, "full": full,
                    "head": head, "head_full": " + ".join(keys), "index": index,
                    "numeric": numeric})
    return out


# Metrics in the order the page shows them: first those no built-in loss kind minimizes,
# then content similarity, then the Gram distances (gram's own loss); with what each favours
# by construction.
METRIC_ORDER = ("color", "weave", "swd", "structure", "edges", "style", "content")
METRIC_NOTES = {
    "color": "sliced Wasserstein distance of pixel colours to the style (lower is better); "
             "no kind minimizes it",
    "weave": "local periodicity, the grid artefact (lower is better); no kind minimizes it",
    "swd": "sliced Wasserstein distance of VGG features to the style's (lower is better); "
           "leans to sliced_wasserstein, which minimizes a distance of the same family",
    "structure": "SSIM of the low-pass luminance against the content (higher keeps more of "
                 "the photo); favours under-stylized results",
    "edges": "correlation of edge strength with the content (higher keeps more); favours "
             "under-stylized results",
    "style": "Gram distance to the style: the gram kind's own loss, so it favours gram",
    "content": "feature distance to the content: the content term's own loss",
}


def _metric_names(sw: results.Sweep) -> list[str]:
    names = sorted({k for c in sw.cells for k in c.metrics})
    rank = {m: i for i, m in enumerate(METRIC_ORDER)}
    return sorted(names, key=lambda k: (rank.get(k.split(".")[0], len(rank)), k))


def _metric_notes(sw: results.Sweep) -> list[str]:
    names = [m for m in _metric_names(sw) if m in METRIC_NOTES]
    if not names:
        return []
    return ["<dl>", *(f"<dt>metric.{_esc(m)}</dt><dd>{_esc(METRIC_NOTES[m])}</dd>"
                      for m in names), "</dl>"]


def _cells_table(sw: results.Sweep, dims: list[dict]) -> list[str]:
    metrics = _metric_names(sw)
    extra_terms = sorted({k for c in sw.cells for k in (c.record.get("final_loss") or {})
                          if k not in TERMS})
    head = (["cell", "group"] + [d["head"] for d in dims] + ["status"]
            + [f"metric.{m}" for m in metrics] + list(TERMS) + extra_terms + list(COUNTS))
    tips = ["", ""] + [d["head_full"] for d in dims]
    left = 3 + len(dims)
    out = ['<div class="scroll"><table class="cells"><thead><tr>'
           + "".join(f'<th class="{"t" if i < left else ""}"'
                     + (f' title="{_esc(tips[i])}"' if i < len(tips) and tips[i] else "")
                     + f">{_esc(h)}</th>" for i, h in enumerate(head))
           + "</tr></thead><tbody>"]
    for c in sw.cells:
        fin = c.record.get("final_loss") or {}
        vals = [(d["texts"][d["index"][c.name]], d["full"][d["index"][c.name]])
                if d["index"][c.name] is not None else ("", "") for d in dims]
        tip = f' title="{_esc(c.error)}"' if c.error else ""
        name = (f'<a href="{_href(sw.dir, c.dir)}/">{_esc(c.name)}</a>' if c.dir.is_dir()
                else _esc(c.name))  # a deleted cell directory is not linked
        cells = [f'<td class="t">{name}</td>',
                 f'<td class="t">{_esc(c.group)}</td>',
                 *(f'<td class="t" title="{_esc(f)}">{_esc(v)}</td>' for v, f in vals),
                 f'<td class="t s-{_esc(c.status)}"{tip}>{_esc(c.status)}</td>']
        nums = ([c.metrics.get(m) for m in metrics] + [fin.get(k) for k in TERMS]
                + [fin.get(k) for k in extra_terms] + [c.record.get(k) for k in COUNTS])
        cells += [f'<td data-v="{_esc(_value_text(v))}">{_esc(_num(v))}</td>' for v in nums]
        out.append(f'<tr id="cell-{_esc(c.name)}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def _tile(sw: results.Sweep, c: results.Cell, caption: list[str]) -> str:
    img = _final_image(c.dir)
    cap = "<br>".join(_esc(t) for t in caption)
    status = "" if c.status in ("done", "converged") else (
        f'<span class="s-{_esc(c.status)}">{_esc(c.status)}</span><br>')
    if img is None:
        pic = f'<div class="none">{_esc(c.status)}</div>'
    else:
        src = _href(sw.dir, img)
        pic = (f'<a href="{src}"><img src="{src}" alt="{_esc(c.name)}" loading="lazy" '
               f'title="{_esc(c.name)}"></a>')
    return f'<div class="tile" data-cell="{_esc(c.name)}">{pic}{status}{cap}</div>'


def _images(sw: results.Sweep, dims: list[dict], label_metric: str | None) -> list[str]:
    """The thumbnails: rows by every varying dim but the last, columns by the last."""
    varying = [d for d in dims if len(d["values"]) > 1]

    def metric(c: results.Cell) -> list[str]:
        if not label_metric or label_metric not in c.metrics:
            return []
        return [f"{label_metric}={svg.fmt(c.metrics[label_metric])}"]

    if len(varying) < 2:
        tiles = [_tile(sw, c, [" ".join(d["texts"][d["index"][c.name]] for d in varying
                                         if d["index"][c.name] is not None) or c.name,
                               *metric(c)]) for c in sw.cells]
        return ['<div class="grid">', *tiles, "</div>"]
    *row_dims, col = varying
    rows: dict[tuple, dict[int, results.Cell]] = {}
    for c in sw.cells:
        key = tuple(d["index"][c.name] for d in row_dims)
        rows.setdefault(key, {})[col["index"][c.name]] = c
    corner = " / ".join(d["head"] for d in row_dims) + " \\ " + col["head"]
    corner_full = " / ".join(d["head_full"] for d in row_dims) + " \\ " + col["head_full"]
    out = [f'<div class="scroll"><table class="sheet"><thead><tr><th title="'
           f'{_esc(corner_full)}">{_esc(corner)}</th>'
           + "".join(f'<th class="t" title="{_esc(f)}">{_esc(t)}</th>'
                     for t, f in zip(col["texts"], col["full"]))
           + "</tr></thead><tbody>"]
    for key in sorted(rows, key=lambda k: [(-1 if i is None else i) for i in k]):
        label = ", ".join(d["texts"][i] for d, i in zip(row_dims, key) if i is not None)
        full = "\n".join(d["full"][i] for d, i in zip(row_dims, key) if i is not None)
        tds = "".join(f"<td>{_tile(sw, rows[key][j], metric(rows[key][j]))}</td>"
                      if j in rows[key] else "<td></td>" for j in range(len(col["values"])))
        out.append(f'<tr><th title="{_esc(full)}">{_esc(label)}</th>{tds}</tr>')
    out.append("</tbody></table></div>")
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1; nan for one value) of finite values. Computed on the values
    divided by the largest magnitude, so values near the float maximum do not overflow (a std
    beyond it is inf)."""
    vs = [v for v in values if math.isfinite(v)]
    if not vs:
        return math.nan, math.nan
    k = max(abs(v) for v in vs) or 1.0
    u = [v / k for v in vs]
    m = math.fsum(u) / len(u)
    s = math.sqrt(math.fsum((v - m) ** 2 for v in u) / (len(u) - 1)) if len(u) > 1 else math.nan
    return m * k, s * k if math.isfinite(s) else s


def axis_series(sw: results.Sweep, dims: list[dict], j: int, metric: str) -> list[svg.Series]:
    """For dim j and a metric: one series per combination of the other varying dims (the
    `seed` dim excluded: it is averaged over); per value of dim j the mean and std over the
    finished cells. x: the value (numeric dims) or its index (categorical)."""
    d = dims[j]
    others = [k for k, dk in enumerate(dims)
              if k != j and len(dk["values"]) > 1 and dk["keys"] != ["seed"]]
    groups: dict[tuple, dict[int, list[float]]] = {}
    for c in sw.cells:
        i = d["index"][c.name]
        if c.status not in ("done", "converged") or i is None or metric not in c.metrics:
            continue
        key = tuple(dims[k]["index"][c.name] for k in others)
        groups.setdefault(key, {}).setdefault(i, []).append(float(c.metrics[metric]))
    series = []
    for key in sorted(groups, key=lambda k: [(-1 if i is None else i) for i in k]):
        name = ", ".join(f"{dims[k]['head']}={dims[k]['texts'][i]}"
                         for k, i in zip(others, key) if i is not None) or "all cells"
        full = "; ".join(dims[k]["full"][i] for k, i in zip(others, key) if i is not None)
        pts = sorted(groups[key].items())
        stats = [mean_std(v) for _, v in pts]
        xs = [float(d["values"][i][0]) if d["numeric"] else float(i) for i, _ in pts]
        series.append(svg.Series(name, xs, [m for m, _ in stats], [s for _, s in stats],
                                 full if full != name else ""))
    if not d["numeric"] and len(series) > 1:  # grouped: side by side around each category
        w = min(0.5, 0.8 / len(series))
        series = [s._replace(xs=[x + (k - (len(series) - 1) / 2) * w for x in s.xs])
                  for k, s in enumerate(series)]
    return series


REPLICATE_KEYS = ("seed", "content", "style")  # dims holding one: replicates, averaged over


def replicate_table(sw: results.Sweep, level: float = 0.95) -> tuple[list[str], list[dict]]:
    """Mean over the replicates (the seed axis and the image pairs: dims holding a key of
    REPLICATE_KEYS) per combination of the other dims, over the finished cells: for each
    metric its mean, std (n - 1), t confidence band (`level`) and n. ([], []) without a
    replicate dim of two or more values. Rows: {"group": {dim head: text}, "n": cells,
    "metrics": {name: (mean, std, lo, hi, n)}}."""
    from nstjax.sweep.frontier import t_band

    dims = _dims(sw)
    reps = [j for j, d in enumerate(dims) if any(k in REPLICATE_KEYS for k in d["keys"])]
    if not any(len(dims[j]["values"]) > 1 for j in reps):
        return [], []
    others = [j for j in range(len(dims)) if j not in reps and len(dims[j]["values"]) > 1]
    names = _metric_names(sw)
    by: dict[tuple, list[results.Cell]] = {}
    for c in sw.cells:
        if c.status in ("done", "converged"):
            by.setdefault(tuple(dims[j]["index"][c.name] for j in others), []).append(c)
    rows = []
    for key in sorted(by, key=lambda k: [(-1 if i is None else i) for i in k]):
        cells = by[key]
        stats = {}
        for m in names:
            vs = [float(c.metrics[m]) for c in cells if m in c.metrics]
            if vs:
                mean, lo, hi = t_band(vs, level)
                stats[m] = (mean, mean_std(vs)[1], lo, hi, len(vs))
        rows.append({"group": {dims[j]["head"]: (dims[j]["texts"][i] if i is not None else "")
                               for j, i in zip(others, key)},
                     "n": len(cells), "metrics": stats})
    return [dims[j]["head"] for j in others], rows


def replicate_csv(sw: results.Sweep) -> str | None:
    """summary_mean.csv: `replicate_table` as CSV (columns <dim>, cells, then per metric
    metric.<m>.mean/.std/.ci_lo/.ci_hi/.n), or None without replicates."""
    import csv
    import io

    heads, rows = replicate_table(sw)
    if not rows:
        return None
    names = _metric_names(sw)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*heads, "cells", *(f"metric.{m}.{s}" for m in names
                                   for s in ("mean", "std", "ci_lo", "ci_hi", "n"))])
    for r in rows:
        vals = []
        for m in names:
            st = r["metrics"].get(m)
            vals += ([f"{v:.9g}" for v in st[:4]] + [str(st[4])]) if st else [""] * 5
        w.writerow([*(r["group"][h] for h in heads), r["n"], *vals])
    return buf.getvalue()


def _replicate_section(sw: results.Sweep) -> list[str]:
    heads, rows = replicate_table(sw)
    if not rows:
        return []
    names = _metric_names(sw)
    out = ['<p class="muted">Each row: the mean over image pairs and seeds of the finished '
           "cells, with the 95% t band (n - 1); the per-pair values are in the cells table and "
           "the charts against the pair axis; summary_mean.csv holds the numbers.</p>",
           '<div class="scroll"><table><thead><tr>'
           + "".join(f'<th class="t">{_esc(h)}</th>' for h in heads) + "<th>cells</th>"
           + "".join(f"<th>metric.{_esc(m)}</th>" for m in names) + "</tr></thead><tbody>"]
    for r in rows:
        tds = "".join(f'<td class="t">{_esc(r["group"][h])}</td>' for h in heads)
        tds += f"<td>{r['n']}</td>"
        for m in names:
            st = r["metrics"].get(m)
            if not st:
                tds += "<td></td>"
                continue
            band = (f" [{svg.fmt(st[2])}, {svg.fmt(st[3])}]" if math.isfinite(st[2]) else "")
            tds += f'<td title="n={st[4]}, std {svg.fmt(st[1])}">{svg.fmt(st[0])}{band}</td>'
        out.append(f"<tr>{tds}</tr>")
    out.append("</tbody></table></div>")
    return out


def _axis_charts(sw: results.Sweep, dims: list[dict]) -> list[str]:
    out = []
    seeds = any(d["keys"] == ["seed"] and len(d["values"]) > 1 for d in dims)
    for j, d in enumerate(dims):
        if len(d["values"]) < 2 or d["keys"] == ["seed"]:
            continue
        charts = []
        for m in _metric_names(sw):
            series = axis_series(sw, dims, j, m)
            if not any(s.ys for s in series):
                continue
            vals = [float(v[0]) for v in d["values"]] if d["numeric"] else []
            xlog = bool(vals) and svg.want_log(vals)
            ticks = ([(v, svg.fmt(v)) for v in vals] if d["numeric"] and len(vals) <= 8
                     else None if d["numeric"] else list(enumerate(d["texts"])))
            charts.append(svg.chart(series, title=f"metric.{m}", xlabel=d["head"],
                                    ticks=[(float(t), s) for t, s in ticks] if ticks else None,
                                    xlog=xlog, lines=d["numeric"]))
        if charts:
            out.append(f"<h3 title=\"{_esc(d['head_full'])}\">{_esc(d['head'])}</h3>")
            out.append('<div class="charts">' + "".join(charts) + "</div>")
    if out and seeds:
        out.insert(0, '<p class="muted">Points: the mean over seeds; bars: the std over seeds '
                   "(n - 1).</p>")
    return out


def _curves(runs: list[tuple[str, dict]], terms: tuple[str, ...] = ("total", "content",
                                                                      "style")) -> str:
    charts = []
    for t in terms:
        series = [svg.Series(name, [float(v) for v in h["iter"]], [float(v) for v in h[t]])
                  for name, h in runs if t in h and "iter" in h and len(h["iter"])]
        if series:
            charts.append(svg.chart(series, title=t, xlabel="iteration", width=380,
                                    height=260))
    return '<div class="charts">' + "".join(charts) + "</div>" if charts else ""


def _group_curves(sw: results.Sweep, plan: dict) -> list[str]:
    out = []
    by_name = {c.name: c for c in sw.cells}
    groups = plan.get("groups") or [{"name": g, "cells": [c.name for c in sw.cells
                                                           if c.group == g]}
                                    for g in dict.fromkeys(c.group for c in sw.cells)]
    for g in groups:
        cells = [by_name[n] for n in g.get("cells", []) if n in by_name]
        runs = [(c.name, _history(c.dir)) for c in cells]
        block = _curves([(n, h) for n, h in runs if h])
        if block:
            wh = g.get("size_wh")
            what = f" ({wh[0]}x{wh[1]}, {g.get('solver', '')})" if wh else ""
            out += [f"<h3>{_esc(g.get('name', ''))}{_esc(what)}</h3>", block]
    return out


def _read_text(p: Path, limit: int = 200_000) -> str | None:
    try:
        return p.read_text(encoding="utf-8", errors="replace")[:limit]
    except OSError:
        return None


def sweep_page(d: str | Path, label_metric: str | None = None) -> str:
    """The HTML of a sweep directory's report (`label_metric`: the tiles' metric; default the
    sweep's own, `sweep.label_metric` kept in sweep.json)."""
    sw = results.load_sweep(d)
    try:
        plan = json.loads((sw.dir / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        plan = {}
    plan = plan if isinstance(plan, dict) else {}
    if label_metric is None and isinstance(plan.get("label_metric"), str):
        label_metric = plan["label_metric"]
    dims = _dims(sw)
    counts: dict[str, int] = {}
    for c in sw.cells:
        counts[c.status] = counts.get(c.status, 0) + 1
    body = [f"<h1>sweep {_esc(sw.name)}</h1>",
            f'<p class="muted">{_esc(plan.get("description") or "")} {len(sw.cells)} cell(s): '
            + ", ".join(f'<span class="s-{_esc(k)}">{v} {_esc(k)}</span>'
                        for k, v in counts.items())
            + f"; page written {time.strftime('%Y-%m-%d %H:%M:%S')} (reload to update)</p>",
            "<h2>Axes</h2><dl>"]
    body += [f"<dt title=\"{_esc(x['head_full'])}\">{_esc(x['head'])}</dt><dd>"
             + ", ".join(f'<span title="{_esc(f)}">{_esc(t)}</span>'
                         for t, f in zip(x["texts"], x["full"])) + "</dd>" for x in dims]
    body.append("</dl>")
    links = [(n, sw.dir / n) for n in ("summary.csv", "summary_seeds.csv", "summary_mean.csv",
                                        "frontier.csv", "contact_sheet.png", "sweep.json")
             if (sw.dir / n).is_file()]
    if links:
        body.append("<p>" + " · ".join(f'<a href="{_href(sw.dir, p)}">{_esc(n)}</a>'
                                       for n, p in links) + "</p>")
    # Only an absolute path names the sweep file wherever the page is built from (older
    # sweep.json files hold the path as typed, relative to a directory unknown here).
    src = Path(plan["file"]) if isinstance(plan.get("file"), str) and plan["file"] else None
    src = src if src is not None and src.is_absolute() else None
    text = _read_text(src) if src is not None and src.is_file() else None
    if text is not None:
        body.append(f"<details><summary>sweep file {_esc(src)}</summary><pre>{_esc(text)}"
                    "</pre></details>")
    first = next((c for c in sw.cells if (c.dir / "config.yaml").is_file()), None)
    if first is not None:
        body.append(f"<details><summary>resolved config of cell {_esc(first.name)} (the base "
                    f"with its axis values)</summary><pre>"
                    f"{_esc(_read_text(first.dir / 'config.yaml') or '')}</pre></details>")
    body += ["<h2>Metrics</h2>", '<p class="muted">Led by the style metrics that no built-in '
             "loss kind minimizes; a metric a kind minimizes flatters that kind.</p>",
             *_metric_notes(sw)]
    body += ["<h2>Cells</h2>", '<p class="muted">Click a column to sort; a cell\'s name opens '
             "its run directory.</p>", *_cells_table(sw, dims)]
    body += ["<h2>Final images</h2>", *_images(sw, dims, label_metric)]
    from nstjax.sweep.frontier import html_section

    front = html_section(sw.dir)
    if front:
        body += ["<h2>Trade-off frontier</h2>", *front]
    reps = _replicate_section(sw)
    if reps:
        body += ["<h2>Over image pairs and seeds</h2>", *reps]
    charts = _axis_charts(sw, dims)
    if charts:
        body += ["<h2>Metrics against each axis</h2>", *charts]
    curves = _group_curves(sw, plan)
    if curves:
        body += ["<h2>Loss curves per group</h2>", *curves]
    return _page(f"sweep {sw.name}", body)


# ---------------------------------------------------------------- runs


def run_page(d: str | Path) -> str:
    """The HTML of a run directory's report."""
    r = results.load_run(d)
    rec = r.record
    fin = rec.get("final_loss") or {}
    facts = [("status", rec.get("status")), ("error", rec.get("error")),
             *((k, rec.get(k)) for k in ("iterations", "evaluations", "compile_seconds",
                                         "solve_seconds", "wall_seconds", "device")),
             *((f"loss {k}", fin.get(k)) for k in TERMS),
             *((f"metric.{k}", v) for k, v in sorted(r.metrics.items()))]
    body = [f"<h1>run {_esc(r.dir.name)}</h1>", "<dl>"]
    body += [f"<dt>{_esc(k)}</dt><dd>{_esc(_num(v))}</dd>" for k, v in facts
             if v not in (None, "")]
    body.append("</dl>")
    img = _final_image(r.dir)
    if img is not None:
        src = _href(r.dir, img)
        body += ["<h2>Final image</h2>",
                 f'<a href="{src}"><img src="{src}" alt="final" style="max-width:100%;'
                 'max-height:80vh"></a>']
    snaps = sorted(p for p in r.dir.glob("*iter_*.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if snaps:
        body += ["<h2>Snapshots</h2>", '<div class="grid">']
        body += [f'<div class="tile"><a href="{_href(r.dir, p)}"><img src="{_href(r.dir, p)}" '
                 f'alt="{_esc(p.stem)}" loading="lazy"></a>{_esc(p.stem)}</div>' for p in snaps]
        body.append("</div>")
    if r.history:
        layers = tuple(k for k in r.history if "/" in k)
        body += ["<h2>Loss curves</h2>", _curves([("run", r.history)], (*TERMS[:3], "tv"))]
        if layers:
            per = [(k, {"iter": r.history["iter"], "term": r.history[k]}) for k in layers]
            body.append(_curves(per, ("term",)).replace(">term<", ">terms per layer<"))
    text = _read_text(r.dir / "config.yaml")
    if text is not None:
        body += ["<h2>Resolved config</h2>", f"<pre>{_esc(text)}</pre>"]
    files = [n for n in ("run.json", "history.csv", "config.yaml") if (r.dir / n).is_file()]
    body.append("<p>" + " · ".join(f'<a href="{quote(n)}">{n}</a>' for n in files) + "</p>")
    return _page(f"run {r.dir.name}", body)


def write(d: str | Path, label_metric: str | None = None, force: bool = False) -> Path:
    """Write `d`/report.html (atomically) for a sweep directory (with sweep.json or
    summary.csv) or a run directory (with run.json); returns its path. A report.html that
    nstjax did not write (`ours`) is replaced only with `force`."""
    d = Path(d)
    if not d.is_dir():
        raise UserError(f"{d}: no such directory; give a sweep's --out directory or a run "
                        "directory")
    if not force and not ours(d / PAGE):
        raise ForeignFile(f"{d / PAGE}: exists and was not written by nstjax report; pass "
                        "--force to replace it, or move it away")
    if (d / "sweep.json").is_file() or (d / "summary.csv").is_file():
        text = sweep_page(d, label_metric)
    elif (d / "run.json").is_file():
        text = run_page(d)
    else:
        raise UserError(f"{d}: neither a sweep directory (sweep.json) nor a run directory "
                        "(run.json)")
    runtime.write_atomic(d / PAGE, text)
    return d / PAGE
