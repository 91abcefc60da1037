"""The loss-kind registry and its contract: `register` a kind (a pair of functions, `Kind`),
its settings (`Option`), the contract checks (one-line `PluginError`s naming the kind and its
file), and the plugins that register kinds (`load_plugin`, `isolated` for sweep cells).

`nstjax.losses` holds the built-in `gram` kind and dispatches on `Spec.kind`; it re-exports
this module's API, so a plugin writes `from nstjax import losses; losses.register(...)`.
"""

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nstjax.errors import PluginError, UserError, cut, plugin_failed, preview

TargetsFn = Callable[..., Any]
TermsFn = Callable[[dict, jax.Array, Any, dict, Any], Mapping[str, jax.Array]]  # spec: losses.Spec
BlendFn = Callable[[Any, jax.Array], Any]

_OPTION_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Option:
    """One setting of a loss kind, given as `loss.options.<name>` (a sweep axis like any key).

    `default` fixes the type (bool, int, float or str; an int is accepted for a float). `low`,
    `high`: inclusive bounds of a number; `choices`: the allowed strings. `shape=True` marks an
    option that changes array shapes or the traced code (a patch size, a number of
    projections): it is a static field of the Spec, read with `spec.option(name)`, and part of
    every compile key. Any other number is an argument of the compiled program,
    `weights["options"][name]` (float32): sweeping it compiles nothing. bool and str options
    are always static.
    """

    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    shape: bool = False

    @property
    def static(self) -> bool:
        return self.shape or isinstance(self.default, (bool, str))

    def check(self, value: Any, where: str) -> Any:
        """`value` as this option's type, or a one-line UserError naming `where`."""
        want = type(self.default)
        if want in (int, float) and isinstance(value, str):
            value = _number(value, want)  # as the schema's number fields take "1e-5"
        if want is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # 4e3 (a float in YAML 1.2), as the schema's int fields take it
        ok = (isinstance(value, want) and not (want is not bool and isinstance(value, bool))) or (
            want is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise UserError(f"{where}: must be {want.__name__} (got {preview(value)})")
        if want is float:
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"{where}: must be a finite number (got {value})")
        if self.choices and value not in self.choices:
            raise UserError(f"{where}: must be one of {', '.join(self.choices)} "
                            f"(got {preview(value)})")
        if want in (int, float):
            if self.low is not None and value < self.low:
                raise UserError(f"{where}: must be >= {self.low:g} (got {value})")
            if self.high is not None and value > self.high:
                raise UserError(f"{where}: must be <= {self.high:g} (got {value})")
        return value


def _number(text: str, want: type) -> Any:
    """A number written as text (`1e-5`, YAML 1.1's string for it) as `want`, the way the
    config's own number fields read it; the text unchanged if it is not one."""
    try:
        v = float(text.strip())
    except ValueError:
        return text
    if want is int:
        return int(v) if math.isfinite(v) and v == int(v) else text
    return v


@dataclass(frozen=True, eq=False)  # hashed by identity: a kind registered again is new
class Kind:
    """A loss kind: how to compute its targets once, and its terms of an image (the written
    contract, also in docs/guides/research/custom-losses.md; a plugin that breaks it gets a one-line
    `PluginError` naming the kind, its file and the rule).

    - `targets(params, content_x, style_x, spec[, key]) -> dict`: run once per problem
      (jitted, spec static). content_x is preprocessed (1,H,W,3), the size of the image
      optimized; style_x is (S,h,w,3), ALL S style images at once. The result must be a dict
      with "style" (the style statistics) and may hold anything else (e.g. "content"
      features, random directions): every leaf an array. With the default linear blend every
      leaf under "style" must have a leading axis of S (one row per style image): the
      framework replaces it by the blend weights' weighted sum, keeping a leading axis of 1.
      A kind whose statistics do not blend linearly passes `blend=`. `random=True`: targets
      also takes `key`, a PRNG key derived from the run's seed.
    - `blend(style, b) -> style`: the statistics under "style" (leading axis S) and the
      normalized blend weights b (S,) float32 -> what `terms` expects for one blended style.
      Not called with `masks.style` (per-style targets, only for kinds with `masks=True`).
    - `terms(params, x, tgt, weights, spec) -> {name: scalar}`: traced inside the solver; a
      dict of scalar arrays that contains "total" (what is minimized); by convention also
      "content", "style", "tv" and per-layer "style/<layer>" (needed by
      `loss.style_norm: content`, which rescales the layer weights). `weights` holds the
      config's loss weights as arguments of the compiled program: {"content": {layer: w},
      "style": {layer: w}, "ratio": r, "tv": t}, plus "options": {name: float32} for the
      kind's numeric options (`Option`). Static options: `spec.option(name)`.
    Both must be pure and traceable by JAX (no Python control flow on array values).
    """

    name: str
    targets: TargetsFn
    terms: TermsFn
    description: str = ""
    options: Mapping[str, Option] = field(default_factory=dict)
    blend: BlendFn | None = None
    random: bool = False
    masks: bool = False
    source: str = ""  # where the functions come from (a plugin's file), for error messages
    builtin: bool = False

    @property
    def label(self) -> str:
        return f"loss kind {self.name!r}" + (f" ({self.source})" if self.source else "")


_KINDS: dict[str, Kind] = {}
_PLUGIN_KINDS: dict[str, dict[str, Kind]] = {}  # what each imported plugin registered
_BUILTIN_MODULES = ("nstjax.losses", "nstjax.style_losses")  # built-in kinds, registered on import
_ON_CHANGE: list[Callable[[], None]] = []  # drop programs compiled for a replaced kind
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)


def on_change(fn: Callable[[], None]) -> None:
    """Call `fn` whenever a name's functions change (losses: drop its compiled targets)."""
    _ON_CHANGE.append(fn)


def _forget_programs() -> None:
    for fn in _ON_CHANGE:
        fn()


def _set_kinds(new: dict[str, Kind]) -> None:
    """Make `new` the registry; compiled targets are dropped if a name changes functions."""
    if any(_KINDS.get(n, k) is not k for n, k in new.items()):
        _forget_programs()
    _KINDS.clear()
    _KINDS.update(new)


@contextlib.contextmanager
def isolated(plugins: Sequence[str] = ()):
    """Within the block, the registry holds exactly the kinds registered in code (not by a
    plugin file or module) plus those of `plugins` (imported or re-registered); it is restored
    after. A sweep cell sees the kinds its own config imports, never another cell's."""
    _load_builtins()  # before the snapshot: loaded inside, they would vanish with the restore
    saved = dict(_KINDS)
    from_plugins = {id(k) for ks in _PLUGIN_KINDS.values() for k in ks.values()}
    try:
        _set_kinds({n: k for n, k in saved.items() if id(k) not in from_plugins})
        for ref in plugins:
            load_plugin(ref)
        yield
    finally:
        _set_kinds(saved)
_LOADING: list[str] = []  # the plugin files (or modules) being imported, innermost last


def registrant(fn: Callable) -> str:
    """Who registers `fn`: the plugin being imported, else the file `fn` comes from."""
    return _LOADING[-1] if _LOADING else source_of(fn)


def source_of(fn: Callable) -> str:
    """The file a function comes from (its module's), or its module's name."""
    mod = sys.modules.get(getattr(fn, "__module__", "") or "")
    return str(getattr(mod, "__file__", "") or getattr(fn, "__module__", "") or "")


def register(name: str, *, targets: TargetsFn, terms: TermsFn, description: str = "",
             options: Mapping[str, Option] | None = None, blend: BlendFn | None = None,
             random: bool = False, masks: bool = False, replace: bool = False,
             _builtin: bool = False) -> Kind:
    """Register a loss kind under `name`, selectable as `Spec(kind=name)` / `loss.kind: name`
    (the contract: `Kind`). `options`: its settings ({name: Option}), `blend`: how several
    styles' statistics combine (default linear), `random`: targets takes a PRNG `key`,
    `masks`: terms handles `masks.style` (per-style targets and `tgt["style_masks"]`).

    A name is registered once; `replace=True` swaps in new functions from the same file (e.g.
    re-running a notebook cell) and drops `targets`' compiled programs. A built-in kind's name
    and a name registered from another file are refused (ValueError naming both). Programs
    cached by key elsewhere should include `kind(spec.kind)` (a new object after a replace)
    in the key.
    """
    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
        raise ValueError(f"loss kind name must be a non-empty identifier, got {name!r}")
    if not (callable(targets) and callable(terms)) or (blend is not None and not callable(blend)):
        raise TypeError(f"loss kind {name!r}: targets, terms and blend must be callables")
    opts = dict(options or {})
    for n, o in opts.items():
        if not (isinstance(n, str) and n.isidentifier() and isinstance(o, Option)
                and isinstance(o.default, _OPTION_TYPES)):
            raise TypeError(f"loss kind {name!r}: options must map identifiers to "
                            f"losses.Option(default=bool|int|float|str), got {n!r}: {o!r}")
    k = Kind(name, targets, terms, description, opts, blend, random, masks,
             "" if _builtin else registrant(terms), _builtin)
    old = _KINDS.get(name)
    if old is not None and (old.builtin != k.builtin or old.source != k.source):
        taken = f"the built-in loss kind {name!r}" if old.builtin else old.label
        raise ValueError(f"{k.label}: the name is taken by {taken}; pick another name")
    if old is not None and not replace:
        raise ValueError(f"loss kind {name!r} is already registered; pass replace=True to "
                         "replace it")
    if name in _KINDS:
        _forget_programs()
    _KINDS[name] = k
    return k


def kinds() -> tuple[str, ...]:
    """The registered loss kinds, sorted."""
    _load_builtins()
    return tuple(sorted(_KINDS))


def kind(name: str) -> Kind:
    """The registered kind `name`; a UserError naming `loss.kind` and the valid kinds if none."""
    _load_builtins()
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise UserError(
            f"loss.kind: unknown loss kind {name!r}; registered kinds: {', '.join(kinds())} "
            "(a custom kind must be registered with nstjax.losses.register first)") from None


def resolve_options(name: str, given: Any, where: str = "loss.options") -> dict[str, Any]:
    """The options of kind `name`: `given` checked by the kind (an unknown option is a one-line
    UserError naming it), every other option at its default, in the kind's order."""
    k = kind(name)
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise UserError(f"{where}: must be a mapping of loss kind {name!r}'s options "
                        f"(got {preview(given)})")
    for key in given:
        if key not in k.options:
            have = (f"its options: {', '.join(k.options)}" if k.options
                    else "it takes no options")
            raise UserError(f"{where}.{cut(str(key))}: unknown option of loss kind {name!r}; "
                            f"{have}")
    return {n: o.check(given[n], f"{where}.{n}") if n in given else o.default
            for n, o in k.options.items()}


def static_options(name: str, resolved: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The options of kind `name` that are static (Spec fields, compile key)."""
    return tuple((n, resolved[n]) for n, o in kind(name).options.items() if o.static)


def dynamic_options(name: str, resolved: Mapping[str, Any]) -> dict[str, float]:
    """The numeric options of kind `name` passed as program arguments (`weights["options"]`)."""
    return {n: float(resolved[n]) for n, o in kind(name).options.items() if not o.static}


@contextlib.contextmanager
def calling(k: Kind, what: str):
    """A plugin's exception inside the block -> one-line PluginError naming the kind; device
    errors (out of memory) and the built-in kinds' own errors pass unchanged."""
    if k.builtin:
        yield
        return
    try:
        yield
    except (jax.errors.JaxRuntimeError, MemoryError):
        raise
    except PluginError:
        raise
    except UserError as e:
        raise PluginError(f"{k.label}: {what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - user code may raise anything
        raise plugin_failed(k.label, what, e) from None


def _shape(leaf: Any) -> tuple:
    try:
        return tuple(np.shape(leaf))
    except Exception:  # noqa: BLE001 - not array-like
        return ()


def check_targets(k: Kind, tgt: Any, n_styles: int) -> None:
    """The targets contract (see `Kind`), checked on what `targets` returned."""
    if not isinstance(tgt, Mapping) or "style" not in tgt:
        got = f"keys {sorted(map(str, tgt))}" if isinstance(tgt, Mapping) else type(tgt).__name__
        raise PluginError(f"{k.label}: targets() must return a dict with a 'style' entry (the "
                          f"style statistics, one leading-axis row per style image); got {got}")
    if k.blend is not None:
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(tgt["style"])[0]:
        shape = _shape(leaf)
        if not shape or shape[0] != n_styles:
            raise PluginError(
                f"{k.label}: targets()['style']{jax.tree_util.keystr(path)} has shape {shape}; "
                f"every leaf under 'style' needs a leading axis of one row per style image "
                f"({n_styles} here), which the linear blend combines; or register the kind "
                "with its own blend=")


def check_terms(k: Kind, terms: Any) -> dict[str, jax.Array]:
    """The terms contract (see `Kind`): a dict of scalars with 'total'; returned as arrays."""
    if not isinstance(terms, Mapping):
        raise PluginError(f"{k.label}: terms() must return a dict of scalars with 'total' (what "
                          f"is minimized); got {type(terms).__name__} {preview(_shape(terms))}")
    if "total" not in terms:
        raise PluginError(f"{k.label}: terms() returned keys {sorted(map(str, terms))}; it "
                          "must include 'total' (the scalar minimized)")
    out = {}
    for name, v in terms.items():
        shape = _shape(v)
        if not isinstance(name, str) or shape != () or not hasattr(v, "dtype") and not (
                isinstance(v, (int, float)) and not isinstance(v, bool)):
            raise PluginError(f"{k.label}: terms()[{preview(name)}] has shape {shape}: every "
                              "term must be a scalar (e.g. jnp.sum(...) of a per-layer loss) "
                              "under a string name")
        out[name] = jnp.asarray(v)
    return out


def load_plugin(ref: str, here: str | Path | None = None, what: str = "loss plugin") -> None:
    """Import a module that registers loss kinds (or metrics: `what` names it in errors): a
    `.py` file (relative to `here`) or a dotted module name. Importing the same file twice
    runs it once."""
    _load_builtins()  # first: loaded during the plugin's import, they would count as its own
    if _is_file_ref(ref):
        path = _plugin_path(ref, here)
        if not path.is_file():
            where = "" if str(path) == ref else f" ({path})"
            raise UserError(f"{ref}: {what} file not found{where}; check the path (a "
                            "relative one is relative to the config file)")
        mod_name = plugin_key(ref, here)
        if _reinstall(mod_name) or mod_name in sys.modules:  # (or being imported now)
            return
        try:
            code = path.read_bytes()  # what runs is what is hashed
        except OSError as e:
            raise UserError(f"{ref}: cannot read the {what} ({e.strerror or e})") from None
        spec = importlib.util.spec_from_file_location(
            mod_name, path, loader=_SourceLoader(mod_name, str(path), code))
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        before = dict(_KINDS)
        _LOADING.append(str(path))
        try:
            spec.loader.exec_module(module)
            IMPORTED[str(path)] = hashlib.sha256(code).hexdigest()
        except Exception as e:
            del sys.modules[mod_name]
            raise UserError(f"{ref}: importing the {what} failed: "
                            f"{type(e).__name__}: {e}") from None
        finally:
            _LOADING.pop()
        _record_plugin(mod_name, before)
        return
    if _reinstall(ref):
        return
    before = dict(_KINDS)
    _LOADING.append(ref)
    try:
        importlib.import_module(ref)
    except Exception as e:
        raise UserError(f"{ref}: importing the {what} module failed: "
                        f"{type(e).__name__}: {e}") from None
    finally:
        _LOADING.pop()
    _record_plugin(ref, before)


IMPORTED: dict[str, str] = {}  # plugin file -> sha256 of the code imported from it


class _SourceLoader(importlib.machinery.SourceFileLoader):
    """Imports a plugin file from the bytes already read (and hashed), never from a cached
    .pyc or a second read."""

    def __init__(self, name: str, path: str, code: bytes):
        super().__init__(name, path)
        self.code = code

    def get_data(self, path: str) -> bytes:
        if path == self.path:
            return self.code
        raise OSError(f"{path}: not read (the plugin's source is)")  # no bytecode cache

    def set_data(self, path: str, data: bytes, *, _mode: int = 0o666) -> None:
        pass  # no .pyc written next to the user's file


def plugin_file(ref: str, here: str | Path | None = None) -> tuple[str, str | None] | None:
    """(file, sha256) of an imported plugin `ref` (a module's file for a module name; the
    sha256 of the code as imported for a plugin file), or None if it is not imported."""
    if _is_file_ref(ref):
        path = str(_plugin_path(ref, here))
        return (path, IMPORTED[path]) if path in IMPORTED else None
    mod = sys.modules.get(ref)
    f = getattr(mod, "__file__", None)
    if not f:
        return None
    try:
        return f, hashlib.sha256(Path(f).read_bytes()).hexdigest()
    except OSError:
        return f, None


def _is_file_ref(ref: str) -> bool:
    return ref.endswith(".py") or "/" in ref or "\\" in ref


def _plugin_path(ref: str, here: str | Path | None) -> Path:
    path = Path(ref).expanduser()
    if here is not None and not path.is_absolute():
        path = Path(here) / path
    return path.resolve()


def plugin_key(ref: str, here: str | Path | None = None) -> str:
    """The module name plugin `ref` is imported under (a file's is derived from its path)."""
    if _is_file_ref(ref):
        return f"nstjax_plugin_{abs(hash(str(_plugin_path(ref, here)))):x}"
    return ref


def _record_plugin(key: str, before: dict[str, Kind]) -> None:
    _PLUGIN_KINDS[key] = {n: k for n, k in _KINDS.items() if before.get(n) is not k}


def _reinstall(key: str) -> bool:
    """Whether plugin `key` was imported already; if so its kinds are put back in the registry
    (an `isolated` block may have left them out)."""
    if key not in _PLUGIN_KINDS or key not in sys.modules:
        return False
    _set_kinds({**_KINDS, **_PLUGIN_KINDS[key]})
    return True
