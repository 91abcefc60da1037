"""Measured costs of compiled programs, so that `nstjax sweep --dry-run` estimates from what
this machine did rather than from a model.

Every sweep writes, per structure group and batch layout, what it measured into `costs.json`
in the cache directory (`$NSTJAX_HOME`, else `~/.cache/nstjax`; or the file `$NSTJAX_COSTS`):
the compile seconds (cold, and with the XLA binaries from the persistent compilation cache),
the seconds per evaluation of
the batched program, evaluations per iteration and the seconds per cell spent outside compile
and solve (building targets, final images, metrics, writes); and per backend the seconds a
sweep spends outside its batches (imports, summary, contact sheet, report). The key is the
group's structure (loss spec, solver settings but maxiter, chunk, weights, image size, plugins)
with the backend, device kind and device count, so any change of shape or program is a miss.

    {"version": 1,
     "programs": {KEY: {"label": "g0 128x96 lbfgs",
                        "layouts": {"8,8": {"compile_s", "compile_warm_s", "eval_s",
                                            "evals_per_iter", "cell_s", "updated"}}}},
     "overhead": {"cpu": {"sweep_s": 4.2, "updated": ...}}}

An unreadable or foreign file is ignored (and rewritten by the next sweep); writes are atomic,
and two processes writing at once lose at most one of their entries.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from nstjax import runtime

VERSION = 1
FILE = "costs.json"


class Measured(NamedTuple):
    """What a lookup found for one group and layout (`eval_s` scaled by `scale` when it was
    measured with another batch size)."""

    compile_s: float | None  # cold compile; None if only a cached compile was measured
    compile_warm_s: float | None  # XLA binaries from the persistent compilation cache
    eval_s: float
    evals_per_iter: float
    cell_s: float
    layout: tuple[int, int]  # (batch, lanes) it was measured at
    scale: float = 1.0
    updated: str = ""

    def compile(self, warm: bool) -> float:
        """The compile seconds to expect (`warm`: the persistent cache likely has it)."""
        if warm and self.compile_warm_s is not None:
            return self.compile_warm_s
        return self.compile_s if self.compile_s is not None else (self.compile_warm_s or 0.0)


def path() -> Path:
    """$NSTJAX_COSTS if set, else costs.json in the cache directory."""
    import os

    return Path(os.environ.get("NSTJAX_COSTS") or runtime.cache_dir() / FILE).expanduser()


def program_key(structure: tuple, backend: str, device_kind: str, ndev: int) -> str:
    """A stable key for a group's structure (`sweep.plan.structure`) on these devices."""
    s = list(structure)
    s[1] = replace(s[1], maxiter=0)  # runs of any length share a program
    text = repr((tuple(s), backend, device_kind, ndev))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load(p: Path | None = None) -> dict:
    """The cost file's content, or an empty one if it is absent, unreadable or another
    version."""
    p = p or path()
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"version": VERSION, "programs": {}, "overhead": {}}
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        return {"version": VERSION, "programs": {}, "overhead": {}}
    doc.setdefault("programs", {})
    doc.setdefault("overhead", {})
    return doc


def _save(doc: dict, p: Path | None = None) -> None:
    p = p or path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        runtime.write_atomic(p, json.dumps(doc, indent=1, sort_keys=True))
    except (OSError, Exception):  # noqa: BLE001 - a cost cache must never fail a run
        pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def record_batch(key: str, label: str, batch: int, lanes: int, *, compile_s: float,
                 warm: bool, solve_s: float, evals: int, iterations: int, cell_s: float,
                 p: Path | None = None) -> None:
    """Add one batch's measurements (`compile_s` 0.0: the program was reused, not compiled;
    `evals`, `iterations`: the most any cell of the batch made)."""
    if evals <= 0 or solve_s <= 0:
        return
    doc = load(p)
    prog = doc["programs"].setdefault(key, {"label": label, "layouts": {}})
    prog["label"] = label
    entry = prog["layouts"].setdefault(f"{batch},{lanes}", {})
    if compile_s > 0:
        entry["compile_warm_s" if warm else "compile_s"] = round(compile_s, 3)
    entry.update(eval_s=solve_s / evals, evals_per_iter=evals / max(iterations, 1),
                 cell_s=round(max(cell_s, 0.0), 3), updated=_now())
    _save(doc, p)


def record_overhead(backend: str, sweep_s: float, p: Path | None = None) -> None:
    """The seconds a sweep process spent outside its batches."""
    doc = load(p)
    doc["overhead"][backend] = {"sweep_s": round(max(sweep_s, 0.0), 3), "updated": _now()}
    _save(doc, p)


def _layout(text: str) -> tuple[int, int]:
    b, k = text.split(",")
    return int(b), int(k)


def lookup(doc: dict, key: str, batch: int, lanes: int) -> Measured | None:
    """The measurements of `key` at (batch, lanes); else those at the nearest batch size, eval_s
    scaled linearly by the batch size (a batch's evaluation costs about its cells': measured
    0.6-0.7x for vmapped lanes on CPU); None if the structure was never measured."""
    layouts = (doc.get("programs", {}).get(key) or {}).get("layouts") or {}
    good = {}
    for text, e in layouts.items():
        try:
            lay = _layout(text)
            float(e["eval_s"]), float(e["evals_per_iter"])
        except (ValueError, KeyError, TypeError):
            continue
        good[lay] = e
    if not good:
        return None
    want = (batch, lanes)
    lay = want if want in good else min(good, key=lambda bk: (abs(bk[0] - batch), -bk[1]))
    e = good[lay]
    scale = 1.0 if lay == want else batch / lay[0]
    return Measured(e.get("compile_s"), e.get("compile_warm_s"), float(e["eval_s"]) * scale,
                    float(e["evals_per_iter"]), float(e.get("cell_s", 0.0)), lay, scale,
                    str(e.get("updated", "")))


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc), or None where unknown."""
    import os

    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def overhead(doc: dict, backend: str) -> float | None:
    try:
        return float(doc["overhead"][backend]["sweep_s"])
    except (KeyError, TypeError, ValueError):
        return None
