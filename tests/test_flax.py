"""nstjax.vgg16.VGG16 as a flax module: param layout, numpy reference, use as a perceptual loss."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import np_vgg16, rel_err

from nstjax import vgg16
from nstjax.weights import VGG16_CONVS


def test_init_gives_the_keras_layers_and_shapes():
    x = jnp.zeros((1, 16, 16, 3))  # 16 px: block5 runs on 1x1 maps
    key = jax.random.key(0)
    shapes = jax.eval_shape(vgg16.VGG16().init, key, x)["params"]  # init without computing
    assert list(shapes) == [name for name, _, _ in VGG16_CONVS]
    for name, cin, cout in VGG16_CONVS:
        assert set(shapes[name]) == {"kernel", "bias"}, name
        assert shapes[name]["kernel"].shape == (3, 3, cin, cout), name
        assert shapes[name]["bias"].shape == (cout,), name
        assert shapes[name]["kernel"].dtype == shapes[name]["bias"].dtype == jnp.float32
    params = vgg16.VGG16(layers=("block1_conv2",)).init(key, x)["params"]
    # He-normal kernels: std sqrt(2 / fan_in), here within 5% for the 64x64x9 layer; zero biases.
    std = float(jnp.std(params["block1_conv2"]["kernel"]))
    assert abs(std / np.sqrt(2 / (9 * 64)) - 1) < 0.05
    np.testing.assert_array_equal(params["block1_conv2"]["bias"], 0.0)


def test_init_stops_at_the_deepest_layer_and_remat_keeps_the_layout():
    x = jnp.zeros((1, 16, 16, 3))
    key = jax.random.key(0)
    shallow = jax.eval_shape(vgg16.VGG16(layers=("block2_conv1",)).init, key, x)["params"]
    assert list(shallow) == ["block1_conv1", "block1_conv2", "block2_conv1"]
    plain = jax.eval_shape(vgg16.VGG16(layers=("block4_conv2",)).init, key, x)
    remat = jax.eval_shape(vgg16.VGG16(layers=("block4_conv2",), remat=True).init, key, x)
    assert jax.tree.structure(remat) == jax.tree.structure(plain)
    assert jax.tree.map(lambda a: a.shape, remat) == jax.tree.map(lambda a: a.shape, plain)


def test_apply_with_the_flat_dict_matches_numpy(vgg_params):
    x = (50.0 * np.random.default_rng(3).standard_normal((1, 18, 22, 3))).astype(np.float32)
    ref = np_vgg16(vgg_params, x, "block5_conv3", "avg")
    out = jax.jit(vgg16.VGG16(precision="highest").apply)({"params": vgg_params}, x)
    assert list(out) == list(vgg16.NAMES)
    for name in vgg16.NAMES:
        assert out[name].shape == ref[name].shape, name
        assert out[name].dtype == jnp.float32, name
        assert rel_err(out[name], ref[name]) < 1e-4, name


# --------------------------------------------------------------------------- perceptual loss

STYLE_LAYERS = ("block1_conv2", "block2_conv2")


def gram(f: jax.Array) -> jax.Array:
    n, h, w, c = f.shape
    f = f.reshape(n, h * w, c)
    return jnp.einsum("npc,npd->ncd", f, f) / (h * w * c)


class Stylizer(nn.Module):
    """A one-conv 'generator' scored by VGG16 Gram matrices against target Grams."""

    @nn.compact
    def __call__(self, z: jax.Array, target_grams: dict) -> jax.Array:
        image = nn.Conv(3, (3, 3), name="generator")(z)
        feats = vgg16.VGG16(layers=STYLE_LAYERS, name="vgg")(image)
        return sum(jnp.mean((gram(feats[n]) - target_grams[n]) ** 2) for n in STYLE_LAYERS)


def test_small_flax_model_with_frozen_vgg_trains_one_optax_step(vgg_params):
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
    style = jnp.asarray(50.0 * rng.standard_normal((1, 16, 16, 3)), jnp.float32)
    model = Stylizer()
    params = model.init(jax.random.key(1), z, {n: jnp.zeros((1, 1, 1)) for n in STYLE_LAYERS})
    params = params["params"]
    # The pretrained (here: random fixture) VGG16 weights, in the flat layout nstjax loads.
    assert set(params["vgg"]) == {"block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2"}
    params["vgg"] = {n: vgg_params[n] for n in params["vgg"]}
    style_feats = vgg16.features(vgg_params, style, STYLE_LAYERS)
    targets = {n: gram(style_feats[n]) for n in STYLE_LAYERS}

    labels = {k: jax.tree.map(lambda _, k=k: "frozen" if k == "vgg" else "train", v)
              for k, v in params.items()}
    opt = optax.multi_transform({"train": optax.adam(1e-3), "frozen": optax.set_to_zero()},
                                labels)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: model.apply({"params": p}, z, targets))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, grads

    new, state, loss0, grads = step(params, state)
    loss1 = model.apply({"params": new}, z, targets)
    assert float(loss1) < float(loss0)
    # VGG16 gets gradients (so freezing it is the optimizer's doing) but its params stay put.
    assert float(jnp.max(jnp.abs(grads["vgg"]["block1_conv1"]["kernel"]))) > 0
    for n in params["vgg"]:
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(new["vgg"][n][leaf], vgg_params[n][leaf])
    for leaf in ("kernel", "bias"):
        assert float(jnp.max(jnp.abs(new["generator"][leaf] - params["generator"][leaf]))) > 0
