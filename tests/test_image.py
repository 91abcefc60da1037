"""Tests for nstjax.image, against hand-computed values, Pillow, and the PNG spec."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from nstjax import image
from nstjax.errors import UserError

MEAN = np.array([103.939, 116.779, 123.68])


def rgb_of(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def assert_user_error(path: Path, match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def decode_png(data: bytes) -> tuple[dict, np.ndarray]:
    """Minimal reference PNG decoder (non-interlaced, any filter), straight from the spec."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, hdr = 8, b"", {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        if tag == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            hdr = {"w": w, "h": h, "depth": depth, "ctype": ctype, "interlace": interlace}
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    assert hdr["depth"] == 16 and hdr["ctype"] == 2 and hdr["interlace"] == 0
    w, h, bpp = hdr["w"], hdr["h"], 6
    raw, stride, prev = zlib.decompress(idat), w * 6, bytearray(w * 6)
    rows = []
    for y in range(h):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            pred = {0: 0, 1: a, 2: b, 3: (a + b) // 2}.get(ftype)
            if ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    arr = np.frombuffer(b"".join(rows), dtype=">u2").reshape(h, w, 3)
    return hdr, arr.astype(np.uint16)


# ---------------------------------------------------------------- preprocess / deprocess


def test_preprocess_matches_hand_computed_caffe_values():
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], np.uint8)
    want = np.array(
        [
            [[-103.939, -116.779, 131.32], [-103.939, 138.221, -123.68]],
            [[151.061, -116.779, -123.68], [-73.939, -96.779, -113.68]],
        ]
    )
    got = image.preprocess(rgb)
    assert got.shape == (1, 2, 2, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], want, atol=1e-4)
    np.testing.assert_allclose(image.preprocess(rgb.astype(np.float64)), got, atol=1e-6)


def test_deprocess_round_trip_and_clipping():
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    x = image.preprocess(rgb)
    assert np.array_equal(image.deprocess(x), rgb)
    assert np.array_equal(image.deprocess(x[0]), rgb)
    np.testing.assert_allclose(image.deprocess_float(x), rgb, atol=1e-4)
    big = np.full((1, 2, 2, 3), 1000.0) - MEAN
    assert image.deprocess(big).dtype == np.uint8 and (image.deprocess(big) == 255).all()
    assert (image.deprocess(-big - 2 * MEAN) == 0).all()
    assert image.deprocess_float(big).max() == pytest.approx(1000.0)


# ---------------------------------------------------------------- reading: modes and formats


def test_rgba_composited_on_white(tmp_path):
    px = np.array([[[255, 0, 0, 128], [0, 0, 255, 0], [10, 20, 30, 255]]] * 2, np.uint8)
    p = tmp_path / "a.png"
    Image.fromarray(px, "RGBA").save(p)
    got = rgb_of(image.read(p))
    assert got[0].tolist() == [[255, 127, 127], [255, 255, 255], [10, 20, 30]]


def test_la_and_l(tmp_path):
    la = np.array([[[100, 255], [0, 0]]] * 2, np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert rgb_of(image.read(tmp_path / "la.png"))[0].tolist() == [[100] * 3, [255] * 3]
    Image.new("L", (3, 2), 77).save(tmp_path / "l.png")
    assert (rgb_of(image.read(tmp_path / "l.png")) == 77).all()


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency(tmp_path, ext):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.paste(1, (2, 0, 4, 2))
    p = tmp_path / f"p.{ext}"
    im.save(p, transparency=1)
    got = rgb_of(image.read(p))
    assert got[0].tolist() == [[255, 0, 0]] * 2 + [[255, 255, 255]] * 2


def test_palette_without_transparency(tmp_path):
    im = Image.new("P", (2, 2), 1)
    im.putpalette([255, 0, 0, 0, 0, 200] + [0] * 762)
    im.save(tmp_path / "p.png")
    assert (rgb_of(image.read(tmp_path / "p.png")) == [0, 0, 200]).all()


def test_cmyk(tmp_path):
    im = Image.new("CMYK", (3, 2), (0, 0, 0, 0))
    im.putpixel((0, 0), (0, 255, 255, 0))
    im.putpixel((1, 0), (0, 0, 0, 255))
    im.save(tmp_path / "c.tif")
    got = rgb_of(image.read(tmp_path / "c.tif"))
    assert got[0].tolist() == [[255, 0, 0], [0, 0, 0], [255, 255, 255]]


def test_16bit_png_scaled_by_257(tmp_path):
    a = np.array([[0, 25700], [65535, 12345]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    got = rgb_of(image.read(tmp_path / "g.png"))
    assert got[..., 0].tolist() == [[0, 100], [255, 48]]
    assert (got == got[..., :1]).all()


def test_32bit_int_and_float(tmp_path):
    Image.fromarray(np.array([[0, 25700], [65535, 70000]], np.int32), "I").save(tmp_path / "i.tif")
    assert image.read(tmp_path / "i.tif").getpixel((0, 1)) == (255, 255, 255)
    assert rgb_of(image.read(tmp_path / "i.tif"))[..., 1].tolist() == [[0, 100], [255, 255]]
    f = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    assert rgb_of(image.read(tmp_path / "f.tif"))[..., 2].tolist() == [[0, 128], [255, 64]]


def test_1bit(tmp_path):
    im = Image.new("1", (2, 2), 0)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "b.png")
    assert rgb_of(image.read(tmp_path / "b.png"))[..., 0].tolist() == [[0, 255], [0, 0]]


def blocks() -> np.ndarray:
    """16x32 image of four flat colour blocks (survives lossy codecs well)."""
    a = np.zeros((16, 32, 3), np.uint8)
    a[:8, :16], a[:8, 16:], a[8:, :16], a[8:, 16:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), 200
    return a


@pytest.mark.parametrize(
    "ext, kwargs, tol",
    [
        ("png", {}, 0),
        ("bmp", {}, 0),
        ("tif", {}, 0),
        ("gif", {}, 0),
        ("webp", {"lossless": True}, 0),
        ("jpg", {"quality": 95}, 12),
    ],
)
def test_formats(tmp_path, ext, kwargs, tol):
    if ext == "webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    p = tmp_path / f"x.{ext}"
    Image.fromarray(blocks()).save(p, **kwargs)
    got = rgb_of(image.read(p))
    assert got.shape == (16, 32, 3)
    assert np.abs(got[2:6, 2:14] - blocks()[2:6, 2:14]).max() <= tol
    assert np.abs(got[10:14, 18:30] - 200).max() <= tol


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_exif_orientation_6(tmp_path, ext):
    a = np.zeros((16, 32, 3), np.uint8)
    a[..., 2] = 255
    a[:8, :8] = (255, 0, 0)  # stored top-left corner is red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / f"e.{ext}"
    Image.fromarray(a).save(p, exif=exif)
    got = image.read(p)
    assert got.size == (16, 32) and "exif" not in got.info
    px = rgb_of(got)
    assert np.abs(px[3, 12] - [255, 0, 0]).max() < 20  # now top-right
    assert np.abs(px[3, 3] - [0, 0, 255]).max() < 20
    assert np.abs(px[28, 12] - [0, 0, 255]).max() < 20


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(p).n_frames == 3
    assert (rgb_of(image.read(p)) == [255, 0, 0]).all()


def test_pillow_bomb_limit_does_not_apply_and_is_restored(tmp_path, monkeypatch):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert image.read(tmp_path / "x.png", max_pixels=10_000).size == (32, 32)
    assert Image.MAX_IMAGE_PIXELS == 100


# ---------------------------------------------------------------- reading: bad input


def test_missing_file(tmp_path):
    p = tmp_path / "nope.png"
    assert_user_error(p, "not found", image.read, p)


def test_directory(tmp_path):
    assert_user_error(tmp_path, "directory", image.read, tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert_user_error(p, "empty", image.read, p)


def test_truncated_jpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    p = tmp_path / "cut.jpg"
    Image.fromarray(noise).save(p, quality=90)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert Image.open(p).size == (64, 64)  # the header alone is fine
    assert_user_error(p, "truncated", image.read, p)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("just some text\n")
    assert_user_error(p, "not a recognised image", image.read, p)


def test_one_pixel_image(tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(p)
    assert_user_error(p, r"too small \(1x1\)", image.read, p)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file"
)
def test_unreadable_file(tmp_path):
    p = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(p)
    p.chmod(0)
    try:
        assert_user_error(p, "permission", image.read, p)
    finally:
        p.chmod(0o644)


def huge_png_header(w: int, h: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # far too little data: decoding would fail
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_too_many_pixels_refused_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "huge.png"
    p.write_bytes(huge_png_header(100_000, 80_000))

    def no_decode(self):
        raise AssertionError("image data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    msg = assert_user_error(p, "image.max_pixels", image.read, p, max_pixels=1_000_000)
    assert "100000x80000" in msg and "1000000" in msg
    # the default limit also refuses it, rather than Pillow's own bomb check
    assert_user_error(p, "image.max_pixels", image.read, p)


# ---------------------------------------------------------------- sizes and resizing


@pytest.mark.parametrize(
    "orig, size, want",
    [
        ((400, 300), None, (400, 300)),
        ((400, 300), 200, (200, 150)),
        ((300, 400), 200, (150, 200)),
        ((400, 300), 800, (800, 600)),
        ((400, 300), [100, None], (100, 75)),
        ((400, 300), (None, 150), (200, 150)),
        ((400, 300), [50, 60], (50, 60)),
        ((333, 222), 100, (100, 67)),
        ((1000, 1), 10, (10, 1)),
        ((1000, 2), [None, 1], (500, 1)),
    ],
)
def test_target_size(orig, size, want):
    assert image.target_size(orig, size) == want


@pytest.mark.parametrize("size", [0, -5, True, 2.5, "big", [None, None], [0, 10], [1, 2, 3]])
def test_target_size_invalid(size):
    with pytest.raises(UserError, match="image size"):
        image.target_size((10, 10), size)


def test_resize_nearest_matches_pillow():
    src = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    got = image.resize(src, (13, 7), "nearest")
    want = src.resize((13, 7), Image.Resampling.NEAREST)
    assert got.size == (13, 7) and np.array_equal(np.asarray(got), np.asarray(want))


def test_resize_unknown_method():
    with pytest.raises(UserError, match="bicubic.*lanczos"):
        image.resize(Image.new("RGB", (4, 4)), (2, 2), "cubic")


# ---------------------------------------------------------------- load (images and .npy)


def test_load_image_with_size(tmp_path):
    Image.fromarray(blocks()).save(tmp_path / "b.png")
    x = image.load(tmp_path / "b.png", size=16, resample="nearest")
    assert x.shape == (1, 8, 16, 3) and x.dtype == np.float32
    assert image.deprocess(x)[1, 1].tolist() == [255, 0, 0]
    full = image.load(tmp_path / "b.png")
    assert np.array_equal(image.deprocess(full), blocks())


def test_load_npy_both_shapes(tmp_path):
    arr = np.random.default_rng(3).normal(0, 50, (6, 9, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    np.save(tmp_path / "b.npy", arr[None].astype(np.float64))
    np.save(tmp_path / "c.npy", np.arange(6 * 9 * 3, dtype=np.int16).reshape(6, 9, 3))
    for name in ("a.npy", "b.npy"):
        x = image.load(tmp_path / name)
        assert x.shape == (1, 6, 9, 3) and x.dtype == np.float32
        np.testing.assert_allclose(x[0], arr, rtol=1e-6)
    assert image.load(tmp_path / "c.npy")[0, 0, 1, 0] == 3.0
    assert image.load(tmp_path / "a.npy", size=9).shape == (1, 6, 9, 3)
    assert image.load(tmp_path / "a.npy", size=[9, None]).shape == (1, 6, 9, 3)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((6, 9, 4), np.float32), "shape"),
        (np.zeros((2, 6, 9, 3), np.float32), "shape"),
        (np.zeros((6, 9), np.float32), "shape"),
        (np.zeros((6, 9, 3), "U3"), "float or int"),
        (np.zeros((6, 9, 3), bool), "float or int"),
        (np.array([[[{"a": 1}] * 3] * 9] * 6, dtype=object), "float or int"),
        (np.full((6, 9, 3), np.nan, np.float32), "NaN"),
        (np.zeros((1, 1, 3), np.float32), "too small"),
    ],
)
def test_load_npy_refused(tmp_path, arr, match):
    p = tmp_path / "bad.npy"
    np.save(p, arr, allow_pickle=True)
    assert_user_error(p, match, image.load, p)


def test_load_npy_size_mismatch_and_junk(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.zeros((6, 9, 3), np.float32))
    assert_user_error(p, "9x6.*never resampled", image.load, p, size=32)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"definitely not numpy")
    assert_user_error(junk, "not a valid .npy", image.load, junk)
    truncated = tmp_path / "cut.npy"
    truncated.write_bytes(p.read_bytes()[:200])
    assert_user_error(truncated, "truncated", image.load, truncated)
    assert_user_error(tmp_path / "gone.npy", "not found", image.load, tmp_path / "gone.npy")


# ---------------------------------------------------------------- saving


def smooth_rgb(h: int = 24, w: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 4 % 256], -1).astype(
        np.uint8
    )


def test_save_png8_round_trip_without_metadata(tmp_path):
    rgb = smooth_rgb()
    p = tmp_path / "out.png"
    image.save(p, image.preprocess(rgb))
    with Image.open(p) as im:
        assert im.format == "PNG" and im.mode == "RGB" and not im.getexif()
        assert "exif" not in im.info
    assert np.array_equal(image.deprocess(image.load(p)), rgb)


def test_save_jpeg(tmp_path):
    rgb = smooth_rgb()
    for name in ("out.jpg", "OUT.JPEG"):
        image.save(tmp_path / name, image.preprocess(rgb))
        with Image.open(tmp_path / name) as im:
            assert im.format == "JPEG" and not im.getexif() and "exif" not in im.info
        diff = np.abs(rgb_of(image.read(tmp_path / name)) - rgb)
        assert diff.mean() < 2 and diff.max() < 20


def test_save_png16_exact(tmp_path):
    k = np.random.default_rng(4).integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    k[0, 0], k[0, 1] = 0, 65535
    p = tmp_path / "deep.png"
    image.save(p, image.preprocess(k / 257.0), bits=16)
    hdr, decoded = decode_png(p.read_bytes())
    assert (hdr["w"], hdr["h"]) == (7, 5)
    assert np.array_equal(decoded, k)
    with Image.open(p) as im:  # Pillow reads 16-bit RGB as 8-bit RGB
        assert im.size == (7, 5) and im.mode == "RGB"
        assert np.abs(np.asarray(im).astype(float) - k / 257.0).max() <= 1.0
    assert np.abs(image.deprocess_float(image.load(p)) - k / 257.0).max() <= 1.0


def test_save_png16_clips(tmp_path):
    x = np.array([[[-500.0, 500.0, 0.0], [0.0, 0.0, 0.0]]] * 2)[None] - MEAN
    image.save(tmp_path / "c.png", x, bits=16)
    _, decoded = decode_png((tmp_path / "c.png").read_bytes())
    # preprocessed pixel is BGR (-500, 500, 0) plus mean; the output is RGB (0, 65535, 0)
    assert decoded[0, 0].tolist() == [0, 65535, 0]


def test_save_npy(tmp_path):
    x = image.preprocess(smooth_rgb())
    image.save(tmp_path / "raw.npy", x[0])
    back = np.load(tmp_path / "raw.npy")
    assert back.dtype == np.float32 and np.array_equal(back, x)
    assert np.array_equal(image.load(tmp_path / "raw.npy"), x)


def test_save_refusals(tmp_path):
    x = image.preprocess(smooth_rgb())
    assert_user_error(tmp_path / "a.gif", "use one of", image.save, tmp_path / "a.gif", x)
    assert_user_error(tmp_path / "noext", "use one of", image.save, tmp_path / "noext", x)
    assert_user_error(tmp_path / "a.jpg", "16-bit", image.save, tmp_path / "a.jpg", x, bits=16)
    assert_user_error(tmp_path / "a.png", "bit depth", image.save, tmp_path / "a.png", x, bits=12)
    assert os.listdir(tmp_path) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    x = image.preprocess(smooth_rgb())
    for name in ("a.png", "b.jpg", "c.npy"):
        image.save(tmp_path / name, x)
    image.save(tmp_path / "a.png", x, bits=16)  # overwrite in place
    image.save(tmp_path / "sub" / "d.png", x)  # missing parent is created
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.jpg", "c.npy", "sub"]
    assert os.listdir(tmp_path / "sub") == ["d.png"]

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    before = (tmp_path / "a.png").read_bytes()
    assert_user_error(tmp_path / "a.png", "No space", image.save, tmp_path / "a.png", x)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.jpg", "c.npy", "sub"]
    assert (tmp_path / "a.png").read_bytes() == before


# ---------------------------------------------------------------- colour


def test_ycbcr_matches_pillow():
    rgb = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pil_ycc = np.asarray(Image.fromarray(rgb).convert("YCbCr")).astype(float)
    ours = image.rgb_to_ycbcr(rgb)
    assert np.abs(np.rint(ours) - pil_ycc).max() <= 1
    pil_rgb = np.asarray(Image.fromarray(pil_ycc.astype(np.uint8), "YCbCr").convert("RGB"))
    back = np.clip(np.rint(image.ycbcr_to_rgb(pil_ycc)), 0, 255)
    assert np.abs(back - pil_rgb.astype(float)).max() <= 1
    np.testing.assert_allclose(image.ycbcr_to_rgb(ours), rgb, atol=1e-9)
    assert image.rgb_to_ycbcr(np.array([255.0, 255.0, 255.0])) == pytest.approx([255, 128, 128])


def test_match_histogram_moments():
    rng = np.random.default_rng(6)
    mix = np.array([[1.0, 0.3, 0.0], [0.2, 0.8, 0.1], [0.0, 0.5, 0.6]])
    src = (rng.normal(0, 15, (100, 100, 3)) @ mix.T + [90, 110, 140]).clip(0, 255)
    chol = np.array([[18.0, 4, -3], [0, 12, 5], [0, 0, 9]])
    ref = rng.normal(0, 1, (60, 80, 3)) @ chol + [130, 100, 120]
    out = image.match_histogram(src, ref)
    assert out.shape == src.shape and out.min() >= 0 and out.max() <= 255
    flat, rf = out.reshape(-1, 3), ref.reshape(-1, 3)
    np.testing.assert_allclose(flat.mean(0), rf.mean(0), atol=0.5)
    cov_ref = np.cov(rf, rowvar=False)
    np.testing.assert_allclose(np.cov(flat, rowvar=False), cov_ref, atol=0.02 * cov_ref.max())


def test_match_histogram_flat_source_is_finite():
    ref = np.random.default_rng(7).random((8, 8, 3)) * 255
    out = image.match_histogram(np.full((4, 4, 3), 50.0), ref)
    assert np.isfinite(out).all()
