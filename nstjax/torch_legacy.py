"""Read a dict of tensors saved with PyTorch's legacy (non-zip) format, without torch.

The format (``torch.save(obj, f, _use_new_zipfile_serialization=False)``) is five pickles and
raw data: a magic number, a protocol version, a system-info dict, the object itself (tensors are
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls whose storages are
persistent ids), the list of storage keys, then for each key an int64 element count and the
storage's bytes. The unpickler here resolves only the names such a file needs (the rebuild call,
OrderedDict, numeric storage types) to inert records, so nothing in the file executes; every
other global is refused. Arrays are built with numpy from the storages afterwards.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001
# Storage type names and their numpy dtypes (little-endian, as the file's sys_info must say).
STORAGES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "ByteStorage": np.dtype("u1"),
    "CharStorage": np.dtype("i1"),
    "ShortStorage": np.dtype("<i2"),
    "IntStorage": np.dtype("<i4"),
    "LongStorage": np.dtype("<i8"),
}
MAX_TENSORS = 4096


class FormatError(ValueError):
    """The file is not a legacy torch file of plain tensors, or is damaged."""


class _Storage(NamedTuple):
    dtype: np.dtype
    key: str
    numel: int


class _Tensor(NamedTuple):
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType(NamedTuple):
    name: str


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise FormatError("a tensor whose storage is not a persistent storage record")
    ints = (offset, *size, *stride)
    if not all(type(v) is int and v >= 0 for v in ints) or len(size) != len(stride):
        raise FormatError("a tensor with a malformed offset, size or stride")
    return _Tensor(storage, offset, tuple(size), tuple(stride))


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in STORAGES},
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise FormatError(f"refusing the global {module}.{name} (only plain tensors are "
                              "read)") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise FormatError(f"unexpected persistent id {str(pid)[:60]}")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise FormatError("a storage of an unknown type")
        if view is not None:
            raise FormatError("storage views are not supported")
        if type(numel) is not int or numel < 0:
            raise FormatError("a storage with a malformed size")
        return _Storage(STORAGES[stype.name], key, numel)


def _load_one(fh: BinaryIO) -> Any:
    try:
        return _Unpickler(fh).load()
    except FormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RecursionError, MemoryError) as e:
        raise FormatError(f"unreadable pickle ({type(e).__name__}: {e})") from None


def _tensors(obj: Any) -> dict[str, _Tensor]:
    if not isinstance(obj, dict) or len(obj) > MAX_TENSORS:
        raise FormatError("the saved object is not a dict of tensors")
    if not all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in obj.items()):
        raise FormatError("the saved object is not a dict of named tensors")
    return obj


def read(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """{name: array} from a legacy torch file holding a dict of tensors (C-contiguous copies)."""
    data = Path(path).read_bytes()
    fh = io.BytesIO(data)
    if _load_one(fh) != MAGIC:
        raise FormatError("not a legacy torch file (bad magic number)")
    if _load_one(fh) != PROTOCOL:
        raise FormatError("unsupported legacy torch protocol version")
    info = _load_one(fh)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise FormatError("not a little-endian legacy torch file")
    tensors = _tensors(_load_one(fh))
    keys = _load_one(fh)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise FormatError("malformed storage key list")
    storages = {t.storage.key: t.storage for t in tensors.values()}
    if set(keys) != set(storages) or len(keys) != len(storages):
        raise FormatError("the storage key list does not match the tensors' storages")
    buffers: dict[str, np.ndarray] = {}
    for key in keys:
        st = storages[key]
        head = fh.read(8)
        if len(head) != 8 or int.from_bytes(head, "little", signed=True) != st.numel:
            raise FormatError(f"storage {key}: size field does not match ({st.numel} elements)")
        nbytes = st.numel * st.dtype.itemsize
        raw = fh.read(nbytes)
        if len(raw) != nbytes:
            raise FormatError(f"storage {key}: truncated ({len(raw)} of {nbytes} bytes)")
        buffers[key] = np.frombuffer(raw, st.dtype)
    if fh.read(1):
        raise FormatError("trailing bytes after the last storage")
    return {name: _array(t, buffers[t.storage.key]) for name, t in tensors.items()}


def _array(t: _Tensor, buf: np.ndarray) -> np.ndarray:
    if not t.shape:
        last = t.offset
    else:
        last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride) if n > 0)
    if any(n == 0 for n in t.shape):
        return np.zeros(t.shape, buf.dtype)
    if last >= buf.size:
        raise FormatError("a tensor reaches past the end of its storage")
    item = buf.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        buf[t.offset:], t.shape, tuple(s * item for s in t.stride), writeable=False)
    return np.array(view, dtype=buf.dtype.newbyteorder("="), order="C")
