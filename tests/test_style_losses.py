"""The built-in style kinds against float64 numpy references, and the plugin contract."""

import jax.numpy as jnp
import numpy as np
import pytest

from nstjax import losses, style_losses
from nstjax.errors import PluginError, UserError

rng = np.random.default_rng(0)


def test_mean_std_layer_against_numpy():
    f, s = rng.normal(size=(1, 4, 5, 3)), rng.normal(size=(1, 6, 3, 3))
    eps = 1e-5
    ref = np.sum((f.mean((1, 2)) - s.mean((1, 2))) ** 2
                 + (np.sqrt(f.var((1, 2)) + eps) - np.sqrt(s.var((1, 2)) + eps)) ** 2) / 3
    m, v = style_losses.mean_var(jnp.asarray(s, jnp.float32))
    got = style_losses.mean_std_layer(jnp.asarray(f, jnp.float32), m, v, eps)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_sliced_wasserstein_layer_against_numpy():
    f, s, v = rng.normal(size=(1, 3, 4, 5)), rng.normal(size=(1, 3, 4, 5)), rng.normal(size=(5, 7))
    v = v / np.linalg.norm(v, axis=0)
    ref = np.mean((np.sort(f.reshape(12, 5) @ v, 0) - np.sort(s.reshape(12, 5) @ v, 0)) ** 2)
    vj = jnp.asarray(v, jnp.float32)
    t = style_losses.sorted_projections(jnp.asarray(s, jnp.float32), vj)
    got = style_losses.sliced_wasserstein_layer(jnp.asarray(f, jnp.float32), vj, t)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_mrf_layer_against_numpy():
    f, s = rng.normal(size=(1, 4, 4, 2)), rng.normal(size=(1, 5, 4, 2))

    def pats(a):  # every 3x3 patch, flattened (any fixed order: the loss ignores it)
        _, h, w, _ = a.shape
        return np.stack([a[0, i:i + 3, j:j + 3].ravel() for i in range(h - 2)
                         for j in range(w - 2)])
    px, ps = pats(f), pats(s)
    ncc = (px / np.linalg.norm(px, axis=1, keepdims=True)) @ (
        ps / np.linalg.norm(ps, axis=1, keepdims=True)).T
    ref = np.mean(np.sum((px - ps[ncc.argmax(1)]) ** 2, 1))
    tp = style_losses.patches(jnp.asarray(s, jnp.float32), 3)
    got = style_losses.mrf_layer(jnp.asarray(f, jnp.float32), tp, 3)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_options_are_checked_by_the_kind():
    assert losses.resolve_options("sliced_wasserstein", {}) == {"projections": 64}
    with pytest.raises(UserError, match="loss.options.nope: unknown option .*projections"):
        losses.resolve_options("sliced_wasserstein", {"nope": 1})
    with pytest.raises(UserError, match="must be >= 1"):
        losses.resolve_options("sliced_wasserstein", {"projections": 0})


def test_terms_contract_errors_are_one_line():
    k = losses.register("t_bad", targets=lambda *a: {"style": {}},
                        terms=lambda *a: {"style": jnp.zeros(())}, replace=True)
    with pytest.raises(PluginError, match="must include 'total'"):
        losses.check_terms(k, {"style": jnp.zeros(())})
    with pytest.raises(PluginError, match="must be a scalar"):
        losses.check_terms(k, {"total": jnp.zeros(3)})
    with pytest.raises(PluginError, match="must return a dict of scalars"):
        losses.check_terms(k, jnp.zeros(3))
    with pytest.raises(PluginError, match="with a 'style' entry"):
        losses.check_targets(k, {"content": {}}, 1)
    with pytest.raises(PluginError, match="leading axis of one row per style image"):
        losses.check_targets(k, {"style": {"a": jnp.zeros((3, 2))}}, 2)
