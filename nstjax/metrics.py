"""Metrics that judge a result: a registry of named scores of the final image, in run.json
`metrics` and a sweep's `metric.*` columns (config `eval:`; docs/guides/research/metrics.md).

Built in (`eval.metrics` picks; all by default), with which way is better:
- `gram` (lower): the loss's own yardstick, kept as one metric among others: per-layer Gram
  distances to the style (`style.<layer>`, their sum `style`) and the content distance
  (`content`), unweighted, `gatys` normalization, through the run's VGG16. It measures what a
  Gram loss minimizes, so it cannot judge a result on its own.
- `structure` (higher, <= 1): SSIM of the low-pass luminance of the result against the
  content's. SSIM multiplies luminance, contrast and structure terms, so a faint town (low
  contrast) scores low as well as a lost one.
- `edges` (higher, <= 1): correlation of the low-pass luminance's gradient magnitude with the
  content's: are the content's edges where they were (contrast does not count).
- `weave` (lower, >= 0): the local-periodicity index: in 16-px tiles of the high-passed
  luminance, the share of the power at periods of 2-8 px held by the 4 strongest frequencies
  (`tile_peaks`), averaged (smooth tiles count less), minus the style image's own. A
  one-wavelength ripple or lattice (the woven skies of average pooling) gives ~0.05;
  brush strokes and photos ~0.01 or less.
- `ripple` (lower, >= 0): a field of short ripples where the content is flat: the share of the
  luminance's power at periods of 2-6 px among 2-32 px, over the tiles where the content is
  flat, divided by the style's own share (1: as fine-grained as the painting). `weave` looks
  for one wavelength per tile and misses ripples whose orientation wanders; `ripple` sees the
  fine grain the eye sees in a sky that has no bold strokes under it.
- `color` (lower): sliced Wasserstein distance between the result's and the style's pixel
  colours in CIELab (in Lab units, ~ Delta E): is the palette the painting's.
- `swd` (lower): sliced Wasserstein distance between the result's and the style's VGG16
  features at layers the built-in losses do not use (`eval.swd_layers`, default the conv3
  layers of blocks 3-5), each layer's divided by the style features' RMS, averaged.
Other metrics register with `register(name, fn)` (a module named in `eval.plugins` does so on
import); `fn(inp: Inputs)` returns a float (stored under `name`) or a mapping of floats (keys
stored as given). Names and keys never collide: a built-in metric cannot be replaced, a name
registered from one file cannot be taken over from another, and a returned key that is another
metric's name (or one of the Gram metric's `style`, `content`, `style.*`, `content.*`) or that
an earlier metric of the same evaluation returned is refused (`PluginError` naming both).
"""

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import losses, vgg16
from nstjax.errors import PluginError, UserError, user_code
from nstjax.kinds import registrant
from nstjax.tables import DEFAULT_METRICS, DEFAULT_STYLE_LAYERS, DEFAULT_SWD_LAYERS


@dataclass(frozen=True)
class EvalSpec:
    """The `eval:` section: which metrics score the final image, and their settings."""

    style_layers: tuple[str, ...] = DEFAULT_STYLE_LAYERS
    content_layers: tuple[str, ...] = ("block4_conv2",)
    normalization: str = "gatys"
    pooling: str = "avg"
    precision: str = "highest"
    metrics: tuple[str, ...] = DEFAULT_METRICS
    swd_layers: tuple[str, ...] = DEFAULT_SWD_LAYERS
    projections: int = 64
    seed: int = 0

    def __post_init__(self):
        # Lists from YAML become tuples (hashable: an EvalSpec is a static jit argument).
        for f in ("style_layers", "content_layers", "swd_layers"):
            v = getattr(self, f)
            if isinstance(v, str) or not isinstance(v, (list, tuple)) or not v:
                raise UserError(f"eval.{f}: {v!r} is not a non-empty list of VGG16 layers")
            object.__setattr__(self, f, tuple(v))
            bad = [n for n in v if n not in vgg16.CHANNELS]
            if bad:
                raise UserError(f"eval.{f}: {bad[0]!r} is not a VGG16 or VGG19 conv layer; "
                                f"valid: {', '.join(vgg16.CHANNELS)}")
        m = self.metrics
        if isinstance(m, str) or not isinstance(m, (list, tuple)):
            raise UserError(f"eval.metrics: {m!r} is not a list of metric names")
        object.__setattr__(self, "metrics", tuple(m))
        for f, ok in (("normalization", losses.NORMALIZATIONS), ("pooling", vgg16.POOLINGS),
                      ("precision", vgg16.PRECISIONS)):
            if getattr(self, f) not in ok:
                raise UserError(f"eval.{f}: {getattr(self, f)!r} is not one of {', '.join(ok)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EvalSpec":
        """From a config's `eval:` mapping (missing keys take the defaults)."""
        d = dict(d or {})
        d.pop("plugins", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"eval.{unknown[0]}: unknown key; valid: {', '.join(sorted(known))}")
        return cls(**d)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.content_layers + self.style_layers))


class Inputs(NamedTuple):
    """What a metric sees. Images are preprocessed (1,H,W,3) float32 (`rgb` turns them into
    0-255 RGB); `style` (the first style image) is at the run's style size; `content` is None
    for a texture."""

    params: dict
    x: jax.Array
    content: jax.Array | None
    style: jax.Array
    cfg: EvalSpec
    gram_ref: dict | None = None  # `reference(...)`, blended over several styles; else computed

    def features(self, img: jax.Array, layers: tuple[str, ...]) -> dict[str, jax.Array]:
        """VGG16 features of `img` at `layers` with the evaluation's pooling and precision."""
        return _features(self.params, img, tuple(layers), self.cfg.pooling, self.cfg.precision)


MetricFn = Callable[[Inputs], "float | Mapping[str, float]"]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    better: Literal["lower", "higher"] = "lower"
    description: str = ""
    source: str = ""  # the file that registered it (a plugin's), for error messages
    builtin: bool = False

    @property
    def label(self) -> str:
        if self.builtin:
            return f"the built-in metric {self.name!r}"
        return f"metric {self.name!r}" + (f" ({self.source})" if self.source else "")


_METRICS: dict[str, Metric] = {}
GRAM_KEYS = ("style", "content")  # the Gram metric's keys (and their `.<layer>` ones)


def register(name: str, fn: MetricFn, *, better: Literal["lower", "higher"] = "lower",
             description: str = "", replace: bool = False, _builtin: bool = False) -> Metric:
    """Register metric `name` (selectable in `eval.metrics`); `better` says which way is
    better (shown in reports). `replace=True` swaps in a new function registered from the same
    file; a built-in metric, a name the Gram metric's keys use (`style`, `content`) and a name
    registered from another file are refused (ValueError naming both)."""
    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
        raise ValueError(f"metric name must be a non-empty identifier, got {name!r}")
    if not callable(fn):
        raise TypeError(f"metric {name!r}: fn must be callable")
    if better not in ("lower", "higher"):
        raise ValueError(f"metric {name!r}: better must be 'lower' or 'higher', got {better!r}")
    new = Metric(name, fn, better, description, "" if _builtin else registrant(fn), _builtin)
    if name in GRAM_KEYS:
        raise ValueError(f"{new.label}: the name {name!r} is a key of the built-in metric "
                         "'gram'; pick another name")
    old = _METRICS.get(name)
    if old is not None:
        if old.builtin or old.source != new.source:
            raise ValueError(f"{new.label}: the name is taken by {old.label}; pick another "
                             "name")
        if not replace:
            raise ValueError(f"metric {name!r} is already registered; pass replace=True")
    _METRICS[name] = new
    return new


def names() -> tuple[str, ...]:
    """The registered metrics, sorted."""
    return tuple(sorted(_METRICS))


def get(name: str) -> Metric:
    """The registered metric `name`; a UserError naming `eval.metrics` if none."""
    try:
        return _METRICS[name]
    except (KeyError, TypeError):
        raise UserError(f"eval.metrics: unknown metric {name!r}; registered: "
                        f"{', '.join(names())} (a plugin in eval.plugins may register more)"
                        ) from None


_PLUGIN_METRICS: dict[str, dict[str, Metric]] = {}  # what each `eval.plugins` module registered


def load_plugins(refs, here: str | Path | None = None) -> None:
    """Import the `eval.plugins` modules (files relative to `here`, or dotted names); one
    imported before has its metrics put back (an `isolated` block may have left them out)."""
    for ref in refs or ():
        key = losses.plugin_key(ref, here)
        before = dict(_METRICS)
        losses.load_plugin(ref, here, what="metric plugin")
        new = {n: m for n, m in _METRICS.items() if before.get(n) is not m}
        if new or key not in _PLUGIN_METRICS:
            _PLUGIN_METRICS[key] = new
        _METRICS.update(_PLUGIN_METRICS[key])


@contextlib.contextmanager
def isolated(plugins: Sequence[str] = ()):
    """Within the block the registry holds the metrics registered in code (not by an
    `eval.plugins` module) plus those of `plugins`; restored after. A sweep cell sees the
    metrics its own config imports, never another cell's."""
    saved = dict(_METRICS)
    from_plugins = {id(m) for ms in _PLUGIN_METRICS.values() for m in ms.values()}
    try:
        _METRICS.clear()
        _METRICS.update({n: m for n, m in saved.items() if id(m) not in from_plugins})
        load_plugins(plugins)
        yield
    finally:
        _METRICS.clear()
        _METRICS.update(saved)


def direction(key: str) -> str | None:
    """'lower' or 'higher' for a metric key (`structure`, `style.block1_conv1`, ...)."""
    m = _METRICS.get(key) or _METRICS.get(key.split(".")[0])
    if m is None and (key in ("style", "content") or key.startswith(("style.", "content."))):
        m = _METRICS.get("gram")
    return m.better if m else None


# ------------------------------------------------------------------ gram (the loss's yardstick)

def _features(params, x, layers, pooling, precision):
    return vgg16.features(params, x, layers, pooling, precision)


_features = jax.jit(_features, static_argnums=(2, 3, 4))


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
    """The Gram metric's targets: content features and normalized style Grams (jitted, cfg
    static; once per content/style pair)."""
    fc = vgg16.features(params, content_x, cfg.content_layers, cfg.pooling, cfg.precision)
    fs = vgg16.features(params, style_x, cfg.style_layers, cfg.pooling, cfg.precision)
    return {"content": {n: fc[n] for n in cfg.content_layers},
            "style": {n: _normalized_gram(fs[n], cfg.normalization) for n in cfg.style_layers}}


def score(params: dict, x: jax.Array, ref: dict, cfg: EvalSpec) -> dict:
    """The Gram metric's terms (device scalars) of x against `reference(...)` (jitted).

    `gatys` per style layer: sum((G_x/M_x - G_s/M_s)^2) / (4 N^2): the paper's E_l when x and
    the style have the same size, comparable when not; content: 1/2 sum((F_x - F_c)^2).
    `seed`: the post's summed MSE of Grams F^T F/(h w c) per layer; content: its MSE/(h w c).
    """
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


def _gram(inp: Inputs) -> dict[str, float]:
    content = inp.content if inp.content is not None else inp.x
    ref = inp.gram_ref if inp.gram_ref is not None else reference(
        inp.params, content, inp.style, inp.cfg)
    out = {k: float(v) for k, v in jax.device_get(score(inp.params, inp.x, ref, inp.cfg)).items()}
    if inp.content is None:  # a texture: there is no content to keep
        out = {k: v for k, v in out.items() if not k.startswith("content")}
    return out


# ------------------------------------------------------------------ image metrics (numpy)

def rgb(x) -> np.ndarray:
    """A preprocessed (1,H,W,3) image as float64 (H,W,3) RGB in 0..255 (clipped, as saved)."""
    bgr = np.asarray(x, np.float64)[0] + np.array([103.939, 116.779, 123.68])
    return np.clip(bgr[..., ::-1], 0.0, 255.0)


def luminance(img: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of RGB (H,W,3) in 0..255."""
    return img @ np.array([0.299, 0.587, 0.114])


def _lowpass(lum: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(lum, sigma=max(1.0, min(lum.shape) / 128.0), mode="reflect")


def structure(x_rgb: np.ndarray, c_rgb: np.ndarray) -> float:
    """SSIM of the low-pass luminances (window 7, data range 255)."""
    from skimage.metrics import structural_similarity

    a, b = _lowpass(luminance(x_rgb)), _lowpass(luminance(c_rgb))
    return float(structural_similarity(a, b, data_range=255.0, win_size=7))


def edges(x_rgb: np.ndarray, c_rgb: np.ndarray) -> float:
    """Pearson correlation of the Sobel gradient magnitudes of the low-pass luminances."""
    from skimage.filters import sobel

    a, b = (sobel(_lowpass(luminance(i))).ravel() for i in (x_rgb, c_rgb))
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / den) if den > 0 else 0.0


def tile_peaks(lum: np.ndarray, tile: int = 16, stride: int = 8, longest: float = 8.0,
               peaks: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per `tile`-px tile (every `stride` px) of the high-passed luminance (minus a Gaussian
    blur of sigma 2): the share of its power at periods of 2..`longest` px held by its `peaks`
    strongest frequency bins (Hann window), and that power. A local lattice or ripple of one
    wavelength packs its power into a few bins; strokes and photographs spread it."""
    from numpy.lib.stride_tricks import sliding_window_view
    from scipy.ndimage import gaussian_filter

    hp = lum - gaussian_filter(lum, 2.0, mode="reflect")
    if min(hp.shape) < tile:
        return np.zeros(0), np.zeros(0)
    t = sliding_window_view(hp, (tile, tile))[::stride, ::stride].reshape(-1, tile, tile)
    t = t - t.mean(axis=(1, 2), keepdims=True)
    p = np.abs(np.fft.fft2(t * np.outer(np.hanning(tile), np.hanning(tile)))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(tile), np.fft.fftfreq(tile), indexing="ij")
    band = p[:, np.hypot(fy, fx) >= 1.0 / longest]
    power = band.sum(axis=1)
    top = -np.sort(-band, axis=1)[:, :peaks].sum(axis=1)
    return top / np.maximum(power, 1e-12), power


def weave(x_rgb: np.ndarray, s_rgb: np.ndarray, floor: float = 0.15) -> float:
    """Mean `tile_peaks` share of the result minus the style's (at the result's size), at least
    0. Each tile counts in proportion to its power up to `floor` x the style's median tile
    power: a smooth region (little visible texture) is not woven, however few its frequencies."""
    from PIL import Image

    h, w = x_rgb.shape[:2]
    if s_rgb.shape[:2] != (h, w):
        s_rgb = np.asarray(Image.fromarray(s_rgb.astype(np.uint8)).resize(
            (w, h), Image.BICUBIC), np.float64)
    (sx, px), (ss, ps) = tile_peaks(luminance(x_rgb)), tile_peaks(luminance(s_rgb))
    if not len(sx):
        return 0.0
    ref = floor * float(np.median(ps))
    if ref <= 0:
        return 0.0
    score = [float(np.mean(sh * np.minimum(1.0, pw / ref))) for sh, pw in ((sx, px), (ss, ps))]
    return max(0.0, score[0] - score[1])


def _resized(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if img.shape[:2] == hw:
        return img
    return np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize(
        (hw[1], hw[0]), Image.BICUBIC), np.float64)


def _tiles(a: np.ndarray, tile: int, stride: int) -> np.ndarray:
    from numpy.lib.stride_tricks import sliding_window_view

    if min(a.shape) < tile:
        return np.zeros((0, tile, tile))
    return sliding_window_view(a, (tile, tile))[::stride, ::stride].reshape(-1, tile, tile)


def fine_spectrum(lum: np.ndarray, mask_from: np.ndarray | None = None, *, tile: int = 32,
                  flat: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """The power spectrum of `lum` averaged over its `tile`-px tiles (every tile/2 px; tile
    mean removed, Hann window), and the radial frequency of each bin. With `mask_from` (an image
    of the same size, e.g. the content), only tiles where it is flat count: its high-passed
    (minus a Gaussian blur of sigma 2) RMS under `flat` grey levels; all tiles if none is.
    Averaging power over tiles keeps what repeats at one frequency and orientation everywhere
    (a grid tied to the pixel lattice) as sharp peaks, and spreads strokes, whose orientation
    and period vary, into a smooth spectrum."""
    from scipy.ndimage import gaussian_filter

    t = _tiles(lum, tile, tile // 2)
    if mask_from is not None and len(t):
        hp = mask_from - gaussian_filter(mask_from, 2.0, mode="reflect")
        rms = np.sqrt((_tiles(hp, tile, tile // 2) ** 2).mean(axis=(1, 2)))
        if (rms < flat).any():
            t = t[rms < flat]
    fy, fx = np.meshgrid(np.fft.fftfreq(tile), np.fft.fftfreq(tile), indexing="ij")
    if not len(t):
        return np.zeros((tile, tile)), np.hypot(fy, fx)
    t = t - t.mean(axis=(1, 2), keepdims=True)
    p = np.abs(np.fft.fft2(t * np.outer(np.hanning(tile), np.hanning(tile)))) ** 2
    return p.mean(axis=0), np.hypot(fy, fx)


def fine_share(p: np.ndarray, f: np.ndarray, shortest: float = 2.0, longest: float = 6.0,
               coarsest: float = 32.0) -> float:
    """The share of a `fine_spectrum`'s power at periods of `shortest`..`longest` px among
    its power at periods up to `coarsest` px."""
    fine = p[(f >= 1.0 / longest) & (f <= 1.0 / shortest)].sum()
    total = p[(f >= 1.0 / coarsest) & (f <= 1.0 / shortest)].sum()
    return float(fine / total) if total > 0 else 0.0


def ripple(x_rgb: np.ndarray, s_rgb: np.ndarray, c_rgb: np.ndarray | None = None) -> float:
    """A field of short ripples where the content is flat, relative to the painting: the
    `fine_share` (periods 2-6 px among 2-32 px) of the result's luminance over the tiles where
    the content is flat (`fine_spectrum`; all tiles without a content), divided by the style's
    own over all its tiles at the result's size. 1: as fine-grained as the painting. Checked
    against labels by eye (tests/data/ripple/LABELS.md): within a painting every sky with a
    fine regular pattern scores above every clean one, but where "visible" starts depends on
    the painting (The Starry Night: patterns 2.05-2.8, clean 1.6-1.9; The Scream, whose strokes
    are broad: patterns 2.7-5.4, clean 2.1-2.5); jcjohnson/neural-style's results: 0.8-1.4."""
    hw = x_rgb.shape[:2]
    lc = None if c_rgb is None else luminance(_resized(c_rgb, hw))
    sx = fine_share(*fine_spectrum(luminance(x_rgb), lc))
    ss = fine_share(*fine_spectrum(luminance(_resized(s_rgb, hw))))
    return sx / ss if ss > 0 else 0.0


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int, seed: int) -> float:
    """POT's sliced 2-Wasserstein distance between point sets a (n,d) and b (m,d)."""
    import ot

    return float(ot.sliced_wasserstein_distance(a, b, n_projections=projections, seed=seed))


def color(x_rgb: np.ndarray, s_rgb: np.ndarray, projections: int = 64, seed: int = 0) -> float:
    """Sliced Wasserstein distance of the pixels' CIELab colours (Lab units)."""
    from skimage.color import rgb2lab

    a, b = (rgb2lab(i / 255.0).reshape(-1, 3) for i in (x_rgb, s_rgb))
    return sliced_wasserstein(a, b, projections, seed)


def _swd(inp: Inputs) -> float | dict:
    layers = inp.cfg.swd_layers
    fx, fs = inp.features(inp.x, layers), inp.features(inp.style, layers)
    out = []
    for n in layers:
        a = np.asarray(fx[n], np.float64).reshape(-1, fx[n].shape[-1])
        b = np.asarray(fs[n], np.float64).reshape(-1, fs[n].shape[-1])
        if not (len(a) and len(b)):  # an image too small for the layer: nothing to compare
            continue
        rms = np.sqrt(np.mean(b * b)) or 1.0
        out.append(sliced_wasserstein(a / rms, b / rms, inp.cfg.projections, inp.cfg.seed))
    return float(np.mean(out)) if out else {}


def _need_content(fn):
    def wrapped(inp: Inputs):
        if inp.content is None:
            return {}
        return fn(rgb(inp.x), rgb(inp.content))
    return wrapped


register("gram", _gram, _builtin=True, description="Gram distances per layer (style.*, style) "
         "and content distance (content), gatys normalization")
register("structure", _need_content(structure), better="higher", _builtin=True,
         description="SSIM of low-pass luminance against the content")
register("edges", _need_content(edges), better="higher", _builtin=True,
         description="correlation of gradient magnitude with the content's")
register("weave", lambda inp: weave(rgb(inp.x), rgb(inp.style)), _builtin=True,
         description="periodic-lattice index: peaked high-frequency power beyond the style's")
register("ripple", lambda inp: ripple(rgb(inp.x), rgb(inp.style),
                                      None if inp.content is None else rgb(inp.content)),
         _builtin=True, description="fine regular pattern (periods 2-6 px) in the content's flat "
         "regions, beyond the style's own")
register("color", lambda inp: color(rgb(inp.x), rgb(inp.style), inp.cfg.projections,
                                    inp.cfg.seed), _builtin=True,
         description="sliced Wasserstein distance of CIELab colours to the style")
register("swd", _swd, _builtin=True, description="sliced Wasserstein distance of VGG16 features at "
         "eval.swd_layers to the style's, per-layer RMS-normalized")


# ------------------------------------------------------------------ evaluation

def _finite(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) and not (
            isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0):
        raise PluginError(f"metric {name!r}: returned {type(v).__name__}; a metric must "
                          "return a float or a mapping of floats")
    v = float(v)
    if not np.isfinite(v):
        raise PluginError(f"metric {name!r}: returned {v}; a metric must be finite")
    return v


def owner(key: str) -> Metric | None:
    """The registered metric whose key `key` is: its name or `<name>.<part>`; `style`,
    `content` and their `.<layer>` keys are the Gram metric's."""
    head = key.split(".")[0]
    if head in GRAM_KEYS:
        head = "gram"
    return _METRICS.get(key) or _METRICS.get(head)


def check_keys(m: Metric, values: Mapping[str, float],
               taken: Mapping[str, Metric] | None = None) -> None:
    """Refuse a key of metric `m`'s result that is another metric's (a built-in's included),
    or that `taken` (the keys earlier metrics returned) holds: a PluginError naming both."""
    for key in values:
        other = owner(key)
        if other is None or other.name == m.name:
            other = (taken or {}).get(key)
        if other is not None and other.name != m.name:
            raise PluginError(f"{m.label}: returned the key {key!r}, which belongs to "
                              f"{other.label}; return another key (e.g. '{m.name}.{key}')")


def run_metric(name: str, inp: Inputs) -> dict[str, float]:
    """One metric's values ({key: float}); user code's faults as one-line PluginErrors."""
    m = get(name)
    with user_code(f"metric {name!r}", "computing it"):
        v = m.fn(inp)
    if isinstance(v, Mapping):
        out = {str(k): _finite(f"{name}.{k}", x) for k, x in v.items()}
        check_keys(m, out)
        return out
    return {name: _finite(name, v)}


def evaluate(params: dict, x, content_x, style_x, cfg: EvalSpec = EvalSpec(),
             on_error: Callable[[Exception], None] | None = None,
             gram_ref: dict | None = None) -> dict[str, float]:
    """Score image x (1,H,W,3, preprocessed: the saved image) with `cfg.metrics`.

    `content_x` (None for a texture) must have x's shape; `style_x` may have another size.
    Returns {key: float}: the Gram metric's "style.<layer>", "style", "content", the others
    under their names. A metric that fails raises PluginError, or with `on_error` is reported
    there and left out. `gram_ref`: the Gram metric's reference when it is not the one of
    `content_x` and `style_x` (several styles blended).
    """
    x, style_x = jnp.asarray(x, jnp.float32), jnp.asarray(style_x, jnp.float32)
    if content_x is not None:
        content_x = jnp.asarray(content_x, jnp.float32)
        if x.shape != content_x.shape:
            raise ValueError(f"x {x.shape} and content {content_x.shape} must have the same "
                             "shape")
    inp = Inputs(params, x, content_x, style_x, cfg, gram_ref)
    out: dict[str, float] = {}
    whose: dict[str, Metric] = {}
    for name in cfg.metrics:
        try:
            got = run_metric(name, inp)
            check_keys(get(name), got, whose)
            out.update(got)
            whose.update(dict.fromkeys(got, get(name)))
        except PluginError as e:
            if on_error is None:
                raise
            on_error(e)
    return out
