"""Small inline-SVG charts for the HTML reports: points or lines with error bars, linear or log
axes. Plain strings, no JavaScript and no network, so a page opens from disk anywhere."""

from __future__ import annotations

import html
import math
from typing import NamedTuple

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


class Series(NamedTuple):
    """One line or set of points: x positions, y values and (optional) y errors (std)."""

    name: str
    xs: list[float]
    ys: list[float]
    errs: list[float] | None = None
    title: str = ""  # the full name, shown on hover where the legend shows `name` cut short


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cut(text: str, n: int) -> str:
    """`text` in at most n characters (an ellipsis where cut): a legend fits its chart."""
    return text if len(text) <= n else text[: max(n - 1, 1)] + "\u2026"


def fmt(v: float) -> str:
    """A short tick or tooltip number (3 significant digits)."""
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.3g}" if 1e-3 <= a < 1e5 else f"{v:.2e}".replace("e+0", "e").replace("e-0", "e-")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten within [lo, hi] (with 2x and 5x when fewer than three decades; every
    k-th decade when more than ten)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mult = (1, 2, 5) if b - a < 3 else (1,)
    every = max(1, math.ceil((b - a) / 10))
    return [m * 10.0**e for e in range(a, b + 1, every) for m in mult
            if lo <= m * 10.0**e <= hi]


LIMIT = 1e250  # magnitudes drawn at most this large (and log values at least 1/LIMIT)


def _clip(v: float) -> float:
    """A finite value within +-LIMIT (and 0 or at least 1/LIMIT in magnitude), so that spans,
    padding and ticks never overflow; inf and nan pass (they are left out)."""
    if not math.isfinite(v) or v == 0:
        return v
    a = min(max(abs(v), 1 / LIMIT), LIMIT)
    return math.copysign(a, v)


def _clipped(s: Series) -> Series:
    return s._replace(xs=[_clip(x) for x in s.xs], ys=[_clip(y) for y in s.ys],
                      errs=None if s.errs is None else [_clip(e) if e is not None else None
                                                        for e in s.errs])


class _Scale(NamedTuple):
    lo: float
    hi: float
    log: bool
    a: float  # pixel of lo
    b: float  # pixel of hi

    def __call__(self, v: float) -> float:
        f = ((math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
             if self.log else (v - self.lo) / (self.hi - self.lo))
        return self.a + f * (self.b - self.a)


def _scale(values: list[float], log: bool, a: float, b: float, pad: float = 0.05) -> _Scale:
    vals = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not vals:
        return _Scale(0.0, 1.0, False, a, b)
    lo, hi = min(vals), max(vals)
    if log:
        if hi / lo < 1.0001:
            lo, hi = lo / 2, hi * 2
        span = (math.log10(hi) - math.log10(lo)) * pad  # (hi / lo may overflow)
        return _Scale(lo / 10**span, hi * 10**span, True, a, b)
    if hi - lo < 1e-12 * max(abs(hi), 1e-30):
        lo, hi = lo - (abs(lo) or 1) * 0.5, hi + (abs(hi) or 1) * 0.5
    span = (hi - lo) * pad
    return _Scale(lo - span, hi + span, False, a, b)


def want_log(values: list[float]) -> bool:
    """Log scale when every value is positive and they span more than a factor of 20."""
    vals = [v for v in values if math.isfinite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 20


def chart(series: list[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
          ticks: list[tuple[float, str]] | None = None, xlog: bool = False,
          ylog: bool | None = None, lines: bool = True, width: int = 480,
          height: int = 300) -> str:
    """An <svg> element: each series as points (and a line when `lines`) with error bars.

    `ticks`: fixed x ticks (position, text), e.g. the categories of a categorical axis; else
    round numbers. `ylog` None: log when `want_log` of the values (error bars clipped at 0).
    Values beyond 1e250 in magnitude are drawn at 1e250 (the tables hold the exact ones).
    """
    series = [_clipped(s) for s in series]
    ticks = [(_clip(t), text) for t, text in ticks] if ticks else ticks
    left, right, top = 64, 12, 24 if title else 10
    legend_rows = len(series) if len(series) > 1 else 0
    bottom = 44 + 16 * legend_rows
    h = height + 16 * legend_rows
    errs = [(e if e is not None and math.isfinite(e) else 0.0)
            for s in series for e in (s.errs or [0.0] * len(s.ys))]
    ys = [y for s in series for y in s.ys if math.isfinite(y)]
    ylog = want_log(ys) if ylog is None else ylog
    lo_hi = ys + [y - e for y, e in zip(ys, errs)] + [y + e for y, e in zip(ys, errs)]
    sy = _scale(lo_hi, ylog, h - bottom, top)
    xs = [x for s in series for x in s.xs] + [t for t, _ in ticks or []]
    sx = _scale(xs, xlog, left, width - right, pad=0.08)
    out = [f'<svg class="chart" width="{width}" '
           f'height="{h}" viewBox="0 0 {width} {h}" role="img" aria-label="{_esc(title)}">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" '
           f'height="{h - bottom - top}" fill="#fff" stroke="#bbb"/>']
    if title:
        out.append(f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" '
                   f'font-weight="bold">{_esc(title)}</text>')
    ytk = log_ticks(sy.lo, sy.hi) if sy.log else nice_ticks(sy.lo, sy.hi)
    for t in ytk:
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="#eee"/><text x="{left - 4}" y="{y + 4:.1f}" '
                   f'text-anchor="end">{fmt(t)}</text>')
    xtk = ticks or [(t, fmt(t)) for t in (log_ticks(sx.lo, sx.hi) if sx.log
                                          else nice_ticks(sx.lo, sx.hi))]
    rot = len(xtk) > 5 or sum(len(t) for _, t in xtk) * 7 > width - left - right
    for t, text in xtk:
        x = sx(t)
        ty = h - bottom + 14
        tr = f' transform="rotate(-20 {x:.1f} {ty})"' if rot else ""
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{h - bottom}" y2="{h - bottom + 4}" '
                   f'stroke="#888"/><text x="{x:.1f}" y="{ty}" text-anchor='
                   f'"{"end" if rot else "middle"}"{tr}>{_esc(text)}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.1f}" y="{h - bottom + 34}" '
               f'text-anchor="middle">{_esc(xlabel)}</text>')
    out.append(f'<text transform="translate(12 {(top + h - bottom) / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{_esc(ylabel)}</text>')
    for i, s in enumerate(series):
        out += _series(s, PALETTE[i % len(PALETTE)], sx, sy, lines)
        if legend_rows:
            y = h - 16 * (legend_rows - i) + 4
            out.append(f'<rect x="{left}" y="{y - 9}" width="10" height="10" '
                       f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{left + 16}" '
                       f'y="{y}">{_esc(_cut(s.name, (width - left - 20) // 6))}'
                       f'<title>{_esc(s.title or s.name)}</title></text>')
    out.append("</svg>")
    return "\n".join(out)


def _series(s: Series, color: str, sx: _Scale, sy: _Scale, lines: bool) -> list[str]:
    out = []
    pts = [(x, y, (s.errs or [0.0] * len(s.ys))[k]) for k, (x, y) in enumerate(zip(s.xs, s.ys))
           if math.isfinite(y) and (y > 0 or not sy.log) and (x > 0 or not sx.log)]
    if lines and len(pts) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in sorted(pts))
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                   f'stroke-width="1.5"/>')
    dots = len(pts) <= 60
    for x, y, e in pts:
        px, py = sx(x), sy(y)
        if e is not None and math.isfinite(e) and e > 0:
            lo = y - e if not sy.log or y - e > 0 else sy.lo
            y0, y1 = sy(max(lo, sy.lo) if sy.log else lo), sy(y + e)
            out.append(f'<path d="M{px:.1f},{y0:.1f}V{y1:.1f}M{px - 4:.1f},{y0:.1f}'
                       f'h8M{px - 4:.1f},{y1:.1f}h8" stroke="{color}" fill="none"/>')
        if dots:
            tip = f"{s.title or s.name}: {fmt(y)}" + (f" ± {fmt(e)}" if e else "")
            out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{color}">'
                       f'<title>{_esc(tip)}</title></circle>')
    return out
