"""Image I/O and pixel-space transforms: reading, resizing, VGG "caffe" pre/deprocessing, saving,
colour (YCbCr, luminance, histogram matching) and mask images.

Arrays in *preprocessed space* are float32, shaped (1, H, W, 3), BGR order with ``MEAN_BGR``
subtracted (Keras ``vgg16.preprocess_input``, mode "caffe"). Pillow is used only at the edges.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from nstjax.errors import UserError
from nstjax.runtime import npy_bytes, write_atomic

MEAN_BGR = (103.939, 116.779, 123.68)
DEFAULT_MAX_PIXELS = 40_000_000  # the config's image.max_pixels default
MIN_SIDE = 2

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

SAVE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".npy")

_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Errors Pillow raises for corrupt or truncated data (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)

# Full-range ITU-R BT.601 (JFIF), rows give Y, Cb, Cr from R, G, B; offsets are added after.
_YCBCR = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ]
)
_YCBCR_OFFSET = np.array([0.0, 128.0, 128.0])
_YCBCR_INV = np.linalg.inv(_YCBCR)


# ---------------------------------------------------------------- reading


def _check_file(path: Path) -> None:
    """Raise UserError if ``path`` is not an existing, readable, non-empty regular file."""
    import stat  # here: this helper's edits stay inside it

    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; check the path") from None
    except OSError as e:  # a symlink loop, a name too long, ...
        from nstjax.errors import cut

        raise UserError(f"{cut(str(path), 200)}: cannot open ({e.strerror or e}); check the path"
                        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: is a directory; give an image file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise UserError(f"{path}: not a regular file; give an image file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: permission denied; make the file readable")
    if st.st_size == 0:
        raise UserError(f"{path}: file is empty; give a valid image")


def _check_dims(path: Path, wh: tuple[int, int], max_pixels: int | None) -> None:
    w, h = wh
    if min(w, h) < MIN_SIDE:
        raise UserError(
            f"{path}: image is too small ({w}x{h}); need at least {MIN_SIDE}x{MIN_SIDE} pixels"
        )
    if max_pixels is not None and w * h > max_pixels:
        raise UserError(
            f"{path}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}; "
            "shrink the file or raise image.max_pixels"
        )


@contextlib.contextmanager
def _no_pillow_bomb_limit() -> Iterator[None]:
    """Disable Pillow's decompression-bomb limit so that ``max_pixels`` is the one that applies."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel 16/32-bit integer or float array to uint8."""
    a = arr.astype(np.float64)
    if mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        # Float images are conventionally 0..1; otherwise take them as already 0..255.
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    else:  # I;16* and I: 16-bit range (16-bit PNG/PGM/TIFF); 65535 -> 255
        a = np.clip(a, 0, 65535) / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def _to_rgb(path: Path, im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to a new 8-bit RGB image (transparency composited on white)."""
    if im.mode in _WIDE_MODES:
        gray = _to_8bit(np.asarray(im), im.mode)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return _composite_on_white(im)
    if im.mode == "RGB":
        return im.copy()
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise UserError(
            f"{path}: unsupported colour mode {im.mode!r}; convert the image to RGB"
        ) from e


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except _DECODE_ERRORS + (KeyError, TypeError):
        return im  # corrupt EXIF: keep the stored orientation rather than refusing the image
    return im if out is None else out


def read(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as 8-bit RGB: first frame, EXIF orientation applied, alpha on white.

    The pixel count is checked against ``max_pixels`` from the header, before decoding.
    """
    path = Path(path)
    _check_file(path)
    try:
        with _no_pillow_bomb_limit(), Image.open(path) as im:
            _check_dims(path, im.size, max_pixels)
            im.load()  # full decode now, so truncated data is detected here
            rgb = _to_rgb(path, _exif_transpose(im))
    except UserError:
        raise
    except PermissionError as e:
        raise UserError(f"{path}: permission denied; make the file readable") from e
    except Image.UnidentifiedImageError as e:
        raise UserError(f"{path}: not a recognised image file; give a PNG, JPEG, etc.") from e
    except _DECODE_ERRORS as e:
        raise UserError(f"{path}: cannot decode image ({e}); the file may be truncated") from e
    _check_dims(path, rgb.size, max_pixels)
    rgb.info.clear()  # drop EXIF/ICC etc.: callers get pixels only
    return rgb


# ---------------------------------------------------------------- sizes and resizing


def _positive_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def target_size(
    orig_wh: tuple[int, int], size: int | Sequence[int | None] | None
) -> tuple[int, int]:
    """Output (W, H) for ``size``: an int sets the longer side; [W, H] may leave one side None.

    The side given as None (or both, for an int) follows the original aspect ratio.
    ``size=None`` keeps the original size.
    """
    w0, h0 = int(orig_wh[0]), int(orig_wh[1])
    if size is None:
        return w0, h0
    bad = UserError(
        f"image size {size!r} is invalid; give an int (longer side) or [W, H] "
        "with positive ints, one of which may be null"
    )
    if _positive_int(size):
        scale = int(size) / max(w0, h0)
        return max(1, round(w0 * scale)), max(1, round(h0 * scale))
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
        raise bad
    w, h = size
    if not all(v is None or _positive_int(v) for v in (w, h)) or (w is None and h is None):
        raise bad
    if w is None:
        return max(1, round(w0 * int(h) / h0)), int(h)
    if h is None:
        return int(w), max(1, round(h0 * int(w) / w0))
    return int(w), int(h)


def resize(img: Image.Image, wh: tuple[int, int], resample: str = "bicubic") -> Image.Image:
    """Resize with Pillow; ``resample`` is a name from ``RESAMPLE`` (e.g. "bicubic")."""
    try:
        method = RESAMPLE[resample]
    except (KeyError, TypeError):
        raise UserError(
            f"resample method {resample!r} is unknown; use one of: {', '.join(RESAMPLE)}"
        ) from None
    return img.resize((int(wh[0]), int(wh[1])), method)


# ---------------------------------------------------------------- pixel <-> VGG space


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) in 0..255 -> float32 (1, H, W, 3) BGR minus ``MEAN_BGR`` (Keras "caffe")."""
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"preprocess expects an (H, W, 3) RGB array, got shape {a.shape}")
    bgr = a[..., ::-1].astype(np.float32)
    return (bgr - np.asarray(MEAN_BGR, np.float32))[None]


def _as_hwc(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected a (1, H, W, 3) or (H, W, 3) array, got shape {a.shape}")
    return a


def deprocess_float(x: np.ndarray) -> np.ndarray:
    """Preprocessed (1, H, W, 3) or (H, W, 3) -> float64 RGB (H, W, 3), not clipped."""
    bgr = _as_hwc(x).astype(np.float64) + np.asarray(MEAN_BGR, np.float64)
    return bgr[..., ::-1]


def deprocess(x: np.ndarray) -> np.ndarray:
    """Preprocessed (1, H, W, 3) or (H, W, 3) -> uint8 RGB (H, W, 3), clipped and rounded."""
    return np.clip(np.rint(deprocess_float(x)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- loading


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header, read without loading the data."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            else:
                shape, _, dtype = fmt.read_array_header_2_0(f)
    except PermissionError as e:
        raise UserError(f"{path}: permission denied; make the file readable") from e
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise UserError(f"{path}: not a valid .npy file ({e}); save arrays with np.save") from e
    return shape, dtype


def _load_npy(path: Path, size: object, max_pixels: int | None) -> np.ndarray:
    _check_file(path)
    shape, dtype = _npy_header(path)
    if dtype.kind not in "fiu":
        raise UserError(f"{path}: .npy must hold a float or int array, not dtype {dtype}")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[0] == 1)) or shape[-1] != 3:
        raise UserError(
            f"{path}: .npy has shape {shape}; need a preprocessed (H, W, 3) or (1, H, W, 3) array"
        )
    h, w = shape[-3], shape[-2]
    _check_dims(path, (w, h), max_pixels)
    want = target_size((w, h), size)  # type: ignore[arg-type]
    if want != (w, h):
        raise UserError(
            f"{path}: array is {w}x{h} but the requested size is {want[0]}x{want[1]}; "
            "arrays are never resampled, so save it at that size or set the size to null"
        )
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read .npy data ({e}); the file may be truncated") from e
    out = np.asarray(arr, dtype=np.float32).reshape(1, h, w, 3)
    if not np.isfinite(out).all():
        raise UserError(f"{path}: .npy contains NaN or infinite values; fix the array")
    return out


def load(
    path: str | os.PathLike,
    size: int | Sequence[int | None] | None = None,
    resample: str = "bicubic",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Load an image (or a preprocessed ``.npy``) as float32 (1, H, W, 3) in preprocessed space."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return _load_npy(path, size, max_pixels)
    img = read(path, max_pixels=max_pixels)
    wh = target_size(img.size, size)
    if max_pixels is not None and wh[0] * wh[1] > max_pixels:
        raise UserError(
            f"{path}: the requested size {wh[0]}x{wh[1]} = {wh[0] * wh[1]} pixels is over the "
            f"limit of {max_pixels}; lower image.size or raise image.max_pixels"
        )
    if wh != img.size:
        img = resize(img, wh, resample)
    return preprocess(np.asarray(img))


# ---------------------------------------------------------------- saving


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def encode_png16(rgb16: np.ndarray) -> bytes:
    """Encode a uint16 (H, W, 3) array as a 16-bit RGB PNG (Pillow cannot write this mode)."""
    h, w, _ = rgb16.shape
    raw = np.ascontiguousarray(rgb16, dtype=">u2").view(np.uint8).reshape(h, w * 6)
    # Filter type 2 ("Up") on every row: a cheap, vectorised filter that helps zlib a lot.
    up = raw.copy()
    up[1:] = raw[1:] - raw[:-1]  # uint8 arithmetic wraps modulo 256, as the spec requires
    rows = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def _encode(path: Path, x: np.ndarray, bits: int) -> bytes:
    ext = path.suffix.lower()
    if ext not in SAVE_EXTENSIONS:
        raise UserError(
            f"{path}: cannot save {ext or 'files without an extension'}; "
            f"use one of {', '.join(SAVE_EXTENSIONS)}"
        )
    if bits not in (8, 16):
        raise UserError(f"{path}: bit depth {bits} is unsupported; use 8 or 16")
    if ext == ".npy":
        return npy_bytes(_as_hwc(x)[None])
    buf = io.BytesIO()
    if bits == 16:
        if ext != ".png":
            raise UserError(f"{path}: 16-bit output needs a .png file; JPEG is 8-bit only")
        rgb = np.clip(deprocess_float(x), 0.0, 255.0)
        return encode_png16(np.rint(rgb * 257.0).astype(np.uint16))
    # Built from a bare array, so no EXIF or other metadata is carried over.
    img = Image.fromarray(deprocess(x), "RGB")
    if ext == ".png":
        img.save(buf, "PNG", optimize=False)
    else:
        img.save(buf, "JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def save(path: str | os.PathLike, x: np.ndarray, bits: int = 8) -> None:
    """Save a preprocessed array as PNG (8/16-bit), JPEG (quality 95) or raw ``.npy``, atomically.

    The format follows the extension; no metadata (EXIF etc.) is written.
    """
    path = Path(path)
    write_atomic(path, _encode(path, np.asarray(x), bits))


# ---------------------------------------------------------------- colour


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """RGB (..., 3) in 0..255 -> full-range BT.601 YCbCr (..., 3) float64, as JPEG/Pillow use."""
    return np.asarray(rgb, np.float64) @ _YCBCR.T + _YCBCR_OFFSET


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb_to_ycbcr`` (float64, not clipped)."""
    return (np.asarray(ycc, np.float64) - _YCBCR_OFFSET) @ _YCBCR_INV.T


def _sym_pow(cov: np.ndarray, p: float, eps: float = 1e-6) -> np.ndarray:
    """``cov ** p`` for a symmetric PSD matrix; tiny eigenvalues are floored for stability."""
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, eps)
    return (vecs * vals**p) @ vecs.T


def match_histogram(src_rgb: np.ndarray, ref_rgb: np.ndarray) -> np.ndarray:
    """Give ``src_rgb`` the RGB mean and covariance of ``ref_rgb`` (Gatys et al. 2016, sec. 2.1).

    Uses x' = C_ref^(1/2) C_src^(-1/2) (x - mu_src) + mu_ref with symmetric square roots.
    Returns float64 RGB shaped like ``src_rgb``, clipped to 0..255.
    """
    src = np.asarray(src_rgb, np.float64)
    ref = np.asarray(ref_rgb, np.float64).reshape(-1, 3)
    flat = src.reshape(-1, 3)
    mu_s, mu_r = flat.mean(0), ref.mean(0)
    cov_s = np.cov(flat, rowvar=False, bias=True)
    cov_r = np.cov(ref, rowvar=False, bias=True)
    a = _sym_pow(cov_r, 0.5) @ _sym_pow(cov_s, -0.5)
    out = (flat - mu_s) @ a.T + mu_r
    return np.clip(out, 0.0, 255.0).reshape(src.shape)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Y (BT.601, 0..255) of RGB (..., 3), as float64 (...)."""
    return rgb_to_ycbcr(rgb)[..., 0]


def gray(y: np.ndarray) -> np.ndarray:
    """Y (H, W) replicated into an RGB (H, W, 3) array."""
    return np.repeat(np.asarray(y, np.float64)[..., None], 3, axis=-1)


def match_luminance(y_style: np.ndarray, y_content: np.ndarray) -> np.ndarray:
    """The style's Y shifted and scaled to the content's mean and standard deviation."""
    sd_s = max(float(y_style.std()), 1e-6)
    return (y_style - y_style.mean()) * (float(y_content.std()) / sd_s) + y_content.mean()


def recolor(x: np.ndarray, content_ycc: np.ndarray) -> np.ndarray:
    """Preprocessed x with its own Y and the content's Cb/Cr (content_ycc (H, W, 3))."""
    y = luminance(deprocess_float(x))
    ycc = np.concatenate([y[..., None], content_ycc[..., 1:]], axis=-1)
    return preprocess(ycbcr_to_rgb(ycc))


# ---------------------------------------------------------------- masks


def load_mask(path: str, wh: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """A mask image as float32 (H, W) in 0..1 (white = 1), resized bilinearly to `wh`."""
    img = read(path, max_pixels=max_pixels).convert("L")
    if img.size != tuple(wh):
        img = resize(img, wh, "bilinear")
    return np.asarray(img, np.float32) / 255.0
