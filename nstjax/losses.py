"""Gram matrices and the style-transfer losses, as pure functions of features.

Two normalizations:
- `seed`: the Keras blog post's code, quirks included. Gram = F^T F / (h*w*c); per style layer the
  Keras MSE (mean over the last axis of the Gram difference) summed, times the layer weight; the
  weighted sum divided by h*w*c of the FIRST style layer. Content: summed last-axis MSE / (h*w*c).
- `gatys`: the paper. Gram = F^T F; style E_l = sum((G - A)^2) / (4 N_l^2 M_l^2);
  content = 1/2 sum((F - P)^2).
Both: total = style + content / style_to_content_ratio + tv_weight * tv.

Loss kinds: `Spec.kind` names a registered pair of functions (`register`); `gram` (the post's
Gram loss, above) is the built-in one. Others come from plugins (`load_plugin`, a config's
`loss.plugins`), e.g. configs/examples/adain_loss.py (AdaIN-style channel statistics).
`targets` and `objective` dispatch on it, so the kind is part of every compiled program's cache
key (the Spec; callers that cache by key add `kind(spec.kind)`, which a replace changes).
"""

import contextlib
import importlib
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

from nstjax import vgg16
from nstjax.errors import PluginError, UserError, cut, preview

NORMALIZATIONS = ("seed", "gatys")


@dataclass(frozen=True)
class Spec:
    """What shapes the compiled program: layers, pooling, normalization, precision."""

    content_layers: tuple[str, ...] = ("block4_conv2",)
    style_layers: tuple[str, ...] = tuple(f"block{i}_conv2" for i in range(1, 6))
    pooling: str = "avg"
    normalization: str = "seed"
    precision: str = "default"  # the config's default (model.precision)
    remat: bool = False
    # Spatial control (nstjax.controls): the number of masked styles (0: one target Gram per
    # layer, no masks) and whether a content mask blends the image with the content.
    style_masks: int = 0
    content_mask: bool = False
    kind: str = "gram"  # a registered loss kind (`kinds()`)
    conv: str = "auto"  # the convolution algorithm (vgg16.conv): auto, direct or winograd
    # The kind's static options ((name, value), ...): those that change shapes (`Option`).
    options: tuple[tuple[str, Any], ...] = ()
    seamless: bool = False  # circular padding everywhere: seamless (tileable) images
    arch: str = "vgg16"  # the backbone (vgg16.ARCHS): vgg16 or vgg19

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.content_layers + self.style_layers))

    def option(self, name: str) -> Any:
        """The value of the kind's static option `name` (`loss.options.<name>`)."""
        for n, v in self.options:
            if n == name:
                return v
        raise KeyError(f"loss kind {self.kind!r}: {name!r} is not a static option of this Spec "
                       f"(static options: {[n for n, _ in self.options]}); numeric options "
                       "that keep shapes are in weights['options']")


def gram(f: jax.Array, normalization: str = "seed") -> jax.Array:
    """Gram matrices (N, c, c) of features (N, h, w, c), accumulated in float32."""
    n, h, w, c = f.shape
    flat = f.reshape(n, h * w, c).astype(jnp.promote_types(f.dtype, jnp.float32))
    g = jnp.einsum("npi,npj->nij", flat, flat, precision=jax.lax.Precision.HIGHEST)
    return g / (h * w * c) if normalization == "seed" else g


def content_loss(f: jax.Array, p: jax.Array, normalization: str = "seed") -> jax.Array:
    """Content loss of features f against target features p, both (N, h, w, c)."""
    d2 = jnp.square(f - p)
    if normalization == "seed":
        _, h, w, c = f.shape
        return jnp.sum(jnp.mean(d2, axis=-1)) / (h * w * c)
    return 0.5 * jnp.sum(d2)


def style_layer_loss(f: jax.Array, a: jax.Array, normalization: str = "seed") -> jax.Array:
    """One layer's style term for features f (N,h,w,c) against a target Gram a (N or 1, c, c).

    `seed` returns the un-divided summed MSE; the division by the first layer's size is in
    `style_loss`.
    """
    g = gram(f, normalization)
    if normalization == "seed":
        return jnp.sum(jnp.mean(jnp.square(g - a), axis=-1))
    _, h, w, c = f.shape
    return jnp.sum(jnp.square(g - a)) / (4.0 * c**2 * (h * w) ** 2)


def style_loss(
    feats: Sequence[jax.Array],
    grams: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    normalization: str = "seed",
) -> jax.Array:
    """Weighted style loss over layers (feats and target grams in the same order)."""
    total = sum(w * style_layer_loss(f, a, normalization) for f, a, w in zip(feats, grams, weights))
    if normalization == "seed":
        _, h, w, c = feats[0].shape
        total = total / (h * w * c)
    return total


def masked_gram(f: jax.Array, m: jax.Array, normalization: str = "seed") -> jax.Array:
    """Grams (S, c, c) of features f (1, h, w, c) weighted by S masks m (S, h, w, 1).

    Gatys et al. 2017's guided Gram: the Gram of F * m, normalized by the mask's area so that a
    mask of ones gives `gram(f)`: `seed` divides by c * sum(m^2) (a mean over the region),
    `gatys` scales the region's sum up to h * w positions.
    """
    _, h, w, c = f.shape
    flat = f.reshape(h * w, c).astype(jnp.float32)
    mf = m.astype(jnp.float32).reshape(m.shape[0], h * w, 1)
    # One Gram per mask: a batched "spi,pj->sij" einsum is ~50x slower on XLA:CPU.
    g = jnp.stack([jnp.einsum("pi,pj->ij", flat * ms, flat * ms,
                              precision=jax.lax.Precision.HIGHEST) for ms in mf])
    area = jnp.maximum(jnp.sum(jnp.square(mf), axis=(1, 2)), 1e-6)[:, None, None]
    return g / (c * area) if normalization == "seed" else g * (h * w / area)


def masked_style_layer_loss(f: jax.Array, m: jax.Array, a: jax.Array,
                            normalization: str = "seed") -> jax.Array:
    """One layer's style term with S regions: masks m (S,h,w,1), target Grams a (S,c,c).

    Each region's term is `style_layer_loss`'s, weighted by the region's area fraction, so one
    mask of ones gives exactly `style_layer_loss`.
    """
    g = masked_gram(f, m, normalization)
    frac = jnp.mean(m.astype(jnp.float32), axis=(1, 2, 3))
    if normalization == "seed":
        per = jnp.sum(jnp.mean(jnp.square(g - a), axis=-1), axis=-1)
    else:
        _, h, w, c = f.shape
        per = jnp.sum(jnp.square(g - a), axis=(1, 2)) / (4.0 * c**2 * (h * w) ** 2)
    return jnp.sum(frac * per)


def tv_loss(x: jax.Array, seamless: bool = False) -> jax.Array:
    """Total variation: squared differences of vertical and horizontal neighbours per pixel
    (`seamless`: across the wrap-around edges too, for seamless images)."""
    _, h, w, _ = x.shape
    if seamless:
        dy = jnp.sum(jnp.square(jnp.roll(x, -1, 1) - x))
        dx = jnp.sum(jnp.square(jnp.roll(x, -1, 2) - x))
        return (dx + dy) / (h * w)
    dy = jnp.sum(jnp.square(x[:, 1:] - x[:, :-1]))
    dx = jnp.sum(jnp.square(x[:, :, 1:] - x[:, :, :-1]))
    return (dx + dy) / (h * w)


def default_weights(spec: Spec, style_weights: Sequence[float], ratio: float,
                    tv: float = 0.0, content_weights: Sequence[float] | None = None,
                    options: Mapping[str, float] | None = None) -> dict:
    """Loss weights as a pytree of float32 scalars (an argument of the compiled program);
    `options`: the kind's numeric options (`dynamic_options`), under "options" when any."""
    cw = content_weights if content_weights is not None else [1.0] * len(spec.content_layers)
    f32 = jnp.float32
    out = {
        "content": {n: f32(w) for n, w in zip(spec.content_layers, cw)},
        "style": {n: f32(w) for n, w in zip(spec.style_layers, style_weights)},
        "ratio": f32(ratio),
        "tv": f32(tv),
    }
    if options:
        out["options"] = {n: f32(v) for n, v in options.items()}
    return out


def scored_image(x: jax.Array, tgt: dict, spec: Spec) -> jax.Array:
    """The image the loss scores: x, or m * x + (1 - m) * content with `spec.content_mask`
    (tgt["content_mask"] = {"mask": (1,H,W,1), "image": (1,H,W,3)})."""
    if not spec.content_mask:
        return x
    cm = tgt["content_mask"]
    return cm["mask"] * x + (1.0 - cm["mask"]) * cm["image"]


def features(params: dict, x: jax.Array, layers: Sequence[str], spec: Spec) -> dict:
    """`vgg16.features` of `layers` with the spec's pooling, precision, remat and convolution:
    what a loss kind's targets and terms call, so both see the same network (no layers: {})."""
    if not layers:
        return {}
    return vgg16.features(params, x, layers, spec.pooling, spec.precision, spec.remat, spec.conv,
                          seamless=spec.seamless, arch=spec.arch)


def gram_targets(params: dict, content_x: jax.Array, style_x: jax.Array, spec: Spec) -> dict:
    """Targets: content features {layer: (1,h,w,c)} and style Grams {layer: (1,c,c)}."""
    fc = features(params, content_x, spec.content_layers, spec)
    fs = features(params, style_x, spec.style_layers, spec)
    return {
        "content": {n: fc[n] for n in spec.content_layers},
        "style": {n: gram(fs[n], spec.normalization) for n in spec.style_layers},
    }


def loss_terms(params: dict, x: jax.Array, tgt: dict, weights: dict, spec: Spec) -> dict:
    """The Gram loss's terms of image x (1,H,W,3), preprocessed: total, content, style, tv and
    `style/<layer>` (weighted; with `seed`, divided by the first style layer's size, so they sum
    to `style`), plus `content/<layer>` when there are several content layers.

    With `spec.content_mask` the image scored is `scored_image(x, tgt, spec)`. With
    `spec.style_masks`, tgt["style"][layer] is (S,c,c) and tgt["style_masks"][layer] (S,h,w,1):
    guided Grams.
    """
    x = scored_image(x, tgt, spec)
    feats = features(params, x, spec.layers, spec)
    norm = spec.normalization
    per_content = {n: weights["content"][n] * content_loss(feats[n], tgt["content"][n], norm)
                   for n in spec.content_layers}
    per_style = {}
    for n in spec.style_layers:
        if spec.style_masks:
            e = masked_style_layer_loss(feats[n], tgt["style_masks"][n], tgt["style"][n], norm)
        else:
            e = style_layer_loss(feats[n], tgt["style"][n], norm)
        per_style[n] = weights["style"][n] * e
    if norm == "seed":  # the post divides the weighted sum by the first style layer's size
        _, h, w, c = feats[spec.style_layers[0]].shape
        per_style = {n: v / (h * w * c) for n, v in per_style.items()}
    content = sum(per_content.values(), jnp.float32(0.0))
    style = sum(per_style.values())
    tv = tv_loss(x, spec.seamless)
    total = style + content / weights["ratio"] + weights["tv"] * tv
    terms = {"total": total, "content": content, "style": style, "tv": tv}
    terms.update({f"style/{n}": v for n, v in per_style.items()})
    if len(per_content) > 1:
        terms.update({f"content/{n}": v for n, v in per_content.items()})
    return terms


# ---------------------------------------------------------------- the registry and its contract

TargetsFn = Callable[..., Any]
TermsFn = Callable[[dict, jax.Array, Any, dict, Spec], Mapping[str, jax.Array]]
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


@dataclass(frozen=True, eq=False)  # hashed by identity: a kind registered again is new
class Kind:
    """A loss kind: how to compute its targets once, and its terms of an image (the written
    contract, also in the README's "Research bench"; a plugin that breaks it gets a one-line
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
_BUILTIN_MODULES = ("nstjax.style_losses",)  # further built-in kinds, registered on import
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)


def _forget_programs() -> None:
    targets.clear_cache()  # the module's jitted `targets` (register's argument shadows it)


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
def _source(fn: Callable) -> str:
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

    A name is registered once; `replace=True` swaps in new functions (e.g. re-running a
    notebook cell) and drops `targets`' compiled programs. Programs cached by key elsewhere
    should include `kind(spec.kind)` (a new object after a replace) in the key.
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
    if name in _KINDS and not replace:
        raise ValueError(f"loss kind {name!r} is already registered; pass replace=True to "
                         "replace it")
    k = Kind(name, targets, terms, description, opts, blend, random, masks,
             "" if _builtin else _source(terms), _builtin)
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
def _calling(k: Kind, what: str):
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
        msg = cut(" ".join(str(e).split()) or "(no message)", 300)
        raise PluginError(f"{k.label}: {what} failed: {type(e).__name__}: {msg}") from None


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
    if _is_file_ref(ref):
        path = _plugin_path(ref, here)
        if not path.is_file():
            where = "" if str(path) == ref else f" ({path})"
            raise UserError(f"{ref}: {what} file not found{where}; check the path (a "
                            "relative one is relative to the config file)")
        mod_name = plugin_key(ref, here)
        if _reinstall(mod_name) or mod_name in sys.modules:  # (or being imported now)
            return
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        before = dict(_KINDS)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise UserError(f"{ref}: importing the {what} failed: "
                            f"{type(e).__name__}: {e}") from None
        _record_plugin(mod_name, before)
        return
    if _reinstall(ref):
        return
    before = dict(_KINDS)
    try:
        importlib.import_module(ref)
    except Exception as e:
        raise UserError(f"{ref}: importing the {what} module failed: "
                        f"{type(e).__name__}: {e}") from None
    _record_plugin(ref, before)


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


def targets(params: dict, content_x: jax.Array, style_x: jax.Array, spec: Spec,
            key: jax.Array | None = None) -> Any:
    """The targets of `spec.kind` (gram: content features and style Grams), jitted with `spec`
    static: the one compiled targets program every caller shares (run, sweep, bench, API), so
    the targets a documented composition computes are bit-identical to a run's. `key`: the
    PRNG key of a `random` kind (default key 0)."""
    k = kind(spec.kind)
    with _calling(k, "targets()"):
        if k.random:
            key = jax.random.key(0) if key is None else key
            return k.targets(params, content_x, style_x, spec, key)
        return k.targets(params, content_x, style_x, spec)


targets = jax.jit(targets, static_argnums=(3,))


def checked_targets(params: dict, content_x: jax.Array, style_x: jax.Array, spec: Spec,
                    key: jax.Array | None = None) -> dict:
    """`targets`, with the contract checked (one-line PluginErrors): a dict with 'style'."""
    k = kind(spec.kind)
    with _calling(k, "targets()"):
        tgt = targets(params, content_x, style_x, spec, key)
    check_targets(k, tgt, int(np.shape(style_x)[0]))
    return dict(tgt)


def linear_blend(style: Any, b: jax.Array) -> Any:
    """The default blend: sum_i b_i T_i over each leaf's leading (style) axis, keeping it as 1."""
    return jax.tree.map(lambda t: jnp.tensordot(b, t, axes=1)[None], style)


def blend(spec: Spec, style: Any, b: Any) -> Any:
    """The style statistics of several styles combined by kind `spec.kind`'s blend (linear by
    default) with normalized weights b (S,)."""
    k = kind(spec.kind)
    with _calling(k, "blend()"):
        return (k.blend or linear_blend)(style, jnp.asarray(b, jnp.float32))


def objective(spec: Spec):
    """fun(x, params, tgt, weights) -> (total, terms): the function solvers minimize, the terms
    of the kind `spec.kind`. Params, targets and weights are arguments, never constants of the
    compiled program. A plugin's broken contract is a one-line PluginError at trace time."""
    k = kind(spec.kind)

    def fun(x, params, tgt, weights):
        with _calling(k, "terms()"):
            terms = k.terms(params, x, tgt, weights, spec)
        terms = check_terms(k, terms)
        return terms["total"], terms

    return fun


def check_objective(spec: Spec, x: jax.Array, params: dict, tgt: Any, weights: dict) -> None:
    """Trace a plugin kind's terms once (no compile) so that a broken contract is a one-line
    error before anything runs or is written; the built-in kinds are trusted."""
    if not kind(spec.kind).builtin:
        jax.eval_shape(objective(spec), x, params, tgt, weights)


register("gram", targets=gram_targets, terms=loss_terms, masks=True, _builtin=True,
         description="the post's loss: content features, Gram matrices, TV")
