"""AdaIN-style loss: match each style layer's channel means and deviations, not its Grams."""
import jax.numpy as jnp

from nstjax import losses


def stats(f, eps=1e-5):  # (1, h, w, c) -> per-channel mean and std over positions
    return {"mean": jnp.mean(f, (1, 2)), "std": jnp.sqrt(jnp.var(f, (1, 2)) + eps)}


def targets(params, content_x, style_x, spec):
    fc = losses.features(params, content_x, spec.content_layers, spec)
    fs = losses.features(params, style_x, spec.style_layers, spec)
    return {"content": {n: fc[n] for n in spec.content_layers},
            "style": {n: stats(fs[n]) for n in spec.style_layers}}


def terms(params, x, tgt, weights, spec):
    f = losses.features(params, x, spec.layers, spec)
    per = {}
    for n, t in tgt["style"].items():  # relative distance: about 1 for an unrelated image
        s = stats(f[n])
        d = jnp.sum((s["mean"] - t["mean"]) ** 2 + (s["std"] - t["std"]) ** 2)
        per[f"style/{n}"] = weights["style"][n] * d / jnp.sum(t["mean"] ** 2 + t["std"] ** 2)
    content = sum(weights["content"][n] * losses.content_loss(f[n], tgt["content"][n],
                  spec.normalization) for n in spec.content_layers)
    style, tv = sum(per.values()), losses.tv_loss(x)
    total = style + content / weights["ratio"] + weights["tv"] * tv
    return {"total": total, "content": content, "style": style, "tv": tv, **per}


losses.register("adain", targets=targets, terms=terms, replace=True)
