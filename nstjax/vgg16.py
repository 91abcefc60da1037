"""VGG16's conv stack as a flax module, and `features`, its functional face over a params dict.

The convolution has a custom VJP: its input gradient is written as a forward convolution of the
cotangent with the flipped, in/out-swapped kernel. The gradients equal `jax.grad`'s, but XLA:CPU
keeps this form on its fast path inside compiled loops, where the transposed convolution that
`jax.grad` emits runs ~3x slower (scripts/BENCH_NOTES.md, "Solver findings").
"""

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

# (name, input channels, output channels): the Keras VGG16 layer names, in order.
CONVS: tuple[tuple[str, int, int], ...] = (
    ("block1_conv1", 3, 64),
    ("block1_conv2", 64, 64),
    ("block2_conv1", 64, 128),
    ("block2_conv2", 128, 128),
    ("block3_conv1", 128, 256),
    ("block3_conv2", 256, 256),
    ("block3_conv3", 256, 256),
    ("block4_conv1", 256, 512),
    ("block4_conv2", 512, 512),
    ("block4_conv3", 512, 512),
    ("block5_conv1", 512, 512),
    ("block5_conv2", 512, 512),
    ("block5_conv3", 512, 512),
)
NAMES: tuple[str, ...] = tuple(name for name, _, _ in CONVS)
CHANNELS: dict[str, int] = {name: cout for name, _, cout in CONVS}
POOLINGS = ("avg", "max")
PRECISIONS = ("highest", "default", "bfloat16")

_DIMS = ("NHWC", "HWIO", "NHWC")


def block(name: str) -> int:
    """Block number of a layer name: 'block4_conv2' -> 4."""
    return int(name[5])


def _lax_conv(x: jax.Array, kernel: jax.Array, precision: str) -> jax.Array:
    prec = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS, precision=prec.get(precision)
    )


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_vjp(x: jax.Array, kernel: jax.Array, precision: str) -> jax.Array:
    return _lax_conv(x, kernel, precision)


def _conv_fwd(x: jax.Array, kernel: jax.Array, precision: str):
    return _lax_conv(x, kernel, precision), (x, kernel)


def _conv_bwd(precision: str, residuals: tuple[jax.Array, jax.Array], g: jax.Array):
    x, kernel = residuals
    # 3x3 SAME stride 1: the transpose w.r.t. x is again a 3x3 SAME convolution.
    dx = _lax_conv(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), precision)
    (dk,) = jax.linear_transpose(lambda k: _lax_conv(x, k, precision), kernel)(g)
    return dx, dk


_conv_vjp.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, precision: str = "highest") -> jax.Array:
    """3x3, stride-1, 'SAME' convolution of NHWC `x` with an HWIO `kernel` (no bias).

    `precision`: `highest` (true float32), `default` (TF32 where the hardware has it) or
    `bfloat16` (both operands cast to bf16; the result is bf16).
    """
    if precision == "bfloat16":
        x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    return _conv_vjp(x, kernel, precision)


def _pool(x: jax.Array, pooling: str) -> jax.Array:
    # Keras VGG16 pools 2x2, stride 2, 'valid': odd sizes drop the last row/column.
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    return x.max(axis=(2, 4)) if pooling == "max" else x.mean(axis=(2, 4))


def _check(layers: Sequence[str], pooling: str, precision: str) -> None:
    unknown = [n for n in layers if n not in CHANNELS]
    if unknown or not layers:
        raise ValueError(f"unknown VGG16 layers {unknown} in {list(layers)}; valid: {list(NAMES)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


# Keras' own initializer is Glorot; He-normal keeps activations at scale through 13 ReLU layers
# (as weights.random_params does).
_he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class Conv3x3(nn.Module):
    """3x3 'SAME' convolution + bias + ReLU (a Keras VGG16 conv layer); params kernel, bias."""

    features: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _he_normal, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        y = conv(x, kernel, self.precision)
        return jax.nn.relu(y + bias.astype(y.dtype).reshape(1, 1, 1, -1))


def _run_block(
    module: nn.Module, h: jax.Array, names: tuple[str, ...]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    # Submodules named after the Keras layers, created on `module`: params stay flat,
    # {"block1_conv1": {"kernel", "bias"}, ...}, with or without nn.remat around a block.
    acts = {}
    for n in names:
        h = Conv3x3(CHANNELS[n], module.precision, name=n)(h)
        acts[n] = h
    return h, acts


class VGG16(nn.Module):
    """VGG16's conv stack (Keras layer names) returning `{name: activation}` for `layers`.

    Input: a preprocessed NHWC batch (BGR, ImageNet mean subtracted). Computes no layer past
    the deepest one asked for. `pooling`: `avg` or `max` (2x2 'valid'). `precision`: `highest`,
    `default` or `bfloat16` (outputs are cast back to float32 so Grams and losses accumulate in
    float32). `remat` recomputes each block in the backward pass instead of storing its
    activations (for large images).
    """

    layers: Sequence[str] = NAMES
    pooling: str = "avg"
    precision: str = "highest"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        _check(self.layers, self.pooling, self.precision)
        last = max(NAMES.index(n) for n in self.layers)
        run = nn.remat(_run_block, static_argnums=(2,)) if self.remat else _run_block
        out: dict[str, jax.Array] = {}
        h = x
        for b in range(1, 6):
            names = tuple(n for n in NAMES[: last + 1] if block(n) == b)
            if not names:
                break
            if b > 1:
                h = _pool(h, self.pooling)
            h, acts = run(self, h, names)
            out.update(acts)
        return {n: out[n].astype(jnp.promote_types(out[n].dtype, jnp.float32))
                for n in self.layers}


def features(
    params: dict,
    x: jax.Array,
    layers: Sequence[str],
    pooling: str = "avg",
    precision: str = "highest",
    remat: bool = False,
) -> dict[str, jax.Array]:
    """Activations {name: (N,h,w,c)} of `layers` for a preprocessed NHWC batch `x`.

    `params` is `{layer_name: {"kernel": (3,3,cin,cout), "bias": (cout,)}}` (flax's "params"
    collection of `VGG16`); the rest as in `VGG16`.
    """
    module = VGG16(tuple(layers), pooling, precision, remat)
    return module.apply({"params": params}, x)
