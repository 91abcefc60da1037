"""From a Config to a `Problem`: the arrays one solve needs, built in one direction:
images -> params -> targets -> loss weights -> x0.

A single style is a blend of one; the artistic controls are options of the same pipeline:
- `style: [a, b]`, `style_blend: [0.7, 0.3]`: targets 0.7 T(a) + 0.3 T(b) (weights normalized
  to sum 1; default equal), T the loss kind's style targets (Grams for `gram`).
- `style_scale: s`: the style images are resized to s times the content's size before their
  targets are computed. With `gatys` normalization a Gram is a sum over positions, so the
  style's Grams are rescaled by (positions of the output / positions of the style) per layer.
- `color.preserve: luminance` (Gatys et al. 2016): content and styles become their luminance
  (each style's matched to the content's mean and deviation); saved images take the output's Y
  with the content's Cb/Cr. `histogram`: each style's RGB mean and covariance are matched to
  the content's first.
- `masks.style: [ma, mb]`: per-region guided Grams (Gatys et al. 2017); the masks, pooled to
  each layer's resolution as the network pools, are targets.
- `masks.content: m` (white = stylize): the image scored and saved is m x + (1 - m) content.
What users sweep (blend weights, scale, mask contents) only changes the targets, arguments of
the compiled program; the number of masked styles and a content mask are in `losses.Spec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import image, losses, metrics, vgg16, weights
from nstjax.config import Config
from nstjax.errors import PluginError, UserError


@dataclass
class Problem:
    """Everything a solve needs, as arrays: built once per run (or per sweep cell)."""

    spec: losses.Spec
    params: dict
    content: jax.Array  # (1,H,W,3) preprocessed (luminance with color.preserve: luminance)
    style: jax.Array  # (1,h,w,3) the first style image, as its targets were computed
    targets: dict
    weights: dict
    x0: jax.Array
    info: dict  # weights source, sizes
    post: Callable[[np.ndarray], np.ndarray] | None = None  # x -> the image to save


_PARAMS: dict = {}  # the last weights final_metrics loaded itself: {(name, seed): params}


def final_metrics(cfg: Config, x: np.ndarray, problem: Problem | None = None,
                  on_error=None) -> dict:
    """The reference evaluation (`metrics`, settings from `cfg.eval`) of a final image x
    (1,H,W,3), preprocessed, as saved (controls applied) against the content image and the
    style images as given (before colour control) at the run's sizes; several styles are
    scored against their targets blended by `style_blend` (equal by default). The params are
    the problem's, else loaded from `cfg.model.weights`. A metric that fails goes to
    `on_error` (else raises PluginError)."""
    if problem is not None:
        params = problem.params
    else:
        key = (cfg.model.weights, cfg.seed, cfg.model.arch)
        if key not in _PARAMS:
            _PARAMS.clear()
            p, _ = weights.load(cfg.model.weights, seed=cfg.seed, arch=cfg.model.arch)
            _PARAMS[key] = jax.tree.map(jnp.asarray, p)
        params = _PARAMS[key]
    mp = cfg.image.max_pixels
    content = load_content(cfg)
    h, w = content.shape[1:3]
    if tuple(np.shape(x)) != content.shape:
        raise ValueError(f"the final image is {np.shape(x)}, the content {content.shape}")
    swh = style_size(cfg, (w, h))
    spec = cfg.eval.spec()
    styles = [jnp.asarray(image.load(p, list(swh), cfg.image.resample, max_pixels=mp))
              for p in cfg.styles]
    ref = None
    if "gram" in spec.metrics and len(styles) > 1:
        refs = [metrics.reference(params, jnp.asarray(content), s, spec) for s in styles]
        b = blend_weights(cfg)
        ref = {"content": refs[0]["content"],
               "style": {n: sum(float(bi) * r["style"][n] for bi, r in zip(b, refs))
                         for n in refs[0]["style"]}}
    c = content if cfg.content is not None else None  # a texture: no content to keep
    return metrics.evaluate(params, x, c, styles[0], spec, on_error, ref)


def score_file(cfg: Config, path: str, on_error=None) -> dict:
    """The reference evaluation of an image file (a peer's published result, an earlier run's
    final.png) as a run of `cfg` scores its final image: at the file's own size, against the
    content and the style images resized to it (`final_metrics`)."""
    from nstjax.config import MAX_SIDE, MIN_SIDE

    x = image.load(path, None, max_pixels=cfg.image.max_pixels)  # at its own size
    w, h = x.shape[2], x.shape[1]
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
        raise UserError(f"{path}: the image is {w}x{h} px; an image scored needs {MIN_SIDE} to "
                        f"{MAX_SIDE} px a side (as image.size); give a larger or smaller image")
    at = cfg.replace(**{"image.size": [w, h]})
    return final_metrics(at, x, on_error=on_error)


def load_content(cfg: Config) -> np.ndarray:
    """The content image at `image.size`, preprocessed (1,H,W,3); with `content: null` (texture
    synthesis) the mean image (zeros) of the size `image.size` gives the first style image."""
    im = cfg.image
    if cfg.content is not None:
        return image.load(cfg.content, im.size, im.resample, max_pixels=im.max_pixels)
    style = image.load(cfg.styles[0], im.size, im.resample, max_pixels=im.max_pixels)
    return np.zeros_like(style, dtype=np.float32)


def spec_of(cfg: Config) -> losses.Spec:
    """The static settings of the compiled program (no content layers without a content)."""
    return losses.Spec(
        content_layers=tuple(cfg.loss.content_layers) if cfg.content is not None else (),
        style_layers=tuple(cfg.loss.style_layers),
        pooling=cfg.model.pooling,
        normalization=cfg.loss.normalization,
        precision=cfg.model.precision,
        remat=cfg.model.remat,
        style_masks=len(cfg.styles) if cfg.masks.style else 0,
        content_mask=cfg.masks.content is not None,
        kind=cfg.loss.kind,
        conv=cfg.model.conv,
        options=losses.static_options(cfg.loss.kind, _options(cfg)),
        seamless=cfg.image.seamless,
        arch=cfg.model.arch,
    )


def _options(cfg: Config) -> dict:
    return losses.resolve_options(cfg.loss.kind, cfg.loss.options)


def loss_weights(cfg: Config, spec: losses.Spec) -> dict:
    cw = cfg.loss.content_weights if spec.content_layers else None
    return losses.default_weights(spec, cfg.loss.style_weights, cfg.loss.style_to_content_ratio,
                                  cfg.loss.tv_weight, cw,
                                  losses.dynamic_options(cfg.loss.kind, _options(cfg)))


_NORM_FUNS: dict = {}  # (spec, kind) -> the jitted objective style_norm evaluates


def style_norm(spec: losses.Spec, params: dict, x_ref, tgt: dict, w: dict) -> dict[str, float]:
    """Each style layer's unweighted term at `x_ref` (`loss.style_norm: content|layers`): the kind's
    `style/<layer>` terms with unit layer weights, one forward evaluation."""
    key = (spec, losses.kind(spec.kind))
    if key not in _NORM_FUNS:
        _NORM_FUNS.clear()
        _NORM_FUNS[key] = jax.jit(losses.objective(spec))
    unit = dict(w, style={n: jnp.float32(1.0) for n in w["style"]})
    _, terms = _NORM_FUNS[key](jnp.asarray(x_ref), params, tgt, unit)
    out = {}
    for n in spec.style_layers:
        v = terms.get(f"style/{n}")
        if v is None:
            raise UserError(f"loss.style_norm needs the per-layer terms 'style/<layer>', "
                            f"which loss kind {spec.kind!r} does not return; use style_norm: none")
        v = float(v)
        if not (np.isfinite(v) and v > 0):
            raise UserError(f"loss.style_norm: the style term of layer {n} is {v:g} at the "
                            "reference image (content, or the initial image without one), so it "
                            "cannot be divided by; use style_norm: none or another layer")
        out[n] = v
    return out


def blend_weights(cfg: Config) -> np.ndarray:
    """`style_blend` normalized to sum 1 (equal weights when unset)."""
    n = len(cfg.styles)
    b = np.ones(n) if cfg.style_blend is None else np.asarray(cfg.style_blend, np.float64)
    return b / b.sum()


def check_depth(wh: tuple[int, int], layers, what: str, fix: str) -> None:
    """Refuse a size at which the deepest of `layers` would have no pixels (after its pools)."""
    deepest = max(layers, key=vgg16.block)
    need = 2 ** (vgg16.block(deepest) - 1)
    if min(wh) < need:
        raise UserError(f"{what} {wh[0]}x{wh[1]} pixels, but layer {deepest} needs at least "
                        f"{need} on each side; {fix}")


def style_size(cfg: Config, content_wh: tuple[int, int]) -> tuple[int, int]:
    """(W, H) of the style images: the content's size times `style_scale`."""
    s = cfg.style_scale
    wh = (max(1, round(content_wh[0] * s)), max(1, round(content_wh[1] * s)))
    check_depth(wh, cfg.loss.style_layers, f"style_scale {s:g} makes the style images",
                "raise style_scale or image.size")
    if wh[0] * wh[1] > cfg.image.max_pixels:
        raise UserError(f"style_scale {s:g}: the style images would be {wh[0]}x{wh[1]} pixels, "
                        f"over image.max_pixels ({cfg.image.max_pixels}); lower style_scale")
    return wh


def layer_masks(masks: np.ndarray, layers, pooling: str = "avg") -> dict[str, np.ndarray]:
    """Masks (S, H, W) at each layer's resolution: {layer: float32 (S, h, w, 1)}."""
    by_block = {1: np.asarray(masks, np.float32)}
    for b in range(2, 6):
        m = by_block[b - 1]  # 2x2 stride-2 pooling as vgg16 pools (odd sizes drop a row)
        s, h, w = m.shape
        m = m[:, : h // 2 * 2, : w // 2 * 2].reshape(s, h // 2, 2, w // 2, 2)
        by_block[b] = m.max(axis=(2, 4)) if pooling == "max" else m.mean(axis=(2, 4))
    return {n: by_block[vgg16.block(n)][..., None] for n in layers}


def styles_at(cfg: Config, wh: tuple[int, int], content_rgb: np.ndarray) -> np.ndarray:
    """The style images at `wh`, colour control applied: float32 (S, H, W, 3) preprocessed."""
    out = []
    for path in cfg.styles:
        x = image.load(path, list(wh), cfg.image.resample, max_pixels=cfg.image.max_pixels)
        if cfg.color.preserve != "none":
            rgb = image.deprocess_float(x)
            if cfg.color.preserve == "histogram":
                rgb = image.match_histogram(rgb, content_rgb)
            else:
                rgb = image.gray(image.match_luminance(image.luminance(rgb),
                                                       image.luminance(content_rgb)))
            x = image.preprocess(rgb)
        out.append(x[0])
    return np.stack(out)


def style_targets(params: dict, content_x, styles_x, spec: losses.Spec,
                  blend: np.ndarray | None, key: jax.Array | None = None) -> dict:
    """`losses.targets` for S style images (contract checked): per-style targets (leading axis
    S) with masks (`blend` None), else blended into one by the kind's blend (linear unless the
    kind has its own). Gatys Grams are rescaled to the content's positions. `key`: a random
    kind's PRNG key."""
    tgt = losses.checked_targets(params, jnp.asarray(content_x), jnp.asarray(styles_x), spec, key)
    plugin_values(spec, "targets()", tgt)
    (_, h, w, _), (_, hs, ws, _) = content_x.shape, styles_x.shape
    if spec.kind == "gram" and spec.normalization == "gatys" and (h, w) != (hs, ws):
        tgt["style"] = {n: g * (((h >> k) * (w >> k)) / ((hs >> k) * (ws >> k)))
                        for n, g in tgt["style"].items() for k in [vgg16.block(n) - 1]}
    if blend is not None:
        tgt["style"] = losses.blend(spec, tgt["style"], blend)
        plugin_values(spec, "blend()", tgt["style"])
    return tgt


def plugin_values(spec: losses.Spec, what: str, tree: Any) -> None:
    """What a plugin kind's `what` returned (concrete): arrays, none NaN or infinite, else a
    one-line PluginError naming the kind, the entry and the rule. Built-in kinds are trusted."""
    k = losses.kind(spec.kind)
    if k.builtin:
        return
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise PluginError(f"{k.label}: {what} returned {type(tree).__name__}, no arrays; it "
                          "must return the style statistics (a pytree of arrays)")
    for path, leaf in leaves:
        where = f"{what}{jax.tree_util.keystr(path)}"
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.number):
            raise PluginError(f"{k.label}: {where} is a {type(leaf).__name__}; every entry must "
                              "be a numeric array")
        if not np.isfinite(np.asarray(leaf)).all():
            raise PluginError(f"{k.label}: {where} holds NaN or infinity; every entry must be "
                              "finite")


def targets_key(cfg: Config) -> jax.Array:
    """The PRNG key a random loss kind's targets draw from: the run's seed, folded with 1 (the
    noise init uses the seed's own key)."""
    return jax.random.fold_in(jax.random.key(cfg.seed), 1)


def initial_image(cfg: Config, content: np.ndarray, style: np.ndarray) -> jax.Array:
    """x0: `noise` (the post's uniform(-2.5, 2.5)/100 from the seed), `content`, `style`,
    `content_matched` (the content with the style images' RGB mean and covariance: the transform
    of `color.preserve: histogram` run the other way, so the solve starts in the painting's
    palette) or a file. `style` is (S, H, W, 3) preprocessed; S > 1 pools the styles' pixels."""
    if cfg.init == "noise":
        key = jax.random.key(cfg.seed)
        return jax.random.uniform(key, content.shape, jnp.float32, -2.5, 2.5) / 100.0
    if cfg.init == "content":
        return jnp.asarray(content)
    if cfg.init == "style":
        return jnp.asarray(style[:1])
    if cfg.init == "content_matched":
        pixels = np.concatenate([image.deprocess_float(s).reshape(-1, 3) for s in style])
        rgb = image.match_histogram(image.deprocess_float(content), pixels)
        return jnp.asarray(image.preprocess(rgb), jnp.float32)
    h, w = content.shape[1:3]
    x0 = image.load(cfg.init, [w, h], cfg.image.resample, max_pixels=cfg.image.max_pixels)
    if x0.shape != content.shape:
        raise UserError(f"init: {cfg.init} has shape {x0.shape[1:3]}, the run needs {(h, w)}")
    return jnp.asarray(x0)


def build(cfg: Config, params: dict | None = None, winfo: dict | None = None) -> Problem:
    """Load images and weights, compute targets, weights and x0: the arrays a solve needs."""
    mp = cfg.image.max_pixels
    content = load_content(cfg)
    h, w = content.shape[1:3]
    check_depth((w, h), cfg.loss.content_layers + cfg.loss.style_layers,
                "the content image is" if cfg.content else "the texture is",
                "raise image.size or use an image with a less extreme aspect ratio")
    if cfg.image.seamless:
        need = 2 ** (max(vgg16.block(n) for n in cfg.loss.content_layers + cfg.loss.style_layers)
                     - 1)
        if w % need or h % need:
            raise UserError(f"image.seamless: the image is {w}x{h} pixels; a seamless image "
                            f"needs sides that are multiples of {need} (the deepest layer's "
                            "pooling), e.g. image.size: [" f"{w // need * need or need}, "
                            f"{h // need * need or need}]")
    content_rgb = image.deprocess_float(content)
    swh = style_size(cfg, (w, h))
    styles = styles_at(cfg, swh, content_rgb)
    lum = cfg.color.preserve == "luminance"
    content_ycc = image.rgb_to_ycbcr(content_rgb) if lum else None
    if lum:
        content = image.preprocess(image.gray(content_ycc[..., 0]))
    if params is None:
        params, winfo = weights.load(cfg.model.weights, seed=cfg.seed, arch=cfg.model.arch)
    spec = spec_of(cfg)
    params = vgg16.prepare(params, spec.conv, spec.precision, (h, w))
    tgt = style_targets(params, content, styles, spec,
                        None if spec.style_masks else blend_weights(cfg), targets_key(cfg))
    if spec.style_masks:
        masks = np.stack([image.load_mask(p, (w, h), mp) for p in cfg.masks.style])
        tgt["style_masks"] = {n: jnp.asarray(v) for n, v in
                              layer_masks(masks, spec.style_layers, spec.pooling).items()}
    cmask = None
    if spec.content_mask:
        cmask = image.load_mask(cfg.masks.content, (w, h), mp)[None, :, :, None]
        tgt["content_mask"] = {"mask": jnp.asarray(cmask), "image": jnp.asarray(content)}
    style0 = styles[:1]
    if cfg.init == "style" and swh != (w, h):
        style0 = styles_at(cfg.model_copy(update={"style": cfg.styles[:1]}), (w, h), content_rgb)
    x0 = initial_image(cfg, content, styles if cfg.init == "content_matched" else style0)

    def post(x: np.ndarray) -> np.ndarray:
        if cmask is not None:
            x = cmask * x + (1.0 - cmask) * content
        return image.recolor(x, content_ycc) if lum else x

    lw = loss_weights(cfg, spec)
    losses.check_objective(spec, jnp.asarray(x0), params, tgt, lw)
    info = {"weights": winfo, "content_size": [w, h]}
    if cfg.loss.style_norm != "none":
        ref = content if cfg.content is not None else x0
        e = info["style_norm"] = style_norm(spec, params, ref, tgt, lw)
        # layers: to the layers' geometric mean, so the sum keeps the kind's own scale
        g = float(np.exp(np.mean(np.log(list(e.values()))))) if cfg.loss.style_norm == "layers" \
            else 1.0
        lw["style"] = {n: v * jnp.float32(g / e[n]) for n, v in lw["style"].items()}
    ref_px = cfg.loss.reference_pixels
    if ref_px:
        ratio, tv = losses.size_balanced(cfg.loss.style_to_content_ratio, cfg.loss.tv_weight,
                                         h * w, ref_px, spec.normalization, cfg.loss.style_norm)
        lw["ratio"], lw["tv"] = jnp.float32(ratio), jnp.float32(tv)
        info["balance"] = {"pixels": h * w, "reference_pixels": ref_px,
                           "style_to_content_ratio": ratio, "tv_weight": tv}
    if controls_used(cfg):
        info.update(style_size=list(swh), styles=len(cfg.styles),
                    style_blend=blend_weights(cfg).round(6).tolist())
    return Problem(spec, params, jnp.asarray(content), jnp.asarray(styles[:1]), tgt,
                   lw, jnp.asarray(x0), info,
                   post if (cmask is not None or lum) else None)


def controls_used(cfg: Config) -> bool:
    """Whether `cfg` uses an artistic control (several styles, scale, colour, masks)."""
    return (len(cfg.styles) > 1 or cfg.style_scale != 1.0 or cfg.color.preserve != "none"
            or cfg.masks.style is not None or cfg.masks.content is not None)
