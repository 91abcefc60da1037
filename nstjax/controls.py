"""Artistic controls: several styles with blend weights, style scale, colour preservation,
style and content masks, and coarse-to-fine multi-scale runs.

`run.build` hands a config that uses any of the first four to `build` here, and `run.run` hands
a multi-scale config to `run_multiscale`. What users sweep (blend weights, style scale, mask
contents) only changes the targets, which are arguments of the compiled program; the number of
masked styles and whether there is a content mask are in `losses.Spec`.

- `style: [a, b]`, `style_blend: [0.7, 0.3]`: target Grams 0.7 G(a) + 0.3 G(b) (weights are
  normalized to sum 1; default equal).
- `style_scale: s`: each style image is resized to s times the content's size before its Grams
  are computed. Grams do not change shape with the image size. With `seed` normalization a Gram
  is a mean over positions, so it is comparable across sizes as it is; with `gatys` it is a sum,
  so the style's Grams are rescaled by (positions of the output / positions of the style) at
  each layer, i.e. the target is the style's per-position Gram times the output's size.
- `color.preserve: luminance` (Gatys et al. 2016): content and styles become their luminance Y
  (replicated in R, G, B; each style's Y matched to the content's mean and deviation), the
  transfer runs on those, and the saved images take the output's Y with the content's Cb/Cr.
  `histogram`: each style image's RGB mean and covariance are matched to the content's first.
- `masks.style: [ma, mb]`, one per style (white = that style's region): per-region guided
  Grams (Gatys et al. 2017) of the output's features times the mask, pooled to each layer's
  resolution as the network pools; each region's term is weighted by its area. The targets are
  the Grams of the whole style images. Regions that no mask covers get no style loss.
- `masks.content: m` (white = stylize, black = keep): the image scored and saved is
  m * x + (1 - m) * content, so where the mask is black the output is exactly the content.
- `multiscale`: see `run_multiscale`.
"""

from __future__ import annotations

import io
import json
import signal
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import image, losses, run, solvers, vgg16, weights
from nstjax.config import Config, MultiscaleCfg, dump
from nstjax.errors import UserError

MULTISCALE_COLUMNS = ("scale", *run.HISTORY_COLUMNS)


def active(cfg: Config) -> bool:
    """Whether `cfg` uses a control that `build` here implements (multi-scale aside)."""
    return (len(cfg.styles) > 1 or cfg.style_scale != 1.0 or cfg.color.preserve != "none"
            or cfg.masks.style is not None or cfg.masks.content is not None)


def blend_weights(cfg: Config) -> np.ndarray:
    """`style_blend` normalized to sum 1 (equal weights when unset)."""
    n = len(cfg.styles)
    b = np.ones(n) if cfg.style_blend is None else np.asarray(cfg.style_blend, np.float64)
    return b / b.sum()


def _min_side(layers: list[str] | tuple[str, ...]) -> tuple[str, int]:
    """The deepest layer and the smallest image side at which it still has a pixel."""
    deepest = max(layers, key=vgg16.block)
    return deepest, 2 ** (vgg16.block(deepest) - 1)


def _check_side(wh: tuple[int, int], layers, what: str, fix: str) -> None:
    name, need = _min_side(layers)
    if min(wh) < need:
        raise UserError(f"{what} {wh[0]}x{wh[1]} pixels, but layer {name} needs at least {need} "
                        f"on each side; {fix}")


def style_size(cfg: Config, content_wh: tuple[int, int]) -> tuple[int, int]:
    """(W, H) of the style images: the content's size times `style_scale`."""
    s = cfg.style_scale
    wh = (max(1, round(content_wh[0] * s)), max(1, round(content_wh[1] * s)))
    _check_side(wh, cfg.loss.style_layers, f"style_scale {s:g} makes the style images",
                "raise style_scale or image.size")
    if wh[0] * wh[1] > cfg.image.max_pixels:
        raise UserError(f"style_scale {s:g}: the style images would be {wh[0]}x{wh[1]} pixels, "
                        f"over image.max_pixels ({cfg.image.max_pixels}); lower style_scale")
    return wh


# ---------------------------------------------------------------- colour


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Y (BT.601, 0..255) of RGB (..., 3), as float64 (...)."""
    return image.rgb_to_ycbcr(rgb)[..., 0]


def gray(y: np.ndarray) -> np.ndarray:
    """Y (H, W) replicated into an RGB (H, W, 3) array."""
    return np.repeat(np.asarray(y, np.float64)[..., None], 3, axis=-1)


def match_luminance(y_style: np.ndarray, y_content: np.ndarray) -> np.ndarray:
    """The style's Y shifted and scaled to the content's mean and standard deviation."""
    sd_s = max(float(y_style.std()), 1e-6)
    return (y_style - y_style.mean()) * (float(y_content.std()) / sd_s) + y_content.mean()


def recolor(x: np.ndarray, content_ycc: np.ndarray) -> np.ndarray:
    """Preprocessed x with its own Y and the content's Cb/Cr (content_ycc (H, W, 3))."""
    y = luminance(image.deprocess_float(x))
    ycc = np.concatenate([y[..., None], content_ycc[..., 1:]], axis=-1)
    return image.preprocess(image.ycbcr_to_rgb(ycc))


# ---------------------------------------------------------------- masks


def load_mask(path: str, wh: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """A mask image as float32 (H, W) in 0..1 (white = 1), resized bilinearly to `wh`."""
    img = image.read(path, max_pixels=max_pixels).convert("L")
    if img.size != tuple(wh):
        img = image.resize(img, wh, "bilinear")
    return np.asarray(img, np.float32) / 255.0


def _pool(m: np.ndarray, pooling: str) -> np.ndarray:
    """2x2 stride-2 pooling of (S, H, W) masks, as vgg16 pools (odd sizes drop the last row)."""
    s, h, w = m.shape
    m = m[:, : h // 2 * 2, : w // 2 * 2].reshape(s, h // 2, 2, w // 2, 2)
    return m.max(axis=(2, 4)) if pooling == "max" else m.mean(axis=(2, 4))


def layer_masks(masks: np.ndarray, layers, pooling: str = "avg") -> dict[str, np.ndarray]:
    """Masks (S, H, W) at each layer's resolution: {layer: float32 (S, h, w, 1)}."""
    by_block = {1: np.asarray(masks, np.float32)}
    for b in range(2, 6):
        by_block[b] = _pool(by_block[b - 1], pooling)
    return {n: by_block[vgg16.block(n)][..., None] for n in layers}


# ---------------------------------------------------------------- targets


@partial(jax.jit, static_argnums=(3,))
def _features(params: dict, content_x: jax.Array, styles_x: jax.Array, spec: losses.Spec):
    fc = vgg16.features(params, content_x, spec.content_layers, spec.pooling, spec.precision)
    fs = vgg16.features(params, styles_x, spec.style_layers, spec.pooling, spec.precision)
    grams = {n: losses.gram(fs[n], spec.normalization) for n in spec.style_layers}
    return {n: fc[n] for n in spec.content_layers}, grams


def style_grams(params: dict, content_x, styles_x, spec: losses.Spec) -> tuple[dict, dict]:
    """Content features {layer: (1,h,w,c)} and per-style Grams {layer: (S,c,c)}.

    With `gatys` normalization a Gram is a sum over positions: the style's are rescaled to the
    content's number of positions at each layer (a no-op when the sizes are equal).
    """
    fc, grams = _features(params, jnp.asarray(content_x), jnp.asarray(styles_x), spec)
    if spec.normalization == "gatys":
        (_, h, w, _), (_, hs, ws, _) = content_x.shape, styles_x.shape
        for n in spec.style_layers:
            k = vgg16.block(n) - 1
            grams[n] = grams[n] * (((h >> k) * (w >> k)) / ((hs >> k) * (ws >> k)))
    return fc, grams


def _styles(cfg: Config, wh: tuple[int, int], content_rgb: np.ndarray) -> np.ndarray:
    """The style images at `wh`, colour control applied: float32 (S, H, W, 3) preprocessed."""
    out = []
    for path in cfg.styles:
        x = image.load(path, list(wh), cfg.image.resample, max_pixels=cfg.image.max_pixels)
        rgb = image.deprocess_float(x)
        if cfg.color.preserve == "histogram":
            rgb = image.match_histogram(rgb, content_rgb)
        elif cfg.color.preserve == "luminance":
            rgb = gray(match_luminance(luminance(rgb), luminance(content_rgb)))
        out.append(image.preprocess(rgb)[0])
    return np.stack(out)


def build(cfg: Config, params: dict | None = None, winfo: dict | None = None) -> run.Problem:
    """run.build for configs with controls: images, masks, targets and the save-time `post`."""
    mp = cfg.image.max_pixels
    content = image.load(cfg.content, cfg.image.size, cfg.image.resample, max_pixels=mp)
    h, w = content.shape[1:3]
    _check_side((w, h), cfg.loss.content_layers + cfg.loss.style_layers,
                "the content image is", "raise image.size")
    content_rgb = image.deprocess_float(content)
    swh = style_size(cfg, (w, h))
    styles = _styles(cfg, swh, content_rgb)
    content_ycc = image.rgb_to_ycbcr(content_rgb)
    if cfg.color.preserve == "luminance":
        content = image.preprocess(gray(content_ycc[..., 0]))
    if params is None:
        params, winfo = weights.load(cfg.model.weights, seed=cfg.seed)
    params = jax.tree.map(jnp.asarray, params)
    spec = run.spec_of(cfg)
    fc, grams = style_grams(params, content, styles, spec)
    tgt: dict = {"content": fc}
    if spec.style_masks:
        masks = np.stack([load_mask(p, (w, h), mp) for p in cfg.masks.style])
        tgt["style"] = grams
        tgt["style_masks"] = {n: jnp.asarray(v) for n, v in
                              layer_masks(masks, spec.style_layers, spec.pooling).items()}
    else:
        b = jnp.asarray(blend_weights(cfg), jnp.float32)
        tgt["style"] = {n: jnp.einsum("s,sij->ij", b, g)[None] for n, g in grams.items()}
    cmask = None
    if spec.content_mask:
        cmask = load_mask(cfg.masks.content, (w, h), mp)[None, :, :, None]
        tgt["content_mask"] = {"mask": jnp.asarray(cmask), "image": jnp.asarray(content)}
    style0 = styles[:1]
    if cfg.init == "style" and swh != (w, h):
        style0 = _styles(cfg.model_copy(update={"style": cfg.styles[:1]}), (w, h), content_rgb)
    x0 = run.initial_image(cfg, content, style0)
    lum = cfg.color.preserve == "luminance"

    def post(x: np.ndarray) -> np.ndarray:
        if cmask is not None:
            x = cmask * x + (1.0 - cmask) * content
        return recolor(x, content_ycc) if lum else x

    info = {"weights": winfo, "content_size": [w, h], "style_size": list(swh),
            "styles": len(cfg.styles), "style_blend": blend_weights(cfg).round(6).tolist()}
    return run.Problem(spec, params, jnp.asarray(content), jnp.asarray(styles[:1]), tgt,
                       run.loss_weights(cfg, spec), jnp.asarray(x0), info,
                       post if (cmask is not None or lum) else None)


# ---------------------------------------------------------------- multi-scale


def scale_sizes(cfg: Config, final_wh: tuple[int, int]) -> list[tuple[int, int]]:
    """(W, H) of every scale, coarse to fine; the last is the final size (from image.size)."""
    ms = cfg.multiscale
    w, h = final_wh
    side = max(w, h)
    if ms.sizes is not None:
        longs = [float(s) for s in ms.sizes]
        if longs[-1] >= side:
            raise UserError(f"multiscale.sizes: {ms.sizes[-1]} is not below the final size {side}"
                            " (image.size is always the last scale): list only coarser sizes")
    else:
        longs = [side / ms.factor**k for k in range(ms.steps - 1, 0, -1)]
    sizes = [(max(1, round(w * s / side)), max(1, round(h * s / side))) for s in longs]
    sizes.append((w, h))
    for a, b in zip(sizes, sizes[1:]):
        if a == b:
            raise UserError(f"multiscale: two scales are both {a[0]}x{a[1]}; use a larger "
                            "multiscale.factor or fewer steps")
    _check_side(sizes[0], cfg.loss.content_layers + cfg.loss.style_layers,
                "multiscale: the coarsest scale is",
                "use larger multiscale.sizes, or a smaller factor or fewer steps")
    return sizes


def scale_iters(cfg: Config, n: int) -> list[int]:
    """Iterations (rounds for scipy_lbfgsb) per scale: multiscale.maxiter, or the solver's
    budget split evenly with the remainder going to the finest scales."""
    m = cfg.multiscale.maxiter
    if isinstance(m, list):
        return list(m)
    if m is not None:
        return [m] * n
    total = cfg.solver.rounds if cfg.solver.name == "scipy_lbfgsb" else cfg.solver.maxiter
    base, extra = divmod(total, n)
    return [base] * (n - extra) + [base + 1] * extra


def scale_config(cfg: Config, wh: tuple[int, int], iters: int) -> Config:
    """The single-scale config of one scale: image.size [W, H], its iterations, no multiscale."""
    key = "rounds" if cfg.solver.name == "scipy_lbfgsb" else "maxiter"
    return cfg.model_copy(update={
        "image": cfg.image.model_copy(update={"size": [wh[0], wh[1]]}),
        "solver": cfg.solver.model_copy(update={key: iters}),
        "multiscale": MultiscaleCfg(),
    })


def upsample(x: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a preprocessed (1, h, w, 3) image to (1, H, W, 3), in float."""
    return np.asarray(jax.image.resize(jnp.asarray(x), (1, wh[1], wh[0], 3), "bicubic"))


def run_multiscale(cfg: Config, out: str | Path | None = None, *, quiet: bool = False,
                   parent: str | Path = "runs") -> run.RunResult:
    """Coarse to fine: solve at each scale, the upsampled result is the next scale's init.

    Sizes come from `multiscale.sizes` (longer sides) or `factor` and `steps`; the last scale is
    `image.size`. The solver restarts at each scale (L-BFGS history is tied to the image's shape,
    which changes). One run directory: `scale{i}_final.*` for the coarser scales, `final.*`,
    snapshots `scale{i}_iter_*`, history.csv with a `scale` column and iterations numbered on
    across scales (each scale's first row is its start), run.json with a `scales` list. If a
    scale fails or the run is interrupted, no finer scale runs and final.* is that scale's.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    run.check_out(out, parent)
    final = image.load(cfg.content, cfg.image.size, cfg.image.resample,
                       max_pixels=cfg.image.max_pixels)
    sizes = scale_sizes(cfg, (final.shape[2], final.shape[1]))
    iters = scale_iters(cfg, len(sizes))
    params, winfo = weights.load(cfg.model.weights, seed=cfg.seed)
    problem = run.build(scale_config(cfg, sizes[0], iters[0]), params, winfo)
    d = run.make_run_dir(out, cfg, parent)
    run.write_atomic(d / "config.yaml", dump(cfg))
    record = {**run.start_record(cfg, problem), "content_size": list(sizes[-1]), "scales": []}
    run.write_atomic(d / "run.json", json.dumps(record, indent=2))

    ctx = {"d": d, "cfg": cfg, "flag": {}, "history": [], "record": record,
           "total": {"evals": 0, "compile": 0.0, "solve": 0.0, "iters": 0},
           "bar": tqdm(total=sum(iters), disable=quiet, unit="it", dynamic_ncols=True,
                       file=sys.stderr)}
    res, done, crash = solvers.Result(x=np.asarray(problem.x0)), problem, None
    with run.stop_on_signals(ctx["flag"]):
        try:
            for i, (wh, n) in enumerate(zip(sizes, iters), 1):
                cfg_i = scale_config(cfg, wh, n)
                if i > 1:
                    problem = run.build(cfg_i, params, winfo)
                    problem.x0 = jnp.asarray(upsample(res.x, wh))
                res, done = _solve_scale(ctx, i, cfg_i, problem), problem
                if ctx["flag"].get("signal") or res.status in ("failed", "interrupted"):
                    break
                if i < len(sizes):
                    image.save(d / f"scale{i}_final.{cfg.output.format}",
                               run.visible(problem, res.x), bits=cfg.output.bits)
        except KeyboardInterrupt:  # a second signal: stop now, with the last finished image
            ctx["flag"].setdefault("signal", signal.SIGINT)
        except Exception as e:  # recorded in run.json, then re-raised
            crash = e
    ctx["bar"].close()
    t = ctx["total"]
    whole = solvers.Result(x=res.x, history=ctx["history"], evals=t["evals"],
                           iterations=t["iters"], status=res.status, compile_seconds=t["compile"],
                           solve_seconds=t["solve"], error=res.error)
    if ctx["flag"].get("signal") and whole.status != "failed":
        whole.status = "interrupted"
    if crash is not None:
        text = str(crash).strip().splitlines()
        whole.status, whole.error = "failed", f"{type(crash).__name__}: {text[0] if text else ''}"
    record["signal"] = ctx["flag"].get("signal")
    run.write_atomic(d / "last.npy", _npy_bytes(res.x))
    run.finish(d, cfg, whole, record, t_start, post=done.post, columns=MULTISCALE_COLUMNS)
    if crash is not None:
        raise crash
    return run.RunResult(d, whole, record)


def _solve_scale(ctx: dict, i: int, cfg_i: Config, problem: run.Problem) -> solvers.Result:
    """Solve one scale of a multi-scale run; history rows go on from the earlier scales'."""
    d, cfg, history, total = ctx["d"], ctx["cfg"], ctx["history"], ctx["total"]
    s = cfg_i.solver.settings()
    n = s.rounds if s.name == "scipy_lbfgsb" else s.maxiter
    chunk = run.chunk_size(cfg_i)
    args = (problem.params, problem.targets, problem.weights)
    compiled, compile_s = None, 0.0
    if s.name in solvers.COMPILED:
        t = time.perf_counter()
        compiled, hit = run.program(problem.spec, s, problem.x0, args, chunk)
        compile_s = 0.0 if hit else time.perf_counter() - t
    prior = list(history)
    it0, t0 = total["iters"], total["solve"]

    def shift(r: dict) -> dict:
        return {**r, "scale": i, "iter": r["iter"] + it0, "seconds": r["seconds"] + t0}

    def on_chunk(x: np.ndarray, rows: list[dict]) -> bool:
        history.extend(shift(r) for r in rows)
        ctx["bar"].update(len(rows))
        it, every = (rows[-1]["iter"] if rows else 0), cfg.output.save_every
        if every and it and it % every == 0 and it < n:
            image.save(d / f"scale{i}_iter_{it:06d}.{cfg.output.format}",
                       run.visible(problem, x), bits=cfg.output.bits)
        run.write_atomic(d / "history.csv", run.history_csv(history, MULTISCALE_COLUMNS))
        run.write_atomic(d / "last.npy", _npy_bytes(x))
        return bool(ctx["flag"].get("signal"))

    res = solvers.minimize(s, losses.objective(problem.spec), problem.x0, args, chunk=chunk,
                           on_chunk=on_chunk, compiled=compiled)
    history[:] = prior + [shift(r) for r in res.history]
    compile_s = max(res.compile_seconds, compile_s)
    total["evals"] += res.evals
    total["compile"] += compile_s
    total["solve"] += res.solve_seconds
    total["iters"] += res.iterations
    ctx["record"]["scales"].append({
        "scale": i, "size": [problem.content.shape[2], problem.content.shape[1]],
        "iterations": res.iterations, "evaluations": res.evals, "status": res.status,
        "compile_seconds": round(compile_s, 4), "solve_seconds": round(res.solve_seconds, 4),
        "initial_total": res.history[0]["total"], "final_total": res.history[-1]["total"]})
    return res


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(x, np.float32), allow_pickle=False)
    return buf.getvalue()
