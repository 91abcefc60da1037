"""Gram matrices and the style-transfer losses, as pure functions of features.

Two normalizations:
- `seed`: the Keras blog post's code, quirks included. Gram = F^T F / (h*w*c); per style layer the
  Keras MSE (mean over the last axis of the Gram difference) summed, times the layer weight; the
  weighted sum divided by h*w*c of the FIRST style layer. Content: summed last-axis MSE / (h*w*c).
- `gatys`: the paper. Gram = F^T F; style E_l = sum((G - A)^2) / (4 N_l^2 M_l^2);
  content = 1/2 sum((F - P)^2).
Both: total = style + content / style_to_content_ratio + tv_weight * tv.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from nstjax import vgg16

NORMALIZATIONS = ("seed", "gatys")


@dataclass(frozen=True)
class Spec:
    """What shapes the compiled program: layers, pooling, normalization, precision."""

    content_layers: tuple[str, ...] = ("block4_conv2",)
    style_layers: tuple[str, ...] = tuple(f"block{i}_conv2" for i in range(1, 6))
    pooling: str = "avg"
    normalization: str = "seed"
    precision: str = "highest"
    remat: bool = False
    # Spatial control (nstjax.controls): the number of masked styles (0: one target Gram per
    # layer, no masks) and whether a content mask blends the image with the content.
    style_masks: int = 0
    content_mask: bool = False

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.content_layers + self.style_layers))


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


def tv_loss(x: jax.Array) -> jax.Array:
    """Total variation: squared differences of vertical and horizontal neighbours per pixel."""
    _, h, w, _ = x.shape
    dy = jnp.sum(jnp.square(x[:, 1:] - x[:, :-1]))
    dx = jnp.sum(jnp.square(x[:, :, 1:] - x[:, :, :-1]))
    return (dx + dy) / (h * w)


def targets(params: dict, content_x: jax.Array, style_x: jax.Array, spec: Spec) -> dict:
    """Targets: content features {layer: (1,h,w,c)} and style Grams {layer: (1,c,c)}."""
    fc = vgg16.features(params, content_x, spec.content_layers, spec.pooling, spec.precision)
    fs = vgg16.features(params, style_x, spec.style_layers, spec.pooling, spec.precision)
    return {
        "content": {n: fc[n] for n in spec.content_layers},
        "style": {n: gram(fs[n], spec.normalization) for n in spec.style_layers},
    }


def default_weights(spec: Spec, style_weights: Sequence[float], ratio: float,
                    tv: float = 0.0, content_weights: Sequence[float] | None = None) -> dict:
    """Loss weights as a pytree of float32 scalars (an argument of the compiled program)."""
    cw = content_weights if content_weights is not None else [1.0] * len(spec.content_layers)
    f32 = jnp.float32
    return {
        "content": {n: f32(w) for n, w in zip(spec.content_layers, cw)},
        "style": {n: f32(w) for n, w in zip(spec.style_layers, style_weights)},
        "ratio": f32(ratio),
        "tv": f32(tv),
    }


def loss_terms(params: dict, x: jax.Array, tgt: dict, weights: dict, spec: Spec) -> dict:
    """All loss terms {total, content, style, tv} of image x (1,H,W,3), preprocessed.

    With `spec.content_mask` the image scored is m * x + (1 - m) * content, from
    tgt["content_mask"] = {"mask": (1,H,W,1), "image": (1,H,W,3)}. With `spec.style_masks`,
    tgt["style"][layer] is (S,c,c) and tgt["style_masks"][layer] (S,h,w,1): guided Grams.
    """
    if spec.content_mask:
        cm = tgt["content_mask"]
        x = cm["mask"] * x + (1.0 - cm["mask"]) * cm["image"]
    feats = vgg16.features(params, x, spec.layers, spec.pooling, spec.precision, spec.remat)
    norm = spec.normalization
    content = sum(
        weights["content"][n] * content_loss(feats[n], tgt["content"][n], norm)
        for n in spec.content_layers
    )
    if spec.style_masks:
        style = sum(
            weights["style"][n]
            * masked_style_layer_loss(feats[n], tgt["style_masks"][n], tgt["style"][n], norm)
            for n in spec.style_layers
        )
        if norm == "seed":  # as in style_loss: divided by the first style layer's size
            _, h, w, c = feats[spec.style_layers[0]].shape
            style = style / (h * w * c)
    else:
        style = style_loss(
            [feats[n] for n in spec.style_layers],
            [tgt["style"][n] for n in spec.style_layers],
            [weights["style"][n] for n in spec.style_layers],
            norm,
        )
    tv = tv_loss(x)
    total = style + content / weights["ratio"] + weights["tv"] * tv
    return {"total": total, "content": content, "style": style, "tv": tv}


def objective(spec: Spec):
    """fun(x, params, tgt, weights) -> (total, terms): the function solvers minimize.

    Params, targets and weights are arguments, never constants of the compiled program.
    """

    def fun(x, params, tgt, weights):
        terms = loss_terms(params, x, tgt, weights, spec)
        return terms["total"], terms

    return fun
