"""Trade-off frontiers of a sweep: which group (e.g. loss kind) gives the best style at equal
content preservation?

A frontier sweep varies the balance (an axis such as `loss.style_to_content_ratio`) within
each group, over replicates (seeds, image pairs). Every finished cell is a `Point`: its group,
its replicate (`unit`: the values of the seed and pair axes), its ratio and two metrics, `x`
(content kept, e.g. metric.structure) and `y` (style reached, e.g. metric.swd).

- `curves`: per group and ratio, the mean of x and y over the units with a t confidence band;
- `pareto`: the points no other point beats in both x and y;
- `interpolate`: a unit's y at a chosen x (`at`) along its own curve (linear in x, the points
  ordered by x; nan outside the x range the unit reached);
- `iso_table`: per group, the mean of the units' interpolated y with a percentile bootstrap CI
  over units (an explicit seed), and the paired difference to the best group (units both
  groups have) with its bootstrap CI: `verdict` says `best`, `no difference` (the CI holds 0)
  or `worse`.

Everything here is a pure function of numbers; `nstjax frontier SWEEP_DIR` reads a sweep
directory (`nstjax.results`), prints the table and writes frontier.csv and frontier.png.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Better = Literal["lower", "higher"]
RATIO_KEY = "loss.style_to_content_ratio"
UNIT_KEYS = ("seed", "content", "style", "pair")  # replicate axes: averaged over, paired on
LEVEL = 0.95
BOOT = 2000


@dataclass(frozen=True)
class Point:
    """One finished cell: its group, replicate, ratio and metric values."""

    group: str
    unit: str
    ratio: float
    x: float
    y: float


@dataclass(frozen=True)
class CurvePoint:
    """One ratio of a group's curve: means over the units and the t band (level) of each."""

    ratio: float
    n: int
    x: float
    x_lo: float
    x_hi: float
    y: float
    y_lo: float
    y_hi: float


@dataclass(frozen=True)
class IsoRow:
    """A group's y at x = at: mean over units with its bootstrap CI; the paired difference to
    the best group (nan for the best itself) with its CI; the verdict."""

    group: str
    n: int
    y: float
    lo: float
    hi: float
    diff: float
    diff_lo: float
    diff_hi: float
    verdict: str


def t_band(values, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t_{(1+level)/2, n-1} s / sqrt(n) (s: n - 1 in the
    denominator); the band is nan for fewer than two values."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if v.size < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m, m - h, m + h


def curves(points: list[Point], level: float = LEVEL) -> dict[str, list[CurvePoint]]:
    """Per group (in first-seen order), per ratio (ascending): means and t bands over units."""
    out: dict[str, list[CurvePoint]] = {}
    for g in dict.fromkeys(p.group for p in points):
        mine = [p for p in points if p.group == g]
        rows = []
        for r in sorted({p.ratio for p in mine}):
            at = [p for p in mine if p.ratio == r]
            xs = t_band([p.x for p in at], level)
            ys = t_band([p.y for p in at], level)
            rows.append(CurvePoint(r, len(at), *xs, *ys))
        out[g] = rows
    return out


def pareto(xs, ys, x_better: Better = "higher", y_better: Better = "lower") -> np.ndarray:
    """Boolean mask of the points on the Pareto front: no other point is at least as good in
    both x and y and better in one. Non-finite points are never on it."""
    x = np.asarray(xs, np.float64) * (1.0 if x_better == "higher" else -1.0)
    y = np.asarray(ys, np.float64) * (1.0 if y_better == "lower" else -1.0)
    ok = np.isfinite(x) & np.isfinite(y)
    mask = np.zeros(x.shape, bool)
    best_y = math.inf
    # best x first (ties: best y first); a point is on the front when its y beats every
    # point with a better x, or equals the best so far at the same x
    order = sorted(np.flatnonzero(ok), key=lambda i: (-x[i], y[i]))
    last_x = None
    for i in order:
        if y[i] < best_y:
            mask[i] = True
            best_y = y[i]
            last_x = x[i]
        elif y[i] == best_y and x[i] == last_x:
            mask[i] = True  # a duplicate of a front point
    return mask


def interpolate(at: float, xs, ys) -> float:
    """y at x = at along the polyline of (x, y) ordered by x (equal x: their mean y); nan
    outside [min x, max x] (no extrapolation)."""
    x = np.asarray(xs, np.float64)
    y = np.asarray(ys, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size == 0 or not x.min() <= at <= x.max():
        return math.nan
    ux = np.unique(x)
    uy = np.array([y[x == v].mean() for v in ux])
    return float(np.interp(at, ux, uy))


def iso_values(points: list[Point], at: float) -> dict[str, dict[str, float]]:
    """Per group, per unit: the unit's y interpolated at x = at over its ratios (units whose
    curve does not reach `at` are left out)."""
    out: dict[str, dict[str, float]] = {}
    for g in dict.fromkeys(p.group for p in points):
        per: dict[str, float] = {}
        mine = [p for p in points if p.group == g]
        for u in dict.fromkeys(p.unit for p in mine):
            pts = [p for p in mine if p.unit == u]
            v = interpolate(at, [p.x for p in pts], [p.y for p in pts])
            if math.isfinite(v):
                per[u] = v
        out[g] = per
    return out


def bootstrap_ci(values, seed: int, n_boot: int = BOOT, level: float = LEVEL
                 ) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap CI of the mean, resampling the values with
    replacement n_boot times (numpy's default_rng(seed).integers(0, n, (n_boot, n)))."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [a, 100 - a])
    return float(v.mean()), float(lo), float(hi)


def iso_table(points: list[Point], at: float, y_better: Better = "lower", seed: int = 0,
              n_boot: int = BOOT, level: float = LEVEL) -> list[IsoRow]:
    """Per group: y at x = at (mean over units, bootstrap CI), and against the best group
    (lowest or highest mean y) the paired difference over shared units with its bootstrap CI:
    `no difference` when that CI holds 0, else `worse`. Groups without a unit reaching `at`
    get n = 0 and nan."""
    vals = iso_values(points, at)
    stats = {g: bootstrap_ci(list(v.values()), seed, n_boot, level) for g, v in vals.items()}
    ranked = [g for g in vals if vals[g]]
    sign = 1.0 if y_better == "lower" else -1.0
    best = min(ranked, key=lambda g: sign * stats[g][0]) if ranked else None
    rows = []
    for g, v in vals.items():
        m, lo, hi = stats[g]
        if g == best or best is None or not v:
            d = (math.nan,) * 3
            verdict = "best" if g == best else "no data"
        else:
            shared = [u for u in v if u in vals[best]]
            d = bootstrap_ci([v[u] - vals[best][u] for u in shared], seed, n_boot, level)
            verdict = ("unpaired" if not shared else "no difference" if d[1] <= 0 <= d[2]
                       else "worse")
        rows.append(IsoRow(g, len(v), m, lo, hi, *d, verdict))
    return rows


# ---------------------------------------------------------------- a sweep directory


@dataclass(frozen=True)
class Frontier:
    """What `nstjax frontier` computed for one sweep directory."""

    x: str
    y: str
    at: float
    ratio_key: str
    group_keys: list[str]
    points: list[Point]
    curves: dict[str, list[CurvePoint]]
    front: list[Point]
    table: list[IsoRow]
    x_better: Better
    y_better: Better


def _metric(c, name: str) -> float:
    key = name.removeprefix("metric.")
    v = c.metrics.get(key)
    return float(v) if v is not None else math.nan


def _direction(name: str, default: Better) -> Better:
    from nstjax import metrics

    return metrics.direction(name.removeprefix("metric.")) or default


def points_of(sw, x: str, y: str, ratio_key: str = RATIO_KEY) -> tuple[list[Point], list[str]]:
    """The finished cells of a `results.Sweep` as Points: the group is the values of the axes
    that are neither the ratio nor a replicate axis (UNIT_KEYS, or a zip holding one), the
    unit the replicate axes' values. UserError when the sweep has no such ratio axis."""
    from nstjax.errors import UserError

    if ratio_key not in sw.keys:
        raise UserError(f"{sw.dir}: no axis {ratio_key} (axes: {', '.join(sw.keys) or 'none'});"
                        " a frontier needs the balance as an axis, or name it with --ratio")
    from nstjax import report

    if not sw.dims:  # no sweep.json: one dim per axis key
        sw = type(sw)(sw.dir, sw.cells, sw.name, sw.keys,
                      [{"keys": [k], "values": [[v] for v in dict.fromkeys(
                          c.values.get(k) for c in sw.cells)]} for k in sw.keys])
    dims = report._dims(sw)  # per dim: value texts (zip labels, else short) and cell indexes
    units = [d for d in dims if ratio_key not in d["keys"]
             and any(k in UNIT_KEYS for k in d["keys"])]
    groups = [d for d in dims if ratio_key not in d["keys"] and d not in units]

    def text(ds: list[dict], c, named: bool) -> str:
        parts = []
        for d in ds:
            i = d["index"][c.name]
            t = d["texts"][i] if i is not None else "?"
            parts.append(f"{d['head']}={t}" if named else t)
        return ", ".join(parts)

    pts = []
    for c in sw.cells:
        if c.status not in ("done", "converged"):
            continue
        px, py = _metric(c, x), _metric(c, y)
        if not (math.isfinite(px) and math.isfinite(py)):
            continue
        pts.append(Point(text(groups, c, False) or "all", text(units, c, True) or "one",
                         float(c.values[ratio_key]), px, py))
    return pts, [d["head"] for d in groups]


def compute(d, x: str = "metric.structure", y: str = "metric.swd", at: float | None = None,
            ratio_key: str = RATIO_KEY, seed: int = 0, n_boot: int = BOOT) -> Frontier:
    """The frontier of the sweep directory `d`; `at` None: the median x of the points that
    every group's curves reach (the middle of their common x range)."""
    from nstjax import results
    from nstjax.errors import UserError

    sw = results.load_sweep(d)
    pts, group_keys = points_of(sw, x, y, ratio_key)
    if not pts:
        raise UserError(f"{d}: no finished cell has both {x} and {y}; run the sweep first, or "
                        "name other metrics with --x and --y")
    xb, yb = _direction(x, "higher"), _direction(y, "lower")
    if at is None:
        groups = dict.fromkeys(p.group for p in pts)
        lo = max(min(p.x for p in pts if p.group == g) for g in groups)
        hi = min(max(p.x for p in pts if p.group == g) for g in groups)
        at = (lo + hi) / 2 if lo <= hi else float(np.median([p.x for p in pts]))
    mask = pareto([p.x for p in pts], [p.y for p in pts], xb, yb)
    return Frontier(x, y, float(at), ratio_key, group_keys, pts, curves(pts),
                    [p for p, m in zip(pts, mask) if m],
                    iso_table(pts, float(at), yb, seed, n_boot), xb, yb)


def table_text(f: Frontier) -> str:
    """The iso table as aligned text."""
    head = f"{f.y} at {f.x} = {f.at:.4g} (mean over units, {int(LEVEL * 100)}% bootstrap CI)"
    lines = [head, f"{'group':24s} {'n':>3s} {'mean':>10s} {'CI':>23s} {'vs best':>10s} "
             f"{'CI of difference':>23s}  verdict"]
    for r in f.table:
        ci = f"[{r.lo:.4g}, {r.hi:.4g}]" if math.isfinite(r.lo) else "-"
        dci = f"[{r.diff_lo:.4g}, {r.diff_hi:.4g}]" if math.isfinite(r.diff_lo) else "-"
        diff = f"{r.diff:+.4g}" if math.isfinite(r.diff) else "-"
        lines.append(f"{r.group[:24]:24s} {r.n:3d} {r.y:10.4g} {ci:>23s} {diff:>10s} "
                     f"{dci:>23s}  {r.verdict}")
    return "\n".join(lines)


def csv_text(f: Frontier) -> str:
    """frontier.csv: the iso table (kind `iso`), then each group's curve (kind `curve`)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "group", "ratio", "n", "x", "x_lo", "x_hi", "y", "y_lo", "y_hi",
                "at", "diff", "diff_lo", "diff_hi", "verdict", "x_name", "y_name"])
    g9 = "{:.9g}".format
    for r in f.table:
        w.writerow(["iso", r.group, "", r.n, g9(f.at), "", "", g9(r.y), g9(r.lo), g9(r.hi),
                    g9(f.at), g9(r.diff), g9(r.diff_lo), g9(r.diff_hi), r.verdict, f.x, f.y])
    for g, cps in f.curves.items():
        for c in cps:
            w.writerow(["curve", g, g9(c.ratio), c.n, g9(c.x), g9(c.x_lo), g9(c.x_hi), g9(c.y),
                        g9(c.y_lo), g9(c.y_hi), "", "", "", "", "", f.x, f.y])
    return buf.getvalue()


def series(f: Frontier):
    """The curves as `svg.Series` (x: mean x, y: mean y, errs: half the y band) per group."""
    from nstjax import svg

    out = []
    for g, cps in f.curves.items():
        cps = sorted(cps, key=lambda c: c.x)
        errs = [(c.y_hi - c.y_lo) / 2 if math.isfinite(c.y_hi) else 0.0 for c in cps]
        out.append(svg.Series(g, [c.x for c in cps], [c.y for c in cps], errs,
                              f"{g}: ratios " + ", ".join(f"{c.ratio:g}" for c in cps)))
    return out


def plot_png(f: Frontier, title: str = "") -> bytes:
    """frontier.png (matplotlib, as the sweep's other plots): per group the mean curve with
    its band, the Pareto front's points ringed, the line x = at."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from nstjax.sweep.report import _png

    fig = Figure(figsize=(7, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for g, cps in f.curves.items():
        cps = sorted(cps, key=lambda c: c.x)
        xs, ys = [c.x for c in cps], [c.y for c in cps]
        line, = ax.plot(xs, ys, "o-", label=g, lw=1.4)
        lo = [c.y_lo if math.isfinite(c.y_lo) else c.y for c in cps]
        hi = [c.y_hi if math.isfinite(c.y_hi) else c.y for c in cps]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    if f.front:
        ax.scatter([p.x for p in f.front], [p.y for p in f.front], s=60, facecolors="none",
                   edgecolors="k", lw=0.8, label="Pareto front (cells)")
    ax.axvline(f.at, color="#888", ls="--", lw=1)
    ax.set_xlabel(f"{f.x} ({f.x_better} is better)")
    ax.set_ylabel(f"{f.y} ({f.y_better} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig, title or f"{f.y} against {f.x}")


def write(d, f: Frontier) -> list:
    """frontier.csv and frontier.png in the sweep directory `d` (atomically)."""
    from pathlib import Path

    from nstjax import runtime

    d = Path(d)
    runtime.write_atomic(d / "frontier.csv", csv_text(f))
    runtime.write_atomic(d / "frontier.png", plot_png(f, f"{d.name}: {f.y} against {f.x}"))
    return [d / "frontier.csv", d / "frontier.png"]


def add_arguments(p) -> None:
    """Arguments of `nstjax frontier`."""
    p.add_argument("dir", help="a sweep's --out directory whose axes include the ratio")
    p.add_argument("--x", default="metric.structure", help="content kept (default "
                   "metric.structure)")
    p.add_argument("--y", default="metric.swd", help="style reached (default metric.swd)")
    p.add_argument("--at", help="compare the groups at this x, a finite number (default: "
                   "the middle of the x range every group reached)")
    p.add_argument("--ratio", default=RATIO_KEY, help=f"the balance axis (default {RATIO_KEY})")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--boot", type=int, default=BOOT, help=f"bootstrap resamples ({BOOT})")


FLAG_BOUNDS = {"seed": (0, 2**32 - 1), "boot": (1, 10**6)}


def parse_at(text: str | None) -> float | None:
    """`--at`'s value: a finite number, or None when not given."""
    from nstjax.errors import UserError

    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise UserError(f"--at {text[:40]}: must be a finite number")
    return v


def main(a) -> int:
    """`nstjax frontier`: print the table, write frontier.csv, frontier.png, report.html."""
    from nstjax import report
    from nstjax.errors import check_flags

    check_flags(a, FLAG_BOUNDS)
    at = parse_at(a.at)
    f = compute(a.dir, a.x, a.y, at, a.ratio, a.seed, a.boot)
    print(table_text(f))
    for p in write(a.dir, f):
        print(p)
    print(report.write(a.dir))
    return 0


def saved_choice(d) -> tuple[str, str, float | None]:
    """(x, y, at) of the frontier.csv in `d` (the last `nstjax frontier`), else the defaults."""
    import csv
    from pathlib import Path

    try:
        with open(Path(d) / "frontier.csv", newline="", encoding="utf-8") as fh:
            row = next(csv.DictReader(fh))
        return row["x_name"], row["y_name"], float(row["at"])
    except (OSError, StopIteration, KeyError, ValueError, csv.Error):
        return "metric.structure", "metric.swd", None


def html_section(d) -> list[str]:
    """report.html's frontier: the curves (svg), the iso table with verdicts; [] when the
    sweep has no ratio axis or no cell with both metrics."""
    import html

    from nstjax import svg
    from nstjax.errors import UserError

    x, y, at = saved_choice(d)
    try:
        f = compute(d, x, y, at)
    except (UserError, ValueError):
        return []
    esc = html.escape
    chart = svg.chart(series(f), title=f"{y} against {x}", xlabel=f"{x} ({f.x_better} is "
                      f"better)", ylabel=y, width=560, height=340)

    def num(v: float) -> str:
        return svg.fmt(v) if math.isfinite(v) else ""

    def ci(lo: float, hi: float) -> str:
        return f"[{svg.fmt(lo)}, {svg.fmt(hi)}]" if math.isfinite(lo) else ""

    rows = "".join(
        f"<tr><td class=\"t\">{esc(r.group)}</td><td>{r.n}</td><td>{num(r.y)}</td>"
        f"<td>{ci(r.lo, r.hi)}</td><td>{num(r.diff)}</td><td>{ci(r.diff_lo, r.diff_hi)}</td>"
        f"<td class=\"t\"><b>{esc(r.verdict)}</b></td></tr>" for r in f.table)
    return [f'<p class="muted">Per group ({esc(", ".join(f.group_keys) or "all cells")}), '
            f"each point is one {esc(f.ratio_key)} value: the mean over the units (seeds, "
            f"image pairs), bars the {int(LEVEL * 100)}% t band of {esc(y)}. The table gives "
            f"{esc(y)} at {esc(x)} = {f.at:.4g}, each unit interpolated along its own curve, "
            "with a bootstrap CI over units; the difference to the best group is paired by "
            "unit: <b>no difference</b> where its CI holds 0. frontier.csv holds the numbers."
            "</p>", f'<div class="charts">{chart}</div>',
            "<table><thead><tr><th class=\"t\">group</th><th>units</th><th>mean</th>"
            "<th>CI</th><th>vs best</th><th>CI of difference</th><th class=\"t\">verdict"
            f"</th></tr></thead><tbody>{rows}</tbody></table>"]
