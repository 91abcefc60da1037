"""Config files: bounded YAML loading, dotted keys and overrides, paths relative to the file."""

import re
import stat
from pathlib import Path
from typing import Any

import yaml

from nstjax.errors import UserError, cut, preview

MAX_NODES = 10_000  # values in one YAML document or override value, aliases expanded
MAX_DEPTH = 50  # nesting of one YAML document or override value
MAX_KEY_PARTS = 8  # parts of a dotted override key
MAX_CONFIG_BYTES = 1 << 20
MAX_STYLES = 64
MAX_PLUGINS = 16
WEIGHT_NAMES = ("imagenet", "imagenet_q8", "hed", "random")
INITS = ("noise", "content", "style", "content_matched")


# --------------------------------------------------------------------------- bounded YAML


class _TooBig(Exception):
    """A YAML document that nests or (through aliases) expands past the limits."""


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing a document nested deeper than MAX_DEPTH while composing it and
    one whose aliases expand past MAX_NODES values (or refer to themselves) before building it."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = self._nodes = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooBig(f"nests more than {MAX_DEPTH} levels deep")
            if self._nodes > MAX_NODES:
                raise _TooBig(f"has more than {MAX_NODES} values")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded(node, {}, set(), 1)
        return node


def _expanded(node: yaml.Node, memo: dict[int, int], active: set[int], depth: int) -> int:
    """Values in `node` with every alias expanded: each distinct node is visited once."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise _TooBig("has an alias inside the value it names (a loop)")
    if depth > MAX_DEPTH:
        raise _TooBig(f"nests more than {MAX_DEPTH} levels deep (aliases expanded)")
    total = 1
    if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
        active.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else [
            n for pair in node.value for n in pair]
        for child in children:
            total += _expanded(child, memo, active, depth + 1)
            if total > MAX_NODES:
                raise _TooBig(f"expands to more than {MAX_NODES} values (anchors & and "
                              "aliases * repeat them): write it out plainly")
        active.discard(key)
    memo[key] = total
    return total


# YAML 1.2 floats that PyYAML (YAML 1.1) reads as strings: no dot (`1e-5`) or an unsigned
# exponent (`9.0e5`). Configs, loss.options, sweep axes and override values all read them as
# floats. The resolver table is copied first so PyYAML's own SafeLoader is left as it is.
_BoundedLoader.yaml_implicit_resolvers = {
    k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12,
                                     list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """A YAML document with YAML 1.2 numbers (`1e-5` a float), bounded (depth, aliases)."""
    return _load_yaml(text)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)


# --------------------------------------------------------------------------- paths


def _is_path_value(key: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    if key == "init":
        return value not in INITS
    if key == "model.weights":
        return value not in WEIGHT_NAMES
    if key in ("loss.plugins", "eval.plugins"):  # a module name stays as it is
        return value.endswith(".py") or "/" in value or "\\" in value
    return key in ("content", "style", "masks.style", "masks.content")


def _resolve(key: str, value: Any, base: Path) -> Any:
    if isinstance(value, list) and key in LIST_PATH_KEYS:
        most = MAX_PLUGINS if key.endswith(".plugins") else MAX_STYLES
        if len(value) > most:
            raise UserError(f"{key}: lists {len(value)} entries; at most {most}")
        return [_resolve(key, v, base) if isinstance(v, str) else v for v in value]
    if _is_path_value(key, value):
        p = Path(value).expanduser()
        try:
            return str(p if p.is_absolute() else (base / p).resolve())
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
            raise UserError(f"{key}: {preview(value)}: cannot resolve the path ({e}); "
                            "fix the link or give another path") from None
    return value


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = d.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise UserError(f"override {preview(dotted)}: {preview(part)} is not a section")
        d = nxt
    d[parts[-1]] = value


PATH_KEYS = ("content", "style", "init", "model.weights", "masks.style", "masks.content",
             "loss.plugins", "eval.plugins")
LIST_PATH_KEYS = ("content", "style", "masks.style", "loss.plugins", "eval.plugins")


def resolve_paths(raw: dict, base: Path) -> dict:
    """Make the path values of a raw config absolute, relative to `base`."""
    for key in PATH_KEYS:
        v = _get(raw, key)
        if v is not None:
            _set(raw, key, _resolve(key, v, base))
    return raw


def _override_value(key: str, text: str) -> Any:
    """A path key's value is the raw text (`content=a #1.png`), except that an empty value is
    null and `style=[a.png, b.png]` is a YAML list; any other key's value is YAML."""
    if key in PATH_KEYS and not (key in LIST_PATH_KEYS and text.lstrip().startswith("[")):
        return text or None
    if not text.strip():
        return None
    try:
        return _load_yaml(text)
    except _TooBig as e:
        raise UserError(f"override {key}: the value {e}") from None
    except yaml.YAMLError:
        raise UserError(f"override {key}: value {preview(text)} is not valid YAML") from None


def parse_overrides(items: list[str], base: Path | None = None) -> dict:
    """`a.b=value` strings into a nested dict, values parsed as YAML except a path key's (the
    raw text: see _override_value); paths relative to `base`."""
    out: dict = {}
    base = base or Path.cwd()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if len(parts) > MAX_KEY_PARTS:
            raise UserError(f"bad override {preview(item)}: the key has {len(parts)} dotted "
                            f"parts; config keys have at most 2 (e.g. solver.maxiter)")
        if not sep or not key or any(not p.isidentifier() for p in parts):
            raise UserError(f"bad override {preview(item)}: write key=value, "
                            "e.g. solver.maxiter=50")
        _set(out, key, _resolve(key, _override_value(key, text), base))
    return out


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge `extra` into a copy of `base`."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


NULL_KEEPS = ("content",)  # keys whose null is a value (content: null: texture synthesis)


def apply_overrides(raw: dict, over: dict) -> dict:
    """`over` deep-merged into a copy of `raw`; an override's null unsets its key (it takes
    its default again: `solver.learning_rate=null` drops a learning rate a file set), except
    for the keys of NULL_KEEPS, whose null is a value."""
    import copy

    over = copy.deepcopy(over)
    out = merge(raw, copy.deepcopy(over))

    def drop(cur: dict, extra: dict, prefix: str) -> None:
        for k, v in extra.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and isinstance(cur.get(k), dict):
                drop(cur[k], v, key + ".")
            elif v is None and key not in NULL_KEEPS:
                cur.pop(k, None)

    drop(out, over, "")
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file (safe loader, bounded size), with the line of any syntax error."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read config ({e.strerror or e}); check the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file; give a YAML config file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: {st.st_size} bytes is too large for a config "
                        f"(at most {MAX_CONFIG_BYTES}); is it the right file?")
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8"))
    except _TooBig as e:
        raise UserError(f"{path}: the YAML {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: YAML error{where}: {cut(problem)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read config: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of keys to values")
    return raw
