"""TensorBoard events (`output.tensorboard: true`): written by tensorboardX, read back by
TensorBoard's own EventAccumulator and compared with history.csv, final.png and config.yaml;
one TensorBoard run per sweep cell; a missing tensorboardX is one line, exit 2, nothing
written."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import yaml
from conftest import history, quiet_cli, write_tiny
from PIL import Image

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(logdir):
    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc, tag: str) -> str:
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(acc.Tensors(f"{tag}/text_summary")[0].tensor_proto) \
        .ravel()[0].decode()


def _check_scalars(acc, d) -> list[dict]:
    rows = history(d)
    assert set(acc.Tags()["scalars"]) == set(rows[0]) - {"iter"}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [int(r["iter"]) for r in rows], tag
        np.testing.assert_allclose([e.value for e in events], [r[tag] for r in rows],
                                   rtol=1e-6, err_msg=tag)
    return rows


def test_run_writes_scalars_images_and_config(env, capsys):
    code, err = quiet_cli(capsys, "run", "ok.yaml", "output.tensorboard=true", "--out", "r")
    assert code == 0, err
    d = env / "r"
    acc = _events(d / "tensorboard")
    rows = _check_scalars(acc, d)
    assert {"style/block1_conv1", "total", "seconds"} <= set(acc.Tags()["scalars"])
    # Snapshots where iter_*.png were saved (save_every 2 of 6), the final image at the end.
    snaps = acc.Images("snapshot")
    assert [e.step for e in snaps] == [2, 4]
    for e in snaps:
        got = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))
        want = np.asarray(Image.open(d / f"iter_{e.step:06d}.png").convert("RGB"))
        np.testing.assert_array_equal(got, want)
    final = acc.Images("final")
    assert [e.step for e in final] == [int(rows[-1]["iter"])]
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(final[0].encoded_image_string))),
        np.asarray(Image.open(d / "final.png").convert("RGB")))
    cfg = yaml.safe_load(_text(acc, "config"))  # an indented YAML (Markdown code) block
    assert cfg == yaml.safe_load((d / "config.yaml").read_text())
    assert '"status": "done"' in _text(acc, "run")


def test_off_by_default(env, capsys):
    code, err = quiet_cli(capsys, "run", "ok.yaml", "--out", "r")
    assert code == 0, err
    assert not (env / "r" / "tensorboard").exists()


def test_sweep_cells_each_have_their_run(tmp_path):
    """The ratio sweep of the sweep tests (the same program: compiled once per session)."""
    from sweep_helpers import base_config, prepared, write_sweep

    from nstjax import sweep

    p = write_sweep(tmp_path / "tb.yaml", base=base_config(output={"tensorboard": True}),
                    axes={"loss.style_to_content_ratio": [1, 5, 15]})
    out = tmp_path / "out"
    assert sweep.run_sweep(*prepared(p), out, lanes=1, quiet=True).exit_code == 0
    for name in ("ratio-1", "ratio-5", "ratio-15"):
        d = out / "cells" / name
        _check_scalars(_events(d / "tensorboard"), d)


def test_missing_tensorboardx_is_one_line_exit_2(env, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboardX" else real(name, *a))
    code, err = quiet_cli(capsys, "run", "ok.yaml", "output.tensorboard=true", "--out", "r")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "output.tensorboard" in line and "pip install 'nstjax[tensorboard]'" in line, err
    assert not (env / "r").exists()
    write_tiny(env / "s.yaml")
    (env / "sw.yaml").write_text(yaml.safe_dump(
        {"base": "s.yaml", "set": {"output.tensorboard": True}, "axes": {"seed": [0, 1]}}))
    code, err = quiet_cli(capsys, "sweep", "sw.yaml", "--out", "sw")
    assert code == 2 and "pip install 'nstjax[tensorboard]'" in err, err
    assert not (env / "sw").exists()
