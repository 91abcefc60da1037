"""Tests for nstjax.torch_legacy: files written by tests/torch_legacy_helpers.py (from the format's
description, no torch), read back against numpy; refusals of anything but plain tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from torch_legacy_helpers import MAGIC, Global, Tensor, dumps_object, tensor, write

from nstjax import torch_legacy as T


def test_round_trip_dtypes_and_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    b = rng.integers(0, 256, (5, 3)).astype(np.uint8)
    c = rng.standard_normal(7)
    shared = np.arange(12, dtype=np.int64)
    obj = {
        "a": tensor("0", a),
        "b": tensor("1", b),
        "c": tensor("2", c),
        # Two views of one storage: a transposed 3x4 and a slice at an offset.
        "t": Tensor("3", shared, 0, (4, 3), (1, 4)),
        "s": Tensor("3", shared, 5, (2, 2), (3, 1)),
        "scalar": Tensor("4", np.array([2.5], np.float32), 0, (), ()),
    }
    got = T.read(write(tmp_path / "w.bin", obj))
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    np.testing.assert_array_equal(got["c"], c)
    np.testing.assert_array_equal(got["t"], shared.reshape(3, 4).T)
    np.testing.assert_array_equal(got["s"], np.array([[5, 6], [8, 9]]))
    assert got["scalar"].shape == () and got["scalar"] == np.float32(2.5)
    assert [got[k].dtype for k in "abcts"] == [np.float32, np.uint8, np.float64, np.int64,
                                               np.int64]
    assert all(v.flags.c_contiguous and v.flags.writeable for v in got.values())


def _evil_object_pickle(module: str, name: str) -> bytes:
    # {"x": module.name("marker")}: a reduce of an arbitrary global.
    return (b"\x80\x02}q\x00(X\x01\x00\x00\x00x" + pickle.GLOBAL + f"{module}\n{name}\n".encode()
            + b"X\x06\x00\x00\x00markerq\x01\x85R" + b"u.")


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"),
                                         ("torch", "load"), ("torch._utils", "_rebuild_parameter"),
                                         ("numpy", "frombuffer")])
def test_refuses_any_other_global(tmp_path: Path, module: str, name: str) -> None:
    path = write(tmp_path / "evil.bin", {}, object_pickle=_evil_object_pickle(module, name))
    with pytest.raises(T.FormatError, match=f"refusing the global {module}.{name}"):
        T.read(path)


def _good(tmp_path: Path) -> tuple[Path, bytes]:
    path = write(tmp_path / "w.bin", {"w": tensor("0", np.arange(6, dtype=np.float32))})
    return path, path.read_bytes()


@pytest.mark.parametrize("damage,says", [
    (lambda b: b[:-3], "truncated"),
    (lambda b: b + b"\0", "trailing bytes"),
    (lambda b: b[:40], "unreadable pickle|truncated|size field"),
    (lambda b: b"", "unreadable pickle"),
    (lambda b: pickle.dumps(123, protocol=2) + b[b.index(b".") + 1:], "bad magic"),
])
def test_damaged_files(tmp_path: Path, damage, says: str) -> None:
    path, raw = _good(tmp_path)
    path.write_bytes(damage(raw))
    with pytest.raises(T.FormatError, match=says):
        T.read(path)


def test_size_field_must_match_the_storage(tmp_path: Path) -> None:
    path, raw = _good(tmp_path)
    head = np.int64(6).astype("<i8").tobytes()
    i = raw.rindex(head)
    path.write_bytes(raw[:i] + np.int64(5).astype("<i8").tobytes() + raw[i + 8:])
    with pytest.raises(T.FormatError, match="size field"):
        T.read(path)


def test_a_view_past_the_storage_is_refused(tmp_path: Path) -> None:
    s = np.arange(4, dtype=np.float32)
    path = write(tmp_path / "w.bin", {"w": Tensor("0", s, 2, (3,), (1,))})
    with pytest.raises(T.FormatError, match="past the end"):
        T.read(path)


def test_big_endian_and_other_objects_refused(tmp_path: Path) -> None:
    obj = {"w": tensor("0", np.zeros(2, np.float32))}
    with pytest.raises(T.FormatError, match="little-endian"):
        T.read(write(tmp_path / "be.bin", obj, sys_info={"little_endian": False}))
    for other, says in ((pickle.dumps([1, 2], protocol=2), "not a dict of tensors"),
                        (pickle.dumps({"w": 3}, protocol=2), "not a dict of named tensors")):
        with pytest.raises(T.FormatError, match=says):
            T.read(write(tmp_path / "other.bin", obj, object_pickle=other))


def test_unknown_storage_type_refused(tmp_path: Path) -> None:
    body, _, _ = dumps_object({"w": tensor("0", np.zeros(2, np.float32))})
    odd = body.replace(b"torch\nFloatStorage\n", b"torch\nQUInt8Storage\n")
    with pytest.raises(T.FormatError, match="refusing the global torch.QUInt8Storage"):
        T.read(write(tmp_path / "w.bin", {"w": tensor("0", np.zeros(2, np.float32))},
                     object_pickle=odd))


def test_magic_constant_is_torchs() -> None:
    # torch/serialization.py: MAGIC_NUMBER = 0x1950a86a20f9469cfc6c, PROTOCOL_VERSION = 1001.
    assert T.MAGIC == MAGIC == 0x1950A86A20F9469CFC6C and T.PROTOCOL == 1001
    assert Global("a", "b") == ("a", "b")
