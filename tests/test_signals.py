"""Faults during a run: SIGINT/SIGTERM on a real `nstjax run` process, a second Ctrl-C, a signal
while compiling, NaN/Inf, a crash, two runs at once, and atomic writes (no partial files); and
signals before the run (while importing, while loading), a signal ignored when nstjax starts.

Tests that send signals set the handlers they rely on (in-process: `_default_sigint`; children:
`_cli`), so the suite passes however pytest was started (a background job of a
non-interactive shell inherits SIGINT ignored; nohup, SIGHUP ignored)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import after_chunks, history, record, write_tiny
from conftest import quiet_cli as nstjax
from PIL import Image

from nstjax import cli, config, image, losses, run
from nstjax.record import STATE_FILE


def assert_complete(d: Path, status: str) -> dict:
    """The run directory is whole: run.json with `status`, final image = last.npy, a finite
    history numbered 0..iterations, and no temporary or partial file."""
    rec = record(d)
    assert rec["status"] == status, rec
    rows = history(d)
    assert [int(r["iter"]) for r in rows] == list(range(len(rows)))
    assert rec["iterations"] == int(rows[-1]["iter"])
    assert all(np.isfinite(v) for r in rows for v in r.values())
    x = np.load(d / "last.npy", allow_pickle=False)
    assert np.isfinite(x).all()
    assert np.array_equal(np.asarray(Image.open(d / "final.png")), image.deprocess(x))
    left = [p.name for p in d.iterdir() if p.name.startswith(".") or "tmp" in p.name]
    assert not left, left
    return rec


@pytest.fixture(autouse=True)
def _default_sigint():
    """Python's own SIGINT handler, as in an interactive shell (see the module docstring)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _cli(*args: str, ignored: tuple[int, ...] = ()) -> list[str]:
    """argv running `nstjax args` with SIGINT, SIGTERM, SIGHUP as in an interactive shell, except
    `ignored` (as if its parent ignored them). Not a preexec_fn: forking a process that runs JAX
    threads can deadlock."""
    setup = ("import runpy, signal, sys\n"
             "for s in (signal.SIGTERM, signal.SIGHUP):\n"
             "    signal.signal(s, signal.SIG_DFL)\n"
             "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
             f"for s in {[int(s) for s in ignored]}:\n"
             "    signal.signal(s, signal.SIG_IGN)\n"
             "sys.argv = ['nstjax', *sys.argv[1:]]\n"
             "runpy.run_module('nstjax.cli', run_name='__main__')\n")
    return [sys.executable, "-c", setup, *args]


# --------------------------------------------------------------------------- real signals


def _start(cfg: Path, cwd: Path, home: Path, *where: str) -> subprocess.Popen:
    env = {**os.environ, "NSTJAX_HOME": str(home), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(_cli("run", str(cfg), *where, "--quiet"), env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _dir_of(p: subprocess.Popen, runs: Path) -> Path | None:
    """The run directory (under `runs`) whose run.json names process p."""
    for d in runs.glob("*"):
        try:
            if record(d).get("pid") == p.pid:
                return d
        except (OSError, ValueError):
            pass
    return None


def _wait_for_progress(p: subprocess.Popen, find, min_iter: int, timeout: float = 240) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if p.poll() is not None:
            pytest.fail(f"exited early ({p.returncode}): {p.stderr.read()}")
        try:
            d = find()
            if d is not None and history(d)[-1]["iter"] >= min_iter:
                return d
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.05)
    p.kill()
    pytest.fail("no progress")


@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    """Three real `nstjax run` processes at 32x32 (5000 iterations) started together: `int` gets
    SIGINT and `term` SIGTERM (these two share one --runs-dir: two runs at once), `int2` (--out,
    chunks of 25) gets two SIGINTs 20 ms apart (while a chunk computes, Python sees them as one;
    the KeyboardInterrupt path of a later second Ctrl-C is tested in-process below)."""
    base = tmp_path_factory.mktemp("signals")
    home, runs = base / "home", base / "runs"
    slow = write_tiny(base / "slow.yaml", solver__maxiter=5000)
    slow25 = write_tiny(base / "slow25.yaml", solver__maxiter=5000, output__save_every=0)
    procs = {"int": _start(slow, base, home, "--runs-dir", str(runs)),
             "term": _start(slow, base, home, "--runs-dir", str(runs)),
             "int2": _start(slow25, base, home, "--out", str(base / "int2"))}
    sigs = {"int": [signal.SIGINT], "term": [signal.SIGTERM],
            "int2": [signal.SIGINT, signal.SIGINT]}
    dirs, out = {}, {}
    try:
        for k, p in procs.items():
            find = (lambda: base / "int2") if k == "int2" else (lambda p=p: _dir_of(p, runs))
            dirs[k] = _wait_for_progress(p, find, 4)
            for i, sig in enumerate(sigs[k]):
                if i:
                    time.sleep(0.02)
                p.send_signal(sig)
        for k, p in procs.items():
            _, err = p.communicate(timeout=120)
            out[k] = (p.returncode, err, dirs[k])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    out["runs"] = runs
    return out


def test_sigint_stops_and_keeps_everything(signalled):
    code, err, d = signalled["int"]
    assert code == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"nstjax: interrupted; continue with: nstjax resume {d}"
    rec = assert_complete(d, "interrupted")
    assert rec["signal"] == signal.SIGINT and 4 <= rec["iterations"] < 5000
    assert (d / STATE_FILE).is_file()  # stopped between chunks: the solver state is kept


def test_sigterm_stops_and_keeps_everything(signalled):
    code, err, d = signalled["term"]
    assert code == 143, err
    assert "Traceback" not in err
    rec = assert_complete(d, "interrupted")
    assert rec["signal"] == signal.SIGTERM and 4 <= rec["iterations"] < 5000


def test_repeated_sigint_keeps_everything(signalled):
    code, err, d = signalled["int2"]
    assert code == 130, err
    assert "Traceback" not in err
    rec = assert_complete(d, "interrupted")
    assert rec["iterations"] >= 4


def test_two_runs_at_once_get_distinct_directories(signalled):
    """`int` and `term` started together with one --runs-dir and no --out."""
    a, b = signalled["int"][2], signalled["term"][2]
    assert a != b and a.parent == b.parent == signalled["runs"]
    assert sorted(signalled["runs"].iterdir()) == sorted([a, b])
    assert record(a)["pid"] != record(b)["pid"]
    for d in (a, b):
        assert_complete(d, "interrupted")


def test_resume_after_sigterm(signalled, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NSTJAX_HOME", str(tmp_path / "home"))
    d = tmp_path / "term"
    shutil.copytree(signalled["term"][2], d)
    done = record(d)["iterations"]
    code, err = nstjax(capsys, "resume", str(d), f"solver.maxiter={done + 4}")
    assert code == 0, err
    rec = assert_complete(d, "done")
    assert rec["iterations"] == done + 4
    assert rec["resumed"][0]["from_iteration"] == done
    assert rec["resumed"][0]["solver_state"] == "restored"
    assert not (d / STATE_FILE).exists()
    assert yaml.safe_load((d / "config.yaml").read_text())["solver"]["maxiter"] == done + 4


# --------------------------------------------------------------------------- in process


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def test_hard_interrupt_in_process_keeps_the_last_chunk(env, capsys, monkeypatch):
    """A KeyboardInterrupt (a second Ctrl-C) mid-solve: the last chunk's image, history and
    run.json (interrupted) are written; exit 130."""
    after_chunks(monkeypatch, 2, _raise_keyboard_interrupt)
    code, err = nstjax(capsys, "run", "ok.yaml", "--out", "r")
    assert code == 130, err
    rec = assert_complete(env / "r", "interrupted")
    assert rec["iterations"] == 2  # the interrupted chunk's rows never arrived


def test_interrupt_while_writing_leaves_no_partial_file(env, capsys, monkeypatch):
    real = os.fsync
    hits = []

    def fsync(fd):
        if "history.csv" in os.readlink(f"/proc/self/fd/{fd}"):
            hits.append(fd)
            if len(hits) == 2:
                raise KeyboardInterrupt
        return real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    monkeypatch.setattr(os, "fsync", fsync)
    code, err = nstjax(capsys, "run", "ok.yaml", "--out", "r")
    assert code == 130, err
    assert_complete(env / "r", "interrupted")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                      (signal.SIGHUP, 129)])
def test_signal_while_loading_writes_nothing(env, capsys, monkeypatch, sig, code):
    """Before the run directory exists a signal just ends the command: 130/143, nothing made."""
    def build(cfg):
        os.kill(os.getpid(), sig)
        time.sleep(1)  # the handler runs here
        raise AssertionError("not stopped")

    monkeypatch.setattr(run, "build", build)
    got, err = nstjax(capsys, "run", "ok.yaml")
    assert got == code, err
    assert "Traceback" not in err and not (env / "runs").exists()


def test_signal_while_compiling(env, capsys, monkeypatch):
    """SIGTERM before the first iteration: stop there, exit 143, the start image is kept."""
    real = run.program

    def program(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(run, "program", program)
    code, err = nstjax(capsys, "run", "ok.yaml", "--out", "r")
    assert code == 143, err
    rec = assert_complete(env / "r", "interrupted")
    assert rec["iterations"] == 0 and rec["initial_loss"] == rec["final_loss"]


def test_inf_from_a_real_config(env, capsys):
    """Loss weights so large the loss overflows float32 at the start image: failed at once,
    exit 1 with the hint; the start image and the (inf) first history row are kept."""
    code, err = nstjax(capsys, "run", "ok.yaml", "loss.style_weights=[1e38]", "--out", "r")
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last == ("nstjax: error: loss is inf at the start image; try a lower "
                    "solver.learning_rate or smaller loss weights")
    d = env / "r"
    rec = record(d)
    assert rec["status"] == "failed" and rec["iterations"] == 0
    assert [r["total"] for r in history(d)] == [np.inf]
    x = np.load(d / "last.npy")
    assert np.isfinite(x).all()
    assert np.array_equal(np.asarray(Image.open(d / "final.png")), image.deprocess(x))
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_nan_mid_run_keeps_the_last_finite_image(env, capsys, monkeypatch):
    """An objective that turns NaN once the image moves past 3.5: the run stops at the first
    non-finite step and keeps the image, history and losses of the step before."""
    real = losses.objective

    def poisoned(spec):
        fun = real(spec)

        def f(x, *args):
            total, terms = fun(x, *args)
            bad = jnp.max(jnp.abs(x)) > 3.5
            total = jnp.where(bad, jnp.nan, total)
            return total, {**terms, "total": total}

        return f

    monkeypatch.setattr(losses, "objective", poisoned)
    # Not the healthy program compiled before (the cache lives in nstjax.record).
    monkeypatch.setattr("nstjax.record._PROGRAMS", {})
    code, err = nstjax(capsys, "run", "ok.yaml", "solver.maxiter=20", "--out", "r")
    assert code == 1, err
    assert err.strip().splitlines()[-1].startswith("nstjax: error: loss became non-finite")
    d = env / "r"
    rec = assert_complete(d, "failed")
    assert 1 <= rec["iterations"] < 20
    assert rec["error"] == f"loss became non-finite at iteration {rec['iterations'] + 1}"
    x = np.load(d / "last.npy")
    assert np.abs(x).max() <= 3.5
    assert rec["final_loss"]["total"] == pytest.approx(history(d)[-1]["total"])


def test_crash_marks_the_run_failed_and_keeps_the_image(env, monkeypatch):
    """An unexpected error (a bug) mid-run: run.json says failed with the error, the image so far
    is written, then the exception propagates (a traceback is right for a bug)."""

    def boom():
        raise RuntimeError("boom\nsecond line")

    after_chunks(monkeypatch, 2, boom)
    cfg = config.load(env / "ok.yaml")
    with pytest.raises(RuntimeError, match="boom"):
        run.run(cfg, env / "r", quiet=True)
    rec = assert_complete(env / "r", "failed")
    assert rec["error"] == "RuntimeError: boom" and rec["iterations"] == 2


def test_every_file_is_written_by_rename(env, capsys, monkeypatch):
    """Each file of a run directory arrives by os.replace from a temporary name."""
    real = os.replace
    renamed = set()

    def replace(src, dst):
        assert Path(src).name.startswith(".") and Path(src).parent == Path(dst).parent
        renamed.add(Path(dst).name)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, err = nstjax(capsys, "run", "ok.yaml", "--out", "r")
    assert code == 0, err
    assert {p.name for p in (env / "r").iterdir()} <= renamed


def test_an_existing_run_is_never_overwritten(env, capsys):
    code, err = nstjax(capsys, "run", "ok.yaml", "--out", "r")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (env / "r").iterdir()}
    code, err = nstjax(capsys, "run", "ok.yaml", "--out", "r")
    assert code == 2 and "not empty" in err
    assert {p.name: p.read_bytes() for p in (env / "r").iterdir()} == before
    (env / "empty").mkdir()
    cfg = config.load(env / "ok.yaml")
    run.make_run_dir(env / "empty", cfg)  # claims it: a second run given it is refused
    with pytest.raises(run.UserError, match="not empty"):
        run.make_run_dir(env / "empty", cfg)


# --------------------------------------------------------------------------- before the run


SAY = {signal.SIGINT: "nstjax: interrupted", signal.SIGTERM: "nstjax: terminated",
       signal.SIGHUP: "nstjax: hung up"}


def _handled(pid: int) -> int:
    """The signals process `pid` catches (SigCgt bit mask), 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _cli_process(env: Path, *ignored: int) -> subprocess.Popen:
    """`nstjax run ok.yaml`, returned once main has installed its handlers (nstjax is then
    importing JAX: a second or more), with `ignored` signals ignored from the start."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc")
    p = subprocess.Popen(_cli("run", "ok.yaml", "--quiet", "--no-compile-cache", ignored=ignored),
                         cwd=env, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while not _handled(p.pid) & (1 << (signal.SIGTERM - 1)):  # nothing else catches SIGTERM
        if p.poll() is not None or time.monotonic() > end:
            p.kill()
            pytest.fail(f"no handlers installed: {p.communicate()}")
        time.sleep(0.002)
    return p


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_while_importing(env, sig):
    """A signal during the imports: the command stops right after them, 128 + signum and one
    line, never "Exception ignored", an ImportError, a crash or a completed run."""
    p = _cli_process(env)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert err.strip() == SAY[sig] and not out
    assert not (env / "runs").exists()


def test_ignored_signals_stay_ignored(env):
    """Started with SIGINT and SIGHUP ignored (a background job of a non-interactive shell, nohup):
    they stay ignored; SIGTERM still stops the command."""
    p = _cli_process(env, signal.SIGINT, signal.SIGHUP)
    caught = _handled(p.pid)
    assert not caught & (1 << (signal.SIGINT - 1)) and not caught & (1 << (signal.SIGHUP - 1))
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGHUP)
    time.sleep(0.2)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert err.strip() == "nstjax: terminated"


def test_handlers_come_before_heavy_imports(env, capsys, monkeypatch):
    """In process: main's handlers are in place when the parser (and so JAX) is imported; a signal
    then is held until the imports are done (raising inside an import is unsafe)."""
    real = cli.parser
    seen = {}

    def parser():
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # delivered here, but deferred
        seen["imported"] = True
        return real()

    monkeypatch.setattr(cli, "parser", parser)
    code, err = nstjax(capsys, "run", "ok.yaml")
    assert code == 143 and err.strip() == "nstjax: terminated"
    assert seen == {"handler": cli._on_signal, "imported": True}
    assert signal.getsignal(signal.SIGTERM) is not cli._on_signal  # restored
    assert not (env / "runs").exists()


def test_cli_module_imports_nothing_heavy():
    """`nstjax` (the entry point nstjax.cli:main) imports no third-party module and no nstjax
    module but the package, nstjax.cli and nstjax.errors before main runs (the stdlib's small
    modules, e.g. signal and typing, are allowed)."""
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="console_scripts", name="nstjax")] == [
        "nstjax.cli:main"]
    code = ("import sys; before = set(sys.modules); import nstjax.cli; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    ours = {m for m in out if m.partition(".")[0] == "nstjax"}
    assert ours <= {"nstjax", "nstjax.cli", "nstjax.errors"}, out
    assert all(m.partition(".")[0] in sys.stdlib_module_names for m in set(out) - ours), out
