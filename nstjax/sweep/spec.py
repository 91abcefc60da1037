"""Sweep files: parsing and validation, dimensions (axes and zip groups), cells and their names.

    base: ../quickstart.yaml          # a config path (relative to this file) or an inline config
    set: {solver.maxiter: 50}         # fixed overrides for every cell (optional)
    pairs:                            # image pairs (optional): one dim, labelled content~style
      content: [photos/*.jpg, ../demo/tubingen.jpg]   # paths or globs, relative to this file
      style: paintings/*.jpg
      mode: cross                     # every content with every style; zip: i-th with i-th
    axes:                             # the cells are the product of the axes, in this order
      loss.style_to_content_ratio: [1, 5, 15]
    zip:                              # keys that vary together (optional; a list of groups)
      - label: [deep, uniform]        # optional readable names for the zip's values
        loss.style_weights: [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]
    sweep: {batch_size: auto, lanes: auto, compile_cache: true}   # optional settings
    # sweep.label_metric: style   labels the contact sheet's tiles with metric.style
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nstjax.errors import UserError, cut, preview

if TYPE_CHECKING:
    from nstjax.config import Config

SECTIONS = ("base", "name", "description", "set", "pairs", "axes", "zip", "sweep")
PAIR_MODES = ("cross", "zip")
PAIR_KEYS = ("content", "style")  # the keys of the `pairs:` dim
MAX_PAIRS = 4096
SETTINGS = ("batch_size", "lanes", "compile_cache", "label_metric")
_SHORT = {"style_to_content_ratio": "ratio", "style_weights": "style_w",
          "content_weights": "content_w", "content_layers": "content", "style_layers": "style",
          "tv_weight": "tv", "pooling": "pool", "maxiter": "iters", "learning_rate": "lr",
          "solver.name": "solver", "image.size": "size", "model.weights": "weights"}
_PATH_KEYS = ("content", "style", "init", "model.weights", "masks.style", "masks.content")
SEED_MAX = 2**63 - 1


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
    label_metric: str | None = None  # a metric (`style`, `content`, `style.<layer>`) for tiles

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
        if parts[:i] == ["loss", "options"] and i == 2 and len(parts) == 3:
            return key  # a loss kind's option: checked by the kind when each cell validates
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


def canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _images(v: Any, where: str, here: Path) -> list[str]:
    """A list (or one string) of image paths or glob patterns, relative to the sweep file:
    absolute paths, each pattern's matches sorted; UserError for a pattern that matches no
    file or a path that is not one."""
    import glob

    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(
            isinstance(x, str) and x for x in items):
        raise UserError(f"{where}: must be an image path, a glob such as images/*.jpg, or a "
                        "list of them")
    out: list[str] = []
    for x in items:
        p = Path(x).expanduser()
        p = p if p.is_absolute() else here / p
        if glob.has_magic(x):
            found = sorted(m for m in glob.glob(str(p)) if Path(m).is_file())
            if not found:
                raise UserError(f"{where}: {x} matches no file (looked in {p.parent})")
            out += [str(Path(m).resolve()) for m in found]
        elif not p.is_file():
            raise UserError(f"{where}: {x}: no such image file ({p})")
        else:
            out.append(str(p.resolve()))
    return list(dict.fromkeys(out))


def _pairs(raw: Any, src: str, here: Path) -> list[Dim]:
    """`pairs:` as one dim of keys (content, style) labelled `<content stem>~<style stem>`:
    every content with every style (mode cross, the default) or the i-th with the i-th (zip)."""
    if raw is None:
        return []
    where = f"{src}: pairs"
    if not isinstance(raw, dict) or not {"content", "style"} <= set(raw):
        raise UserError(f"{where}: must map content and style to image paths or globs (and "
                        "optionally mode: cross or zip)")
    for k in raw:
        if k not in ("content", "style", "mode"):
            raise UserError(f"{where}: unknown key {k}; pairs has content, style and mode")
    mode = raw.get("mode", "cross")
    if mode not in PAIR_MODES:
        raise UserError(f"{where}.mode: must be cross or zip (got {preview(mode)})")
    contents = _images(raw["content"], f"{where}.content", here)
    styles = _images(raw["style"], f"{where}.style", here)
    if mode == "zip" and len(contents) != len(styles):
        raise UserError(f"{where}: mode zip pairs the i-th content with the i-th style, but "
                        f"content has {len(contents)} image(s) and style {len(styles)}")
    values = (list(zip(contents, styles)) if mode == "zip" else
              list(itertools.product(contents, styles)))
    if len(values) > MAX_PAIRS:
        raise UserError(f"{where}: {len(values)} pairs; at most {MAX_PAIRS}")
    labels = [f"{Path(c).stem}~{Path(s).stem}" for c, s in values]
    labels = [t if labels.count(t) == 1 else f"{t}-{i}" for i, t in enumerate(labels)]
    return [Dim(("content", "style"), tuple(values), tuple(labels))]


def _dims(raw: dict, src: str, here: Path | None = None) -> list[Dim]:
    """Pairs, axes then zip groups, validated: keys exist, lists non-empty, equal zip
    lengths."""
    dims: list[Dim] = _pairs(raw.get("pairs"), src, here or Path.cwd())
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
        texts = [canon(v) for v in d.values]
        dup = next((v for v, c in zip(d.values, texts) if texts.count(c) > 1), None)
        if dup is not None:
            raise UserError(f"{src}: {', '.join(d.keys)} lists the value {_shown(dup)} twice")
    return dims


def check_cells(dims: list[Dim], src: str) -> None:
    """Refuse a sweep of more than MAX_CELLS cells before any cell is made (one line naming
    the dims and the limit)."""
    from nstjax.results import MAX_CELLS

    n = math.prod(len(d) for d in dims)
    if n > MAX_CELLS:
        shown = " x ".join(f"{'+'.join(d.keys)} ({len(d)})" for d in dims)
        raise UserError(f"{src}: axes and zip: {cut(shown, 200)} make {n} cells, more than the "
                        f"limit of {MAX_CELLS} per sweep; split it into several sweep files")


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


def _label_metric(v: Any, src: str) -> str | None:
    """A metric key of `nstjax.metrics`: a registered metric (structure, weave, ...), or style,
    content, style.<layer>, content.<layer> (the Gram distances)."""
    if v is None:
        return None
    from nstjax import metrics
    from nstjax.config import LAYERS

    head, _, layer = v.partition(".") if isinstance(v, str) else ("", "", "")
    gram = head in ("style", "content") and (not layer or layer in LAYERS)
    named = [n for n in metrics.names() if n != "gram"]
    if not gram and head not in named:
        raise UserError(f"{src}: sweep.label_metric: must name a metric such as style, "
                        f"style.block1_conv1 or one of {', '.join(named)} (got {str(v)[:60]!r})")
    return v


MAX_AUTO = 1 << 20  # cells per batch or lanes: more is a mistake


def parse_auto(v: Any, where: str) -> int | None:
    """`auto` (or null) -> None; an int in 1..MAX_AUTO -> itself."""
    if v is None or v == "auto":
        return None
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= MAX_AUTO or (isinstance(v, float) and v != n) or isinstance(v, bool):
        raise UserError(f"{where}: must be auto or an integer in 1..{MAX_AUTO} (got "
                        f"{preview(v)})")
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
    dims = _dims(raw, src, here)
    check_cells(dims, src)
    keys = {k for d in dims for k in d.keys}
    for where, d in (("set", fixed), ("override", over)):
        clash = [k for k in _flat_keys(d) if k in keys]
        if clash:
            raise UserError(f"{src}: {where} {clash[0]} is also a sweep axis; change the axis "
                            "values in the sweep file instead")
    batch, lanes, cache = _settings(raw.get("sweep"), src)
    label_metric = _label_metric((raw.get("sweep") or {}).get("label_metric"), src)
    name = raw.get("name") or path.stem
    if not isinstance(name, str):
        raise UserError(f"{src}: name: must be a string")
    return Sweep(name=safe_name(name) or "sweep", source=src,
                 base=config.apply_overrides(config.apply_overrides(base, fixed), over),
                 dims=dims, here=here,
                 batch_size=batch, lanes=lanes, compile_cache=cache,
                 description=str(raw.get("description") or ""), label_metric=label_metric)


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
    dir: str = ""  # its directory under cells/ (`store.locate`): the name, or name-<config hash>

    @property
    def label(self) -> str:
        return ", ".join(self.texts) or "base"


def short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def safe_name(text: str, cap: int = 48) -> str:
    """Filesystem-safe: only [A-Za-z0-9._-], no '..', no leading '.', at most `cap` chars."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text))
    s = re.sub(r"\.{2,}", ".", s)
    s = re.sub(r"-{2,}", "-", s).strip(".-_")
    if len(s) > cap:
        s = s[: cap - 7].rstrip(".-_") + "-" + short_hash(text)
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
    return canon(v)


def _cell_parts(dims: list[Dim], short: dict, combo: tuple) -> tuple[list, list]:
    parts, texts = [], []
    for d, i in zip(dims, combo):
        if d.labels:
            head = "pair" if d.keys == PAIR_KEYS else short[d.keys[0]]
            body = d.labels[i]
        else:
            head = "_".join(short[k] for k in d.keys)
            body = "_".join(value_text(k, v) for k, v in zip(d.keys, d.values[i]))
        parts.append(f"{safe_name(head, 24)}-{safe_name(body, 40) or short_hash(body)}")
        texts.append(f"{head}={body}")
    return parts, texts


def _unique_names(cells: list[Cell]) -> None:
    for c in cells:
        name = "__".join(c.parts) or "base"
        c.name = name if len(name) <= 120 else f"{name[:112].rstrip('.-_')}-{short_hash(name)}"
    for attempt in ("hash", "index"):
        seen: dict[str, int] = {}
        for c in cells:
            seen[c.name] = seen.get(c.name, 0) + 1
        for c in cells:
            if seen[c.name] > 1:
                c.name += (f"-{short_hash(canon(c.values))}" if attempt == "hash"
                           else f"-{c.index}")


def _base_solver_keys(raw: dict, base: dict, values: dict) -> dict:
    """`raw` without the base's solver keys that a cell's own solver (set by an axis) does not
    use: the base's settings serve the solvers that use them. Keys the cell's values set
    themselves stay, so validation refuses those its solver ignores (`config.validate`)."""
    from nstjax import solvers

    solver = raw.get("solver")
    if "solver.name" not in values or not isinstance(solver, dict):
        return raw
    used = solvers.USES.get(solver.get("name"), frozenset(solver))
    base_keys = base.get("solver") if isinstance(base.get("solver"), dict) else {}
    drop = {k for k in base_keys if k != "name" and k not in used and f"solver.{k}" not in values}
    return {**raw, "solver": {k: v for k, v in solver.items() if k not in drop}} if drop else raw


def expand(sw: Sweep) -> list[Cell]:
    """All cells (product of the dims, first dim slowest), each with a validated config.

    A cell whose config is invalid keeps its error (it will be marked failed); if every cell is
    invalid the first error is raised.
    """
    from nstjax import config, losses, metrics

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
        raw = _base_solver_keys(config.merge(sw.base, overlay), sw.base, values)
        cells.append(Cell(index, combo, values, labels, tuple(parts), tuple(texts), raw))
    _unique_names(cells)
    for c in cells:
        where = f"{sw.source} cell {c.name}"
        try:
            # this cell's plugins (loss kinds, metrics) only, never another cell's
            with losses.isolated(), metrics.isolated():
                cfg = config.validate(c.raw, where)
            if not 0 <= cfg.seed <= SEED_MAX:  # random weights and noise need a valid seed
                raise UserError(f"{where}: seed: must be an integer in 0..2**63-1 (got "
                                f"{cfg.seed})")
            c.cfg = cfg
        except UserError as e:
            c.error = str(e)
    if all(c.cfg is None for c in cells):
        raise UserError(cells[0].error)
    return cells

