"""nstjax.problem: one build from a Config (blend weights, depth checks, masks per layer,
targets against a float64 numpy reference)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DEMO, TINY, np_pool2x2, np_vgg16
from PIL import Image

from nstjax import config, image, losses, problem
from nstjax.errors import UserError


def make_cfg(**extra) -> config.Config:
    return config.validate(config.merge(TINY, extra))


def test_blend_weights_are_normalized():
    two = [str(DEMO / "content.png"), str(DEMO / "style.png")]
    np.testing.assert_allclose(problem.blend_weights(make_cfg(style=two)), [0.5, 0.5])
    np.testing.assert_allclose(
        problem.blend_weights(make_cfg(style=two, style_blend=[3, 1])), [0.75, 0.25])
    np.testing.assert_allclose(problem.blend_weights(make_cfg()), [1.0])


def test_check_depth_names_the_layer():
    problem.check_depth((8, 8), ["block4_conv1"], "x is", "fix")
    with pytest.raises(UserError, match="x is 8x7 pixels, but layer block4_conv1 needs at least 8"):
        problem.check_depth((8, 7), ["block1_conv1", "block4_conv1"], "x is", "fix")
    with pytest.raises(UserError, match="style_scale 0.1 makes the style images 3x3"):
        problem.build(make_cfg(style_scale=0.1, loss={"style_layers": ["block3_conv1"],
                                                      "style_weights": [1.0]}))


def test_layer_masks_pool_as_the_network_does():
    rng = np.random.default_rng(1)
    m = rng.random((2, 11, 9))
    got = problem.layer_masks(m, ["block1_conv1", "block2_conv2", "block3_conv1"])
    for name, blocks in (("block1_conv1", 0), ("block2_conv2", 1), ("block3_conv1", 2)):
        ref = m[..., None]
        for _ in range(blocks):  # the numpy VGG's own pooling (conftest), float64
            ref = np_pool2x2(ref, "avg")
        assert got[name].shape == ref.shape
        np.testing.assert_allclose(got[name], ref, rtol=1e-6)


def test_two_styles_blend_their_grams_linearly(tmp_path, vgg_params):
    """Targets of style [a, b] with blend [3, 1] = 0.75 G(a) + 0.25 G(b), G in float64."""
    rng = np.random.default_rng(2)
    paths = []
    for name in ("a", "b"):
        p = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(p)
        paths.append(str(p))
    cfg = make_cfg(style=paths, style_blend=[3, 1])
    params = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in vgg_params.items()}
    p = problem.build(cfg, params, {"source": "test"})
    want = 0
    for path, w in zip(paths, (0.75, 0.25)):
        f = np_vgg16(params, image.load(path, [32, 32]), "block1_conv1")["block1_conv1"]
        flat = f.reshape(-1, f.shape[-1])
        want = want + w * (flat.T @ flat) / flat.size
    got = np.asarray(p.targets["style"]["block1_conv1"], np.float64)
    assert got.shape == (1, 64, 64)
    np.testing.assert_allclose(got[0], want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
    assert p.info["style_blend"] == [0.75, 0.25] and p.spec == problem.spec_of(cfg)
    assert p.weights["style"]["block1_conv1"] == np.float32(1.0)


def test_initial_image_noise_is_the_posts_uniform():
    content = np.zeros((1, 8, 8, 3), np.float32)
    x0 = np.asarray(problem.initial_image(make_cfg(init="noise"), content, content))
    assert x0.shape == content.shape and np.abs(x0).max() <= 0.025 and x0.std() > 0.01
    assert isinstance(problem.spec_of(make_cfg()), losses.Spec)


def test_final_metrics_blend_the_styles_at_their_own_size(vgg_params):
    """Two styles at half the content's size, blended 1:3: the style reference is the blend of
    their per-position Grams; the content is the image as given (float64 numpy reference)."""
    from types import SimpleNamespace

    two = [str(DEMO / "style.png"), str(DEMO / "content.png")]
    cfg = make_cfg(style=two, style_blend=[1, 3], style_scale=0.5, image={"size": [32, 24]},
                   eval={"style_layers": ["block1_conv2", "block2_conv1"],
                         "content_layers": ["block2_conv1"], "metrics": ["gram"]})
    rng = np.random.default_rng(3)
    x = image.load(DEMO / "content.png", [32, 24]) + rng.normal(0, 20, (1, 24, 32, 3))
    got = problem.final_metrics(cfg, x.astype(np.float32), SimpleNamespace(params=vgg_params))
    params = {k: {n: np.asarray(a) for n, a in v.items()} for k, v in vgg_params.items()}

    def grams(a):
        f = np_vgg16(params, a, "block2_conv1")
        out = {}
        for n in ("block1_conv2", "block2_conv1"):
            m = f[n][0].reshape(-1, f[n].shape[-1])
            out[n] = m.T @ m / m.shape[0]
        return out, f

    gx, fx = grams(x)
    g1, _ = grams(image.load(two[0], [16, 12]))
    g2, _ = grams(image.load(two[1], [16, 12]))
    _, fc = grams(image.load(DEMO / "content.png", [32, 24]))
    want = {f"style.{n}": np.sum((gx[n] - (0.25 * g1[n] + 0.75 * g2[n])) ** 2)
            / (4 * gx[n].shape[0] ** 2) for n in gx}
    want["style"] = sum(want.values())
    want["content"] = 0.5 * np.sum((fx["block2_conv1"] - fc["block2_conv1"]) ** 2)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-4), k
    with pytest.raises(ValueError, match="the final image is"):
        problem.final_metrics(cfg, x[:, :12], SimpleNamespace(params=vgg_params))


@pytest.mark.parametrize("mode", ["content", "layers"])
@pytest.mark.parametrize("norm", ["gatys", "seed"])
def test_style_norm_gives_each_layer_its_weight_at_the_content(vgg_params, norm, mode):
    """style_norm: content divides layer l's weight by E_l(content), the post's/paper's layer
    term written in numpy, so at the content each layer contributes exactly its weight;
    `layers` multiplies that by the geometric mean of the E_l (the sum keeps its scale)."""
    layers = ["block1_conv1", "block2_conv1", "block3_conv1"]
    cfg = make_cfg(loss={"style_weights": [1.0, 2.0, 3.0], "style_layers": layers,
                         "normalization": norm, "style_norm": mode})
    params = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in vgg_params.items()}
    p = problem.build(cfg, params, {"source": "test"})
    fc = np_vgg16(params, np.asarray(p.content), "block3_conv1")
    fs = np_vgg16(params, np.asarray(p.style), "block3_conv1")
    first = fc[layers[0]].size
    es = []
    for n in layers:
        a, b = (f[n].reshape(-1, f[n].shape[-1]).astype(np.float64) for f in (fc, fs))
        if norm == "gatys":
            e = np.sum((a.T @ a - b.T @ b) ** 2) / (4 * a.shape[1] ** 2 * a.shape[0] ** 2)
        else:  # the post: Grams / (h w c), summed last-axis MSE, / the first layer's size
            e = np.sum(np.mean((a.T @ a / a.size - b.T @ b / b.size) ** 2, -1)) / first
        es.append(e)
    g = (es[0] * es[1] * es[2]) ** (1 / 3) if mode == "layers" else 1.0
    for i, (n, e) in enumerate(zip(layers, es)):
        assert float(p.weights["style"][n]) == pytest.approx((i + 1) * g / e, rel=2e-3), n
        assert p.info["style_norm"][n] == pytest.approx(e, rel=2e-3)


def _rgb_stats(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = np.asarray(a, np.float64).reshape(-1, 3)
    return flat.mean(0), np.cov(flat, rowvar=False, bias=True)


def test_initial_image_content_matched_takes_the_styles_mean_and_covariance():
    """x0 = the content with the style pixels' RGB mean and covariance (numpy float64 moments,
    not image.match_histogram); two styles pool their pixels. Narrow ranges keep clipping out."""
    rng = np.random.default_rng(7)
    content = rng.normal(128, 12, (1, 10, 12, 3)) @ np.array([[1, .3, 0], [0, 1, .2], [0, 0, 1]])
    styles = np.stack([rng.normal(mu, 9, (10, 12, 3)) for mu in ((90, 120, 160), (110, 100, 140))])
    styles[1, ..., 2] += 0.5 * styles[1, ..., 0]
    pre = lambda rgb: image.preprocess(rgb)  # noqa: E731
    cfg = make_cfg(init="content_matched")
    x0 = np.asarray(problem.initial_image(
        cfg, pre(content[0]), np.concatenate([pre(s) for s in styles])))
    assert x0.shape == (1, 10, 12, 3) and x0.dtype == np.float32
    got_mu, got_cov = _rgb_stats(image.deprocess_float(x0))
    want_mu, want_cov = _rgb_stats(styles)
    np.testing.assert_allclose(got_mu, want_mu, atol=1e-3)
    np.testing.assert_allclose(got_cov, want_cov, rtol=1e-4, atol=1e-3)
    # the content's own structure stays: x0 is an affine map of the content's pixels
    flat_c = np.c_[content.reshape(-1, 3), np.ones(120)]
    coef, res, *_ = np.linalg.lstsq(flat_c, image.deprocess_float(x0).reshape(-1, 3), rcond=None)
    assert res.max() < 1e-6 * 120


def test_build_with_content_matched_starts_in_the_styles_colours():
    p = problem.build(make_cfg(init="content_matched"))
    got_mu, _ = _rgb_stats(image.deprocess_float(np.asarray(p.x0)))
    want_mu, _ = _rgb_stats(image.deprocess_float(np.asarray(p.style)))
    content_mu, _ = _rgb_stats(image.deprocess_float(np.asarray(p.content)))
    assert np.abs(got_mu - want_mu).max() < 3.0 < np.abs(content_mu - want_mu).max()


def test_content_matched_needs_a_content_image():
    with pytest.raises(UserError, match="init: content_matched needs a content image"):
        make_cfg(content=None, init="content_matched")
