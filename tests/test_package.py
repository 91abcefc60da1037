"""The package as a whole: every module reachable from `nstjax`, a public API that resolves,
and no private JAX or jaxopt APIs (the config schema's own import: tests/test_config.py)."""

import pkgutil
import re
from pathlib import Path

import nstjax

PKG = Path(nstjax.__file__).resolve().parent


def test_submodules_lists_every_module_of_the_package():
    found = {m.name for m in pkgutil.iter_modules([str(PKG)])}
    assert set(nstjax.SUBMODULES) == found
    assert len(nstjax.SUBMODULES) == len(set(nstjax.SUBMODULES))


def test_every_public_name_resolves():
    assert nstjax.__all__[0] == "__version__" and len(set(nstjax.__all__)) == len(nstjax.__all__)
    for name in nstjax.__all__:
        assert getattr(nstjax, name) is not None, name
    assert nstjax.stylize is nstjax.run.stylize
    assert nstjax.UserError is nstjax.errors.UserError
    assert issubclass(nstjax.PluginError, nstjax.UserError)


def test_no_private_jax_or_jaxopt_api():
    private = re.compile(r"jax\._src|jaxopt\._src|\._fun_with_aux|linesearch_solver\.|"
                         r"from jax\._src|import jax\._src")
    used = {p.relative_to(PKG).as_posix(): m.group(0) for p in PKG.rglob("*.py")
            if (m := private.search(p.read_text()))}
    assert used == {}

