"""A fixed reference evaluation of an image, independent of the run's own loss settings.

Every run and sweep cell can be scored on the same yardstick: per-layer Gram distances to the
style (default `block1..5_conv1` and `_conv2`) and the content distance (default
`block4_conv2`), unweighted, with the paper's (`gatys`) normalization, through the run's own
VGG16 weights. A layer ablation or a loss-kind comparison is then read off one set of numbers.

`gatys` per style layer: sum((G_x/M_x - G_s/M_s)^2) / (4 N^2) with G = F^T F, N channels and M
positions: the paper's E_l = sum((G_x - G_s)^2) / (4 N^2 M^2) when x and the style have the same
size, and still comparable when they do not. Content: 1/2 sum((F_x - F_c)^2).
`seed` per style layer: the post's summed MSE of Grams F^T F/(h w c) (without the post's
division by the first layer's size: each layer stands alone); content: its summed MSE / (h w c).
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import jax
import jax.numpy as jnp

from nstjax import losses, vgg16
from nstjax.errors import UserError

DEFAULT_STYLE_LAYERS = tuple(f"block{i}_conv{j}" for i in range(1, 6) for j in (1, 2))


@dataclass(frozen=True)
class EvalSpec:
    """The `eval:` section: which layers the reference evaluation scores, and how."""

    style_layers: tuple[str, ...] = DEFAULT_STYLE_LAYERS
    content_layers: tuple[str, ...] = ("block4_conv2",)
    normalization: str = "gatys"
    pooling: str = "avg"
    precision: str = "highest"

    def __post_init__(self):
        # Lists from YAML become tuples (hashable: an EvalSpec is a static jit argument).
        for f in ("style_layers", "content_layers"):
            v = getattr(self, f)
            if isinstance(v, str) or not isinstance(v, (list, tuple)) or not v:
                raise UserError(f"eval.{f}: {v!r} is not a non-empty list of VGG16 layers")
            object.__setattr__(self, f, tuple(v))
            bad = [n for n in v if n not in vgg16.CHANNELS]
            if bad:
                raise UserError(f"eval.{f}: {bad[0]!r} is not a VGG16 conv layer; valid: "
                                f"{', '.join(vgg16.NAMES)}")
        for f, ok in (("normalization", losses.NORMALIZATIONS), ("pooling", vgg16.POOLINGS),
                      ("precision", vgg16.PRECISIONS)):
            if getattr(self, f) not in ok:
                raise UserError(f"eval.{f}: {getattr(self, f)!r} is not one of {', '.join(ok)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EvalSpec":
        """From a config's `eval:` mapping (missing keys take the defaults)."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"eval.{unknown[0]}: unknown key; valid: {', '.join(sorted(known))}")
        return cls(**d)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.content_layers + self.style_layers))


def _normalized_gram(f: jax.Array, normalization: str) -> jax.Array:
    """Gram per position (gatys: F^T F / M) or the post's F^T F / (h w c)."""
    g = losses.gram(f, "gatys")
    _, h, w, c = f.shape
    return g / (h * w) if normalization == "gatys" else g / (h * w * c)


def _style_distance(g: jax.Array, a: jax.Array, normalization: str) -> jax.Array:
    d2 = jnp.square(g - a)
    if normalization == "gatys":
        return jnp.sum(d2) / (4.0 * g.shape[-1] ** 2)
    return jnp.sum(jnp.mean(d2, axis=-1))


def reference(params: dict, content_x: jax.Array, style_x: jax.Array, cfg: EvalSpec) -> dict:
    """Targets of the evaluation: content features and normalized style Grams (jitted, cfg
    static; once per content/style pair)."""
    fc = vgg16.features(params, content_x, cfg.content_layers, cfg.pooling, cfg.precision)
    fs = vgg16.features(params, style_x, cfg.style_layers, cfg.pooling, cfg.precision)
    return {"content": {n: fc[n] for n in cfg.content_layers},
            "style": {n: _normalized_gram(fs[n], cfg.normalization) for n in cfg.style_layers}}


def score(params: dict, x: jax.Array, ref: dict, cfg: EvalSpec) -> dict:
    """The evaluation's terms (device scalars) of x against `reference(...)` (jitted)."""
    f = vgg16.features(params, x, cfg.layers, cfg.pooling, cfg.precision)
    out = {f"style.{n}": _style_distance(_normalized_gram(f[n], cfg.normalization),
                                         ref["style"][n], cfg.normalization)
           for n in cfg.style_layers}
    content = {n: losses.content_loss(f[n], ref["content"][n], cfg.normalization)
               for n in cfg.content_layers}
    out["style"] = sum(out[f"style.{n}"] for n in cfg.style_layers)
    out["content"] = sum(content.values())
    if len(content) > 1:
        out.update({f"content.{n}": v for n, v in content.items()})
    return out


reference = jax.jit(reference, static_argnums=(3,))
score = jax.jit(score, static_argnums=(3,))


def evaluate(params: dict, x, content_x, style_x, cfg: EvalSpec = EvalSpec()) -> dict[str, float]:
    """Score image x (1,H,W,3, preprocessed: the saved image) against the content and style.

    Returns {"style.<layer>": ..., "style": sum over layers, "content": ...} as Python floats
    (plus "content.<layer>" with several content layers). Compiled once per shape and `cfg`; a
    sweep scoring many cells of one pair can call `reference` once and `score` per cell.
    """
    x, content_x, style_x = (jnp.asarray(a, jnp.float32) for a in (x, content_x, style_x))
    if x.shape != content_x.shape:
        raise ValueError(f"x {x.shape} and content {content_x.shape} must have the same shape")
    ref = reference(params, content_x, style_x, cfg)
    return {k: float(v) for k, v in jax.device_get(score(params, x, ref, cfg)).items()}
