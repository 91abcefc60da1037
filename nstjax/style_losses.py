"""The literature's style losses beside `gram`, as registered loss kinds (`losses.register`).

Each matches other statistics of a style layer's features F (h*w positions x C channels):
- `mean_std`: channel means and deviations (Li, Wang, Liu & Hou 2017, "Demystifying Neural
  Style Transfer", IJCAI: matching batch-norm statistics is a style loss of its own).
- `sliced_wasserstein`: the whole distribution of features, through sorted projections on
  random directions (Heitz, Vanhoey, Chambon & Belcour 2021, "A Sliced Wasserstein Loss for
  Neural Texture Synthesis", CVPR).
- `mrf`: local patches, each of the image's patches pulled to its best match among the style's
  by normalized cross-correlation (Li & Wand 2016, "Combining Markov Random Fields and
  Convolutional Neural Networks for Image Synthesis", CVPR).
Content, TV and the total are the `gram` kind's (content / ratio + tv weight * tv); the style
term of each layer is weighted by `loss.style_weights`. The per-layer functions (`*_layer`)
are pure functions of features, tested against float64 numpy references.
"""

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import losses
from nstjax.errors import UserError
from nstjax.losses import Option, Spec


def _content_features(params: dict, content_x: jax.Array, style_x: jax.Array, spec: Spec):
    fc = losses.features(params, content_x, spec.content_layers, spec)
    fs = losses.features(params, style_x, spec.style_layers, spec)
    return {n: fc[n] for n in spec.content_layers}, fs


def _terms(x: jax.Array, feats: dict, tgt: dict, weights: dict, spec: Spec,
           per_style: dict) -> dict:
    """Content, TV and total around a kind's weighted per-layer style terms."""
    norm = spec.normalization
    content = sum((weights["content"][n] * losses.content_loss(feats[n], tgt["content"][n], norm)
                   for n in spec.content_layers), jnp.float32(0.0))
    style = sum(per_style.values(), jnp.float32(0.0))
    tv = losses.tv_loss(x, spec.seamless)
    total = style + content / weights["ratio"] + weights["tv"] * tv
    return {"total": total, "content": content, "style": style, "tv": tv,
            **{f"style/{n}": v for n, v in per_style.items()}}


# ---------------------------------------------------------------- mean_std (Li et al. 2017)


def mean_var(f: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and variance over positions: (N,h,w,C) -> 2 x (N,C)."""
    f = f.astype(jnp.float32)
    return jnp.mean(f, (1, 2)), jnp.var(f, (1, 2))


def mean_std_layer(f: jax.Array, t_mean: jax.Array, t_var: jax.Array, eps) -> jax.Array:
    """Li et al.'s batch-norm statistics loss of one layer: 1/C sum_c (mu_c - mu'_c)^2 +
    (sigma_c - sigma'_c)^2 with sigma = sqrt(var + eps), features f (1,h,w,C) against the
    target's means and variances (1,C)."""
    m, v = mean_var(f)
    d = jnp.square(m - t_mean) + jnp.square(jnp.sqrt(v + eps) - jnp.sqrt(t_var + eps))
    return jnp.sum(d) / f.shape[-1]


def _mean_std_targets(params, content_x, style_x, spec):
    content, fs = _content_features(params, content_x, style_x, spec)
    style = {}
    for n in spec.style_layers:
        m, v = mean_var(fs[n])
        style[n] = {"mean": m, "var": v}
    return {"content": content, "style": style}


def _mean_std_terms(params, x, tgt, weights, spec):
    x = losses.scored_image(x, tgt, spec)
    feats = losses.features(params, x, spec.layers, spec)
    eps = weights["options"]["eps"]
    per = {n: weights["style"][n] * mean_std_layer(feats[n], t["mean"], t["var"], eps)
           for n, t in tgt["style"].items()}
    return _terms(x, feats, tgt, weights, spec, per)


# ---------------------------------------------------------------- sliced Wasserstein


def directions(key: jax.Array, channels: int, projections: int) -> jax.Array:
    """`projections` random unit directions in feature space: (C, P), columns of norm 1."""
    v = jax.random.normal(key, (channels, projections), jnp.float32)
    return v / jnp.linalg.norm(v, axis=0, keepdims=True)


def sorted_projections(f: jax.Array, v: jax.Array, positions: int | None = None) -> jax.Array:
    """Features (N,h,w,C) projected on directions v (C,P), sorted over positions: (N, M, P).
    `positions`: resample each sorted column to that many quantiles (a style of another size)."""
    n, h, w, c = f.shape
    p = jnp.einsum("nmc,cp->nmp", f.reshape(n, h * w, c).astype(jnp.float32), v,
                   precision=jax.lax.Precision.HIGHEST)
    p = jnp.sort(p, axis=1)
    m = h * w
    if positions is None or positions == m:
        return p
    q = (jnp.arange(positions, dtype=jnp.float32) + 0.5) * (m / positions) - 0.5
    grid = jnp.arange(m, dtype=jnp.float32)
    interp = jax.vmap(jax.vmap(lambda col: jnp.interp(q, grid, col), 1, 1))
    return interp(p)


def sliced_wasserstein_layer(f: jax.Array, v: jax.Array, t_sorted: jax.Array) -> jax.Array:
    """Heitz et al.'s sliced Wasserstein loss of one layer: the mean over directions and
    positions of (sort(F v) - sort(F_style v))^2, features f (1,h,w,C), target (1, h*w, P)."""
    return jnp.mean(jnp.square(sorted_projections(f, v) - t_sorted))


def _sw_targets(params, content_x, style_x, spec, key):
    content, fs = _content_features(params, content_x, style_x, spec)
    keys = jax.random.split(key, len(spec.style_layers))
    _, hc, wc, _ = content_x.shape
    style, dirs = {}, {}
    for k, n in zip(keys, spec.style_layers):
        f = fs[n]
        dirs[n] = directions(k, f.shape[-1], spec.option("projections"))
        b = 1 << (int(n[5]) - 1)  # the layer's pooling factor: its map of the image's size
        style[n] = sorted_projections(f, dirs[n], (hc // b) * (wc // b))
    return {"content": content, "style": style, "directions": dirs}


def _sw_terms(params, x, tgt, weights, spec):
    x = losses.scored_image(x, tgt, spec)
    feats = losses.features(params, x, spec.layers, spec)
    per = {n: weights["style"][n] * sliced_wasserstein_layer(feats[n], tgt["directions"][n], t)
           for n, t in tgt["style"].items()}
    return _terms(x, feats, tgt, weights, spec, per)


# ---------------------------------------------------------------- MRF (Li & Wand 2016)


def patches(f: jax.Array, size: int, stride: int = 1) -> jax.Array:
    """All size x size patches of features (N,h,w,C) at `stride`, 'valid': (N, P, C*size^2)."""
    p = jax.lax.conv_general_dilated_patches(
        f.astype(jnp.float32), (size, size), (stride, stride), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    n, a, b, d = p.shape
    return p.reshape(n, a * b, d)


def mrf_layer(f: jax.Array, style_patches: jax.Array, size: int, eps: float = 1e-8) -> jax.Array:
    """Li & Wand's MRF loss of one layer, per patch: each size x size patch of f (1,h,w,C)
    (stride 1) is matched to the style patch (1, Ns, D) of highest normalized cross-correlation,
    and the loss is the mean over the image's patches of the squared distance to its match
    (the paper's sum divided by the number of patches). The match carries no gradient."""
    px = patches(f, size)[0]
    ps = style_patches[0]
    unit = lambda p: p / (jnp.linalg.norm(p, axis=1, keepdims=True) + eps)  # noqa: E731
    ncc = jnp.dot(unit(px), unit(ps).T, precision=jax.lax.Precision.HIGHEST)
    match = ps[jnp.argmax(jax.lax.stop_gradient(ncc), axis=1)]
    return jnp.mean(jnp.sum(jnp.square(px - match), axis=1))


def _mrf_targets(params, content_x, style_x, spec):
    content, fs = _content_features(params, content_x, style_x, spec)
    size, stride = spec.option("patch_size"), spec.option("stride")
    _, hc, wc, _ = content_x.shape  # the size of the image optimized
    for n in spec.style_layers:
        b = 1 << (int(n[5]) - 1)  # the layer's pooling factor
        _, h, w, _ = fs[n].shape
        for what, (mw, mh) in (("style image", (w, h)), ("output image", (wc // b, hc // b))):
            if min(mw, mh) < size:
                raise UserError(f"loss.options.patch_size: {size} is larger than layer {n}'s "
                                f"map ({mw}x{mh}) of the {what}; lower it or raise image.size")
    return {"content": content,
            "style": {n: patches(fs[n], size, stride) for n in spec.style_layers}}


def _mrf_blend(style: dict, b: jax.Array) -> dict:
    """Several styles: one pool of all their patches (weights cannot apply to a nearest match)."""
    if not np.allclose(np.asarray(b), float(np.asarray(b)[0])):
        raise UserError("style_blend: loss kind mrf pools the patches of all style images "
                        "(a nearest-patch match cannot weigh them); drop style_blend")
    return {n: p.reshape(1, -1, p.shape[-1]) for n, p in style.items()}


def _mrf_terms(params, x, tgt, weights, spec):
    x = losses.scored_image(x, tgt, spec)
    feats = losses.features(params, x, spec.layers, spec)
    size = spec.option("patch_size")
    per = {n: weights["style"][n] * mrf_layer(feats[n], p, size) for n, p in tgt["style"].items()}
    return _terms(x, feats, tgt, weights, spec, per)


losses.register(
    "mean_std", targets=_mean_std_targets, terms=_mean_std_terms, _builtin=True,
    description="channel means and deviations (Li et al. 2017)",
    options={"eps": Option(1e-5, "added to each variance before its square root (several "
                           "styles blend their means and variances)", low=1e-12, high=1e3)})
losses.register(
    "sliced_wasserstein", targets=_sw_targets, terms=_sw_terms, random=True, _builtin=True,
    description="sorted projections on random directions (Heitz et al. 2021)",
    options={"projections": Option(64, "random directions per layer (drawn once from the seed)",
                                   low=1, high=4096, shape=True)})
losses.register(
    "mrf", targets=_mrf_targets, terms=_mrf_terms, blend=_mrf_blend, _builtin=True,
    description="nearest style patches by normalized cross-correlation (Li & Wand 2016)",
    options={"patch_size": Option(3, "patch side in feature-map positions", low=1, high=15,
                                  shape=True),
             "stride": Option(1, "stride of the style's candidate patches (cost / stride^2)",
                              low=1, high=15, shape=True)})
