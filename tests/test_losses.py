"""nstjax.losses against the Keras blog post's formulas and the paper's, written out in numpy."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_vgg16, rel_err

from nstjax import losses

POST_STYLE_WEIGHTS = [0.05, 0.2, 0.2, 0.25, 0.3]
# The docs' worked example of a user-defined kind (`adain`), loaded as a config would.
ADAIN = Path(__file__).resolve().parents[1] / "configs" / "plugins" / "adain_loss.py"

# --------------------------------------------------------------------------- float64 references
# Keras-literal ("seed"): x is one image's features (h, w, c), as in the post's code.


def k_gram(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    # backend.batch_flatten(backend.permute_dimensions(x, (2, 0, 1))) -> (c, h*w)
    features = np.transpose(x, (2, 0, 1)).reshape(x.shape[2], -1)
    return features @ features.T / x.size


def k_style_loss(gen: list, style: list, weights: list) -> float:
    """sum_l w_l * sum(mean(square(gram(gen_l) - gram(style_l)), axis=-1)) / size(gen_0)."""
    loss = 0.0
    for g, s, w in zip(gen, style, weights):
        loss += w * np.sum(np.mean(np.square(k_gram(g) - k_gram(s)), axis=-1))
    return loss / np.asarray(gen[0]).size


def k_content_loss(gen: np.ndarray, content: np.ndarray) -> float:
    gen, content = np.asarray(gen, np.float64), np.asarray(content, np.float64)
    return np.sum(np.mean(np.square(gen - content), axis=-1)) / gen.size


# Gatys et al.: F is (M, N) = (h*w, channels).


def g_gram(x: np.ndarray) -> np.ndarray:
    f = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return f.T @ f


def g_style_layer(gen: np.ndarray, style: np.ndarray) -> float:
    h, w, n = gen.shape
    m = h * w
    return np.sum(np.square(g_gram(gen) - g_gram(style))) / (4.0 * n**2 * m**2)


def g_content_loss(gen: np.ndarray, content: np.ndarray) -> float:
    return 0.5 * np.sum(np.square(np.asarray(gen, np.float64) - np.asarray(content, np.float64)))


def np_tv(x: np.ndarray) -> float:
    """Squared vertical plus horizontal neighbour differences, per pixel, as loops."""
    x = np.asarray(x, np.float64)[0]
    h, w, _ = x.shape
    total = 0.0
    for i in range(h):
        for j in range(w):
            if i + 1 < h:
                total += np.sum((x[i + 1, j] - x[i, j]) ** 2)
            if j + 1 < w:
                total += np.sum((x[i, j + 1] - x[i, j]) ** 2)
    return total / (h * w)


def reference_terms(feats_x, feats_c, feats_s, x, spec, style_w, ratio, tv_w, content_w=None):
    """{total, content, style, tv} from float64 features {name: (1,h,w,c)} of image x, the
    content image and the style image."""
    cw = content_w or [1.0] * len(spec.content_layers)
    gen = [feats_x[n][0] for n in spec.style_layers]
    sty = [feats_s[n][0] for n in spec.style_layers]
    if spec.normalization == "seed":
        content = sum(w * k_content_loss(feats_x[n], feats_c[n])
                      for n, w in zip(spec.content_layers, cw))
        style = k_style_loss(gen, sty, style_w)
    else:
        content = sum(w * g_content_loss(feats_x[n], feats_c[n])
                      for n, w in zip(spec.content_layers, cw))
        style = sum(w * g_style_layer(g, s) for g, s, w in zip(gen, sty, style_w))
    tv = np_tv(x)
    out = {"total": style + content / ratio + tv_w * tv, "content": content, "style": style,
           "tv": tv}
    # Per-layer terms, written out on their own (weighted; seed: / size of the FIRST layer).
    for n, g, s, w in zip(spec.style_layers, gen, sty, style_w):
        out[f"style/{n}"] = (w * np.sum(np.mean(np.square(k_gram(g) - k_gram(s)), axis=-1))
                             / gen[0].size if spec.normalization == "seed"
                             else w * g_style_layer(g, s))
    if len(spec.content_layers) > 1:
        for n, w in zip(spec.content_layers, cw):
            f = k_content_loss if spec.normalization == "seed" else g_content_loss
            out[f"content/{n}"] = w * f(feats_x[n], feats_c[n])
    return out


def close(a, b, rtol):
    a, b = float(a), float(b)
    assert abs(a - b) <= rtol * abs(b), (a, b, abs(a - b) / abs(b))


# --------------------------------------------------------------------------- unit formulas


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(7)


def test_gram_seed_and_gatys(rng):
    f = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)
    gs = losses.gram(jnp.asarray(f), "seed")
    gg = losses.gram(jnp.asarray(f), "gatys")
    assert gs.shape == gg.shape == (2, 6, 6)
    for i in range(2):
        assert rel_err(gs[i], k_gram(f[i])) < 1e-6
        assert rel_err(gg[i], g_gram(f[i])) < 1e-6
        # The two differ exactly by the element count h*w*c of one image.
        np.testing.assert_allclose(np.asarray(gg[i]) / (5 * 7 * 6), gs[i], rtol=1e-6)


def test_gram_accumulates_bfloat16_in_float32(rng):
    f = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
    g = losses.gram(jnp.asarray(f, jnp.bfloat16))
    assert g.dtype == jnp.float32
    fb = np.asarray(jnp.asarray(f, jnp.bfloat16).astype(jnp.float32))  # the bf16 values
    assert rel_err(g[0], k_gram(fb[0])) < 1e-6


@pytest.mark.parametrize("norm", ["seed", "gatys"])
def test_content_loss(rng, norm):
    f = rng.standard_normal((1, 6, 5, 8)).astype(np.float32)
    p = rng.standard_normal((1, 6, 5, 8)).astype(np.float32)
    got = losses.content_loss(jnp.asarray(f), jnp.asarray(p), norm)
    ref = k_content_loss(f, p) if norm == "seed" else g_content_loss(f, p)
    close(got, ref, 1e-6)
    assert float(losses.content_loss(jnp.asarray(f), jnp.asarray(f), norm)) == 0.0


@pytest.mark.parametrize("norm", ["seed", "gatys"])
def test_style_loss_over_layers(rng, norm):
    shapes = [(8, 6, 4), (4, 3, 8), (2, 1, 16)]  # different h, w, c per layer
    gen = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    sty = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    w = [0.5, 2.0, 3.0]
    grams = [losses.gram(jnp.asarray(s[None]), norm) for s in sty]
    got = losses.style_loss([jnp.asarray(g[None]) for g in gen], grams,
                            [jnp.float32(v) for v in w], norm)
    if norm == "seed":
        ref = k_style_loss(gen, sty, w)
        # The seed divides by the FIRST layer's size, not each layer's own.
        assert ref * 8 * 6 * 4 == pytest.approx(
            sum(v * np.sum(np.mean((k_gram(g) - k_gram(s)) ** 2, -1))
                for g, s, v in zip(gen, sty, w)))
    else:
        ref = sum(v * g_style_layer(g, s) for g, s, v in zip(gen, sty, w))
    close(got, ref, 1e-5)
    # Per layer (seed: the undivided summed MSE).
    for g, s, a in zip(gen, sty, grams):
        one = losses.style_layer_loss(jnp.asarray(g[None]), a, norm)
        ref1 = (np.sum(np.mean((k_gram(g) - k_gram(s)) ** 2, -1)) if norm == "seed"
                else g_style_layer(g, s))
        close(one, ref1, 1e-5)


def test_tv_loss(rng):
    x = rng.standard_normal((1, 7, 9, 3)).astype(np.float32)
    close(losses.tv_loss(jnp.asarray(x)), np_tv(x), 1e-6)
    # Constant images have none; a single vertical edge of height d costs h * c * d^2 / (h*w).
    assert float(losses.tv_loss(jnp.full((1, 7, 9, 3), 3.0))) == 0.0
    edge = np.zeros((1, 7, 9, 3), np.float32)
    edge[:, :, 4:] = 2.0
    close(losses.tv_loss(jnp.asarray(edge)), 7 * 3 * 4.0 / (7 * 9), 1e-6)


def test_spec_layers_dedup_in_order():
    spec = losses.Spec(content_layers=("block4_conv2",),
                       style_layers=("block1_conv1", "block4_conv2", "block2_conv1"))
    assert spec.layers == ("block4_conv2", "block1_conv1", "block2_conv1")


def test_default_weights():
    spec = losses.Spec(content_layers=("block4_conv2", "block5_conv2"),
                       style_layers=("block1_conv1", "block2_conv1"))
    w = losses.default_weights(spec, [0.25, 4.0], 15.0, tv=0.5)
    assert {k: float(v) for k, v in w["style"].items()} == {"block1_conv1": 0.25,
                                                              "block2_conv1": 4.0}
    assert {k: float(v) for k, v in w["content"].items()} == {"block4_conv2": 1.0,
                                                                "block5_conv2": 1.0}
    assert (float(w["ratio"]), float(w["tv"])) == (15.0, 0.5)
    assert all(jnp.asarray(v).dtype == jnp.float32 for v in jax.tree.leaves(w))
    w2 = losses.default_weights(spec, [1, 1], 2, content_weights=[3, 5])
    assert [float(v) for v in w2["content"].values()] == [3.0, 5.0]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def images():
    r = np.random.default_rng(11)
    return [(50.0 * r.standard_normal((1, 24, 20, 3))).astype(np.float32) for _ in range(3)]


@pytest.fixture(scope="module")
def np_feats(vgg_params, images):
    """float64 numpy features of (x, content, style) through block5_conv2."""
    return [np_vgg16(vgg_params, im, "block5_conv2") for im in images]


@pytest.fixture(scope="module")
def nst_feats(vgg_params, images):
    """nstjax's own features of (x, content, style) through block5_conv2, cast to float64
    (one batched call)."""
    names = losses.vgg16.NAMES[:12]
    out = jax.jit(losses.vgg16.features, static_argnums=(2, 3, 4))(
        vgg_params, jnp.asarray(np.concatenate(images)), names, "avg", "highest")
    return [{n: np.asarray(v[i : i + 1], np.float64) for n, v in out.items()} for i in range(3)]


CASES = {
    # the post: one content layer, five style layers with its weights
    "seed": dict(spec=losses.Spec(normalization="seed"), style_w=POST_STYLE_WEIGHTS, ratio=15.0,
                 tv=0.3, content_w=None),
    "gatys": dict(spec=losses.Spec(content_layers=("block2_conv2", "block4_conv2"),
                                   normalization="gatys"),
                  style_w=[1.0, 0.5, 0.25, 2.0, 3.0], ratio=7.0, tv=0.3, content_w=[0.5, 2.0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_terms_end_to_end(vgg_params, images, np_feats, nst_feats, case):
    c = CASES[case]
    spec = c["spec"]
    x, xc, xs = (jnp.asarray(im) for im in images)
    tgt = jax.jit(losses.targets, static_argnums=3)(vgg_params, xc, xs, spec)
    # Targets: content features and style Grams of the right images.
    for n in spec.content_layers:
        assert tgt["content"][n].shape == np_feats[1][n].shape
        assert rel_err(tgt["content"][n], np_feats[1][n]) < 1e-4
    gram_ref = k_gram if case == "seed" else g_gram
    for n in spec.style_layers:
        c_n = np_feats[2][n].shape[-1]
        assert tgt["style"][n].shape == (1, c_n, c_n)
        assert rel_err(tgt["style"][n][0], gram_ref(np_feats[2][n][0])) < 1e-4

    w = losses.default_weights(spec, c["style_w"], c["ratio"], c["tv"], c["content_w"])
    terms = jax.jit(losses.loss_terms, static_argnums=4)(vgg_params, x, tgt, w, spec)
    per_layer = {f"style/{n}" for n in spec.style_layers}
    if len(spec.content_layers) > 1:
        per_layer |= {f"content/{n}" for n in spec.content_layers}
    assert set(terms) == {"total", "content", "style", "tv"} | per_layer

    # 1) The loss formulas, on the very features nstjax computed (cast to float64).
    ref = reference_terms(*nst_feats, images[0], spec, c["style_w"], c["ratio"], c["tv"],
                          c["content_w"])
    for k in ref:
        close(terms[k], ref[k], 1e-5)
    # 2) Fully independent: features from the float64 numpy forward.
    ref = reference_terms(*np_feats, images[0], spec, c["style_w"], c["ratio"], c["tv"],
                          c["content_w"])
    for k in ref:
        close(terms[k], ref[k], 1e-5)
    # All three terms matter in this test (none is negligible against the total).
    for k in ("content", "style", "tv"):
        assert float(terms[k]) > 0
    # The per-layer terms add up to `style` (and `content`) as float64 sums of the float32 terms.
    close(sum(np.float64(terms[k]) for k in per_layer if k.startswith("style/")), terms["style"],
          1e-6)
    if len(spec.content_layers) > 1:
        close(sum(np.float64(terms[f"content/{n}"]) for n in spec.content_layers),
              terms["content"], 1e-6)


def test_objective_weights_and_targets_are_arguments(vgg_params):
    spec = losses.Spec(content_layers=("block2_conv2",),
                       style_layers=("block1_conv1", "block2_conv1", "block3_conv1"))
    r = np.random.default_rng(3)
    x, xc, xs, xc2 = (jnp.asarray(r.standard_normal((1, 16, 12, 3)) * 50, jnp.float32)
                      for _ in range(4))
    f = jax.jit(losses.objective(spec))
    tgt = losses.targets(vgg_params, xc, xs, spec)
    w1 = losses.default_weights(spec, [1.0, 2.0, 3.0], 10.0, tv=0.0)
    w2 = losses.default_weights(spec, [3.0, 6.0, 9.0], 4.0, tv=0.5)
    total1, t1 = f(x, vgg_params, tgt, w1)
    total2, t2 = f(x, vgg_params, tgt, w2)
    assert f._cache_size() == 1
    assert float(total1) == float(t1["total"])
    close(t2["style"], 3.0 * float(t1["style"]), 1e-6)
    close(t2["content"], t1["content"], 1e-6)
    close(t2["tv"], t1["tv"], 1e-6)
    close(t1["total"], float(t1["style"]) + float(t1["content"]) / 10.0, 1e-6)
    close(total2, 3.0 * float(t1["style"]) + float(t1["content"]) / 4.0 + 0.5 * float(t1["tv"]),
          1e-6)
    assert abs(float(total2) - float(total1)) > 1e-3 * abs(float(total1))

    # New targets (another content image), same compiled program.
    tgt2 = losses.targets(vgg_params, xc2, xs, spec)
    _, t3 = f(x, vgg_params, tgt2, w1)
    assert f._cache_size() == 1
    close(t3["style"], t1["style"], 1e-6)
    fx = losses.vgg16.features(vgg_params, x, ["block2_conv2"])["block2_conv2"]
    fc2 = losses.vgg16.features(vgg_params, xc2, ["block2_conv2"])["block2_conv2"]
    close(t3["content"], k_content_loss(fx, fc2), 1e-5)
    assert abs(float(t3["content"]) - float(t1["content"])) > 1e-3 * float(t1["content"])


def _positive_params(rng, n_layers: int) -> dict:
    """Params for which every pre-activation is positive on positive images, so that no ReLU
    kink is crossed and the loss is a smooth polynomial of x (finite differences are exact to
    O(h^4))."""
    from nstjax.weights import VGG16_CONVS

    return {
        name: {"kernel": jnp.asarray(np.abs(rng.standard_normal((3, 3, cin, cout))) / (9 * cin)),
               "bias": jnp.asarray(0.1 + rng.random(cout))}
        for name, cin, cout in VGG16_CONVS[:n_layers]
    }


@pytest.mark.parametrize("norm", ["seed", "gatys"])
def test_gradient_matches_finite_differences(norm):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = _positive_params(rng, 4)
        spec = losses.Spec(content_layers=("block2_conv1",),
                           style_layers=("block1_conv1", "block1_conv2", "block2_conv2"),
                           normalization=norm)
        xc, xs, x = (jnp.asarray(1.0 + rng.random((1, 8, 10, 3))) for _ in range(3))
        tgt = losses.targets(params, xc, xs, spec)
        fun = jax.jit(losses.objective(spec))
        # Each term alone, so a wrong gradient of a small term cannot hide behind a large one.
        for cw, sw, tv in [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1e3, 0.1)]:
            w = losses.default_weights(spec, [0.3 * sw, sw, 2.0 * sw], 3.0, tv, [cw])
            w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), w)

            def f(y, w=w):
                return fun(y, params, tgt, w)[0]

            g = jax.grad(f)(x)
            gnorm = float(jnp.linalg.norm(g))
            assert gnorm > 0
            dirs = [g / gnorm] + [jnp.asarray(rng.standard_normal(x.shape)) for _ in range(2)]
            h = 0.1
            for v in dirs:
                v = v / jnp.linalg.norm(v)
                fd = (-f(x + 2 * h * v) + 8 * f(x + h * v) - 8 * f(x - h * v) + f(x - 2 * h * v))
                fd = float(fd) / (12 * h)
                # Features and Grams are float32 inside (see report), hence 1e-4, not 1e-8.
                assert abs(fd - float(jnp.vdot(g, v))) <= 1e-4 * gnorm, (cw, sw, tv)


# --------------------------------------------------------------------------- loss kinds


def test_spec_defaults_match_the_config():
    from nstjax import config

    spec, cfg = losses.Spec(), config.validate({"content": "c.png", "style": "s.png"}, "t")
    assert spec.precision == cfg.model.precision == "default"
    assert spec.kind == "gram" and spec.pooling == cfg.model.pooling
    assert spec.normalization == cfg.loss.normalization
    assert list(spec.style_layers) == cfg.loss.style_layers


def test_unknown_kind_is_a_user_error_listing_the_kinds(vgg_params):
    from nstjax.errors import UserError

    losses.load_plugin(str(ADAIN))
    assert {"gram", "adain"} <= set(losses.kinds())
    spec = losses.Spec(kind="nope")
    for call in (lambda: losses.kind("nope"), lambda: losses.objective(spec),
                 lambda: losses.targets(vgg_params, jnp.zeros((1, 16, 16, 3)),
                                        jnp.zeros((1, 16, 16, 3)), spec)):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith("loss.kind: unknown loss kind 'nope'") and "\n" not in msg
        assert "adain" in msg and "gram" in msg


def test_register_refuses_duplicates_and_bad_names():
    k = losses.kind("gram")
    with pytest.raises(ValueError, match="taken by the built-in loss kind .gram."):
        losses.register("gram", targets=k.targets, terms=k.terms)
    with pytest.raises(ValueError, match="identifier"):
        losses.register("bad name", targets=k.targets, terms=k.terms)
    with pytest.raises(TypeError):
        losses.register("t_nocall", targets=k.targets, terms=None)
    assert losses.kind("gram") is k


def np_stats(f: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and sqrt(var + eps) over the positions of one image's (h, w, c)."""
    f = np.asarray(f, np.float64).reshape(-1, f.shape[-1])
    mean = f.sum(0) / f.shape[0]
    var = ((f - mean) ** 2).sum(0) / f.shape[0]
    return mean, np.sqrt(var + eps)


def test_adain_kind_against_float64_numpy(vgg_params, images, np_feats):
    losses.load_plugin(str(ADAIN))
    spec = losses.Spec(style_layers=("block1_conv1", "block2_conv2", "block3_conv1"),
                       kind="adain", precision="highest")
    style_w, ratio, tv_w = [2.0, 0.5, 1.5], 4.0, 1e-5
    x, xc, xs = (jnp.asarray(im) for im in images)
    tgt = losses.targets(vgg_params, xc, xs, spec)
    for n in spec.style_layers:
        m, s = np_stats(np_feats[2][n][0])
        assert rel_err(tgt["style"][n]["mean"][0], m) < 1e-5
        assert rel_err(tgt["style"][n]["std"][0], s) < 1e-5
    w = losses.default_weights(spec, style_w, ratio, tv_w)
    total, terms = jax.jit(losses.objective(spec))(x, vgg_params, tgt, w)
    ref = {}
    for n, wl in zip(spec.style_layers, style_w):
        (mx, sx), (ms, ss) = np_stats(np_feats[0][n][0]), np_stats(np_feats[2][n][0])
        ref[f"style/{n}"] = wl * (np.sum((mx - ms) ** 2 + (sx - ss) ** 2)
                                  / np.sum(ms**2 + ss**2))
    ref["style"] = sum(ref.values())
    ref["content"] = k_content_loss(np_feats[0]["block4_conv2"], np_feats[1]["block4_conv2"])
    ref["tv"] = np_tv(images[0])
    ref["total"] = ref["style"] + ref["content"] / ratio + tv_w * ref["tv"]
    assert set(terms) == set(ref)
    for k in ref:
        close(terms[k], ref[k], 1e-4)
    assert float(total) == float(terms["total"])
    for k in ("content", "style", "tv"):  # each term matters in the total
        assert float(terms[k]) > 1e-3 * float(total) * (ratio if k == "content" else 1.0)
    # Not the Gram loss: same spec otherwise, a different style term.
    gspec = losses.Spec(**{**spec.__dict__, "kind": "gram"})
    _, gterms = losses.objective(gspec)(x, vgg_params, losses.targets(vgg_params, xc, xs, gspec),
                                        w)
    assert abs(float(gterms["style"]) - float(terms["style"])) > 1e-3 * float(terms["style"])
    close(gterms["content"], terms["content"], 1e-6)


def test_a_user_kind_through_targets_and_objective(vgg_params, images, np_feats):
    """A kind registered from outside the package: its targets are jitted (spec static), the
    kind is part of the Spec (so of every cache key), and replacing it drops compiled targets."""
    calls = []

    def t(params, cx, sx, spec):
        calls.append(spec.kind)
        f = losses.vgg16.features(params, sx, spec.style_layers, spec.pooling, spec.precision)
        return {n: jnp.mean(f[n]) for n in spec.style_layers}

    def terms(params, x, tgt, weights, spec):
        f = losses.vgg16.features(params, x, spec.style_layers, spec.pooling, spec.precision)
        per = {f"style/{n}": weights["style"][n] * (jnp.mean(f[n]) - tgt[n]) ** 2
               for n in spec.style_layers}
        return {"total": sum(per.values()), **per}

    losses.register("t_meanonly", targets=t, terms=terms, replace=True)
    spec = losses.Spec(style_layers=("block1_conv1",), kind="t_meanonly", precision="highest")
    x, xc, xs = (jnp.asarray(im) for im in images)
    tgt = losses.targets(vgg_params, xc, xs, spec)
    losses.targets(vgg_params, xc, xs, spec)
    assert calls == ["t_meanonly"]  # traced once, then the compiled program
    w = losses.default_weights(spec, [3.0], 1.0)
    total, tr = losses.objective(spec)(x, vgg_params, tgt, w)
    ref = 3.0 * (np_feats[0]["block1_conv1"].mean() - np_feats[2]["block1_conv1"].mean()) ** 2
    close(total, ref, 1e-4)
    assert set(tr) == {"total", "style/block1_conv1"}

    def t2(params, cx, sx, spec):
        calls.append("v2")
        return {n: jnp.float32(0.0) for n in spec.style_layers}

    losses.register("t_meanonly", targets=t2, terms=terms, replace=True)
    tgt2 = losses.targets(vgg_params, xc, xs, spec)
    assert calls == ["t_meanonly", "v2"] and float(tgt2["block1_conv1"]) == 0.0


def test_targets_is_the_one_jitted_program(vgg_params, images):
    """losses.targets equals a jit of the Gram targets bit for bit (the run's numbers)."""
    spec = losses.Spec(style_layers=("block1_conv2", "block2_conv2"))
    xc, xs = jnp.asarray(images[1]), jnp.asarray(images[2])
    a = losses.targets(vgg_params, xc, xs, spec)
    b = jax.jit(losses.gram_targets, static_argnums=3)(vgg_params, xc, xs, spec)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert hasattr(losses.targets, "lower")  # a jitted function, not a wrapper


def test_load_plugin_registers_from_a_file(tmp_path):
    from nstjax.errors import UserError

    (tmp_path / "myloss.py").write_text(
        "from nstjax import losses\n"
        "g = losses.kind('gram')\n"
        "losses.register('t_plugin', targets=g.targets, terms=g.terms, replace=True)\n")
    losses.load_plugin("myloss.py", here=tmp_path)
    assert losses.kind("t_plugin").terms is losses.loss_terms
    with pytest.raises(UserError, match="not found"):
        losses.load_plugin("missing.py", here=tmp_path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match="broken.py: importing the loss plugin failed: "
                                        "RuntimeError: boom"):
        losses.load_plugin(str(tmp_path / "broken.py"))


def test_demo_plugin_centered_gram(vgg_params, images, np_feats):
    """configs/plugins/centered_gram.py: a kind defined outside the package, against numpy."""
    from pathlib import Path

    losses.load_plugin(str(Path(__file__).resolve().parents[1] / "configs" / "plugins"
                           / "centered_gram.py"))
    spec = losses.Spec(style_layers=("block1_conv2", "block3_conv1"), kind="centered_gram",
                       precision="highest")
    x, xc, xs = (jnp.asarray(im) for im in images)
    w = losses.default_weights(spec, [0.7, 1.3], 2.0, 1e-5)
    tgt = losses.targets(vgg_params, xc, xs, spec)
    _, terms = losses.objective(spec)(x, vgg_params, tgt, w)

    def cov(f):
        f = np.asarray(f[0], np.float64).reshape(-1, f.shape[-1])
        f = f - f.mean(0)
        return f.T @ f / f.shape[0]

    for n, wl in zip(spec.style_layers, [0.7, 1.3]):
        cs = cov(np_feats[2][n])
        ref = wl * np.sum((cov(np_feats[0][n]) - cs) ** 2) / np.sum(cs**2)
        close(terms[f"style/{n}"], ref, 1e-4)
    content = k_content_loss(np_feats[0]["block4_conv2"], np_feats[1]["block4_conv2"])
    close(terms["total"], float(terms["style"]) + content / 2.0 + 1e-5 * np_tv(images[0]), 1e-4)


@pytest.mark.parametrize("norm", ["seed", "gatys"])
def test_size_exponents_on_tiled_features(norm):
    """Features tiled 2x2 have the same per-position statistics at 4x the pixels: the style
    term scales by 4^s, the content term by 4^c (s, c from size_exponents), exactly; and
    size_balanced's ratio and tv keep style : content / ratio : tv x TV at the reference."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(1, 6, 5, 8)).astype(np.float32)
    p = rng.normal(size=(1, 6, 5, 8)).astype(np.float32)
    a = np.asarray(losses.gram(jnp.asarray(rng.normal(size=(1, 6, 5, 8)), jnp.float32), norm))
    big_f, big_p = np.tile(f, (1, 2, 2, 1)), np.tile(p, (1, 2, 2, 1))
    big_a = a * (4.0 if norm == "gatys" else 1.0)  # a summed Gram grows with the positions
    s, c, t = losses.size_exponents(norm)
    one = jnp.float32(1.0)
    st = float(losses.style_loss([jnp.asarray(f)], [jnp.asarray(a)], [one], norm))
    st4 = float(losses.style_loss([jnp.asarray(big_f)], [jnp.asarray(big_a)], [one], norm))
    ct = float(losses.content_loss(jnp.asarray(f), jnp.asarray(p), norm))
    ct4 = float(losses.content_loss(jnp.asarray(big_f), jnp.asarray(big_p), norm))
    assert st4 / st == pytest.approx(4.0**s, rel=1e-5)
    assert ct4 / ct == pytest.approx(4.0**c, rel=1e-5)
    assert t == 0
    ratio, tv = losses.size_balanced(1000.0, 0.5, 4 * 30, 30, norm)
    # at 4x the pixels: style / (content / ratio) as at the reference
    assert st4 / (ct4 / ratio) == pytest.approx(st / (ct / 1000.0), rel=1e-5)
    assert tv == pytest.approx(0.5 * 4.0 ** (s - t))
    assert losses.size_exponents("seed", "content") == (0, 0, 0)


def test_reference_pixels_rescales_the_problems_weights(tmp_path):
    """A config with loss.reference_pixels: the problem's ratio and tv weight at 32x32 are the
    given ones times (1024 / ref) and (ref / 1024) (seed normalization), recorded in info."""
    from conftest import TINY

    from nstjax import config, problem

    cfg = config.validate({**TINY, "loss": {**TINY["loss"], "style_to_content_ratio": 100.0,
                                            "tv_weight": 2.0, "reference_pixels": 4096}})
    pr = problem.build(cfg)
    k = 1024 / 4096
    assert float(pr.weights["ratio"]) == pytest.approx(100.0 * k, rel=1e-6)
    assert float(pr.weights["tv"]) == pytest.approx(2.0 / k, rel=1e-6)
    assert pr.info["balance"] == {"pixels": 1024, "reference_pixels": 4096,
                                  "style_to_content_ratio": pytest.approx(25.0),
                                  "tv_weight": pytest.approx(8.0)}
    plain = problem.build(config.validate({**TINY, "loss": {**TINY["loss"],
                                                            "style_to_content_ratio": 100.0}}))
    assert float(plain.weights["ratio"]) == 100.0 and "balance" not in plain.info
