"""VGG16 conv stack as a pure function: params pytree in, wanted activations out."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from nstjax.weights import VGG16_CONVS

NAMES: tuple[str, ...] = tuple(name for name, _, _ in VGG16_CONVS)
CHANNELS: dict[str, int] = {name: cout for name, _, cout in VGG16_CONVS}
POOLINGS = ("avg", "max")
PRECISIONS = ("highest", "default", "bfloat16")


def block(name: str) -> int:
    """Block number of a layer name: 'block4_conv2' -> 4."""
    return int(name[5])


def _conv(x: jax.Array, p: dict, precision: str) -> jax.Array:
    w, b = p["kernel"], p["bias"]
    if precision == "bfloat16":
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        prec = None
    else:
        prec = jax.lax.Precision.HIGHEST if precision == "highest" else jax.lax.Precision.DEFAULT
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=prec
    )
    return jax.nn.relu(y + b.astype(y.dtype).reshape(1, 1, 1, -1))


def _pool(x: jax.Array, pooling: str) -> jax.Array:
    # Keras VGG16 pools 2x2, stride 2, 'valid': odd sizes drop the last row/column.
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    return x.max(axis=(2, 4)) if pooling == "max" else x.mean(axis=(2, 4))


def features(
    params: dict,
    x: jax.Array,
    layers: Sequence[str],
    pooling: str = "avg",
    precision: str = "highest",
    remat: bool = False,
) -> dict[str, jax.Array]:
    """Activations {name: (N,h,w,c)} of `layers` for a preprocessed NHWC batch `x`.

    Computes no layer past the deepest one asked for. `precision` is `highest` (true float32),
    `default` (TF32 where the hardware has it) or `bfloat16` (activations in bf16; outputs are
    cast back to float32 so Grams and losses accumulate in float32). `remat` recomputes each
    block in the backward pass instead of storing its activations (for large images).
    """
    unknown = [n for n in layers if n not in CHANNELS]
    if unknown:
        raise ValueError(f"unknown VGG16 layers {unknown}; valid: {list(NAMES)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    wanted = set(layers)
    last = max(NAMES.index(n) for n in layers)
    out: dict[str, jax.Array] = {}

    def run_block(h, names):
        acts = {}
        for n in names:
            h = _conv(h, params[n], precision)
            if n in wanted:
                acts[n] = h
        return h, acts

    h = x
    for b in range(1, 6):
        names = [n for n in NAMES[: last + 1] if block(n) == b]
        if not names:
            break
        if b > 1:
            h = _pool(h, pooling)
        fn = jax.checkpoint(run_block, static_argnums=(1,)) if remat else run_block
        h, acts = fn(h, tuple(names))
        out.update(acts)
    return {n: out[n].astype(jnp.promote_types(out[n].dtype, jnp.float32)) for n in layers}
