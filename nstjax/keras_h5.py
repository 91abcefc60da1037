"""Read VGG16 conv params from Keras HDF5 weights files, and the checks every weights reader
applies (layer present, shapes, dtypes, finite values).

Layouts: Keras 2 (``layer_names`` / ``weight_names`` attributes, at the root or under
``model_weights/`` for full-model saves, nested models included) and Keras 3 ``.weights.h5``
(``<path>/<layer>/vars/{0,1}``, HED's ``blockN/layers/conv2d_k`` nesting included). Every
dataset's declared shape and dtype is checked before any data is read, so a small file that
declares a huge array is refused cheaply. Nothing here executes code from the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nstjax.errors import UserError
from nstjax.vgg16 import NAMES as VGG16_NAMES
from nstjax.vgg16 import VGG19_CONVS

VGG19_NAMES = tuple(name for name, _, _ in VGG19_CONVS)
VGG19_ONLY = tuple(name for name in VGG19_NAMES if name not in VGG16_NAMES)

# {"block1_conv1": {"kernel": float32 (3,3,in,out) HWIO, "bias": (out,)}, ...}
Params = dict[str, dict[str, np.ndarray]]
ConvTable = Sequence[tuple[str, int, int]]  # (name, input channels, output channels)
Shapes = dict[str, dict[str, tuple[int, ...]]]


def fmt_shape(shape: Sequence[int]) -> str:
    """A shape as the errors print it: ``(3,3,64,64)``."""
    return "(" + ",".join(str(int(s)) for s in shape) + ")"


def need_shapes(convs: ConvTable) -> Shapes:
    """{layer: {"kernel": (3, 3, in, out), "bias": (out,)}} for a conv table."""
    return {name: {"kernel": (3, 3, cin, cout), "bias": (cout,)} for name, cin, cout in convs}


def arch_name(convs: ConvTable) -> str:
    """`vgg19` for a table with VGG19's extra layers (block3_conv4 ...), else `vgg16`."""
    return "vgg19" if any(name in VGG19_ONLY for name, _, _ in convs) else "vgg16"


def infer_arch(names: Any) -> str | None:
    """The arch a file's conv layer names show: `vgg19` with any of VGG19's extra layers,
    `vgg16` with all of VGG16's and none of those, else None (too few layers to tell)."""
    names = set(names)
    if names & set(VGG19_ONLY):
        return "vgg19"
    return "vgg16" if set(VGG16_NAMES) <= names else None


def check_arch(label: str, names: Any, convs: ConvTable) -> None:
    """Refuse a file holding conv layers of a bigger arch than `convs` (VGG19's extra layers
    read as VGG16 would be dropped without a word)."""
    extra = [n for n in VGG19_ONLY if n in set(names)]
    want = {name for name, _, _ in convs}
    extra = [n for n in extra if n not in want]
    if extra:
        raise UserError(f"weights file {label}: holds VGG19's layers ({', '.join(extra)}), but "
                        f"model.arch is {arch_name(convs)}; use model.arch=vgg19 (weights "
                        "convert: --arch vgg19)")


def check_header(label: str, layer: str, what: str, shape: Any, dtype: np.dtype,
                 need: tuple[int, ...], arch: str = "vgg16") -> None:
    """Refuse a declared shape or dtype before any data is read (a small file may declare a
    huge array)."""
    if dtype.kind not in "fiu" or dtype.hasobject:
        raise UserError(f"weights file {label}: layer {layer} {what} has dtype {dtype}, "
                        "not numbers; re-create the file")
    if shape is None or tuple(shape) != need:
        got = "no data" if shape is None else f"shape {fmt_shape(shape)}"
        raise UserError(f"weights file {label}: layer {layer} has {what} {got}, "
                        f"{arch.upper()} needs {fmt_shape(need)}")


def check_params(label: str, params: Params, convs: ConvTable) -> Params:
    """Keep only the layers of `convs`, checking each is present, shaped right and finite, and
    that the file holds no layer of a bigger arch (`check_arch`)."""
    arch = arch_name(convs).upper()
    if not any(name in params for name, _, _ in convs):
        raise UserError(
            f"weights file {label}: no {arch} conv layers found (block1_conv1 ...); "
            f"use a Keras {arch} (or, for VGG16, HED) weights file"
        )
    check_arch(label, params, convs)
    out: Params = {}
    for name, need in need_shapes(convs).items():
        if name not in params:
            hint = ("; a VGG16 file? use model.arch=vgg16" if name.endswith("_conv4")
                    and "block5_conv3" in params else "")
            raise UserError(
                f"weights file {label}: layer {name} not found "
                f"(found: {', '.join(sorted(params))}){hint}"
            )
        for what, shape in need.items():
            arr = params[name][what]
            if arr.shape != shape:
                raise UserError(
                    f"weights file {label}: layer {name} has {what} shape "
                    f"{fmt_shape(arr.shape)}, {arch} needs {fmt_shape(shape)}"
                )
            if not np.isfinite(arr).all():
                raise UserError(f"weights file {label}: layer {name} {what} contains NaN/Inf")
        out[name] = {"kernel": params[name]["kernel"], "bias": params[name]["bias"]}
    return out


# --------------------------------------------------------------------------- reading


def read_h5(path: str | os.PathLike[str], convs: ConvTable) -> Params:
    """Read the conv params of `convs` from a Keras 2 (legacy) or Keras 3 (.weights.h5) file."""
    label = str(path)
    if not Path(path).is_file():
        raise UserError(f"weights file {label} not found")
    names = need_shapes(convs)
    arch = arch_name(convs)
    try:
        with h5py.File(path, "r") as f:
            found = _find(label, f, names)
            check_arch(label, found, convs)
            found = {name: _kernel_bias(label, name, ds, names[name], arch)
                     for name, ds in found.items() if name in names}
            # Every dataset's header is checked (in _kernel_bias) before any is read.
            raw = {
                name: {w: np.asarray(ds[()]).astype(np.float32, copy=False)
                       for w, ds in layer.items()}
                for name, layer in found.items()
            }
    except (OSError, RuntimeError) as e:
        raise UserError(
            f"weights file {label} is not a readable HDF5 weights file ({e}); "
            "re-download it or pass another file"
        ) from e
    return check_params(label, raw, convs)


def layer_names(path: str | os.PathLike[str]) -> list[str]:
    """The VGG16/VGG19 conv layer names a Keras .h5 file holds (no data read)."""
    label = str(path)
    if not Path(path).is_file():
        raise UserError(f"weights file {label} not found")
    try:
        with h5py.File(path, "r") as f:
            return list(_find(label, f, {}))
    except (OSError, RuntimeError) as e:
        raise UserError(
            f"weights file {label} is not a readable HDF5 weights file ({e}); "
            "re-download it or pass another file"
        ) from e


def _find(label: str, f: h5py.File, names: Shapes) -> dict[str, list[Any]]:
    """{layer: [kernel, bias datasets]} of every conv layer named like VGG16's or VGG19's (or
    like `names`), unread."""
    known = set(names) | set(VGG19_NAMES)
    root = _legacy_root(f)
    return _read_legacy(label, root, known) if root else _read_keras3(label, f, known)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _strings(attr: Any) -> list[str]:
    """An HDF5 string-array attribute (bytes or str elements) as a list of str."""
    return [_text(v) for v in np.atleast_1d(np.asarray(attr)).tolist()]


def _dataset(label: str, layer: str, what: str, obj: Any, need: tuple[int, ...],
             arch: str = "vgg16") -> Any:
    if not isinstance(obj, h5py.Dataset):
        raise UserError(f"weights file {label}: layer {layer} {what} is not a numeric dataset")
    check_header(label, layer, what, obj.shape, obj.dtype, need, arch)
    return obj


def _kernel_bias(label: str, name: str, datasets: list[Any], need: dict[str, tuple[int, ...]],
                 arch: str = "vgg16") -> dict[str, Any]:
    """The kernel and bias datasets of a layer, their shapes and dtypes checked (not read)."""
    if len(datasets) != 2:
        raise UserError(
            f"weights file {label}: layer {name} has {len(datasets)} weights, "
            f"{arch.upper()} needs a kernel and a bias"
        )
    return {
        "kernel": _dataset(label, name, "kernel", datasets[0], need["kernel"], arch),
        "bias": _dataset(label, name, "bias", datasets[1], need["bias"], arch),
    }


def _legacy_root(f: h5py.File) -> h5py.Group | None:
    """The group carrying Keras 2's ``layer_names`` (root, or ``model_weights/`` for full saves)."""
    if "layer_names" in f.attrs:
        return f
    mw = f.get("model_weights")
    if isinstance(mw, h5py.Group) and "layer_names" in mw.attrs:
        return mw
    return None


def _read_legacy(label: str, root: h5py.Group, names: set[str]) -> dict[str, list[Any]]:
    """Keras 2: each layer group lists its datasets in ``weight_names`` (kernel, then bias)."""
    found: dict[str, list[Any]] = {}
    for layer in _strings(root.attrs["layer_names"]):
        group = root.get(layer)
        if not isinstance(group, h5py.Group):
            continue
        for wname in _strings(group.attrs.get("weight_names", [])):
            # Nested models list "block1_conv1/kernel:0" under the outer layer's group.
            owner = next((p for p in wname.split("/") if p in names), None)
            owner = owner or (layer if layer in names else None)
            if owner is None:
                continue
            if wname not in group:
                raise UserError(
                    f"weights file {label}: layer {owner} lists weight {wname!r} "
                    "but the dataset is missing; the file is damaged"
                )
            found.setdefault(owner, []).append(group[wname])
    return found


_CONV2D = re.compile(r"conv2d(?:_(\d+))?")
_BLOCK = re.compile(r"block(\d+)")


def _read_keras3(label: str, f: h5py.File, names: set[str]) -> dict[str, list[Any]]:
    """Keras 3: any group with ``vars/0`` (kernel) and ``vars/1`` (bias), named like VGG16."""
    candidates: list[str] = []

    def visit(path: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and "vars" in obj:
            candidates.append(path)

    f.visititems(visit)
    positional = _hed_positions(candidates, names)
    where: dict[str, list[str]] = {}
    for path in candidates:
        name = _keras3_name(f[path], path, positional, names)
        if name:
            where.setdefault(name, []).append(path)
    params: dict[str, list[Any]] = {}
    for name, paths in where.items():
        if len(paths) > 1:
            raise UserError(
                f"weights file {label}: layer {name} found more than once ({', '.join(paths)}); "
                "convert the VGG16 part on its own"
            )
        vars_ = f[paths[0]]["vars"]
        params[name] = [vars_.get(k) for k in ("0", "1") if k in vars_]
    return params


def _keras3_name(group: h5py.Group, path: str, positional: dict[str, str], names: set[str]
                 ) -> str | None:
    """VGG16 name of a Keras 3 layer group: its own name, HED position, or ``vars`` name attr."""
    base = path.rsplit("/", 1)[-1]
    if base in names:
        return base
    if path in positional:
        return positional[path]
    attr = _text(group["vars"].attrs.get("name", ""))
    return attr if attr in names else None


def _hed_positions(candidates: list[str], names: set[str]) -> dict[str, str]:
    """HED nesting: ``blockN/layers/conv2d, conv2d_1, ...`` -> blockN_conv1, conv2, ... in order."""
    per_block: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for path in candidates:
        parts = path.split("/")
        if len(parts) < 3 or parts[-2] != "layers":
            continue
        conv, block = _CONV2D.fullmatch(parts[-1]), _BLOCK.fullmatch(parts[-3])
        if conv and block:
            key = ("/".join(parts[:-2]), block.group(1))
            per_block.setdefault(key, []).append((int(conv.group(1) or 0), path))
    out: dict[str, str] = {}
    for (_, number), convs in per_block.items():
        for rank, (_, path) in enumerate(sorted(convs), start=1):
            name = f"block{number}_conv{rank}"
            if name in names:
                out[path] = name
    return out
