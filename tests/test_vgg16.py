"""nstjax.vgg16 against a float64 numpy reference of the Keras VGG16 conv stack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_conv3x3_same, np_vgg16, rel_err

from nstjax import vgg16

# Odd sizes at two pooling stages: 18x22 -> 9x11 -> 4x5 -> 2x2 -> 1x1.
H, W = 18, 22
UP_TO_B5 = list(vgg16.NAMES[: vgg16.NAMES.index("block5_conv1") + 1])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    # Roughly the scale of a mean-subtracted (caffe-preprocessed) image.
    return (50.0 * np.random.default_rng(1).standard_normal((1, H, W, 3))).astype(np.float32)


@pytest.fixture(scope="module")
def reference(vgg_params, image) -> dict:
    return {p: np_vgg16(vgg_params, image, "block5_conv1", p) for p in ("avg", "max")}


def count_convs(jaxpr) -> int:
    """conv_general_dilated equations in a jaxpr, sub-jaxprs (remat, pjit, ...) included."""

    def subjaxprs(v):
        if hasattr(v, "eqns"):
            yield v
        elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
            yield v.jaxpr
        elif isinstance(v, (tuple, list)):
            for item in v:
                yield from subjaxprs(item)

    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "conv_general_dilated"
        for v in eqn.params.values():
            n += sum(count_convs(j) for j in subjaxprs(v))
    return n


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_matches_numpy_reference(vgg_params, image, reference, pooling):
    out = vgg16.features(vgg_params, jnp.asarray(image), UP_TO_B5, pooling, "highest")
    ref = reference[pooling]
    assert list(out) == UP_TO_B5
    for name in UP_TO_B5:
        assert out[name].shape == ref[name].shape, name
        assert out[name].dtype == jnp.float32
        assert rel_err(out[name], ref[name]) < 1e-4, name
    # Pooled sizes: odd dimensions drop their last row/column (Keras 'valid' pooling).
    assert out["block3_conv1"].shape == (1, 4, 5, 256)
    assert out["block4_conv1"].shape == (1, 2, 2, 512)
    assert out["block5_conv1"].shape == (1, 1, 1, 512)


def test_avg_and_max_pooling_differ(vgg_params, image, reference):
    # Sanity of the test itself: the two poolings give clearly different features, so each
    # reference comparison above really distinguishes them.
    a, m = reference["avg"]["block2_conv1"], reference["max"]["block2_conv1"]
    assert rel_err(a, m) > 0.1
    out = vgg16.features(vgg_params, jnp.asarray(image), ["block2_conv1"], "max", "highest")
    assert rel_err(out["block2_conv1"], m) < 1e-4
    assert rel_err(out["block2_conv1"], a) > 0.1


def test_subset_of_layers_equals_full_forward(vgg_params, image):
    x = jnp.asarray(image)
    full = vgg16.features(vgg_params, x, vgg16.NAMES, "avg", "highest")
    one = vgg16.features(vgg_params, x, ["block2_conv1"], "avg", "highest")
    assert list(one) == ["block2_conv1"]
    np.testing.assert_allclose(one["block2_conv1"], full["block2_conv1"], rtol=1e-6, atol=1e-6)
    # Order and duplicates of the request are kept as asked.
    two = vgg16.features(vgg_params, x, ["block3_conv2", "block1_conv1"], "avg", "highest")
    assert list(two) == ["block3_conv2", "block1_conv1"]
    np.testing.assert_allclose(two["block3_conv2"], full["block3_conv2"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("layers", "n_convs"),
    [(["block1_conv2"], 2), (["block3_conv1"], 5), (["block1_conv1", "block2_conv2"], 4),
     (["block5_conv3"], 13)],
)
@pytest.mark.parametrize("remat", [False, True])
def test_computes_no_layer_past_the_deepest(vgg_params, image, layers, n_convs, remat):
    jaxpr = jax.make_jaxpr(
        lambda p, x: vgg16.features(p, x, layers, "avg", "highest", remat))(vgg_params, image)
    assert count_convs(jaxpr.jaxpr) == n_convs


def test_remat_same_values_and_gradients(vgg_params, image):
    layers = ["block1_conv2", "block2_conv2", "block3_conv1"]
    x = jnp.asarray(image) / 50.0

    def scalar(x, params, remat):
        f = vgg16.features(params, x, layers, "avg", "highest", remat)
        return sum(jnp.sum(jnp.sin(v)) for v in f.values())  # nonlinear in every element

    vg = jax.jit(jax.value_and_grad(scalar), static_argnums=2)
    v0, g0 = vg(x, vgg_params, False)
    v1, g1 = vg(x, vgg_params, True)
    assert abs(float(v1) - float(v0)) <= 1e-5 * abs(float(v0)) + 1e-5
    assert float(jnp.max(jnp.abs(g0))) > 0
    assert rel_err(g1, g0) < 1e-5

    # remat really wraps each block in a checkpoint (3 blocks here), and plain mode does not.
    def n_remat(remat):
        j = jax.make_jaxpr(lambda x: vgg16.features(vgg_params, x, layers, "avg", "highest",
                                                    remat))(x)
        return sum("remat" in e.primitive.name or "checkpoint" in e.primitive.name
                   for e in j.jaxpr.eqns)

    assert (n_remat(False), n_remat(True)) == (0, 3)

    f0 = vgg16.features(vgg_params, x, layers, "avg", "highest", False)
    f1 = vgg16.features(vgg_params, x, layers, "avg", "highest", True)
    for n in layers:
        np.testing.assert_allclose(f1[n], f0[n], rtol=1e-6, atol=1e-6)


def test_bfloat16_close_to_highest(vgg_params, image, reference):
    x = jnp.asarray(image)
    hi = vgg16.features(vgg_params, x, UP_TO_B5, "avg", "highest")
    bf = vgg16.features(vgg_params, x, UP_TO_B5, "avg", "bfloat16")
    for n in UP_TO_B5:
        assert bf[n].dtype == jnp.float32, n
        a = np.asarray(bf[n], np.float64)
        b = np.asarray(hi[n], np.float64)
        # bf16 keeps 8 significant bits (~4e-3); a few layers of it stay within ~1e-2 overall.
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2, n
    # ... and it really ran in reduced precision (not silently in float32).
    first = "block1_conv1"
    assert rel_err(bf[first], reference["avg"][first]) > 1e-5


def test_default_precision_runs(vgg_params, image, reference):
    out = vgg16.features(vgg_params, jnp.asarray(image), ["block2_conv2"], "avg", "default")
    assert out["block2_conv2"].dtype == jnp.float32
    # TF32 where the hardware has it; on CPU this is float32 anyway.
    assert rel_err(out["block2_conv2"], reference["avg"]["block2_conv2"]) < 1e-2


def test_unknown_layer_raises(vgg_params, image):
    with pytest.raises(ValueError, match="block6_conv1"):
        vgg16.features(vgg_params, jnp.asarray(image), ["block1_conv1", "block6_conv1"])
    with pytest.raises(ValueError):
        vgg16.features(vgg_params, jnp.asarray(image), ["block1_pool"])


def test_unknown_pooling_raises(vgg_params, image):
    with pytest.raises(ValueError, match="min"):
        vgg16.features(vgg_params, jnp.asarray(image), ["block1_conv1"], pooling="min")


def test_block_number():
    assert vgg16.block("block4_conv2") == 4
    assert [vgg16.block(n) for n in vgg16.NAMES] == [1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert vgg16.CHANNELS["block3_conv3"] == 256


# --------------------------------------------------------------------------- custom-VJP conv

LAX_PRECISION = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT,
                 "bfloat16": None}


def plain_conv(x, kernel, precision="highest", algo="direct", prepared=None):
    """The convolution as jax.grad differentiates it by default (what vgg16.conv replaces)."""
    if precision == "bfloat16":
        x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=LAX_PRECISION[precision])


def conv_layer_loss(conv, precision, remat):
    """grad (x, kernel, bias) of a nonlinear scalar of relu(conv + bias), jitted."""

    def f(x, k, b):
        y = conv(x, k, precision)
        y = jax.nn.relu(y + b.astype(y.dtype).reshape(1, 1, 1, -1))
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    return jax.jit(jax.grad(jax.checkpoint(f) if remat else f, argnums=(0, 1, 2)))


@pytest.fixture(scope="module")
def conv_data():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 7, 9, 5)).astype(np.float32)  # odd sizes
    k = (0.3 * rng.standard_normal((3, 3, 5, 6))).astype(np.float32)
    b = (0.5 * rng.standard_normal(6)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(k), jnp.asarray(b)


@pytest.mark.parametrize("precision", vgg16.PRECISIONS)
@pytest.mark.parametrize("remat", [False, True])
def test_conv_gradients_equal_plain_conv(conv_data, precision, remat):
    ours = conv_layer_loss(vgg16.conv, precision, remat)(*conv_data)
    ref = conv_layer_loss(plain_conv, precision, remat)(*conv_data)
    for name, g, r in zip(("x", "kernel", "bias"), ours, ref):
        assert g.dtype == r.dtype == jnp.float32, name
        assert float(jnp.max(jnp.abs(r))) > 0, name
        assert rel_err(g, r) < 1e-6, (name, rel_err(g, r))
    fx = vgg16.conv(conv_data[0], conv_data[1], precision)
    np.testing.assert_array_equal(fx, plain_conv(conv_data[0], conv_data[1], precision))


def test_conv_gradients_match_numpy(conv_data):
    # Hand-derived float64 reference: for L = sum(conv(x, k) * G),
    # dL/dk[i,j,c,o] = sum_nhw xpad[n,h+i,w+j,c] G[n,h,w,o] and dL/dx = conv(G, k flipped, c<->o).
    x, k, _ = (np.asarray(a, np.float64) for a in conv_data)
    cot = np.random.default_rng(8).standard_normal((2, 7, 9, 6))
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    gp = np.pad(cot, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dk = np.zeros_like(k)
    dx = np.zeros_like(x)
    for i in range(3):
        for j in range(3):
            dk[i, j] = np.einsum("nhwc,nhwo->co", xp[:, i : i + h, j : j + w], cot)
            dx += np.einsum("nhwo,co->nhwc", gp[:, 2 - i : 2 - i + h, 2 - j : 2 - j + w], k[i, j])
    _, vjp = jax.vjp(lambda a, b: vgg16.conv(a, b, "highest"), conv_data[0], conv_data[1])
    gx, gk = vjp(jnp.asarray(cot, jnp.float32))
    assert rel_err(gx, dx) < 1e-5
    assert rel_err(gk, dk) < 1e-5


def test_conv_under_vmap_and_jit(conv_data):
    x, k, b = conv_data
    xs = jnp.stack([x, 2.0 * x, -x])
    grad = conv_layer_loss(vgg16.conv, "highest", False)
    batched = jax.jit(jax.vmap(grad, in_axes=(0, None, None)))(xs, k, b)
    single = [conv_layer_loss(plain_conv, "highest", False)(xi, k, b) for xi in xs]
    for i in range(3):
        for g, r in zip(batched, single[i]):
            assert rel_err(g[i], r) < 1e-6


def count_transposed_convs(jaxpr) -> int:
    """Convolutions whose kernel is read in/out-swapped: jax.grad's transposed conv."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            n += tuple(eqn.params["dimension_numbers"].rhs_spec) == (2, 3, 0, 1)
        for v in eqn.params.values():
            for j in (v, getattr(v, "jaxpr", None)):
                if hasattr(j, "eqns"):
                    n += count_transposed_convs(j)
    return n


@pytest.mark.parametrize(
    ("precision", "remat", "layers"),
    [("highest", False, ["block1_conv2", "block2_conv2", "block3_conv1", "block4_conv2",
                         "block5_conv2"]),
     ("bfloat16", True, ["block1_conv2", "block2_conv2", "block3_conv1"])],  # bf16 is slow on CPU
)
def test_features_gradient_equals_plain_conv(vgg_params, image, monkeypatch, precision, remat,
                                             layers):
    n_convs = vgg16.NAMES.index(layers[-1]) + 1
    x = jnp.asarray(image)

    def value_and_grad():  # a new function each time: no cached trace is reused
        def scalar(x, params):
            f = vgg16.features(params, x, layers, "avg", precision, remat)
            return sum(jnp.sum(jnp.sin(v / (1.0 + jnp.max(v)))) for v in f.values())

        return jax.value_and_grad(scalar, argnums=(0, 1))

    ours = jax.jit(value_and_grad()).trace(x, vgg_params)
    v1, (gx1, gp1) = ours.lower().compile()(x, vgg_params)
    monkeypatch.setattr(vgg16, "conv", plain_conv)
    plain = jax.jit(value_and_grad()).trace(x, vgg_params)
    v0, (gx0, gp0) = plain.lower().compile()(x, vgg_params)
    # The backward really differs: no transposed convolutions with the custom VJP.
    assert count_transposed_convs(ours.jaxpr.jaxpr) == 0
    assert count_transposed_convs(plain.jaxpr.jaxpr) == n_convs
    assert float(v1) == float(v0)
    assert float(jnp.max(jnp.abs(gx0))) > 0
    assert rel_err(gx1, gx0) < 1e-6
    for n in vgg16.NAMES[:n_convs]:
        for leaf in ("kernel", "bias"):
            assert rel_err(gp1[n][leaf], gp0[n][leaf]) < 1e-6, (n, leaf)


def test_features_under_vmap_with_remat(vgg_params, image):
    # Lanes of a sweep: vmap over images of the remat'd flax module equals one image at a time.
    layers = ["block1_conv2", "block2_conv1"]
    xs = jnp.asarray(image[None, :, :9, :11]) * jnp.array([1.0, -0.5]).reshape(2, 1, 1, 1, 1)

    def scalar(x):
        f = vgg16.features(vgg_params, x, layers, "max", "highest", True)
        return sum(jnp.sum(jnp.sin(v / 50.0)) for v in f.values())

    vg = jax.value_and_grad(scalar)
    values, grads = jax.jit(jax.vmap(vg))(xs)
    for i in range(2):
        v, g = jax.jit(vg)(xs[i])
        assert abs(float(values[i]) - float(v)) <= 1e-5 * abs(float(v))
        assert float(jnp.max(jnp.abs(g))) > 0
        assert rel_err(grads[i], g) < 1e-5


# --- Winograd F(2x2, 3x3) -------------------------------------------------------------------


def np_winograd_kernel(k: np.ndarray) -> np.ndarray:
    # Lavin & Gray (2015), eq. 7: U = G g G^T, G written out.
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    return np.einsum("ai,ijck,bj->abck", g, k.astype(np.float64), g).reshape(16, *k.shape[2:])


def test_winograd_kernel_is_g_k_gt():
    k = np.random.default_rng(3).standard_normal((3, 3, 4, 5)).astype(np.float32)
    got = vgg16.winograd_kernel(jnp.asarray(k))
    assert got.shape == (16, 4, 5)
    assert rel_err(got, np_winograd_kernel(k)) < 1e-7


@pytest.mark.parametrize(("n", "h", "w", "cin", "cout"), [
    (2, 7, 9, 5, 6),       # odd sizes: the last tile row/column is cropped
    (1, 40, 30, 3, 8),
    (1, 1, 1, 4, 4),       # a single pixel
    (2, 69, 64, 3, 5),     # 35 x 32 tiles > MAX_TILES: 16 separate products
])
def test_winograd_conv_matches_numpy(n, h, w, cin, cout):
    rng = np.random.default_rng(h * w)
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    k = rng.standard_normal((3, 3, cin, cout)).astype(np.float32)
    ref = np.stack([np_conv3x3_same(x[i:i + 1].astype(np.float64), k.astype(np.float64),
                                    np.zeros(cout))[0] for i in range(n)])
    got = jax.jit(vgg16.winograd_conv)(jnp.asarray(x), vgg16.winograd_kernel(jnp.asarray(k)))
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-5  # float32 roundoff; the direct convolution's is ~1e-7
    direct = vgg16._lax_conv(jnp.asarray(x), jnp.asarray(k), "highest")
    assert rel_err(got, direct) < 1e-5


def test_uses_winograd_rules():
    assert vgg16.resolve_conv("auto") == ("winograd" if jax.default_backend() == "cpu"
                                          else "direct")
    assert vgg16.uses_winograd(256, 256, "winograd", "highest", 1)
    assert vgg16.uses_winograd(128, 256, "winograd", "default", 1)
    assert not vgg16.uses_winograd(128, 128, "winograd", "highest", 1)  # block2: gains too little
    assert not vgg16.uses_winograd(512, 512, "winograd", "bfloat16", 1)
    assert not vgg16.uses_winograd(512, 512, "direct", "highest", 1)
    # `auto` on CPU: only where the work repays the compile time.
    cpu = jax.default_backend() == "cpu"
    assert vgg16.uses_winograd(512, 512, "auto", "highest", 16) == cpu
    assert not vgg16.uses_winograd(512, 512, "auto", "highest", 15)  # 15 * 512 * 512 < 2**22
    assert vgg16.tiles_at("block1_conv1", (7, 9)) == 4 * 5
    assert vgg16.tiles_at("block3_conv1", (96, 128)) == 12 * 16  # maps of 24x32
    assert vgg16.tiles_at("block5_conv2", (25, 33)) == 1 * 1  # 'valid' pooling: 1x2 maps
    assert vgg16.uses_winograd(512, 512, "winograd", "highest", vgg16.MAX_TILES)
    assert vgg16.uses_winograd(128, 128, "winograd", "highest", vgg16.MAX_TILES + 1)
    assert not vgg16.uses_winograd(64, 64, "winograd", "highest", vgg16.MAX_TILES + 1)
    assert not vgg16.uses_winograd(512, 512, "winograd", "highest", vgg16.MAX_TILES_SPLIT + 1)
    with pytest.raises(ValueError, match="conv must be one of"):
        vgg16.resolve_conv("fft")


@pytest.fixture(scope="module")
def wide_data():
    # 260 output channels: wide enough for Winograd.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 7, 9, 5)).astype(np.float32)
    k = (0.3 * rng.standard_normal((3, 3, 5, 260))).astype(np.float32)
    return x, k


def test_winograd_conv_gradients_match_numpy(wide_data):
    # The same hand-derived float64 reference as for the direct convolution.
    x, k = (a.astype(np.float64) for a in wide_data)
    cot = np.random.default_rng(12).standard_normal((2, 7, 9, 260))
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    gp = np.pad(cot, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dk, dx = np.zeros_like(k), np.zeros_like(x)
    for i in range(3):
        for j in range(3):
            dk[i, j] = np.einsum("nhwc,nhwo->co", xp[:, i : i + h, j : j + w], cot)
            dx += np.einsum("nhwo,co->nhwc", gp[:, 2 - i : 2 - i + h, 2 - j : 2 - j + w], k[i, j])
    y, vjp = jax.vjp(lambda a, b: vgg16.conv(a, b, "highest", "winograd"),
                     *(jnp.asarray(a) for a in wide_data))
    assert rel_err(y, np_conv3x3_same(x, k, np.zeros(260))) < 1e-5
    gx, gk = vjp(jnp.asarray(cot, jnp.float32))
    assert rel_err(gx, dx) < 1e-5
    assert rel_err(gk, dk) < 1e-5


def test_prepared_kernels_change_nothing(vgg_params, image):
    layers = ["block1_conv2", "block2_conv2", "block3_conv1"]
    x = jnp.asarray(image)
    for algo in ("direct", "winograd"):
        prepared = vgg16.prepare(vgg_params, algo, "highest")
        if algo == "winograd":  # knowing the size: only what runs at that size
            sized = vgg16.prepare(vgg_params, "auto", "highest", (H, W))
            assert all(set(sized[n]) == {"kernel", "bias", "kernel_t"} for n in sized)
        assert set(prepared["block1_conv1"]) == {"kernel", "bias", "kernel_t"}
        assert set(prepared["block2_conv2"]) == {"kernel", "bias", "kernel_t"} | (
            {"winograd", "winograd_t"} if algo == "winograd" else set())  # on large maps
        wide = {"kernel", "bias", "kernel_t"} | (
            {"winograd", "winograd_t"} if algo == "winograd" else set())
        assert set(prepared["block3_conv1"]) == wide
        again = vgg16.prepare(prepared, algo, "highest")  # preparing twice costs nothing
        assert all(again[n][k] is prepared[n][k] for n in prepared for k in prepared[n])

        def f(x, p, algo=algo):
            out = vgg16.features(p, x, layers, "avg", "highest", conv=algo)
            return sum(jnp.sum(jnp.sin(v / 50.0)) for v in out.values())

        vg = jax.jit(jax.value_and_grad(f))
        v0, g0 = vg(x, vgg_params)
        v1, g1 = vg(x, prepared)
        assert float(v0) == float(v1)
        np.testing.assert_array_equal(g0, g1)
    # Prepared for Winograd, the direct algorithm still runs (it flips the kernel itself).
    out = vgg16.features(vgg16.prepare(vgg_params, "winograd", "highest"), x, layers,
                         "avg", "highest", conv="direct")
    ref = vgg16.features(vgg_params, x, layers, "avg", "highest")
    for n in layers:
        np.testing.assert_array_equal(out[n], ref[n])


def test_winograd_features_match_numpy_and_direct(vgg_params, image, reference):
    x = jnp.asarray(image)
    layers = ["block1_conv2", "block3_conv1", "block4_conv2"]

    def f(x, algo):
        out = vgg16.features(vgg_params, x, layers, "avg", "highest", conv=algo)
        return sum(jnp.sum(jnp.sin(v / (1.0 + jnp.max(v)))) for v in out.values()), out

    (v1, out), g1 = jax.jit(jax.value_and_grad(lambda x: f(x, "winograd"), has_aux=True))(x)
    (v0, _), g0 = jax.jit(jax.value_and_grad(lambda x: f(x, "direct"), has_aux=True))(x)
    for n in layers:
        assert rel_err(out[n], reference["avg"][n]) < 1e-4, n
    assert abs(float(v1) - float(v0)) <= 1e-5 * abs(float(v0))
    assert float(jnp.max(jnp.abs(g0))) > 0
    assert rel_err(g1, g0) < 1e-4


def test_winograd_under_vmap_equals_single(wide_data):
    x, k = (jnp.asarray(a) for a in wide_data)
    xs = jnp.stack([x, -0.5 * x])

    def loss(x):
        return jnp.sum(jnp.sin(vgg16.conv(x, k, "highest", "winograd")))

    vg = jax.value_and_grad(loss)
    values, grads = jax.jit(jax.vmap(vg))(xs)  # lanes folded into the batch
    for i in range(2):
        v, g = jax.jit(vg)(xs[i])
        assert abs(float(values[i]) - float(v)) <= 1e-6 * abs(float(v))
        assert rel_err(grads[i], g) < 1e-6
    # A kernel per lane (vmap over the Winograd kernels too): no folding, same results.
    us = jnp.stack([vgg16.winograd_kernel(k), vgg16.winograd_kernel(-k)])
    ys = jax.jit(jax.vmap(vgg16.winograd_conv))(xs, us)
    for i, ki in enumerate((k, -k)):
        ref = np_conv3x3_same(np.asarray(xs[i]), np.asarray(ki), np.zeros(ki.shape[-1]))
        assert rel_err(ys[i], ref) < 1e-5


# --------------------------------------------------------------------------- VGG19

# Keras VGG19, written out: 2, 2, 4, 4, 4 convs per block, 64..512 channels.
VGG19_NAMES = [f"block{b}_conv{i}" for b, k in enumerate((2, 2, 4, 4, 4), 1)
               for i in range(1, k + 1)]


@pytest.fixture(scope="module")
def vgg19_params() -> dict:
    from nstjax.weights import random_params

    params = random_params(1, convs=vgg16.VGG19_CONVS)
    rng = np.random.default_rng(7)
    for p in params.values():
        p["bias"] = (0.1 * rng.standard_normal(p["bias"].shape)).astype(np.float32)
    return jax.tree.map(jnp.asarray, params)


def test_vgg19_table_is_keras():
    assert list(vgg16.names("vgg19")) == VGG19_NAMES
    assert [c for _, _, c in vgg16.VGG19_CONVS] == [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8
    assert [i for _, i, _ in vgg16.VGG19_CONVS][1:] == [c for _, _, c in vgg16.VGG19_CONVS][:-1]
    assert list(vgg16.names("vgg16")) == list(vgg16.NAMES)
    with pytest.raises(ValueError, match="vgg11"):
        vgg16.names("vgg11")


def test_vgg19_matches_numpy_reference(vgg19_params):
    x = (50.0 * np.random.default_rng(2).standard_normal((1, 32, 32, 3))).astype(np.float32)
    ref = np_vgg16(vgg19_params, x, "block5_conv4", "avg", VGG19_NAMES)
    out = vgg16.features(vgg19_params, jnp.asarray(x), VGG19_NAMES, "avg", "highest",
                         arch="vgg19")
    assert list(out) == VGG19_NAMES
    for n in VGG19_NAMES:
        assert out[n].shape == ref[n].shape, n
        assert rel_err(out[n], ref[n]) < 1e-4, n
    assert out["block5_conv4"].shape == (1, 2, 2, 512)
    # The arch is the one the params hold when not given.
    inferred = vgg16.features(vgg19_params, jnp.asarray(x), ["block4_conv1"], "avg", "highest")
    assert rel_err(inferred["block4_conv1"], ref["block4_conv1"]) < 1e-4
    # VGG16's path over the same params skips block3_conv4: a different block4_conv1.
    as16 = vgg16.features(vgg19_params, jnp.asarray(x), ["block3_conv3", "block4_conv1"], "avg",
                          "highest", arch="vgg16")
    assert rel_err(as16["block3_conv3"], ref["block3_conv3"]) < 1e-4
    assert rel_err(as16["block4_conv1"], ref["block4_conv1"]) > 0.1


def test_vgg19_layers_refused_by_vgg16(vgg_params, image):
    assert vgg16.arch_of(vgg_params) == "vgg16"
    with pytest.raises(ValueError, match=r"unknown vgg16 layers \['block3_conv4'\]"):
        vgg16.features(vgg_params, jnp.asarray(image), ["block3_conv4"])


def test_vgg19_extra_convs_run_as_winograd_where_vgg16s_do():
    wl = vgg16.winograd_layers("winograd", "highest", (64, 64), vgg16.names("vgg19"))
    assert {"block3_conv3", "block3_conv4", "block4_conv4", "block5_conv4"} <= set(wl)
    assert not {"block1_conv1", "block2_conv1"} & set(wl)
