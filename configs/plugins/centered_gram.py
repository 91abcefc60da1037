"""A loss kind defined outside the package: Grams of mean-centred features (covariances).

Registering it is all it takes; select it with `loss.kind: centered_gram` once this file is
imported (`nstjax.losses.load_plugin("configs/plugins/centered_gram.py")`, or a config's plugin
list). Style per layer: w_l * |C_x - C_s|^2 / |C_s|^2 with C the channel covariance over
positions (relative, so about 1 for an unrelated image); content and TV as the Gram loss.
"""

import jax.numpy as jnp

from nstjax import losses


def covariance(f):
    """(N, h, w, c) features -> (N, c, c) channel covariance over the positions."""
    f = f - jnp.mean(f, axis=(1, 2), keepdims=True)
    return losses.gram(f, "gatys") / (f.shape[1] * f.shape[2])


def targets(params, content_x, style_x, spec):
    fc = losses.features(params, content_x, spec.content_layers, spec)
    fs = losses.features(params, style_x, spec.style_layers, spec)
    return {"content": {n: fc[n] for n in spec.content_layers},
            "style": {n: covariance(fs[n]) for n in spec.style_layers}}


def terms(params, x, tgt, weights, spec):
    f = losses.features(params, x, spec.layers, spec)
    per = {f"style/{n}": weights["style"][n] * jnp.sum(jnp.square(covariance(f[n]) - t))
           / jnp.sum(jnp.square(t)) for n, t in tgt["style"].items()}
    content = sum(weights["content"][n] * losses.content_loss(f[n], tgt["content"][n],
                                                              spec.normalization)
                  for n in spec.content_layers)
    style, tv = sum(per.values()), losses.tv_loss(x)
    total = style + content / weights["ratio"] + weights["tv"] * tv
    return {"total": total, "content": content, "style": style, "tv": tv, **per}


losses.register("centered_gram", targets=targets, terms=terms, replace=True,
                description="Grams of mean-centred features (covariances), relative distance")
