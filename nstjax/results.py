"""Typed records of finished runs and sweeps, read from their directories alone.

    from nstjax import results
    r = results.load_run("runs/20260101-120000-content-style")
    r.history["total"][-1], r.metrics.get("style"), r.config["loss"]["style_weights"]
    sw = results.load_sweep("runs/sweep-ratio")
    for c in sw.cells:
        print(c.values["loss.style_to_content_ratio"], c.status, c.metrics.get("style"))
    df = sw.to_pandas()             # one row per cell: axis.<key>, losses, metric.* columns

Nothing here needs the sweep file, the images or the weights. Axis values keep their YAML types
(15 stays an int, 15.5 a float, [0.5, 0.5] a list).
"""

import csv
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from nstjax.errors import UserError


class ResultsError(UserError):
    """A run or sweep directory's file holds something its format does not allow (a field of
    the wrong type, a short history row): the message names the file and the field."""


MAX_CELLS = 10_000  # cells of one sweep (the product of its dims' lengths): more is a mistake
LOSS_KEYS = ("total", "content", "style", "tv")
RECORD_KEYS = ("iterations", "evaluations", "compile_seconds", "solve_seconds",
               "batch_solve_seconds", "batch_compile_seconds")
_INT_COLUMNS = ("iter", "scale")
AXIS = "axis."  # prefix of the axis columns in rows() and summary.csv


@dataclass
class Run:
    """One run directory: its resolved config, run.json, history.csv as arrays, metrics."""

    dir: Path
    config: dict
    record: dict
    history: dict[str, np.ndarray]  # column -> values; "iter" (and "scale") int, others float
    metrics: dict[str, float]  # run.json "metrics": the reference evaluation of the result

    @property
    def status(self) -> str:
        return self.record.get("status", "")

    @property
    def final_loss(self) -> dict[str, float]:
        return dict(self.record.get("final_loss") or {})

    @property
    def image_path(self) -> Path | None:
        """The final image (final.png or final.jpg), if the run wrote one."""
        for p in sorted(self.dir.glob("final.*")):
            if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
                return p
        return None

    def to_pandas(self):
        """history as a pandas DataFrame (pandas is optional)."""
        return _pandas().DataFrame(self.history)


@dataclass
class Cell:
    """One sweep cell: its axis values (YAML types), labels, status and results."""

    name: str
    dir: Path
    index: int
    group: str
    values: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)  # label column -> zip label
    status: str = "pending"  # run.json status; "pending" if the cell never ran
    error: str = ""
    record: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def run(self) -> Run:
        """The cell's full run record (history included)."""
        return load_run(self.dir)

    def row(self) -> dict[str, Any]:
        """A flat row: cell, group, dir (the cell's run directory), axis values (columns
        `axis.<key>`, as in summary.csv: an axis never shadows a loss term or metric), labels,
        status, final losses, counts, `metric.<name>` columns."""
        fin = self.record.get("final_loss") or {}
        return {"cell": self.name, "group": self.group, "dir": str(self.dir),
                **{AXIS + k: v for k, v in self.values.items()},
                **self.labels,
                "status": self.status, "error": self.error,
                **{k: _float(fin.get(k)) for k in LOSS_KEYS},
                **{k: v for k, v in fin.items() if k not in LOSS_KEYS},
                **{k: self.record.get(k) for k in RECORD_KEYS},
                **{f"metric.{k}": v for k, v in self.metrics.items()}}


@dataclass
class Sweep:
    """A sweep directory: its name, axis keys (in order) and cells."""

    dir: Path
    cells: list[Cell]
    name: str = ""
    keys: list[str] = field(default_factory=list)
    dims: list[dict] = field(default_factory=list)  # sweep.json "dims" ({keys, values, labels})

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise KeyError(f"no cell {name!r} in {self.dir}; cells: {[c.name for c in self.cells]}")

    def rows(self) -> list[dict[str, Any]]:
        """One row per cell (`Cell.row`), every row with the same columns (missing: None)."""
        rows = [c.row() for c in self.cells]
        cols = list(dict.fromkeys(k for r in rows for k in r))
        return [{k: r.get(k) for k in cols} for r in rows]

    def to_pandas(self):
        """`rows()` as a pandas DataFrame (pandas is optional)."""
        return _pandas().DataFrame(self.rows())


def _pandas():
    from nstjax.runtime import optional

    return optional("pandas", "to_pandas()", "pip install pandas, or use Sweep.rows() / "
                    "Run.history (plain dicts)")


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ---------------------------------------------------------------- reading files


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    return data if isinstance(data, dict) else {}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


_NUMBER = (int, float)


def _is(v: Any, types: tuple) -> bool:
    return isinstance(v, types) and not (isinstance(v, bool) and bool not in types)


def _field(path: Path, name: str, v: Any, types: tuple, want: str) -> None:
    if v is not None and not _is(v, types):
        raise ResultsError(f"{path}: field {name!r} is {json.dumps(v, default=str)[:60]}, not "
                           f"{want}")


def _check_record(path: Path, rec: dict) -> dict:
    """run.json's fields that the loader reads, of their documented types (null allowed)."""
    _field(path, "status", rec.get("status"), (str,), "a string")
    _field(path, "error", rec.get("error"), (str,), "a string")
    for k in RECORD_KEYS:
        _field(path, k, rec.get(k), _NUMBER, "a number")
    for k in ("metrics", "final_loss", "initial_loss"):
        v = rec.get(k)
        _field(path, k, v, (dict,), "an object of numbers")
        if v:
            rec[k] = _unsafe(path, k, v)
    return rec


_NONFINITE = {"nan", "inf", "-inf"}


def _unsafe(path: Path, k: str, v: dict) -> dict:
    """Undo record.json_safe: `name: null` + `name_text: "inf"` reads back as inf."""
    out = {}
    for name, x in v.items():
        base = name.removesuffix("_text")
        if name != base and base in v and v[base] is None and x in _NONFINITE:
            continue
        text = v.get(f"{name}_text")
        if x is None and text in _NONFINITE:
            x = float(text)
        _field(path, f"{k}.{name}", x, _NUMBER, "a number")
        out[name] = x
    return out


def read_history(path: str | Path) -> dict[str, np.ndarray]:
    """history.csv as {column: array}: `iter` and `scale` int64, the rest float64 (an empty
    field is NaN); {} if there is no file."""
    path = Path(path)
    rows = _csv_rows(path)
    if not rows:
        return {}
    for i, r in enumerate(rows, 2):  # line numbers: the header is line 1
        if None in r or None in r.values():  # DictReader: None for short, key None for long
            n = sum(v is not None for k, v in r.items() if k is not None) + len(r.get(None, ()))
            raise ResultsError(f"{path}: line {i} has {n} fields, the header "
                               f"{len(rows[0]) - (None in rows[0])}; the file is damaged")
    out = {}
    try:
        for k in rows[0]:
            if k in _INT_COLUMNS:
                out[k] = np.array([int(r[k]) for r in rows], np.int64)
            else:
                out[k] = np.array([float(r[k]) if r[k] not in ("", None) else np.nan
                                   for r in rows], np.float64)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad value in column {k!r} ({e})") from None
    return out


def load_run(dir: str | Path) -> Run:
    """The run in `dir` (a `nstjax run` output or a sweep cell): config.yaml, run.json,
    history.csv. UserError if `dir` is not a run directory."""
    d = Path(dir)
    try:
        record = _json(d / "run.json")
    except FileNotFoundError:
        what = "does not exist" if not d.exists() else "is not a run directory (no run.json)"
        raise UserError(f"{d}: {what}; give a directory written by nstjax run or a sweep "
                        "cell") from None
    metrics = _check_record(d / "run.json", record).get("metrics") or {}
    return Run(d, _yaml(d / "config.yaml"), record, read_history(d / "history.csv"),
               {k: float(v) for k, v in metrics.items() if _float(v) is not None})


def _get(cfg: dict, dotted: str) -> tuple[bool, Any]:
    cur: Any = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def _label_columns(dims: list[dict]) -> dict[int, str]:
    """dim index -> its label column in summary.csv (`label`, or `label0`, `label1`, ...)."""
    labelled = [i for i, d in enumerate(dims) if d.get("labels")]
    return {i: "label" if len(labelled) == 1 else f"label{j}" for j, i in enumerate(labelled)}


def _cell_labels(dims: list[dict], index: int) -> dict[str, str]:
    sizes = [len(d.get("values") or ()) for d in dims]
    if not sizes or 0 in sizes or not 0 <= index < math.prod(sizes):
        return {}
    combo = []
    for n in reversed(sizes):  # the index in the product, first dim slowest
        index, i = divmod(index, n)
        combo.append(i)
    combo.reverse()
    cols = _label_columns(dims)
    return {cols[j]: str(dims[j]["labels"][i]) for j, i in enumerate(combo)
            if j in cols and i < len(dims[j]["labels"])}


def _typed(text: str) -> Any:
    from nstjax.cfgfile import load_yaml  # YAML 1.2 numbers: "1e-05" is a float

    try:
        return load_yaml(text) if text != "" else None
    except Exception:  # noqa: BLE001 - not YAML (or too deep): the text as it is
        return text


def _number_from_config(v: Any, found: bool, in_cfg: Any) -> Any:
    """A sweep.json value written as text by an older YAML reader (`9.0e5`) taken as the
    number the cell's resolved config holds for it."""
    if (isinstance(v, str) and found and isinstance(in_cfg, (int, float))
            and not isinstance(in_cfg, bool)):
        parsed = _typed(v)
        if isinstance(parsed, (int, float)) and float(parsed) == float(in_cfg):
            return in_cfg
    return v


def _metrics_from(row: dict[str, str]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if k and k.startswith("metric.") and v not in ("", None):
            try:
                out[k[len("metric."):]] = float(v)
            except ValueError:
                pass
    return out


def _check_plan(path: Path, plan: dict) -> dict:
    """sweep.json's fields that the loader reads, of their documented types."""
    _field(path, "name", plan.get("name"), (str,), "a string")
    for k in ("dims", "cells"):
        _field(path, k, plan.get(k), (list,), "a list")
    for i, dim in enumerate(plan.get("dims") or []):
        _field(path, f"dims[{i}]", dim, (dict,), "an object")
        for k in ("keys", "values", "labels"):
            _field(path, f"dims[{i}].{k}", (dim or {}).get(k), (list,), "a list")
    n = math.prod(len(d.get("values") or ()) for d in plan.get("dims") or [])
    if n > MAX_CELLS:
        raise ResultsError(f"{path}: field 'dims' multiplies to {n} cells, more than the limit "
                           f"of {MAX_CELLS} cells per sweep; the file is damaged or hand-edited")
    for i, c in enumerate(plan.get("cells") or []):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise ResultsError(f"{path}: field 'cells[{i}].name' is missing or not a string")
        _field(path, f"cells[{i}].index", c.get("index"), (int,), "an integer")
        for k in ("dir", "group", "error"):
            _field(path, f"cells[{i}].{k}", c.get(k), (str,), "a string")
        _field(path, f"cells[{i}].values", c.get("values"), (dict,), "an object")
    return plan


def load_sweep(dir: str | Path) -> Sweep:
    """The sweep in `dir`: its cells from sweep.json (names, groups, axis values as written
    from the sweep file), else from summary.csv (values read from each cell's config.yaml, or
    parsed as YAML). Cells that never ran are `pending`; each cell's metrics come from its
    run.json (else summary.csv's `metric.*` columns)."""
    d = Path(dir)
    plan_path, summary_path = d / "sweep.json", d / "summary.csv"
    if not d.is_dir():
        raise UserError(f"{d}: no such sweep directory")
    if not plan_path.is_file() and not summary_path.is_file():
        raise UserError(f"{d}: not a sweep directory (no sweep.json or summary.csv); give the "
                        "--out directory of nstjax sweep")
    plan = _check_plan(plan_path, _json(plan_path)) if plan_path.is_file() else {}
    summary = {r.get("cell", ""): r for r in _csv_rows(summary_path)}
    dims = plan.get("dims") or []
    if dims:
        keys = [k for dim in dims for k in dim.get("keys", ())]
    else:  # the axis columns of summary.csv: `axis.<key>` (older files: between
        # `group`/`dir` and the first label/status column)
        head = list(next(iter(summary.values()), {}))
        if any(k.startswith(AXIS) for k in head):
            cols = [k for k in head if k.startswith(AXIS)]
        else:
            fixed = {"cell", "group", "dir"}
            cols = list(itertools.takewhile(
                lambda k: not k.startswith("label") and k != "status",
                (k for k in head if k not in fixed)))
        keys = [k.removeprefix(AXIS) for k in cols]
        summary = {n: {**r, **{k.removeprefix(AXIS): r[k] for k in cols}}
                   for n, r in summary.items()}
    entries = plan.get("cells") or [{"name": n, "index": i, "group": r.get("group", ""),
                                     "dir": r.get("dir") or None}
                                    for i, (n, r) in enumerate(summary.items())]
    cells = []
    for e in entries:
        name = str(e["name"])
        cdir = d / (e.get("dir") or f"cells/{name}")
        srow = summary.get(name, {})
        try:
            record = _check_record(cdir / "run.json", _json(cdir / "run.json"))
        except FileNotFoundError:
            record = {}
        values = e.get("values")
        cfg = _yaml(cdir / "config.yaml")
        if values is None:  # no sweep.json: the cell's resolved config, else the CSV text
            values = {}
            for k in keys:
                found, v = _get(cfg, k)
                values[k] = v if found else _typed(srow.get(k, ""))
        else:
            values = {k: _number_from_config(v, *_get(cfg, k)) for k, v in values.items()}
        labels = (_cell_labels(dims, int(e.get("index", 0))) if dims else
                  {k: v for k, v in srow.items() if k and k.startswith("label")})
        metrics = {k: float(v) for k, v in (record.get("metrics") or {}).items()
                   if _float(v) is not None} or _metrics_from(srow)
        status = record.get("status") or srow.get("status") or (
            "failed" if e.get("error") else "pending")
        cells.append(Cell(name, cdir, int(e.get("index", len(cells))), str(e.get("group", "")),
                          dict(values), labels, status,
                          str(record.get("error") or e.get("error") or srow.get("error") or ""),
                          record, metrics))
    return Sweep(d, cells, str(plan.get("name", d.name)), keys, list(dims))
