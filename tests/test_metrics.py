"""nstjax.metrics: the fixed reference evaluation against float64 numpy formulas."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_vgg16

from nstjax import metrics
from nstjax.errors import PluginError, UserError


def np_gram(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64).reshape(-1, f.shape[-1])
    return f.T @ f


def np_gatys_style(fx: np.ndarray, fs: np.ndarray) -> float:
    """The paper's E_l = sum((G - A)^2) / (4 N^2 M^2), Grams per image's own positions M."""
    mx, ms, n = fx.shape[0] * fx.shape[1], fs.shape[0] * fs.shape[1], fx.shape[-1]
    return float(np.sum((np_gram(fx) / mx - np_gram(fs) / ms) ** 2) / (4.0 * n**2))


def np_seed_style(fx: np.ndarray, fs: np.ndarray) -> float:
    return float(np.sum(np.mean((np_gram(fx) / fx.size - np_gram(fs) / fs.size) ** 2, -1)))


@pytest.fixture(scope="module")
def imgs():
    r = np.random.default_rng(5)
    x = (40.0 * r.standard_normal((1, 24, 20, 3))).astype(np.float32)
    c = (x + 20.0 * r.standard_normal(x.shape)).astype(np.float32)
    s = (40.0 * r.standard_normal((1, 32, 28, 3))).astype(np.float32)  # another size
    return x, c, s


@pytest.fixture(scope="module")
def np_feats(vgg_params, imgs):
    return [np_vgg16(vgg_params, im, "block5_conv2") for im in imgs]


def test_default_evaluation_against_numpy(vgg_params, imgs, np_feats):
    got = metrics.evaluate(vgg_params, *imgs)
    fx, fc, fs = np_feats
    names = [f"block{i}_conv{j}" for i in range(1, 6) for j in (1, 2)]
    assert set(got) == ({f"style.{n}" for n in names} | {"style", "content"}
                        | {"structure", "edges", "weave", "ripple", "color", "swd"})
    assert all(isinstance(v, float) for v in got.values())
    for n in names:
        # With M_x != M_s (the style is larger) the per-position Grams are compared.
        ref = np_gatys_style(fx[n][0], fs[n][0])
        assert got[f"style.{n}"] == pytest.approx(ref, rel=1e-4), n
        assert ref > 0
    assert got["style"] == pytest.approx(sum(got[f"style.{n}"] for n in names), rel=1e-6)
    c = 0.5 * np.sum((fx["block4_conv2"] - fc["block4_conv2"]) ** 2)
    assert got["content"] == pytest.approx(c, rel=1e-4) and c > 0


def test_same_size_gatys_is_the_papers_formula(vgg_params, imgs, np_feats):
    """When x and the style have one size, the distance is E_l = sum((G-A)^2)/(4 N^2 M^2)."""
    x, c, _ = imgs
    spec = metrics.EvalSpec(style_layers=["block1_conv1", "block3_conv2"],
                            content_layers=["block2_conv1", "block4_conv2"])
    got = metrics.evaluate(vgg_params, x, c, c, spec)
    fx, fc = np_feats[0], np_feats[1]
    for n in spec.style_layers:
        h, w, nc = fx[n].shape[1:]
        e = np.sum((np_gram(fx[n][0]) - np_gram(fc[n][0])) ** 2) / (4.0 * nc**2 * (h * w) ** 2)
        assert got[f"style.{n}"] == pytest.approx(e, rel=1e-4)
    for n in spec.content_layers:
        assert got[f"content.{n}"] == pytest.approx(0.5 * np.sum((fx[n] - fc[n]) ** 2), rel=1e-4)
    assert got["content"] == pytest.approx(got["content.block2_conv1"]
                                           + got["content.block4_conv2"], rel=1e-6)


def test_seed_normalization(vgg_params, imgs, np_feats):
    spec = metrics.EvalSpec(normalization="seed", style_layers=("block2_conv2", "block5_conv1"))
    got = metrics.evaluate(vgg_params, *imgs, spec)
    fx, fc, fs = np_feats
    for n in spec.style_layers:
        assert got[f"style.{n}"] == pytest.approx(np_seed_style(fx[n][0], fs[n][0]), rel=1e-4)
    d = fx["block4_conv2"] - fc["block4_conv2"]
    ref = np.sum(np.mean(d**2, -1)) / d.size
    assert got["content"] == pytest.approx(ref, rel=1e-4)


def test_zero_at_the_targets_and_compiled_once(vgg_params, imgs):
    x, c, s = imgs
    a = metrics.evaluate(vgg_params, c, c, c)
    assert a["content"] == 0.0 and a["style"] == 0.0
    metrics.evaluate(vgg_params, x, c, s)
    metrics.evaluate(vgg_params, x + 1.0, c, s)
    n = metrics.score._cache_size()
    metrics.evaluate(vgg_params, x - 1.0, c + 1.0, s)
    assert metrics.score._cache_size() == n  # same shapes and cfg: no new program
    with pytest.raises(ValueError, match="same shape"):
        metrics.evaluate(vgg_params, x[:, :16], c, s)


def test_eval_spec_from_config_section():
    spec = metrics.EvalSpec.from_dict({"style_layers": ["block1_conv1"], "normalization": "seed"})
    assert spec.style_layers == ("block1_conv1",) and hash(spec)
    assert metrics.EvalSpec.from_dict(None) == metrics.EvalSpec()
    assert len(metrics.EvalSpec().style_layers) == 10
    for d, msg in [({"layers": ["block1_conv1"]}, "eval.layers: unknown key"),
                   ({"style_layers": ["block1_conv3"]}, "eval.style_layers: 'block1_conv3'"),
                   ({"style_layers": []}, "eval.style_layers"),
                   ({"normalization": "l2"}, "eval.normalization: 'l2' is not one of")]:
        with pytest.raises(UserError, match=msg):
            metrics.EvalSpec.from_dict(d)


def test_jnp_inputs_accepted(vgg_params, imgs):
    x, c, s = imgs
    a = metrics.evaluate(vgg_params, jnp.asarray(x), jnp.asarray(c), jnp.asarray(s),
                         metrics.EvalSpec(style_layers=("block1_conv1",), metrics=("gram",)))
    assert set(a) == {"style.block1_conv1", "style", "content"}


# ------------------------------------------------------------------ the result metrics


def _pre(rgb: np.ndarray) -> np.ndarray:
    """RGB (H,W,3) 0..255 -> preprocessed (1,H,W,3) BGR minus the ImageNet mean."""
    bgr = rgb[..., ::-1] - np.array([103.939, 116.779, 123.68])
    return bgr[None].astype(np.float32)


def _scene(n: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth 'photo': blobs and a bright rectangle, RGB 0..255."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] / n
    lum = 120 + 60 * np.sin(6 * xx + r.uniform()) * np.cos(4 * yy) + 50 * ((xx > .3) & (yy > .5))
    return np.clip(np.stack([lum, 0.9 * lum, 0.8 * lum], -1), 0, 255)


def test_structure_and_edges_rank_a_faint_and_a_lost_scene():
    c = _scene()
    faint = 128 + 0.25 * (c - 128)  # same layout, a quarter of the contrast
    lost = _scene(seed=7)[:, ::-1]  # another layout
    s_same, s_faint, s_lost = (metrics.structure(x, c) for x in (c, faint, lost))
    assert s_same == pytest.approx(1.0)
    assert s_same > s_faint > s_lost
    assert metrics.edges(c, c) == pytest.approx(1.0)
    assert metrics.edges(faint, c) == pytest.approx(1.0, abs=1e-6)  # edges ignore contrast
    assert metrics.edges(lost, c) < 0.5


def test_weave_sees_a_lattice_the_style_lacks():
    r = np.random.default_rng(1)
    n = 64
    yy, xx = np.mgrid[:n, :n]
    # a 1/f-like "painting": smoothed noise at several scales
    from scipy.ndimage import gaussian_filter
    paint = sum(gaussian_filter(r.standard_normal((n, n)), s) * s for s in (1, 2, 4, 8))
    paint = np.clip(128 + 40 * paint / paint.std(), 0, 255)
    style = np.repeat(paint[..., None], 3, -1)
    lattice = 25 * np.sin(2 * np.pi * xx / 4) * np.sin(2 * np.pi * yy / 4)
    woven = np.clip(gaussian_filter(style, (1.5, 1.5, 0)) + lattice[..., None], 0, 255)
    share, power = metrics.tile_peaks(metrics.luminance(style))
    assert len(share) == 7 * 7 and np.all((share > 0) & (share <= 1)) and np.all(power > 0)
    # the 4 strongest of the 16x16 tile's band bins hold at most their share of a flat spectrum
    # times the peak-to-mean ratio; a lattice concentrates it
    assert metrics.tile_peaks(metrics.luminance(woven))[0].mean() > share.mean() + 0.05
    assert metrics.weave(style, style) == 0.0
    assert metrics.weave(woven, style) > 0.05
    assert metrics.weave(woven, woven) == 0.0  # a lattice the style has itself does not count
    faint = 128 + 0.02 * (woven - 128)  # too faint to see: its tiles count ~nothing
    assert metrics.weave(faint, style) < 0.01


def test_tile_peaks_of_one_frequency_against_numpy():
    """A pure sinusoid at a bin frequency: (after the Hann window) the 4 strongest bins of each
    tile hold the window's main-lobe share, computed here from the window itself."""
    n, tile = 48, 16
    xx = np.arange(n)[None, :].repeat(n, 0)
    lum = 100 * np.cos(2 * np.pi * xx * 4 / tile)  # period 4 px, on bin 4 of a 16-px tile
    share, _ = metrics.tile_peaks(lum.astype(np.float64))
    w = np.hanning(tile)
    spec = np.abs(np.fft.fft(w * np.cos(2 * np.pi * np.arange(tile) * 4 / tile))) ** 2
    row = np.abs(np.fft.fft(w)) ** 2  # the window's spectrum along y (constant rows)
    p2 = np.outer(row, spec)
    fy, fx = np.meshgrid(np.fft.fftfreq(tile), np.fft.fftfreq(tile), indexing="ij")
    band = p2[np.hypot(fy, fx) >= 1 / 8]
    want = np.sort(band)[::-1][:4].sum() / band.sum()
    assert share == pytest.approx(np.full(len(share), want), rel=0.05)


def _wave(hw: tuple[int, int], period: float, amp: float, angle: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[: hw[0], : hw[1]].astype(np.float64)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    return amp * np.cos(2 * np.pi * u / period)


def _grey(lum: np.ndarray) -> np.ndarray:
    return np.repeat((128.0 + lum)[..., None], 3, axis=2)


def test_fine_share_of_pure_waves_by_hand():
    # One wave's power sits at its own period: a 4-px wave is all "fine" (periods 2-6 px), a
    # 16-px one none of it; equal amplitudes of both split the power in half (Parseval). The
    # Hann window leaks a little power into neighbouring bins, hence the tolerances.
    hw = (96, 128)
    share = [metrics.fine_share(*metrics.fine_spectrum(_wave(hw, per, 20.0)))
             for per in (4.0, 16.0)]
    assert share[0] == pytest.approx(1.0, abs=1e-4) and share[1] == pytest.approx(0.0, abs=1e-3)
    both = _wave(hw, 4.0, 20.0) + _wave(hw, 16.0, 20.0, angle=np.pi / 2)
    assert metrics.fine_share(*metrics.fine_spectrum(both)) == pytest.approx(0.5, abs=0.01)
    # ripple: the result's share over the style's: 1 / 0.5.
    assert metrics.ripple(_grey(_wave(hw, 4.0, 10.0)), _grey(both)) == pytest.approx(2.0,
                                                                                     rel=0.02)
    assert metrics.ripple(_grey(both), _grey(both)) == pytest.approx(1.0, rel=1e-9)


def test_ripple_looks_where_the_content_is_flat():
    hw = (96, 128)
    rng = np.random.default_rng(0)
    # Content: a busy left half (16-px waves, well over the 4 grey-level flatness limit), a flat
    # right half. Style: strokes (16-px waves) with a little fine grain.
    content = np.zeros(hw)
    content[:, :64] = _wave((96, 64), 5.0, 40.0) + rng.normal(0, 20, (96, 64))
    style = _wave(hw, 16.0, 30.0, angle=0.3) + _wave(hw, 3.0, 5.0)
    bold = _wave(hw, 16.0, 30.0, angle=0.3)
    ripples_right, ripples_left = bold.copy(), bold.copy()
    ripples_right[:, 64:] = _wave((96, 64), 3.5, 15.0)  # short ripples in the flat sky
    ripples_left[:, :64] = _wave((96, 64), 3.5, 15.0)  # the same where the content is busy
    c, s = _grey(content), _grey(style)
    assert metrics.ripple(_grey(ripples_right), s, c) > 2.0
    assert metrics.ripple(_grey(ripples_left), s, c) < 1.0
    assert metrics.ripple(_grey(bold), s, c) < 1.0
    # Without a content (a texture) every tile counts.
    assert metrics.ripple(_grey(ripples_left), s) > metrics.ripple(_grey(bold), s)


_RIPPLE = Path(__file__).parent / "data" / "ripple"
_DEMO = Path(__file__).parents[1] / "configs" / "demo"
# tests/data/ripple/LABELS.md: each result judged by eye at 4x zoom of its sky.
RIPPLE_LABELS = {
    "starry_night.jpg": {
        "hed_prev_starry.png": "pattern", "hed_quickstart_starry.png": "pattern",
        "hed_avg_starry.png": "pattern", "q8_r300_starry.png": "clean",
        "q8_r1000_starry.png": "clean", "q8_r3000_starry.png": "clean",
        "q8_r5000_starry.png": "clean"},
    "the_scream.jpg": {
        "hed_quickstart_scream.png": "pattern", "hed_prev_scream.png": "pattern",
        "q8_r300_scream.png": "clean", "q8_r1000_scream.png": "clean",
        "q8_r3000_scream.png": "clean"},
}
# jcjohnson/neural-style's published results (../shared/peer, where present), clean by eye at
# our size.
PEER = Path(__file__).parents[2] / "shared" / "peer"
PEER_LABELS = {"jcjohnson_tubingen_starry.png": "starry_night.jpg",
               "jcjohnson_tubingen_scream.png": "the_scream.jpg"}


def _rgb(path: Path, hw: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image

    im = Image.open(path).convert("RGB")
    if hw is not None and im.size != (hw[1], hw[0]):
        im = im.resize((hw[1], hw[0]), Image.LANCZOS)
    return np.asarray(im, np.float64)


def test_ripple_agrees_with_the_labels_by_eye():
    content = _rgb(_DEMO / "tubingen.jpg")
    worst_clean = 0.0
    for style_name, labels in RIPPLE_LABELS.items():
        style = _rgb(_DEMO / style_name)
        got = {f: metrics.ripple(_rgb(_RIPPLE / f), style, content) for f in labels}
        pattern = [v for f, v in got.items() if labels[f] == "pattern"]
        clean = [v for f, v in got.items() if labels[f] == "clean"]
        # Within a painting every patterned sky scores above every clean one.
        assert min(pattern) > max(clean), (style_name, got)
        assert min(pattern) > 2.0, (style_name, got)
        worst_clean = max(worst_clean, max(clean))
        if (PEER.is_dir()):
            for peer, peer_style in PEER_LABELS.items():
                if peer_style == style_name:
                    v = metrics.ripple(_rgb(PEER / peer, (192, 256)), style, content)
                    assert v < min(pattern) and v < 1.5, (peer, v)
    assert worst_clean < 2.6


def test_color_is_a_lab_distance():
    a = np.full((16, 16, 3), 100.0)
    b = np.full((16, 16, 3), 100.0)
    assert metrics.color(a, b) == pytest.approx(0.0, abs=1e-9)
    from skimage.color import rgb2lab
    c = np.zeros((16, 16, 3))
    c[..., 2] = 200.0
    # Two single-colour images: the sliced W2 distance of two Diracs is |d| * E|<u, e>| over
    # random unit directions u, i.e. |d| / sqrt(3) in 3D on average over directions.
    d = np.linalg.norm(rgb2lab(a[:1, :1] / 255.0) - rgb2lab(c[:1, :1] / 255.0))
    got = metrics.color(a, c, projections=4096)
    assert got == pytest.approx(d / np.sqrt(3), rel=0.05)


def test_swd_zero_at_the_style_and_positive_elsewhere(vgg_params, imgs):
    x, _, s = imgs
    spec = metrics.EvalSpec(metrics=("swd",), swd_layers=("block1_conv2", "block2_conv1"))
    assert metrics.evaluate(vgg_params, s, s, s, spec)["swd"] == pytest.approx(0.0, abs=1e-6)
    assert metrics.evaluate(vgg_params, x, x, s, spec)["swd"] > 0.01


def test_registry_plugins_and_faults(vgg_params, imgs, tmp_path):
    x, c, s = imgs
    plug = tmp_path / "my_metric.py"
    plug.write_text("from nstjax import metrics\n"
                    "metrics.register('mean_abs', lambda inp: float(abs(inp.x).mean()), "
                    "better='lower', replace=True)\n")
    metrics.load_plugins([str(plug)])
    got = metrics.evaluate(vgg_params, x, c, s, metrics.EvalSpec(metrics=("mean_abs",)))
    assert got == {"mean_abs": pytest.approx(float(np.abs(x).mean()))}
    assert metrics.direction("mean_abs") == "lower"
    assert metrics.direction("structure") == "higher"
    assert metrics.direction("style.block1_conv1") == "lower"
    for fn, msg in [(lambda inp: 1 / 0, "metric 'bad': computing it failed: ZeroDivisionError"),
                    (lambda inp: float("nan"), "metric 'bad': returned nan"),
                    (lambda inp: "high", "metric 'bad': returned str"),
                    (lambda inp: {"a": [1, 2]}, "metric 'bad.a': returned list")]:
        metrics.register("bad", fn, replace=True)
        spec = metrics.EvalSpec(metrics=("bad", "mean_abs"))
        with pytest.raises(PluginError, match=msg):
            metrics.evaluate(vgg_params, x, c, s, spec)
        seen = []
        got = metrics.evaluate(vgg_params, x, c, s, spec, on_error=seen.append)
        assert set(got) == {"mean_abs"} and len(seen) == 1 and "\n" not in str(seen[0])
    with pytest.raises(UserError, match="eval.metrics: unknown metric 'nope'"):
        metrics.get("nope")


def test_texture_has_no_content_metrics(vgg_params, imgs):
    x, _, s = imgs
    got = metrics.evaluate(vgg_params, x, None, s)
    assert not any(k.startswith("content") for k in got)
    assert {"weave", "ripple", "color", "swd", "style"} <= set(got) and "structure" not in got


def test_gram_metric_on_vgg19(imgs):
    # The metrics run on the network the params hold: VGG19's layers, VGG19's path to them.
    from nstjax import vgg16
    from nstjax.weights import random_params

    params = {n: {k: jnp.asarray(v) for k, v in p.items()}
              for n, p in random_params(2, convs=vgg16.VGG19_CONVS).items()}
    names = [f"block{b}_conv{i}" for b, k in enumerate((2, 2, 4, 4, 4), 1)
             for i in range(1, k + 1)]
    spec = metrics.EvalSpec(style_layers=("block3_conv4", "block4_conv4"),
                            content_layers=("block4_conv2",), metrics=("gram",))
    x, c, s = imgs
    got = metrics.evaluate(params, x, c, s, spec)
    fx, fc, fs = (np_vgg16(params, im, "block4_conv4", names=names) for im in imgs)
    for n in spec.style_layers:
        assert got[f"style.{n}"] == pytest.approx(np_gatys_style(fx[n][0], fs[n][0]), rel=1e-4)
    ref = 0.5 * np.sum((fx["block4_conv2"] - fc["block4_conv2"]) ** 2)
    assert got["content"] == pytest.approx(ref, rel=1e-4) and ref > 0


def test_shipped_metric_plugin_against_colorsys(vgg_params):
    """configs/plugins/saturation_metric.py, loaded as `eval.plugins` loads it, against HSV
    saturation from the standard library's colorsys, pixel by pixel."""
    import colorsys
    from pathlib import Path

    plugin = Path(__file__).resolve().parents[1] / "configs" / "plugins" / "saturation_metric.py"
    metrics.load_plugins([str(plugin)])
    photo = _scene(32)
    r = np.random.default_rng(3)
    painting = np.clip(r.uniform(0, 255, (32, 32, 3)) * [1.0, 0.6, 0.2], 0, 255)
    x, style = _pre(photo), _pre(painting)

    def ref(rgb):
        return np.mean([colorsys.rgb_to_hsv(*(p / 255.0))[1] for p in rgb.reshape(-1, 3)])

    got = metrics.evaluate(vgg_params, x, x, style, metrics.EvalSpec(metrics=("saturation_gap",)))
    assert got["saturation_gap"] == pytest.approx(abs(ref(photo) - ref(painting)), rel=1e-4)
    assert got["saturation_gap"] > 0.1 and metrics.direction("saturation_gap") == "lower"
    same = metrics.evaluate(vgg_params, style, x, style,
                            metrics.EvalSpec(metrics=("saturation_gap",)))
    assert same["saturation_gap"] == 0.0
