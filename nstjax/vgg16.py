"""VGG16's and VGG19's conv stacks as one flax module, and `features`, its functional face over
a params dict. The arch is its conv table (`ARCHS`); the module keeps the name `VGG16`.

The convolution has a custom VJP: its input gradient is written as a forward convolution of the
cotangent with the flipped, in/out-swapped kernel. The gradients equal `jax.grad`'s, but XLA:CPU
keeps this form on its fast path inside compiled loops, where the transposed convolution that
`jax.grad` emits runs ~3x slower (docs/experiments/bench-notes.md, "Solver findings"). On CPU the
layers with 128 or more channels run as Winograd F(2x2, 3x3) (Lavin & Gray 2015): 2.25x fewer
multiplications, float32 roundoff of ~1e-6 (`conv`, `model.conv`). `prepare` computes the
kernels both passes need once per run, outside the compiled loop.
"""

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nstjax.tables import ARCHS, CONVS, VGG19_CONVS

# The layer tables (name, input channels, output channels) of each arch, in order.
NAMES: tuple[str, ...] = tuple(name for name, _, _ in CONVS)
CHANNELS: dict[str, int] = {name: cout for name, _, cout in VGG19_CONVS}  # both archs' names
POOLINGS = ("avg", "max")
PRECISIONS = ("highest", "default", "bfloat16")
CONV_ALGOS = ("auto", "direct", "winograd")

_DIMS = ("NHWC", "HWIO", "NHWC")


def convs(arch: str) -> tuple[tuple[str, int, int], ...]:
    """The conv table of `arch` (`vgg16` or `vgg19`)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


def names(arch: str) -> tuple[str, ...]:
    """The conv layer names of `arch`, in order."""
    return tuple(n for n, _, _ in convs(arch))


def arch_of(params: dict) -> str:
    """The arch a params dict holds: `vgg19` if it has VGG19's extra layers, else `vgg16`."""
    return "vgg19" if "block3_conv4" in params else "vgg16"


def block(name: str) -> int:
    """Block number of a layer name: 'block4_conv2' -> 4."""
    return int(name[5])


def _lax_conv(x: jax.Array, kernel: jax.Array, precision: str) -> jax.Array:
    prec = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS, precision=prec.get(precision)
    )


def resolve_conv(algo: str) -> str:
    """`auto` -> `winograd` on CPU (XLA:CPU's direct convolutions are its slowest part), else
    `direct` (accelerator libraries choose their own algorithms)."""
    if algo not in CONV_ALGOS:
        raise ValueError(f"conv must be one of {CONV_ALGOS}, got {algo!r}")
    if algo == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "direct"
    return algo


# Winograd F(2x2, 3x3) (Lavin & Gray 2015): output tiles of 2x2 from 4x4 input tiles,
# Y = A^T [(G k G^T) * (B^T d B)] A.
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
# Where Winograd beats XLA:CPU's direct convolution (measured on 2 AVX-512 cores, per layer,
# forward and backward; docs/experiments/bench-notes.md): maps of at most `MAX_TILES` 2x2 tiles with
# 256+ channels, as one batched product (1.3-1.9x); maps of up to `MAX_TILES_SPLIT` tiles with
# 128+ channels, as 16 separate products (1.2-1.4x, but ~0.35 s of compile time each). Beyond
# that XLA's products and transforms slow down and the direct convolution wins; 128-channel
# layers on small maps gain too little to repay the compile time.
# `auto` also skips layers of less work (tiles x cin x cout) than `MIN_WORK`: there a few
# tenths of a millisecond per evaluation do not repay the compile time (images of 64 px and
# less run all direct; at 128x96 block5 does).
MAX_TILES, MIN_CHANNELS = 1024, 256
MAX_TILES_SPLIT, MIN_CHANNELS_SPLIT = 4096, 128
MIN_WORK = 1 << 22


def uses_winograd(cin: int, cout: int, algo: str, precision: str, tiles: int) -> bool:
    """Whether a layer of `tiles` 2x2 output tiles per image runs as Winograd: float32
    precisions only, where it is faster (`MAX_TILES`, `MAX_TILES_SPLIT`) and, for `auto`,
    where it repays its compile time (`MIN_WORK`)."""
    ch = max(cin, cout)
    if resolve_conv(algo) != "winograd" or precision == "bfloat16":
        return False
    if algo == "auto" and tiles * cin * cout < MIN_WORK:
        return False
    return ((ch >= MIN_CHANNELS and tiles <= MAX_TILES)
            or (ch >= MIN_CHANNELS_SPLIT and MAX_TILES < tiles <= MAX_TILES_SPLIT))


def winograd_layers(algo: str, precision: str, hw: tuple[int, int],
                    names: Sequence[str] = NAMES) -> list[str]:
    """The layers of `names` that run as Winograd for an (H, W) input image."""
    return [n for n, cin, cout in VGG19_CONVS
            if n in names and uses_winograd(cin, cout, algo, precision, tiles_at(n, hw))]


def tiles_at(name: str, hw: tuple[int, int]) -> int:
    """2x2 output tiles of layer `name`'s map for an (H, W) input image."""
    h, w = (v >> (block(name) - 1) for v in hw)  # 'valid' 2x2 pooling floors at each block
    return (h + 1) // 2 * ((w + 1) // 2)


def flipped(kernel: jax.Array) -> jax.Array:
    """The kernel of the input gradient: spatially flipped, in/out channels swapped."""
    return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


def winograd_kernel(kernel: jax.Array, xp=jnp) -> jax.Array:
    """HWIO (3,3,C,K) -> (16,C,K): G k G^T of F(2x2, 3x3), row-major over the 4x4 tile.
    `xp`: the array module (jax.numpy, or numpy for host arrays)."""
    def g(r0, r1, r2):
        return r0, (r0 + r1 + r2) / 2, (r0 - r1 + r2) / 2, r2
    out = []
    for row in g(kernel[0], kernel[1], kernel[2]):
        out += g(row[0], row[1], row[2])
    return xp.stack(out)


def winograd_conv(x: jax.Array, u: jax.Array, precision: str = "highest") -> jax.Array:
    """The 3x3 SAME convolution of NHWC `x` as Winograd F(2x2, 3x3) with u = winograd_kernel(k):
    16 products (P, C) x (C, K) over the P 2x2 output tiles, 2.25x fewer multiplications than 9
    per pixel; agrees with the direct convolution to float32 roundoff (~1e-6). Up to
    `MAX_TILES` tiles one batched product, with each transform one fusion for XLA; beyond, 16
    separate products, each fed by its own transform (faster there, slower to compile).
    Under `vmap` (a sweep's lanes) the lanes are folded into the batch: the same program as one
    call with n * lanes images, not a batched one (which compiled ~1 s slower per network)."""

    @jax.custom_batching.custom_vmap
    def fun(x, u):
        return _winograd(x, u, precision)

    @fun.def_vmap
    def _lanes(size: int, batched: list[bool], x, u):
        if batched[1]:  # a kernel per lane: no folding
            return jax.vmap(partial(_winograd, precision=precision),
                            in_axes=(0 if batched[0] else None, 0))(x, u), True
        y = _winograd(x.reshape(-1, *x.shape[2:]), u, precision)
        return y.reshape(size, *x.shape[1:-1], y.shape[-1]), True

    return fun(x, u)


def _winograd(x: jax.Array, u: jax.Array, precision: str) -> jax.Array:
    n, h, w, c = x.shape
    ht, wt = (h + 1) // 2, (w + 1) // 2
    xp = jnp.pad(x, ((0, 0), (1, 1 + 2 * ht - h), (1, 1 + 2 * wt - w), (0, 0)))
    prec = jax.lax.Precision.HIGHEST if precision == "highest" else None
    if ht * wt > MAX_TILES:
        y = _winograd_split(xp, u, ht, wt, prec)
    else:
        bt, at = jnp.asarray(_BT, x.dtype), jnp.asarray(_AT, x.dtype)
        # B^T over the 4 rows of each tile, then over its 4 columns: (4, 4, n, ht, wt, c).
        r = sum(bt[:, a, None, None, None, None] * xp[None, :, a:a + 2 * ht:2] for a in range(4))
        v = sum(bt[None, :, b, None, None, None, None] * r[:, None, :, :, b:b + 2 * wt:2]
                for b in range(4))
        m = jax.lax.dot_general(v.reshape(16, n * ht * wt, c), u, (((2,), (1,)), ((0,), (0,))),
                                precision=prec).reshape(4, 4, n, ht, wt, -1)
        # A^T over rows and columns: (2, 2, n, ht, wt, k), then the tiles back in place.
        y = sum(at[:, i, None, None, None, None, None] * m[None, i] for i in range(4))
        y = sum(at[None, :, j, None, None, None, None] * y[:, None, j] for j in range(4))
        y = y.transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(n, 2 * ht, 2 * wt, -1)[:, :h, :w]


def _bt4(a, b, c, d):  # B^T along one axis of 4 tile rows (or columns)
    return a - c, b + c, c - b, b - d


def _winograd_split(xp: jax.Array, u: jax.Array, ht: int, wt: int, prec) -> jax.Array:
    # The transforms written out per tile position: 16 (n, ht, wt, c) inputs, one per product.
    n, c = xp.shape[0], xp.shape[-1]
    e, o = xp[:, 0::2], xp[:, 1::2]
    d = []
    for r in _bt4(e[:, :-1], o[:, :-1], e[:, 1:], o[:, 1:]):
        e2, o2 = r[:, :, 0::2], r[:, :, 1::2]
        d += _bt4(e2[:, :, :-1], o2[:, :, :-1], e2[:, :, 1:], o2[:, :, 1:])
    m = [jnp.dot(di.reshape(-1, c), u[i], precision=prec).reshape(n, ht, wt, -1)
         for i, di in enumerate(d)]
    rows = [[a + b + c_ for a, b, c_ in zip(m[0:4], m[4:8], m[8:12])],
            [b - c_ - d_ for b, c_, d_ in zip(m[4:8], m[8:12], m[12:16])]]
    return jnp.stack([jnp.stack([r[0] + r[1] + r[2], r[1] - r[2] - r[3]], axis=3)
                      for r in rows], axis=2)


def _apply(x: jax.Array, k: jax.Array, winograd: bool, precision: str) -> jax.Array:
    return winograd_conv(x, k, precision) if winograd else _lax_conv(x, k, precision)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _conv_vjp(x, kernel, fwd_k, bwd_k, winograd: bool, precision: str) -> jax.Array:
    return _apply(x, fwd_k, winograd, precision)


def _conv_fwd(x, kernel, fwd_k, bwd_k, winograd, precision):
    return _apply(x, fwd_k, winograd, precision), (x, kernel, fwd_k, bwd_k)


def _conv_bwd(winograd: bool, precision: str, residuals, g: jax.Array):
    x, kernel, fwd_k, bwd_k = residuals
    # 3x3 SAME stride 1: the transpose w.r.t. x is again a 3x3 SAME convolution, with
    # flipped(kernel) (or its Winograd form) as kernel. The kernel's gradient is the direct
    # convolution's; fwd_k and bwd_k are functions of the kernel, so they get none of their own.
    dx = _apply(g, bwd_k, winograd, precision)
    (dk,) = jax.linear_transpose(lambda k: _lax_conv(x, k, precision), kernel)(g)
    return dx, dk, jnp.zeros_like(fwd_k), jnp.zeros_like(bwd_k)


_conv_vjp.defvjp(_conv_fwd, _conv_bwd)

# Keys `prepare` adds beside a layer's kernel and bias: the backward kernel, and both
# Winograd kernels. Computed once per run, outside the compiled loop, where XLA does not hoist
# them (it would redo the flip, ~10 ms per 512-channel layer, every evaluation).
PREPARED = ("kernel_t", "winograd", "winograd_t")


def conv(x: jax.Array, kernel: jax.Array, precision: str = "highest", algo: str = "direct",
         prepared: dict | None = None) -> jax.Array:
    """3x3, stride-1, 'SAME' convolution of NHWC `x` with an HWIO `kernel` (no bias).

    `precision`: `highest` (true float32), `default` (TF32 where the hardware has it) or
    `bfloat16` (both operands cast to bf16; the result is bf16). `algo`: `direct`, `winograd`
    (F(2x2,3x3) where `uses_winograd`, else direct) or `auto`. `prepared`: any of `PREPARED`
    precomputed (`prepare`); missing ones are derived from `kernel`. Gradients: `jax.grad`'s of
    the direct convolution for `direct` (exactly), and to float32 roundoff for `winograd`.
    """
    prepared = prepared or {}
    cin, cout = kernel.shape[2:]
    tiles = (x.shape[1] + 1) // 2 * ((x.shape[2] + 1) // 2)
    wino = uses_winograd(cin, cout, algo, precision, tiles)
    if wino:
        fwd_k = prepared.get("winograd")
        bwd_k = prepared.get("winograd_t")
        fwd_k = winograd_kernel(kernel) if fwd_k is None else fwd_k
        bwd_k = winograd_kernel(flipped(kernel)) if bwd_k is None else bwd_k
    else:
        fwd_k, bwd_k = kernel, prepared.get("kernel_t")
        bwd_k = flipped(kernel) if bwd_k is None else bwd_k
    if precision == "bfloat16":
        x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
        fwd_k, bwd_k = fwd_k.astype(jnp.bfloat16), bwd_k.astype(jnp.bfloat16)
    return _conv_vjp(x, kernel, fwd_k, bwd_k, wino, precision)


def seamless_conv(x: jax.Array, kernel: jax.Array, precision: str = "highest") -> jax.Array:
    """`conv` with circular padding (the image wraps around: a seamless texture's network);
    direct, gradients by jax.grad."""
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
    if precision == "bfloat16":
        xp, kernel = xp.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    prec = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}
    return jax.lax.conv_general_dilated(xp, kernel, (1, 1), "VALID", dimension_numbers=_DIMS,
                                        precision=prec.get(precision))


def prepare(params: dict, algo: str = "auto", precision: str = "default",
            hw: tuple[int, int] | None = None) -> dict:
    """`params` (on the device) with each layer's `PREPARED` kernels for `algo` and `precision`,
    and no others: pass the result wherever params go when the same weights serve many
    evaluations (a solve). `hw`: the (H, W) of the images to come, if known (which layers run as
    Winograd depends on their map size); without it every layer that may gets its Winograd
    kernels. Kernels already there are kept, so preparing twice costs nothing; the missing
    ones are computed on the host. Correctness never depends on it: `conv` derives what is
    missing."""
    want = {}
    for name, p in params.items():
        cin, cout = p["kernel"].shape[2:]
        sizes = [tiles_at(name, hw)] if hw else [1, MAX_TILES, MAX_TILES_SPLIT]
        wino = any(uses_winograd(cin, cout, algo, precision, t) for t in sizes)
        want[name] = PREPARED if wino else PREPARED[:1]
    out = {}
    for name, p in params.items():
        out[name] = {key: v for key, v in p.items() if key not in PREPARED} | {
            key: p[key] if key in p else _host_prepared(np.asarray(p["kernel"]), key)
            for key in want[name]}
    return jax.device_put(out)


def _host_prepared(kernel: np.ndarray, key: str) -> np.ndarray:
    # On the host: as jnp operations, dispatched one by one or compiled, these took seconds.
    kt = np.flip(kernel, (0, 1)).swapaxes(2, 3)
    if key == "kernel_t":
        return np.ascontiguousarray(kt)
    return winograd_kernel(kernel if key == "winograd" else kt, np)


def _pool(x: jax.Array, pooling: str) -> jax.Array:
    # Keras VGG16 pools 2x2, stride 2, 'valid': odd sizes drop the last row/column.
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    return x.max(axis=(2, 4)) if pooling == "max" else x.mean(axis=(2, 4))


def _check(layers: Sequence[str], pooling: str, precision: str, conv: str, arch: str) -> None:
    valid = names(arch)
    unknown = [n for n in layers if n not in valid]
    if unknown or not layers:
        raise ValueError(f"unknown {arch} layers {unknown} in {list(layers)}; valid: {list(valid)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    resolve_conv(conv)


# Keras' own initializer is Glorot; He-normal keeps activations at scale through 13 ReLU layers
# (as weights.random_params does).
_he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class Conv3x3(nn.Module):
    """3x3 'SAME' convolution + bias + ReLU (a Keras VGG16 conv layer); params kernel, bias."""

    features: int
    precision: str = "highest"
    conv: str = "direct"
    seamless: bool = False  # circular ('wrap') padding instead of zeros: seamless images

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _he_normal, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        prepared = {k: self.get_variable("params", k) for k in PREPARED
                    if self.has_variable("params", k)}
        if self.seamless:
            y = seamless_conv(x, kernel, self.precision)
        else:
            y = conv(x, kernel, self.precision, self.conv, prepared)
        return jax.nn.relu(y + bias.astype(y.dtype).reshape(1, 1, 1, -1))


def _run_block(
    module: nn.Module, h: jax.Array, names: tuple[str, ...]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    # Submodules named after the Keras layers, created on `module`: params stay flat,
    # {"block1_conv1": {"kernel", "bias"}, ...}, with or without nn.remat around a block.
    acts = {}
    for n in names:
        h = Conv3x3(CHANNELS[n], module.precision, module.conv, module.seamless, name=n)(h)
        acts[n] = h
    return h, acts


class VGG16(nn.Module):
    """VGG16's or VGG19's conv stack (`arch`; Keras layer names) returning `{name: activation}`
    for `layers`.

    Input: a preprocessed NHWC batch (BGR, ImageNet mean subtracted). Computes no layer past
    the deepest one asked for. `pooling`: `avg` or `max` (2x2 'valid'). `precision`: `highest`,
    `default` or `bfloat16` (outputs are cast back to float32 so Grams and losses accumulate in
    float32). `remat` recomputes each block in the backward pass instead of storing its
    activations (for large images). `conv`: the convolution algorithm (`conv`); params may hold
    `prepare`'s precomputed kernels.
    """

    layers: Sequence[str] = NAMES
    pooling: str = "avg"
    precision: str = "highest"
    remat: bool = False
    conv: str = "direct"
    seamless: bool = False
    arch: str = "vgg16"

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        _check(self.layers, self.pooling, self.precision, self.conv, self.arch)
        order = names(self.arch)
        last = max(order.index(n) for n in self.layers)
        run = nn.remat(_run_block, static_argnums=(2,)) if self.remat else _run_block
        out: dict[str, jax.Array] = {}
        h = x
        for b in range(1, 6):
            todo = tuple(n for n in order[: last + 1] if block(n) == b)
            if not todo:
                break
            if b > 1:
                h = _pool(h, self.pooling)
            h, acts = run(self, h, todo)
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
    conv: str = "direct",
    *,
    seamless: bool = False,
    arch: str | None = None,
) -> dict[str, jax.Array]:
    """Activations {name: (N,h,w,c)} of `layers` for a preprocessed NHWC batch `x`.

    `params` is `{layer_name: {"kernel": (3,3,cin,cout), "bias": (cout,)}}` (flax's "params"
    collection of `VGG16`, optionally with `prepare`'s kernels); the rest as in `VGG16`.
    `seamless`: circular padding in every convolution (the image is one period of a seamless
    pattern; its sides should be multiples of the deepest layer's pooling factor). `arch`:
    `vgg16` or `vgg19`; None: the one `params` holds (`arch_of`).
    """
    arch = arch_of(params) if arch is None else arch
    module = VGG16(tuple(layers), pooling, precision, remat, conv, seamless, arch)
    return module.apply({"params": params}, x)
