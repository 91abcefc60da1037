"""`nstjax sweep`: ablations compiled once per structure group, batched with vmap, sharded.

A sweep file (YAML, usually in configs/sweeps/) names a base config and the axes to vary:

    base: ../quickstart.yaml          # a config path (relative to this file) or an inline config
    set: {solver.maxiter: 50}         # fixed overrides for every cell (optional)
    axes:                             # the cells are the product of the axes, in this order
      loss.style_to_content_ratio: [1, 5, 15]
    zip:                              # keys that vary together (optional; a list of groups)
      - label: [post, uniform]        # optional readable names for the zip's values
        loss.style_weights: [[0.05, 0.2, 0.2, 0.25, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]]
    sweep: {batch_size: auto, lanes: auto, compile_cache: true}   # optional settings

Cells are grouped by structure, everything that shapes the compiled program: image shape,
layers, pooling, normalization, precision, solver settings, chunk length, weights. Cells of a
group differ only in numbers (loss weights, ratios, seeds, init), which are arguments of ONE
compiled program: the solver's `init` and `chunk` mapped over a batch of cells (x0, targets and
loss weights per cell; VGG params broadcast), the batch axis sharded over the local devices with
`shard_map`. On each device `lanes` cells run in lockstep under `jax.vmap` (L-BFGS loop and line
search included); further cells of the device's shard run one after another inside the same
program (`lax.map`). All batches of a group have one size (the last is padded), so the program
is compiled once; JAX's persistent compilation cache makes a rerun skip XLA compilation too.

Each cell writes a complete run directory `cells/<name>/` atomically (built under a hidden
temporary name, then renamed); the sweep directory gets summary.csv, contact_sheet.png and
plots/<group>.png. A rerun skips cells whose run.json says done/converged and whose config is
unchanged; a failed cell is recorded and the others go on. With `jax.distributed`, each process
runs a contiguous share of the cells (ordered by group) and process 0 writes the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import difflib
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nstjax.errors import UserError

if TYPE_CHECKING:
    from nstjax.config import Config

SECTIONS = ("base", "name", "description", "set", "axes", "zip", "sweep")
SETTINGS = ("batch_size", "lanes", "compile_cache")
FINISHED = ("done", "converged")
SUMMARY_TAIL = ("status", "error", "total", "content", "style", "tv", "iterations",
                "evaluations", "compile_seconds", "solve_seconds")
_SHORT = {"style_to_content_ratio": "ratio", "style_weights": "style_w",
          "content_weights": "content_w", "content_layers": "content", "style_layers": "style",
          "tv_weight": "tv", "pooling": "pool", "maxiter": "iters", "learning_rate": "lr",
          "solver.name": "solver", "image.size": "size", "model.weights": "weights"}
_PATH_KEYS = ("content", "style", "init", "model.weights", "masks.style", "masks.content")
# Rough evaluations per iteration (measured on the demo images; for the estimate only).
_EVALS_PER_ITER = {"jaxopt_lbfgs": 5.0, "optax_lbfgs": 3.0, "adam": 1.0}


# ---------------------------------------------------------------- the sweep file


@dataclass(frozen=True)
class Dim:
    """One sweep dimension: an axis (one key) or a zip group (keys that vary together)."""

    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]  # values[i][j]: the i-th value of keys[j]
    labels: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Sweep:
    """A parsed sweep file: the base raw config (paths absolute) and its dimensions."""

    name: str
    source: str
    base: dict
    dims: list[Dim]
    here: Path  # the sweep file's directory: axis paths are relative to it
    batch_size: int | None = None  # None: automatic
    lanes: int | None = None  # None: automatic
    compile_cache: bool | str = True
    description: str = ""

    @property
    def keys(self) -> list[str]:
        return [k for d in self.dims for k in d.keys]


def _near(word: str, choices) -> str:
    near = difflib.get_close_matches(word, list(choices), 1)
    return f" (did you mean {near[0]}?)" if near else ""


def check_key(key: Any, where: str) -> str:
    """A dotted config key that exists in the Config schema, else a UserError naming it."""
    from nstjax.config import Config

    if not isinstance(key, str) or not key or any(not p.isidentifier() for p in key.split(".")):
        raise UserError(f"{where}: {key!r} is not a dotted config key such as loss.tv_weight")
    model: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            raise UserError(f"{where}: {'.'.join(parts[:i])} is not a config section ({key})")
        if part not in fields:
            prefix = ".".join(parts[:i])
            hint = _near(part, fields)
            if hint and prefix:
                hint = hint.replace("mean ", f"mean {prefix}.")
            raise UserError(f"{where}: unknown config key {key}{hint}")
        model = fields[part].annotation
    return key


def _nest(flat: dict, where: str) -> dict:
    """{'a.b': 1} or {'a': {'b': 1}} -> {'a': {'b': 1}} (keys checked against the schema)."""
    from nstjax import config

    out: dict = {}
    for key, value in flat.items():
        if isinstance(value, dict) and isinstance(key, str) and "." not in key:
            sub = _nest({f"{key}.{k}": v for k, v in value.items()}, where) if value else {key: {}}
            out = config.merge(out, sub)
            continue
        check_key(key, where)
        node: dict = {}
        cur = node
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = copy.deepcopy(value)
        out = config.merge(out, node)
    return out


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _flat_keys(v, key + ".") if isinstance(v, dict) and v else [key]
    return out


def _values(v: Any, where: str) -> list:
    if not isinstance(v, list) or not v:
        raise UserError(f"{where}: must be a non-empty list of values")
    return v


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _dims(raw: dict, src: str) -> list[Dim]:
    """Axes then zip groups, validated: keys exist, lists non-empty, equal zip lengths."""
    dims: list[Dim] = []
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise UserError(f"{src}: axes: must map dotted config keys to lists of values")
    for key, vals in axes.items():
        check_key(key, f"{src}: axes")
        vals = _values(vals, f"{src}: axes.{key}")
        dims.append(Dim((key,), tuple((v,) for v in vals)))
    zips = raw.get("zip") or []
    zips = [zips] if isinstance(zips, dict) else zips
    if not isinstance(zips, list):
        raise UserError(f"{src}: zip: must be a list of mappings of keys to equal-length lists")
    for i, z in enumerate(zips):
        where = f"{src}: zip[{i}]"
        if not isinstance(z, dict) or not [k for k in z if k != "label"]:
            raise UserError(f"{where}: must map dotted config keys to equal-length lists")
        keys = [k for k in z if k != "label"]
        lists = [_values(z[k], f"{where}.{check_key(k, where)}") for k in keys]
        labels = z.get("label")
        if labels is not None:
            labels = _values(labels, f"{where}.label")
            if not all(isinstance(s, (str, int, float)) for s in labels):
                raise UserError(f"{where}.label: labels must be strings")
            labels = [str(s) for s in labels]
            lists.append(labels)
        lengths = {len(v) for v in lists}
        if len(lengths) > 1:
            shown = ", ".join(f"{k} has {len(v)}" for k, v in zip([*keys, "label"], lists))
            raise UserError(f"{where}: lists of unequal length ({shown}); keys in a zip vary "
                            "together: give each the same number of values")
        if labels is not None:
            lists.pop()
            if len(set(labels)) != len(labels):
                raise UserError(f"{where}.label: labels must be distinct")
        dims.append(Dim(tuple(keys), tuple(zip(*lists)), tuple(labels) if labels else None))
    seen: set[str] = set()
    for d in dims:
        for k in d.keys:
            if k in seen:
                raise UserError(f"{src}: {k} is swept twice (in axes and/or zip)")
            seen.add(k)
        canon = [_canon(v) for v in d.values]
        dup = next((v for v, c in zip(d.values, canon) if canon.count(c) > 1), None)
        if dup is not None:
            raise UserError(f"{src}: {', '.join(d.keys)} lists the value {_shown(dup)} twice")
    return dims


def _shown(v: tuple) -> str:
    return ", ".join(repr(x) for x in v)


def _settings(raw: Any, src: str) -> tuple[int | None, int | None, bool | str]:
    if raw is None:
        return None, None, True
    if not isinstance(raw, dict):
        raise UserError(f"{src}: sweep: must be a mapping ({', '.join(SETTINGS)})")
    for k in raw:
        if k not in SETTINGS:
            raise UserError(f"{src}: unknown key sweep.{k}{_near(str(k), SETTINGS)}")
    return (parse_auto(raw.get("batch_size", "auto"), f"{src}: sweep.batch_size"),
            parse_auto(raw.get("lanes", "auto"), f"{src}: sweep.lanes"),
            _cache_setting(raw.get("compile_cache", True), f"{src}: sweep.compile_cache"))


def parse_auto(v: Any, where: str) -> int | None:
    """`auto` (or null) -> None; a positive int -> itself."""
    if v is None or v == "auto":
        return None
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(v, float) and v != n) or isinstance(v, bool):
        raise UserError(f"{where}: must be auto or a positive integer (got {v!r})")
    return n


def _cache_setting(v: Any, where: str) -> bool | str:
    if isinstance(v, bool) or (isinstance(v, str) and v):
        return v
    raise UserError(f"{where}: must be true, false or a directory (got {v!r})")


def _base(raw: dict, src: str, here: Path) -> dict:
    from nstjax import config

    if "base" not in raw:
        raise UserError(f"{src}: missing key base: a config path (relative to this file) or an "
                        "inline config")
    base = raw["base"]
    if isinstance(base, str) and base:
        p = Path(base).expanduser()
        p = p if p.is_absolute() else here / p
        if not p.is_file():
            raise UserError(f"{src}: base: config file not found: {p}")
        return config.resolve_paths(config.read_yaml(p), p.resolve().parent)
    if isinstance(base, dict):
        return config.resolve_paths(copy.deepcopy(base), here)
    raise UserError(f"{src}: base: must be a config path or an inline config mapping")


def load(path: str | Path, overrides: list[str] | tuple = ()) -> Sweep:
    """Parse and validate a sweep file; `overrides` (key=value, as for `run`) apply to the base."""
    from nstjax import config

    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    raw = config.read_yaml(path)
    for k in raw:
        if k not in SECTIONS:
            raise UserError(f"{src}: unknown key {k}{_near(str(k), SECTIONS)}; a sweep file has "
                            f"{', '.join(SECTIONS)}")
    here = path.resolve().parent
    base = _base(raw, src, here)
    fixed = raw.get("set") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{src}: set: must map dotted config keys to values")
    fixed = config.resolve_paths(_nest(fixed, f"{src}: set"), here)
    over = config.parse_overrides(list(overrides))
    dims = _dims(raw, src)
    keys = {k for d in dims for k in d.keys}
    for where, d in (("set", fixed), ("override", over)):
        clash = [k for k in _flat_keys(d) if k in keys]
        if clash:
            raise UserError(f"{src}: {where} {clash[0]} is also a sweep axis; change the axis "
                            "values in the sweep file instead")
    batch, lanes, cache = _settings(raw.get("sweep"), src)
    name = raw.get("name") or path.stem
    if not isinstance(name, str):
        raise UserError(f"{src}: name: must be a string")
    return Sweep(name=safe_name(name) or "sweep", source=src,
                 base=config.merge(config.merge(base, fixed), over), dims=dims, here=here,
                 batch_size=batch, lanes=lanes, compile_cache=cache,
                 description=str(raw.get("description") or ""))


# ---------------------------------------------------------------- cells and names


@dataclass
class Cell:
    """One point of the sweep: its axis values, a safe name, its config (or why it has none)."""

    index: int
    combo: tuple[int, ...]
    values: dict[str, Any]
    labels: dict[int, str]  # dim index -> zip label
    parts: tuple[str, ...]  # per dim: safe name part, e.g. "ratio-15"
    texts: tuple[str, ...]  # per dim: display text, e.g. "ratio=15"
    raw: dict
    name: str = ""
    cfg: Config | None = None
    error: str = ""
    group: str = ""
    key: tuple | None = None

    @property
    def label(self) -> str:
        return ", ".join(self.texts) or "base"


def _hash(text: str, n: int = 6) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def safe_name(text: str, cap: int = 48) -> str:
    """Filesystem-safe: only [A-Za-z0-9._-], no '..', no leading '.', at most `cap` chars."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text))
    s = re.sub(r"\.{2,}", ".", s)
    s = re.sub(r"-{2,}", "-", s).strip(".-_")
    if len(s) > cap:
        s = s[: cap - 7].rstrip(".-_") + "-" + _hash(text)
    return s


def short_names(keys: list[str]) -> dict[str, str]:
    """Readable labels for axis keys: the last component (or a known abbreviation), unique."""
    short = {k: _SHORT.get(k, _SHORT.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]))
             for k in keys}
    counts = {v: list(short.values()).count(v) for v in short.values()}
    return {k: (k.replace(".", "_") if counts[v] > 1 else v) for k, v in short.items()}


def value_text(key: str, v: Any) -> str:
    """A value as a short readable string: 15.0 -> 15, paths -> file stem, [64, 48] -> 64x48."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}".replace("e+", "e")
    if v is None:
        return "none"
    if isinstance(v, str):
        if key in _PATH_KEYS and ("/" in v or "\\" in v or Path(v).suffix):
            return Path(v.replace("\\", "/")).stem or v
        return v
    if isinstance(v, (list, tuple)):
        return ("x" if key == "image.size" else "_").join(value_text(key, x) for x in v)
    if isinstance(v, int):
        return str(v)
    return _canon(v)


def _cell_parts(dims: list[Dim], short: dict, combo: tuple) -> tuple[list, list]:
    parts, texts = [], []
    for d, i in zip(dims, combo):
        if d.labels:
            head = short[d.keys[0]]
            body = d.labels[i]
        else:
            head = "_".join(short[k] for k in d.keys)
            body = "_".join(value_text(k, v) for k, v in zip(d.keys, d.values[i]))
        parts.append(f"{safe_name(head, 24)}-{safe_name(body, 40) or _hash(body)}")
        texts.append(f"{head}={body}")
    return parts, texts


def _unique_names(cells: list[Cell]) -> None:
    for c in cells:
        name = "__".join(c.parts) or "base"
        c.name = name if len(name) <= 120 else f"{name[:112].rstrip('.-_')}-{_hash(name)}"
    for attempt in ("hash", "index"):
        seen: dict[str, int] = {}
        for c in cells:
            seen[c.name] = seen.get(c.name, 0) + 1
        for c in cells:
            if seen[c.name] > 1:
                c.name += f"-{_hash(_canon(c.values))}" if attempt == "hash" else f"-{c.index}"


def expand(sw: Sweep) -> list[Cell]:
    """All cells (product of the dims, first dim slowest), each with a validated config.

    A cell whose config is invalid keeps its error (it will be marked failed); if every cell is
    invalid the first error is raised.
    """
    from nstjax import config

    short = short_names(sw.keys)
    cells = []
    for index, combo in enumerate(itertools.product(*[range(len(d)) for d in sw.dims])):
        values: dict[str, Any] = {}
        labels = {}
        for j, (d, i) in enumerate(zip(sw.dims, combo)):
            values.update(zip(d.keys, d.values[i]))
            if d.labels:
                labels[j] = d.labels[i]
        parts, texts = _cell_parts(sw.dims, short, combo)
        overlay = config.resolve_paths(_nest(values, sw.source), sw.here)
        raw = config.merge(sw.base, overlay)
        cells.append(Cell(index, combo, values, labels, tuple(parts), tuple(texts), raw))
    _unique_names(cells)
    for c in cells:
        try:
            c.cfg = config.validate(c.raw, f"{sw.source} cell {c.name}")
        except UserError as e:
            c.error = str(e)
    if all(c.cfg is None for c in cells):
        raise UserError(cells[0].error)
    return cells


# ---------------------------------------------------------------- grouping


@dataclass
class Group:
    """Cells sharing one compiled program."""

    name: str
    key: tuple
    cells: list[Cell]
    hw: tuple[int, int]
    label: str = ""

    @property
    def spec(self):
        return self.key[0]

    @property
    def settings(self):
        return self.key[1]

    @property
    def chunk(self) -> int:
        return self.key[2]

    @property
    def host(self) -> bool:
        """Cells run one by one, as `nstjax run` runs them (not batched)."""
        return self.key[5]


def structure(cfg: Config, hw: tuple[int, int]) -> tuple:
    """What shapes the compiled program: (spec, solver settings, chunk, weights, (H, W), host).

    `host`: the cell runs on its own, as `nstjax run` does (a host-side solver, multi-scale).
    """
    from nstjax import run, solvers

    s = cfg.solver.settings()
    host = s.name not in solvers.COMPILED or _multiscale(cfg)
    return (run.spec_of(cfg), s, run.chunk_size(cfg), cfg.model.weights, tuple(hw), host)


def params_key(cfg: Config) -> tuple:
    """Cells with equal keys share VGG params (random weights depend on the seed)."""
    w = cfg.model.weights
    return (w, cfg.seed if w == "random" else None)


def _content_hw(cfg: Config, cache: dict) -> tuple[int, int]:
    from nstjax import run

    im = cfg.image
    key = (cfg.content, tuple(cfg.styles), _canon(im.size), im.resample, im.max_pixels)
    if key not in cache:
        try:
            content, _ = run.load_images(cfg)
            cache[key] = (int(content.shape[1]), int(content.shape[2]))
        except (UserError, OSError, ValueError) as e:
            cache[key] = str(e)
    if isinstance(cache[key], str):
        raise UserError(cache[key])
    return cache[key]


def plan(sw: Sweep, cells: list[Cell]) -> list[Group]:
    """Group the valid cells by structure (loads each distinct image once to know its shape)."""
    shapes: dict = {}
    by_key: dict[tuple, list[Cell]] = {}
    for c in cells:
        if c.cfg is None:
            continue
        try:
            hw = _content_hw(c.cfg, shapes)
        except UserError as e:
            c.error = str(e)
            continue
        c.key = structure(c.cfg, hw)
        by_key.setdefault(c.key, []).append(c)
    groups = [Group("", k, cs, k[4]) for k, cs in by_key.items()]
    _name_groups(sw, groups)
    return groups


def _name_groups(sw: Sweep, groups: list[Group]) -> None:
    """g0, g1, ... plus the values of the dims that separate the groups (e.g. g1-pool-max)."""
    split = []
    for j in range(len(sw.dims)):
        constant = all(len({c.combo[j] for c in g.cells}) == 1 for g in groups)
        if constant and len({g.cells[0].combo[j] for g in groups}) > 1:
            split.append(j)
    for i, g in enumerate(groups):
        g.label = "__".join(g.cells[0].parts[j] for j in split)
        g.name = safe_name(f"g{i}-{g.label}" if g.label else f"g{i}", 64)
        for c in g.cells:
            c.group = g.name


def owned(groups: list[Group], cells: list[Cell], process: int, count: int) -> list[Cell]:
    """This process's share: a contiguous slice of the cells ordered by group, then index."""
    order = [c for g in groups for c in g.cells] + [c for c in cells if c.key is None]
    n = len(order)
    return order[process * n // count:(process + 1) * n // count]


# ---------------------------------------------------------------- execution


def cell_dir(out: Path, c: Cell) -> Path:
    return out / "cells" / c.name


def is_finished(d: Path, cfg: Config | None) -> bool:
    """A finished cell: run.json says done/converged and its config.yaml is this config."""
    from nstjax import config

    try:
        rec = json.loads((d / "run.json").read_text())
        same = cfg is not None and (d / "config.yaml").read_text() == config.dump(cfg)
        return rec.get("status") in FINISHED and same
    except (OSError, ValueError):
        return False


def _publish(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete directory `tmp` (a rename: readers never see a half)."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def device_memory(devices: list) -> int:
    """Bytes free for one device: its allocator limit, else the host's RAM shared by devices."""
    try:
        st = devices[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        st = {}
    if st.get("bytes_limit"):
        return int(st["bytes_limit"]) - int(st.get("bytes_in_use", 0))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return ram // len(devices)


def _conv_layers(spec, hw: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(h, w, cin, cout) of every conv the objective computes."""
    from nstjax import vgg16

    last = max(vgg16.NAMES.index(n) for n in spec.layers)
    out, cin = [], 3
    for n in vgg16.NAMES[: last + 1]:
        b = vgg16.block(n)
        out.append((hw[0] >> (b - 1), hw[1] >> (b - 1), cin, vgg16.CHANNELS[n]))
        cin = vgg16.CHANNELS[n]
    return out


def cell_bytes(g: Group) -> tuple[int, int]:
    """Rough device bytes of one cell: (its solver state, one evaluation's working set)."""
    acts = sum(h * w * c for h, w, _, c in _conv_layers(g.spec, g.hw))
    x = g.hw[0] * g.hw[1] * 3
    return 4 * (2 * g.settings.history_size + 16) * x, int(4 * 1.5 * 4 * acts)


def lanes_for(g: Group, per_device: int, asked: int | None, backend: str,
              devices: list | None = None) -> int:
    """Cells per device solved in lockstep with vmap (1: one after another in the program).

    Under vmap the line search's branches become selects that evaluate the objective in every
    branch (~3x the evaluations), which pays off only when one cell leaves the device idle:
    auto is 1 on CPU; on accelerators, as many lanes as make ~20 GFLOP per evaluation and fit
    in half the device's free memory.
    """
    if asked:
        return max(1, min(asked, per_device))
    if backend == "cpu":
        return 1
    lanes = int(20e9 // max(eval_flops(g), 1.0))
    if devices:
        lanes = min(lanes, int(0.5 * device_memory(devices) // sum(cell_bytes(g))))
    return max(1, min(per_device, lanes))


def batch_size(g: Group, n: int, devices: list, asked: int | None, lanes: int | None = None,
               backend: str = "cpu") -> int:
    """Cells per compiled batch, a multiple of the device count.

    `asked` if given; else one vmap width per device (`lanes_for`): more cells per batch would
    run one after another anyway, and smaller batches finish (and can be resumed) sooner.
    """
    ndev = len(devices)

    def up(k: int) -> int:
        return max(ndev, -(-k // ndev) * ndev)

    if asked:
        return up(min(asked, n))
    per_dev = -(-n // ndev)
    return up(min(n, ndev * lanes_for(g, per_dev, lanes, backend, devices)))


def _batches(cells: list[Cell], b: int) -> list[list[Cell]]:
    """Split into batches of at most b; a new batch whenever the VGG params change."""
    out: list[list[Cell]] = []
    for _, grp in itertools.groupby(sorted(cells, key=lambda c: (params_key(c.cfg), c.index)),
                                    key=lambda c: params_key(c.cfg)):
        grp = list(grp)
        out += [grp[i:i + b] for i in range(0, len(grp), b)]
    return out


def _map(f, xs, lanes: int, n: int):
    """f over the leading axis of xs: vmap in groups of `lanes`, the groups one after another."""
    import jax

    if lanes <= 1:
        return jax.lax.map(f, xs)  # no vmap: the solver's branches stay real branches
    if lanes >= n:
        return jax.vmap(f)(xs)
    return jax.lax.map(f, xs, batch_size=lanes)


def compile_group(g: Group, mesh, xb, argsb, lanes: int) -> tuple:
    """AOT-compiled batched (init, chunk) for a group: the batch axis sharded over `mesh`.

    Each device runs its shard independently (shard_map): `lanes` cells at a time under vmap,
    the rest of its cells in a loop inside the same program. VGG params are replicated.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from nstjax import losses, solvers

    init, chunk = solvers.make(g.settings, losses.objective(g.spec))
    local = xb.shape[0] // mesh.size

    def init1(x0, params, tgt, w, live):
        # Padding cells start done: inside lax.map their chunks skip all work.
        st = init(x0, (params, tgt, w))
        return {**st, "done": st["done"] | ~live}

    def local_init(x0s, args, live):
        params, tgts, ws = args
        return _map(lambda a: init1(a[0], params, *a[1:]), (x0s, tgts, ws, live), lanes, local)

    def local_chunk(sts, args, n):
        params, tgts, ws = args
        return _map(lambda a: chunk(a[0], (params, a[1], a[2]), n, g.chunk), (sts, tgts, ws),
                    lanes, local)

    b, r = P("cells"), P()
    specs = (r, b, b)
    # check_vma off: jaxopt's cond branches mix per-device and replicated values.
    sm_init = jax.shard_map(local_init, mesh=mesh, in_specs=(b, specs, b), out_specs=b,
                            check_vma=False)
    sm_chunk = jax.shard_map(local_chunk, mesh=mesh, in_specs=(b, specs, r), out_specs=b,
                             check_vma=False)
    bs, rs = NamedSharding(mesh, b), NamedSharding(mesh, r)
    arg_sh = (rs, bs, bs)
    live = jax.ShapeDtypeStruct(xb.shape[:1], jnp.bool_, sharding=bs)
    init_c = jax.jit(sm_init, in_shardings=(bs, arg_sh, bs), out_shardings=bs).lower(
        xb, argsb, live).compile()
    st = jax.eval_shape(sm_init, xb, argsb, live)
    n = jax.ShapeDtypeStruct((), jnp.int32)
    chunk_c = jax.jit(sm_chunk, in_shardings=(bs, arg_sh, rs), out_shardings=bs,
                      donate_argnums=(0,)).lower(st, argsb, n).compile()
    return init_c, chunk_c


_PROGRAMS: dict[tuple, tuple] = {}  # compiled group programs of this process


@contextlib.contextmanager
def _counting(event: str):
    """Count a jax.monitoring event while the block runs (e.g. persistent-cache hits)."""
    import jax

    seen: list[str] = []

    def listener(name: str, **_kw) -> None:
        if name == event:
            seen.append(name)

    jax.monitoring.register_event_listener(listener)
    try:
        yield seen
    finally:
        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_listener(listener)


class _OutOfMemory(Exception):
    pass


@dataclass
class Outcome:
    """What one `execute` did in this process."""

    out: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: bool = False
    signal: int | None = None
    compilations: int = 0
    compile_seconds: float = 0.0
    solve_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        import signal

        if self.interrupted:
            return 143 if self.signal == signal.SIGTERM else 130
        return 1 if self.failed else 0


class Runner:
    """Runs groups of cells on a mesh of local devices and writes their run directories."""

    def __init__(self, sw: Sweep, out: Path, devices: list, *, batch: int | None,
                 lanes: int | None, quiet: bool, process: int = 0):
        import numpy as np
        from jax.sharding import Mesh

        self.sw, self.out, self.devices, self.quiet, self.process = sw, out, devices, quiet, process
        self.mesh = Mesh(np.array(devices), ("cells",))
        self.batch, self.lanes = batch, lanes
        self.backend = devices[0].platform
        self.params: dict[tuple, tuple] = {}
        self.flag: dict = {}
        self.outcome = Outcome(out)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    # ---- per-cell directories

    def tmp_dir(self, c: Cell) -> Path:
        d = self.out / "cells" / f".{c.name}.tmp-{os.getpid()}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def sweep_info(self, c: Cell, g: Group | None, **extra) -> dict:
        return {"sweep": {"name": self.sw.name, "file": self.sw.source, "cell": c.name,
                          "index": c.index, "group": g.name if g else "", "values": c.values,
                          "process": self.process, **extra}}

    def write_failed(self, c: Cell, error: str, g: Group | None = None) -> None:
        """A complete directory for a cell that could not run: config and run.json with error."""
        import yaml

        from nstjax import config, run

        d = self.tmp_dir(c)
        text = config.dump(c.cfg) if c.cfg is not None else yaml.safe_dump(c.raw, sort_keys=False)
        run.write_atomic(d / "config.yaml", text)
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        rec = {"status": "failed", "error": error, "versions": run.versions(), "started": now,
               "finished": now, **self.sweep_info(c, g)}
        run.write_atomic(d / "run.json", json.dumps(rec, indent=2, default=str))
        _publish(d, cell_dir(self.out, c))
        self.outcome.failed.append(c.name)
        self.log(f"  {c.name}: failed: {error}")

    def finish_cell(self, c: Cell, d: Path, res, record: dict, t_start: float,
                    post=None) -> None:
        from nstjax import run

        run.finish(d, c.cfg, res, record, t_start, post=post)
        run.write_atomic(d / "last.npy", _npy(res.x))
        _publish(d, cell_dir(self.out, c))
        self.outcome.ran.append(c.name)
        if res.status == "failed":
            self.outcome.failed.append(c.name)
            self.log(f"  {c.name}: failed: {res.error}")

    # ---- params and programs

    def params_for(self, cfg: Config) -> tuple:
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from nstjax import weights

        key = params_key(cfg)
        if key not in self.params:
            params, info = weights.load(cfg.model.weights, seed=cfg.seed,
                                        quiet=bool(self.params) or self.quiet)
            params = jax.device_put(params, NamedSharding(self.mesh, P()))
            self.params[key] = (params, info)
        return self.params[key]

    def program(self, g: Group, b: int, lanes: int, xb, argsb) -> tuple[tuple, float]:
        """The group's compiled program, reused across batches and sweeps in this process."""
        import jax

        key = (g.key[:3], g.hw, b, lanes, tuple(d.id for d in self.devices),
               jax.tree.structure(argsb),
               tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves((xb, argsb))))
        if key in _PROGRAMS:
            return _PROGRAMS[key], 0.0
        t = time.perf_counter()
        with _counting("/jax/compilation_cache/cache_hits") as hits:
            _PROGRAMS[key] = compile_group(g, self.mesh, xb, argsb, lanes)
        dt = time.perf_counter() - t
        self.outcome.compilations += 1
        self.outcome.compile_seconds += dt
        how = " (XLA binaries from the persistent cache)" if hits else ""
        self.log(f"  {g.name}: compiled for batch {b} ({lanes} lane(s) per device) in "
                 f"{dt:.1f} s{how}")
        return _PROGRAMS[key], dt

    # ---- groups and batches

    def run_group(self, g: Group, cells: list[Cell], share: int | None = None) -> None:
        """Run `cells` of group g. Batches are sized for `share` (this process's cells of the
        group, finished ones included), so a resumed sweep reuses the same program."""
        if g.host:
            self.log(f"{g.name}: {len(cells)} cell(s), one by one ({g.settings.name})")
            for c in cells:
                if self.flag.get("signal"):
                    return
                self.run_host(g, c)
            return
        ndev = len(self.devices)
        b = batch_size(g, max(share or 0, len(cells)), self.devices, self.batch, self.lanes,
                       self.backend)
        todo = list(cells)
        while todo and not self.flag.get("signal"):
            lanes = lanes_for(g, b // ndev, self.lanes, self.backend, self.devices)
            batches = _batches(todo, b)
            self.log(f"{g.name}: {len(todo)} cell(s) in {len(batches)} batch(es) of {b} on "
                     f"{ndev} device(s), {lanes} lane(s) each")
            try:
                for k, batch in enumerate(batches):
                    if self.flag.get("signal"):
                        return
                    self.run_batch(g, batch, b, lanes, f"{k + 1}/{len(batches)}")
                    done = {c.name for c in batch}
                    todo = [c for c in todo if c.name not in done]
            except _OutOfMemory as e:
                if b <= ndev:
                    for c in todo:
                        self.write_failed(c, f"out of device memory at batch {b}: {e}", g)
                    return
                b = max(ndev, b // 2 // ndev * ndev)
                self.log(f"{g.name}: out of device memory; retrying with batch {b}")

    def _problems(self, g: Group, batch: list[Cell]) -> tuple[list, list]:
        from nstjax import run

        probs, live = [], []
        for c in batch:
            try:
                p = run.build(c.cfg, *self.params_for(c.cfg))
                if tuple(p.x0.shape[1:3]) != g.hw:
                    raise UserError(f"init image shape {tuple(p.x0.shape[1:3])} is not {g.hw}")
            except (UserError, OSError, ValueError) as e:
                self.write_failed(c, str(e), g)
                continue
            probs.append(p)
            live.append(c)
        return probs, live

    def _stack(self, probs: list, b: int) -> tuple:
        import jax
        import numpy as np
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        sh = NamedSharding(self.mesh, P("cells"))
        pad = probs + [probs[-1]] * (b - len(probs))

        def stack(*a):
            return jax.device_put(np.stack([np.asarray(x) for x in a]), sh)

        xb = stack(*[p.x0 for p in pad])
        tgt = jax.tree.map(stack, *[p.targets for p in pad])
        w = jax.tree.map(stack, *[p.weights for p in pad])
        live = jax.device_put(np.arange(b) < len(probs), sh)
        return xb, (probs[0].params, tgt, w), live

    def run_batch(self, g: Group, batch: list[Cell], b: int, lanes: int, tag: str) -> None:
        """Build, stack, solve and write one batch; a crash fails only this batch's cells."""
        probs, live = self._problems(g, batch)
        if not live:
            return
        dirs: list[Path] = []
        try:
            xb, argsb, mask = self._stack(probs, b)
            prog, compile_s = self.program(g, b, lanes, xb, argsb)
            dirs = [self.tmp_dir(c) for c in live]
            info = {"batch": tag, "batch_size": b, "lanes": lanes, "devices": len(self.devices)}
            self.solve(g, live, probs, dirs, prog, compile_s, (xb, argsb, mask), info)
        except (KeyboardInterrupt, _OutOfMemory):
            raise
        except Exception as e:  # noqa: BLE001 - one batch's crash must not stop the sweep
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                raise _OutOfMemory(_first_line(e)) from e
            for c in live:
                self.write_failed(c, _first_line(e), g)

    def solve(self, g, live, probs, dirs, prog, compile_s, inputs, info: dict) -> None:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from tqdm.auto import tqdm

        from nstjax import config, run, solvers

        s, length = g.settings, g.chunk
        t_start = time.perf_counter()
        records = []
        for c, p, d in zip(live, probs, dirs):
            run.write_atomic(d / "config.yaml", config.dump(c.cfg))
            rec = {**run.start_record(c.cfg, p), **self.sweep_info(c, g, **info)}
            run.write_atomic(d / "run.json", json.dumps(rec, indent=2, default=str))
            records.append(rec)
        init_c, chunk_c = prog
        t0 = time.perf_counter()
        st = init_c(*inputs)
        argsb = inputs[1]
        terms0 = jax.device_get(st["terms"])
        hist = [[{"iter": 0, **{k: float(v[i]) for k, v in terms0.items()}, "seconds": 0.0}]
                for i in range(len(live))]
        bar = tqdm(total=s.maxiter, disable=self.quiet, unit="it", dynamic_ncols=True,
                   file=sys.stderr, desc=f"{g.name} {info['batch']}")
        left = s.maxiter
        interrupted = False
        while left > 0:
            m = min(left, length)
            st, trace = chunk_c(st, argsb, jnp.int32(m))
            tr = jax.device_get(trace)
            x = np.asarray(jax.device_get(st["x"]))
            for i, (c, p, d) in enumerate(zip(live, probs, dirs)):
                rows = solvers.rows_of({k: v[i] for k, v in tr.items()}, t0)
                hist[i] += rows
                self._progress(c, p, d, x[i], hist[i], rows, s.maxiter)
            left -= m
            bar.update(m)
            bar.set_postfix(best=f"{min(h[-1]['total'] for h in hist):.4g}")
            if self.flag.get("signal"):
                interrupted = True
                break
            if bool(np.all(np.asarray(jax.device_get(st["done"]))[: len(live)])):
                break
        bar.close()
        self.flag["finishing"] = True  # run.stop_on_signals: ignore signals while writing
        fin = jax.device_get({k: st[k] for k in ("x", "it", "evals", "done", "failed")})
        solve_s = time.perf_counter() - t0
        self.outcome.solve_seconds += solve_s
        for i, (c, d) in enumerate(zip(live, dirs)):
            res = solvers.Result(x=np.asarray(fin["x"][i]), history=hist[i],
                                 evals=int(fin["evals"][i]), iterations=int(fin["it"][i]),
                                 compile_seconds=compile_s if i == 0 else 0.0,
                                 solve_seconds=solve_s)
            if bool(fin["failed"][i]):
                res.status = "failed"
                res.error = f"loss became non-finite at iteration {res.iterations}"
            elif interrupted:
                res.status = "interrupted"
            elif bool(fin["done"][i]):
                res.status = "converged"
            records[i]["signal"] = self.flag.get("signal")
            self.finish_cell(c, d, res, records[i], t_start, post=probs[i].post)
        self.flag.pop("finishing", None)
        if interrupted:
            self.outcome.interrupted = True

    def _progress(self, c: Cell, p, d: Path, x, hist: list, rows: list, total: int) -> None:
        """What `run` writes after each chunk: history, last.npy, snapshots."""
        from nstjax import image, run

        every = c.cfg.output.save_every
        it = rows[-1]["iter"] if rows else 0
        if rows and every and it % every == 0 and it < total:
            image.save(d / f"iter_{it:06d}.{c.cfg.output.format}", run.visible(p, x),
                       bits=c.cfg.output.bits)
        run.write_atomic(d / "history.csv", run.history_csv(hist))
        run.write_atomic(d / "last.npy", _npy(x))

    def run_host(self, g: Group, c: Cell) -> None:
        """One cell on its own, exactly as `nstjax run` runs it (host solver, multi-scale)."""
        from nstjax import run

        problem = None
        if not _multiscale(c.cfg):  # run.run builds multi-scale runs itself
            try:
                problem = run.build(c.cfg, *self.params_for(c.cfg))
            except (UserError, OSError, ValueError) as e:
                self.write_failed(c, str(e), g)
                return
        d = self.tmp_dir(c)
        d.rmdir()  # run.run makes it
        try:
            r = run.run(c.cfg, d, quiet=self.quiet, problem=problem)
            record, result = r.record, r.result
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - run.run re-raises after writing its directory
            shutil.rmtree(d, ignore_errors=True)
            self.write_failed(c, _first_line(e), g)
            return
        record.update(self.sweep_info(c, g, batch="1/1", batch_size=1, lanes=1, devices=1))
        run.write_atomic(d / "run.json", json.dumps(record, indent=2, default=str))
        self.outcome.compilations += 1
        self.outcome.compile_seconds += result.compile_seconds
        self.outcome.solve_seconds += result.solve_seconds
        _publish(d, cell_dir(self.out, c))
        self.outcome.ran.append(c.name)
        if record["status"] == "failed":
            self.outcome.failed.append(c.name)
        if record["status"] == "interrupted":
            self.flag["signal"] = record.get("signal") or 2
            self.outcome.interrupted = True


def _multiscale(cfg: Config) -> bool:
    ms = getattr(cfg, "multiscale", None)
    return bool(ms is not None and ms.count)


def _npy(x) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(x, np.float32), allow_pickle=False)
    return buf.getvalue()


def _clean_stale(out: Path, cells: list[Cell]) -> None:
    """Remove temporary directories a killed run left for these cells."""
    for c in cells:
        for d in (out / "cells").glob(f".{c.name}.tmp-*"):
            shutil.rmtree(d, ignore_errors=True)


def _write_plan(out: Path, sw: Sweep, cells: list[Cell], groups: list[Group]) -> None:
    from nstjax import run

    plan_ = {
        "name": sw.name, "file": sw.source, "description": sw.description,
        "dims": [{"keys": list(d.keys), "values": [list(v) for v in d.values],
                  "labels": list(d.labels) if d.labels else None} for d in sw.dims],
        "groups": [{"name": g.name, "label": g.label, "size_wh": [g.hw[1], g.hw[0]],
                    "solver": g.settings.name, "cells": [c.name for c in g.cells]}
                   for g in groups],
        "cells": [{"name": c.name, "index": c.index, "group": c.group, "values": c.values,
                   "error": c.error} for c in cells],
    }
    run.write_atomic(out / "sweep.json", json.dumps(plan_, indent=2, default=str))


def barrier(name: str, timeout_s: float = 7 * 24 * 3600) -> bool:
    """Wait for every process of a jax.distributed job; False if that failed (logged)."""
    try:
        from jax._src import distributed

        client = distributed.global_state.client
        if client is not None:
            client.wait_at_barrier(name, int(min(timeout_s, 2**31 / 1e3 - 1) * 1000))
            return True
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return True
    except Exception as e:  # noqa: BLE001 - a dead peer must not lose this process's summary
        print(f"nstjax: warning: waiting for the other processes failed: {_first_line(e)}",
              file=sys.stderr)
        return False


def execute(sw: Sweep, cells: list[Cell], groups: list[Group], out: str | Path, *,
            devices: list | None = None, batch: int | None = None, lanes: int | None = None,
            quiet: bool = False,
            process: int = 0, count: int = 1) -> Outcome:
    """Run this process's unfinished cells and (process 0) write the sweep's summary files."""
    import jax

    from nstjax import run

    t_start = time.perf_counter()
    out = Path(out)
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create directory: {e.strerror}") from None
    if process == 0:
        _write_plan(out, sw, cells, groups)
    mine = owned(groups, cells, process, count)
    _clean_stale(out, mine)
    todo = [c for c in mine if not is_finished(cell_dir(out, c), c.cfg)]
    devices = list(devices or jax.local_devices())
    r = Runner(sw, out, devices, batch=batch or sw.batch_size, lanes=lanes or sw.lanes,
               quiet=quiet, process=process)
    names = {c.name for c in todo}
    r.outcome.skipped = [c.name for c in mine if c.name not in names]
    who = f"process {process}/{count}: " if count > 1 else ""
    r.log(f"sweep {sw.name}: {who}{len(mine)} cell(s), {len(r.outcome.skipped)} finished "
          f"already, {len(todo)} to run -> {out}")
    with run.stop_on_signals(r.flag):
        for c in todo:
            if c.key is None:
                r.write_failed(c, c.error)
        for g in groups:
            mine_g = [c for c in todo if c.key == g.key]
            if mine_g and not r.flag.get("signal"):
                r.run_group(g, mine_g, sum(1 for c in mine if c.key == g.key))
    r.outcome.signal = r.flag.get("signal")
    r.outcome.interrupted = r.outcome.interrupted or bool(r.outcome.signal)
    if count > 1:
        barrier(f"nstjax-sweep-{sw.name}-done")
    if process == 0:
        summarize(out, sw, cells, groups)
    r.outcome.wall_seconds = time.perf_counter() - t_start
    return r.outcome


# ---------------------------------------------------------------- results


def _record(out: Path, c: Cell) -> dict:
    try:
        return json.loads((cell_dir(out, c) / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _num(v: Any) -> str:
    return f"{v:.9g}" if isinstance(v, float) else ("" if v is None else str(v))


def summary_rows(out: Path, sw: Sweep, cells: list[Cell]) -> list[dict]:
    """One row per cell: axis values, status, error, final losses, iterations, seconds."""
    rows = []
    for c in cells:
        rec = _record(out, c)
        fin = rec.get("final_loss") or {}
        status = rec.get("status") or ("failed" if c.error else "pending")
        row = {"cell": c.name, "group": c.group,
               **{k: (_canon(v) if isinstance(v, (list, dict)) else _num(v))
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
    cols = ["cell", "group", *sw.keys, *labels, *SUMMARY_TAIL]
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, lineterminator="\n")
    w.writeheader()
    w.writerows(summary_rows(out, sw, cells))
    return buf.getvalue()


def summarize(out: str | Path, sw: Sweep, cells: list[Cell], groups: list[Group]) -> list[Path]:
    """(Re)build summary.csv, contact_sheet.png and plots/<group>.png from the cell dirs."""
    from nstjax import run

    out = Path(out)
    run.write_atomic(out / "summary.csv", summary_csv(out, sw, cells))
    paths = [out / "summary.csv"]
    sheet = contact_sheet(out, sw, cells)
    run.write_atomic(out / "contact_sheet.png", sheet)
    paths.append(out / "contact_sheet.png")
    (out / "plots").mkdir(exist_ok=True)
    for g in groups:
        png = loss_plot(out, g)
        if png:
            run.write_atomic(out / "plots" / f"{g.name}.png", png)
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
    p = cell_dir(out, c) / f"final.{fmt}"
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
    if status not in FINISHED:
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
    except (OSError, ValueError):
        return []


def loss_plot(out: Path, g: Group) -> bytes | None:
    """PNG of total, style and content loss against iteration for each cell of a group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [(c, _history(cell_dir(out, c))) for c in g.cells]
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


# ---------------------------------------------------------------- dry run and estimate


def _throughput(devices: list) -> float:
    """Measured float32 matmul FLOP/s of one device (a fraction of a second)."""
    import jax
    import jax.numpy as jnp

    n = 512
    a = jax.device_put(jnp.ones((n, n), jnp.float32), devices[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t, reps = time.perf_counter(), 0
    while time.perf_counter() - t < 0.2:
        f(a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t)


def eval_flops(g: Group) -> float:
    """FLOPs of one loss+gradient evaluation of one cell (convolutions only, fwd + bwd)."""
    return 3.0 * sum(2 * 9 * h * w * ci * co for h, w, ci, co in _conv_layers(g.spec, g.hw))


def layout(g: Group, n: int, devices: list, batch: int | None, lanes: int | None,
           backend: str, share: int = 0) -> tuple[int, int, int]:
    """(batch size, lanes per device, number of batches) for n cells of a group."""
    if n == 0:
        return 0, 0, 0
    b = batch_size(g, max(n, share), devices, batch, lanes, backend)
    return b, lanes_for(g, b // len(devices), lanes, backend, devices), -(-n // b)


def estimate(groups: list[Group], todo: list[Cell], devices: list, batch: int | None,
             lanes: int | None, backend: str) -> dict:
    """Rough seconds: a constant per compilation plus conv FLOPs over a measured matmul rate."""
    # Conv efficiency relative to a matmul, measured on a 2-core CPU; a guess on accelerators.
    rate = (0.15 if backend == "cpu" else 0.35) * _throughput(devices)
    per_compile = 25.0 if backend == "cpu" else 30.0
    compiles, solve = 0, 0.0
    for g in groups:
        cells = [c for c in todo if c.key == g.key]
        if not cells:
            continue
        s, f = g.settings, eval_flops(g)
        if g.host:
            compiles += len(cells)
            evals = (s.rounds * s.maxfun + s.rounds if s.name == "scipy_lbfgsb"
                     else s.maxiter * _EVALS_PER_ITER.get(s.name, 3.0))
            solve += len(cells) * (evals + 1) * f / rate
            continue
        b, k, _ = layout(g, len(cells), devices, batch, lanes, backend, share=len(g.cells))
        nb = len(_batches(cells, b))
        compiles += 1
        evals = s.maxiter * _EVALS_PER_ITER.get(s.name, 3.0) + 1
        redundancy = 3.0 if k > 1 and s.name != "adam" else 1.0  # vmapped line-search branches
        per_dev = b // len(devices)
        steps = -(-per_dev // k) * k * (len(devices) if backend == "cpu" else 1)
        solve += nb * steps * evals * redundancy * f / rate
    return {"compilations": compiles, "compile_s": compiles * per_compile, "solve_s": solve}


def dry_run(sw: Sweep, cells: list[Cell], groups: list[Group], out: Path, devices: list,
            batch: int | None, lanes: int | None, count: int = 1) -> str:
    """The plan as text: cells and groups, compilations, a time estimate."""
    backend = devices[0].platform
    lines = [f"sweep {sw.name} ({sw.source}): {len(cells)} cell(s), {len(groups)} group(s), "
             f"{len(devices)} {backend} device(s) -> {out}"]
    for d in sw.dims:
        lines.append(f"  {' + '.join(d.keys)}: {len(d)} value(s)"
                     + (f" ({', '.join(d.labels)})" if d.labels else ""))
    done = {c.name for c in cells if is_finished(cell_dir(out, c), c.cfg)}
    owner = {c.name: p for p in range(count) for c in owned(groups, cells, p, count)}
    todo = [c for c in cells if c.name not in done and c.key is not None]
    for g in groups:
        n = sum(1 for c in g.cells if c.name not in done)
        s = g.settings
        b, k, nb = layout(g, n, devices, batch, lanes, backend, share=len(g.cells))
        how = "one by one, as `nstjax run`" if g.host else (
            f"{nb} batch(es) of {b}, {k} lane(s) per device" if n else "nothing to run")
        lines.append(f"group {g.name}: {len(g.cells)} cell(s), {n} to run, "
                     f"{g.hw[1]}x{g.hw[0]}, {s.name} {s.maxiter} it, {how}")
        for c in g.cells:
            state = "finished" if c.name in done else "to run"
            who = f"  [process {owner[c.name]}]" if count > 1 else ""
            lines.append(f"    {c.name:40s} {c.label}  ({state}){who}")
    for c in cells:
        if c.key is None:
            lines.append(f"  invalid {c.name}: {c.error}")
    est = estimate(groups, todo, devices, batch, lanes, backend)
    total = est["compile_s"] + est["solve_s"]
    lines.append(f"compilations: {est['compilations']}; {len(todo)} cell(s) to run, "
                 f"{len(done)} finished")
    lines.append(f"estimate (rough model, not a measurement): ~{est['compile_s']:.0f} s compiling "
                 f"+ ~{est['solve_s']:.0f} s solving = ~{total:.0f} s"
                 + (" (less when the persistent compilation cache has the program)"
                    if est["compilations"] else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `nstjax sweep`."""
    p.add_argument("sweep", help="sweep file (YAML), e.g. configs/sweeps/ratio.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the base config")
    p.add_argument("--out", help="sweep directory (default: RUNS_DIR/sweeps/<name>); rerunning "
                   "into it resumes")
    p.add_argument("--runs-dir", default="runs", help="parent of the default sweep directory")
    p.add_argument("--dry-run", action="store_true",
                   help="print cells, groups, compilations and a time estimate; run nothing")
    p.add_argument("--summarize-only", action="store_true",
                   help="rebuild summary.csv, contact sheet and plots from the cell directories")
    p.add_argument("--batch-size", help="cells per compiled batch: auto or a number")
    p.add_argument("--lanes", help="cells per device solved in lockstep with vmap: auto or a "
                   "number (1: one after another inside the compiled program)")
    p.add_argument("--devices", type=int, help="use only the first N local devices")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--compile-cache", metavar="DIR", help="persistent compilation cache directory")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache")
    g = p.add_argument_group("several processes or hosts (jax.distributed)")
    g.add_argument("--coordinator", default=os.environ.get("NSTJAX_COORDINATOR"),
                   help="host:port of process 0 (env NSTJAX_COORDINATOR)")
    g.add_argument("--num-processes", type=int,
                   default=_env_int("NSTJAX_NUM_PROCESSES"), help="env NSTJAX_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, default=_env_int("NSTJAX_PROCESS_ID"),
                   help="env NSTJAX_PROCESS_ID")
    g.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() with cluster auto-detection (SLURM, ...)")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    try:
        return int(v) if v else None
    except ValueError:
        return None


def init_distributed(a: argparse.Namespace) -> tuple[int, int]:
    """(process index, count): jax.distributed.initialize only when asked."""
    if not (a.coordinator or a.num_processes or a.distributed):
        return 0, 1
    if not a.distributed:
        if not (a.coordinator and a.num_processes and a.process_id is not None):
            raise UserError("--coordinator, --num-processes and --process-id go together "
                            "(or use --distributed on a cluster)")
        if not 0 <= a.process_id < a.num_processes:
            raise UserError(f"--process-id {a.process_id}: must be in 0..{a.num_processes - 1}")
    import jax

    try:
        jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"jax.distributed.initialize failed: {_first_line(e)}") from None
    return jax.process_index(), jax.process_count()


def _cache_dir(sw: Sweep, a: argparse.Namespace) -> str | None | bool:
    if a.no_compile_cache:
        return False
    if a.compile_cache:
        return a.compile_cache
    c = sw.compile_cache
    if isinstance(c, str):
        p = Path(c).expanduser()
        return str(p if p.is_absolute() else sw.here / p)
    return None if c else False


def main(a: argparse.Namespace) -> int:
    """`nstjax sweep`: exit 0 when every cell finished, 1 if any failed, 130 if interrupted."""
    import jax

    from nstjax import run

    sw = load(a.sweep, list(a.overrides))
    batch = parse_auto(a.batch_size, "--batch-size") if a.batch_size else sw.batch_size
    lanes = parse_auto(a.lanes, "--lanes") if a.lanes else sw.lanes
    cells = expand(sw)
    groups = plan(sw, cells)
    out = Path(a.out) if a.out else Path(a.runs_dir) / "sweeps" / sw.name
    if a.summarize_only:
        for p in summarize(out, sw, cells, groups):
            print(p)
        return 0
    if a.devices is not None and a.devices < 1:
        raise UserError("--devices: must be at least 1")
    if a.dry_run:
        devices = jax.local_devices()[: a.devices]
        print(dry_run(sw, cells, groups, out, devices, batch, lanes, a.num_processes or 1))
        return 0
    process, count = init_distributed(a)
    cache = _cache_dir(sw, a)
    if cache is not False:
        try:
            run.enable_compile_cache(cache)
        except OSError as e:  # only a speed-up
            print(f"warning: no compilation cache ({e})", file=sys.stderr)
    devices = jax.local_devices()[: a.devices]
    o = execute(sw, cells, groups, out, devices=devices, batch=batch, lanes=lanes, quiet=a.quiet,
                process=process, count=count)
    n_done = len(o.ran) - len(set(o.failed) & set(o.ran))
    msg = (f"sweep {sw.name}: {n_done} ran, {len(o.failed)} failed, {len(o.skipped)} finished "
           f"already; {o.compilations} compilation(s) ({o.compile_seconds:.1f} s), solve "
           f"{o.solve_seconds:.1f} s, wall {o.wall_seconds:.1f} s -> {out}/summary.csv")
    print(msg, file=sys.stderr if o.exit_code else sys.stdout)
    return o.exit_code
