"""nstjax: neural style transfer (Gatys et al. 2015) in JAX.

    import nstjax
    r = nstjax.stylize("configs/quickstart.yaml", ["solver.maxiter=50"])  # writes nothing
    r.image.save("out.png")

Submodules load on first use (`nstjax.solvers`, `nstjax.losses`, ...): `import nstjax` itself
imports neither JAX nor any other dependency. `__all__` is the public API (docs/api.md); the
other modules are importable but internal (docs/how-it-works.md maps them all).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Every module of the package, loaded on first use as `nstjax.<name>`.
SUBMODULES = ("batch", "bench", "bench_torch", "cfgfile", "cli", "config", "costs", "errors",
              "image", "keras_h5", "kinds", "lbfgs", "losses", "metrics", "multiscale", "problem",
              "race", "record", "report", "results", "run", "rundir", "runtime", "solvers",
              "style_losses", "svg", "sweep", "tables", "tblog", "torch_legacy", "vgg16", "watch",
              "weights")
# Names defined elsewhere and exported here: name -> (module, attribute).
EXPORTS = {"stylize": ("run", "stylize"), "UserError": ("errors", "UserError"),
           "PluginError": ("errors", "PluginError")}
# The public API: what docs/api.md documents (tests/test_docs.py checks that they match).
__all__ = ["__version__", "stylize", "UserError", "PluginError",
           "config", "run", "problem", "losses", "kinds", "metrics", "solvers", "lbfgs", "batch",
           "vgg16", "weights", "image", "results", "watch", "errors", "sweep"]


def __getattr__(name: str):  # PEP 562: submodules on first use
    if name in SUBMODULES:
        return importlib.import_module(f"nstjax.{name}")
    if name in EXPORTS:
        module, attr = EXPORTS[name]
        return getattr(importlib.import_module(f"nstjax.{module}"), attr)
    raise AttributeError(f"module 'nstjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(SUBMODULES))
