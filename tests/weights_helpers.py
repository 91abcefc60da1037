"""Writers of small Keras weights files (Keras 2, Keras 3, HED layouts) for the weights tests.

The layouts are written here from the formats' descriptions, independently of the reader."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

Params = dict[str, dict[str, np.ndarray]]

# Same names as VGG16, tiny channels; equal shapes within a block so a mix-up shows in values.
TINY = (
    ("block1_conv1", 3, 2), ("block1_conv2", 2, 2),
    ("block2_conv1", 2, 3), ("block2_conv2", 3, 3),
    ("block3_conv1", 3, 2), ("block3_conv2", 2, 2), ("block3_conv3", 2, 2),
    ("block4_conv1", 2, 2), ("block4_conv2", 2, 2), ("block4_conv3", 2, 2),
    ("block5_conv1", 2, 2), ("block5_conv2", 2, 2), ("block5_conv3", 2, 2),
)  # fmt: skip
# VGG19's names (a fourth conv in blocks 3-5), tiny channels.
TINY19 = (
    *TINY[:7], ("block3_conv4", 2, 2), *TINY[7:10], ("block4_conv4", 2, 2),
    *TINY[10:], ("block5_conv4", 2, 2),
)  # fmt: skip


def make_params(convs=TINY, seed: int = 0) -> Params:
    """Distinct random values per layer."""
    rng = np.random.default_rng(seed)
    return {
        name: {
            "kernel": rng.standard_normal((3, 3, cin, cout), dtype=np.float32),
            "bias": rng.standard_normal((cout,), dtype=np.float32),
        }
        for name, cin, cout in convs
    }


def assert_same(got: Params, want: Params) -> None:
    """Same layers in the same order, float32, bit-equal values."""
    assert list(got) == list(want)
    for name in want:
        for what in ("kernel", "bias"):
            assert got[name][what].dtype == np.float32
            np.testing.assert_array_equal(got[name][what], want[name][what], err_msg=name)


def _layer_order(params: Params) -> list[str]:
    """Keras 2 layer_names: weightless input and pool layers between the convs."""
    order = ["input_1"]
    for name in params:
        if order[-1].startswith("block") and order[-1][:6] != name[:6]:
            order.append(order[-1][:6] + "_pool")
        order.append(name)
    return order + ["block5_pool"]


def write_legacy(path: Path, params: Params, style: str = "W", nest: bool = False) -> Path:
    """Keras 2 h5: ``_W_1:0`` (old) or ``name/kernel:0`` (tf.keras) datasets; optional full save."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if nest else f
        if nest:
            f.attrs["model_config"] = json.dumps({"class_name": "Functional"})
        names = _layer_order(params)
        root.attrs["layer_names"] = np.array([n.encode() for n in names])
        for name in names:
            group = root.create_group(name)
            if name not in params:
                group.attrs["weight_names"] = np.array([], dtype="S1")
                continue
            wn = [f"{name}_W_1:0", f"{name}_b_1:0"] if style == "W" else [
                f"{name}/kernel:0", f"{name}/bias:0"
            ]
            group.attrs["weight_names"] = np.array([w.encode() for w in wn])
            group[wn[0]] = params[name]["kernel"]
            group[wn[1]] = params[name]["bias"]
    return path


def add_vars(f: h5py.File, group: str, layer: dict, attr_name: str | None = None) -> None:
    """A Keras 3 layer group: ``<group>/vars/0`` kernel, ``vars/1`` bias, optional name attr."""
    f[f"{group}/vars/0"] = layer["kernel"]
    f[f"{group}/vars/1"] = layer["bias"]
    if attr_name:
        f[f"{group}/vars"].attrs["name"] = attr_name


def write_keras3(path: Path, params: Params, prefix: str = "layers") -> Path:
    """Keras 3 .weights.h5 with ``<prefix>/<layer>/vars/{0,1}``."""
    with h5py.File(path, "w") as f:
        f.create_group(f"{prefix}/input_layer/vars")
        for name, layer in params.items():
            add_vars(f, f"{prefix}/{name}", layer)
    return path


def write_hed(path: Path, params: Params, suffixes=(None, 1, 2), names: bool = True) -> Path:
    """HED layout: blockN/layers/conv2d[_k]/vars, pools, plus dsn1..5 / fuse extras."""
    with h5py.File(path, "w") as f:
        for name, layer in params.items():
            block, idx = name[:6], int(name[-1]) - 1
            child = "conv2d" if suffixes[idx] is None else f"conv2d_{suffixes[idx]}"
            add_vars(f, f"{block}/layers/{child}", layer, name if names else None)
            f.require_group(f"{block}/vars").attrs["name"] = "sequential"
            if block != "block1":
                f.require_group(f"{block}/layers/max_pooling2d/vars")
        for i, cin in enumerate((64, 128, 256, 512, 512), start=1):
            add_vars(f, f"dsn{i}", {"kernel": np.ones((1, 1, cin, 1)), "bias": np.zeros(1)},
                     "conv2d")
        add_vars(f, "fuse", {"kernel": np.ones((1, 1, 5, 1)), "bias": np.zeros(1)}, "conv2d_5")
        f.create_group("vars").attrs["name"] = "hed"
    return path


def no_data_reads(monkeypatch) -> None:
    """Fail the test if any array data is read (np.load of an npz member, h5py dataset read)."""

    def refuse(*a, **k):
        raise AssertionError("data was read before the header was checked")

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", refuse)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", refuse)
