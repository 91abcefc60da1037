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
`loss.plugins`), e.g. configs/plugins/adain_loss.py (AdaIN-style channel statistics).
`targets` and `objective` dispatch on it, so the kind is part of every compiled program's cache
key (the Spec; callers that cache by key add `kind(spec.kind)`, which a replace changes).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import vgg16
from nstjax.kinds import (  # noqa: F401 - the registry's API, re-exported for plugins
    BlendFn,
    Kind,
    Option,
    TargetsFn,
    TermsFn,
    calling,
    check_targets,
    check_terms,
    dynamic_options,
    isolated,
    kind,
    kinds,
    load_plugin,
    on_change,
    plugin_key,
    register,
    resolve_options,
    static_options,
)

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


def size_exponents(normalization: str, style_norm: str = "none") -> tuple[int, int, int]:
    """How the style, content and TV terms of the `gram` kind grow with the pixel count N, as
    powers of N for the same image statistics at another size: `seed` Grams are per-position
    means but the style sum is divided by the first style layer's size (N^-1), its content
    term is a mean (N^0); `gatys` style terms are size-free (N^0), its content a sum (N^1);
    style_norm content divides the style terms by their value at the content image (N^0);
    TV is a mean over pixels of the squared neighbour differences (N^0: measured 0.9-1.1x
    per pixel between 128 and 256 px on the demo images and The Shipwreck)."""
    style = 0 if normalization == "gatys" or style_norm == "content" else -1
    return style, 1 if normalization == "gatys" else 0, 0


def size_balanced(ratio: float, tv: float, pixels: int, reference: int, normalization: str,
                  style_norm: str = "none") -> tuple[float, float]:
    """(ratio, tv weight) to apply at `pixels` so that the terms keep the balance that
    (ratio, tv) give at `reference` pixels: with k = pixels / reference, the content term
    divided by ratio * k^(c - s) and the TV term times tv * k^(s - t) scale as the style term
    does (exponents s, c, t from `size_exponents`)."""
    s, c, t = size_exponents(normalization, style_norm)
    k = pixels / reference
    return ratio * k ** (c - s), tv * k ** (s - t)


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
    `spec.style_masks`, `tgt["style"][layer]` is (S,c,c) and `tgt["style_masks"][layer]` (S,h,w,1):
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


def targets(params: dict, content_x: jax.Array, style_x: jax.Array, spec: Spec,
            key: jax.Array | None = None) -> Any:
    """The targets of `spec.kind` (gram: content features and style Grams), jitted with `spec`
    static: the one compiled targets program every caller shares (run, sweep, bench, API), so
    the targets a documented composition computes are bit-identical to a run's. `key`: the
    PRNG key of a `random` kind (default key 0)."""
    k = kind(spec.kind)
    with calling(k, "targets()"):
        if k.random:
            key = jax.random.key(0) if key is None else key
            return k.targets(params, content_x, style_x, spec, key)
        return k.targets(params, content_x, style_x, spec)


targets = jax.jit(targets, static_argnums=(3,))
on_change(targets.clear_cache)


def checked_targets(params: dict, content_x: jax.Array, style_x: jax.Array, spec: Spec,
                    key: jax.Array | None = None) -> dict:
    """`targets`, with the contract checked (one-line PluginErrors): a dict with 'style'."""
    k = kind(spec.kind)
    with calling(k, "targets()"):
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
    with calling(k, "blend()"):
        return (k.blend or linear_blend)(style, jnp.asarray(b, jnp.float32))


def objective(spec: Spec):
    """fun(x, params, tgt, weights) -> (total, terms): the function solvers minimize, the terms
    of the kind `spec.kind`. Params, targets and weights are arguments, never constants of the
    compiled program. A plugin's broken contract is a one-line PluginError at trace time."""
    k = kind(spec.kind)

    def fun(x, params, tgt, weights):
        with calling(k, "terms()"):
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
