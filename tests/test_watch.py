"""`stylize(..., on_progress=fn)`: one `Progress` per history row (the same numbers as the
returned history and history.csv), the image on snapshot steps equal to the saved snapshot,
scales of a multi-scale run; a callback that raises fails the run and is re-raised."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import history
from PIL import Image

import nstjax
from nstjax.errors import UserError
from nstjax.watch import Progress


def _collect():
    got: list[Progress] = []
    return got, got.append


def test_in_memory_rows_equal_the_history(env):
    got, fn = _collect()
    r = nstjax.stylize("ok.yaml", quiet=True, on_progress=fn)  # 6 iterations, save_every 2
    assert [p.iteration for p in got] == r.history["iter"].tolist() == list(range(7))
    for k in ("total", "content", "style", "tv", "style/block1_conv1"):
        np.testing.assert_array_equal([p.losses[k] for p in got], r.history[k], err_msg=k)
    np.testing.assert_array_equal([p.seconds for p in got], r.history["seconds"])
    assert {p.scale for p in got} == {None}
    shots = [p for p in got if p.image is not None]
    # snapshots at 2 and 4, and the final image at the last iteration (save_every divides it)
    assert [p.iteration for p in shots] == [2, 4, 6]
    assert all(p.image.dtype == np.uint8 and p.image.shape == (32, 32, 3) for p in shots)
    np.testing.assert_array_equal(shots[-1].image, np.asarray(r.image.convert("RGB")))


def test_with_out_images_equal_the_snapshots(env):
    got, fn = _collect()
    r = nstjax.stylize("ok.yaml", out="o", quiet=True, on_progress=fn)
    rows = history(r.dir)
    assert [p.iteration for p in got] == [int(x["iter"]) for x in rows]
    np.testing.assert_allclose([p.losses["total"] for p in got], [x["total"] for x in rows],
                               rtol=1e-7)
    assert got[-1].image is not None and got[-1].iteration == 6
    for p in got:
        if p.image is not None:
            name = "final" if p.iteration == 6 else f"iter_{p.iteration:06d}"
            want = np.asarray(Image.open(r.dir / f"{name}.png").convert("RGB"))
            np.testing.assert_array_equal(p.image, want)


def test_multiscale_rows_carry_their_scale(env):
    got, fn = _collect()
    r = nstjax.stylize("ok.yaml", ["multiscale.sizes=[16]", "solver.maxiter=8"], quiet=True,
                       on_progress=fn)
    assert [p.scale for p in got] == r.history["scale"].tolist()
    assert {p.scale for p in got} == {1, 2}
    assert [p.iteration for p in got] == r.history["iter"].tolist()
    sizes = {p.scale: p.image.shape for p in got if p.image is not None}
    assert sizes == {1: (16, 16, 3), 2: (32, 32, 3)}  # snapshots at each scale's own size


def test_a_raising_callback_fails_the_run(env):
    def boom(p: Progress) -> None:
        if p.iteration == 3:
            raise RuntimeError("tracker down")

    with pytest.raises(RuntimeError, match="tracker down"):
        nstjax.stylize("ok.yaml", quiet=True, on_progress=boom)
    with pytest.raises(UserError, match="on_progress"):
        nstjax.stylize("ok.yaml", quiet=True, on_progress="print")


def test_readme_wandb_example(env, monkeypatch):
    """The W&B example of docs/guides/python-api.md, with a stand-in `wandb` recording calls."""
    import sys
    import types

    from conftest import write_tiny
    from test_api import _snippet

    logged: list[tuple[dict, int | None]] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: types.SimpleNamespace(finish=lambda: logged.append(({}, -1)))
    fake.Image = lambda a: ("image", np.asarray(a).shape)
    fake.log = lambda data, step=None: logged.append((data, step))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (env / "configs").mkdir()
    write_tiny(env / "configs" / "quickstart.yaml")
    exec(_snippet("Progress callbacks (notebooks, W&B)"), {})  # noqa: S102 - the docs' code
    steps = [s for _, s in logged[:-2]]
    assert steps == list(range(31))
    # snapshots at 10 and 20, the final image with the last row (30)
    assert [s for d, s in logged if "image" in d] == [10, 20, 30]
    assert logged[5][0]["loss/total"] > logged[25][0]["loss/total"]
    assert logged[-2][0]["final"] == ("image", (32, 32, 3)) and logged[-1][1] == -1
