"""`nstjax resume RUN_DIR`: continue an interrupted run into its own directory, exactly."""

from __future__ import annotations

import io
import json
import os
import platform
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, after_chunks, history, record
from conftest import quiet_cli as nstjax
from PIL import Image

from nstjax import image, solvers
from nstjax.record import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]


def one_error(err: str, *needles: str) -> None:
    """One `nstjax: error:` line, last on stderr (a random-weights warning may come first)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    errors = [ln for ln in lines if ln.startswith("nstjax: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    lines = errors
    for n in needles:
        assert n in lines[0], (n, lines[0])


def interrupted_run(capsys, monkeypatch, out: str, chunks: int = 1, *overrides: str,
                    sig: int = signal.SIGINT, code: int = 130) -> Path:
    """`nstjax run ok.yaml --out out` that gets a real signal `sig` during its `chunks`-th chunk
    and exits `code`."""
    real = solvers.minimize
    after_chunks(monkeypatch, chunks, lambda: os.kill(os.getpid(), sig))
    got, err = nstjax(capsys, "run", "ok.yaml", *overrides, "--out", out)
    monkeypatch.setattr(solvers, "minimize", real)
    assert got == code, err
    d = Path(out).resolve()
    assert record(d)["status"] == "interrupted"
    return d


@pytest.mark.parametrize("solver", ["adam", "jaxopt_lbfgs"])
def test_resume_matches_an_uninterrupted_run(env, capsys, monkeypatch, solver):
    """Interrupted after 2 of 6 iterations and resumed (with the saved solver state), the run
    ends exactly where one uninterrupted run does."""
    from conftest import write_tiny

    if solver != "adam":  # solver.learning_rate is Adam's: other solvers refuse it
        write_tiny(env / "ok.yaml", solver__learning_rate=None)
    code, err = nstjax(capsys, "run", "ok.yaml", f"solver.name={solver}", "--out", "whole")
    assert code == 0, err
    d = interrupted_run(capsys, monkeypatch, "part", 1, f"solver.name={solver}")
    assert record(d)["iterations"] == 2 and (d / STATE_FILE).is_file()
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 0, err
    rec = record(d)
    assert rec["status"] == "done" and rec["iterations"] == 6
    assert rec["resumed"][0]["from_iteration"] == 2
    assert rec["resumed"][0]["solver_state"] == "restored" and rec["resumed"][0]["overrides"] == []
    assert rec["evaluations"] == record(env / "whole")["evaluations"]
    rows = history(d)
    assert [int(r["iter"]) for r in rows] == list(range(7))
    assert [r["seconds"] for r in rows] == sorted(r["seconds"] for r in rows)
    whole = history(env / "whole")
    assert [r["total"] for r in rows] == [r["total"] for r in whole]
    assert np.array_equal(np.load(d / "last.npy"), np.load(env / "whole" / "last.npy"))
    assert sorted(p.name for p in d.glob("iter_*")) == ["iter_000002.png", "iter_000004.png"]
    assert np.array_equal(np.asarray(Image.open(d / "final.png")),
                          image.deprocess(np.load(d / "last.npy")))
    assert not (d / STATE_FILE).exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_resume_without_solver_state_restarts_the_solver(env, capsys, monkeypatch):
    d = interrupted_run(capsys, monkeypatch, "part", 2)
    (d / STATE_FILE).unlink()
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 0, err
    rec = record(d)
    assert rec["status"] == "done" and rec["resumed"][0]["solver_state"] == "restarted"
    assert [int(r["iter"]) for r in history(d)] == list(range(7))


def test_resume_with_a_corrupt_solver_state_restarts(env, capsys, monkeypatch):
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    (d / STATE_FILE).write_bytes(b"PK\x03\x04 garbage")
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 0, err
    assert record(d)["resumed"][0]["solver_state"] == "restarted"


def test_resume_with_more_iterations_and_resume_again(env, capsys, monkeypatch):
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    code, err = nstjax(capsys, "resume", str(d), "solver.maxiter=10", "output.bits=16")
    assert code == 0, err
    rec = record(d)
    assert rec["iterations"] == 10 and rec["resumed"][0]["overrides"] == [
        "solver.maxiter=10", "output.bits=16"]
    saved = yaml.safe_load((d / "config.yaml").read_text())
    assert saved["solver"]["maxiter"] == 10 and saved["output"]["bits"] == 16
    assert sorted(p.name for p in d.glob("iter_*")) == [
        "iter_000002.png", "iter_000004.png", "iter_000006.png", "iter_000008.png"]
    bit_depth = {p.name: p.read_bytes()[24] for p in d.glob("iter_*")}  # from the PNG header
    assert bit_depth == {"iter_000002.png": 8, "iter_000004.png": 16, "iter_000006.png": 16,
                         "iter_000008.png": 16}
    assert [int(r["iter"]) for r in history(d)] == list(range(11))
    code, err = nstjax(capsys, "resume", str(d), "solver.maxiter=12")
    assert code == 2
    one_error(err, str(d), "finished", "status done")


def test_resume_a_killed_run(env, capsys, monkeypatch):
    """A run killed -9 leaves run.json `running` with a pid that is gone: resumable."""
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    rec = record(d)
    rec.update(status="running", pid=2**22 + 12345, host=platform.node())
    (d / "run.json").write_text(json.dumps(rec))
    (d / STATE_FILE).unlink()
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 0, err
    assert record(d)["status"] == "done"


def test_resume_refuses_a_finished_run(env, capsys):
    code, err = nstjax(capsys, "run", "ok.yaml", "--out", "r")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (env / "r").iterdir()}
    code, err = nstjax(capsys, "resume", "r")
    assert code == 2
    one_error(err, "r", "finished", "nothing to resume")
    assert {p.name: p.read_bytes() for p in (env / "r").iterdir()} == before


def test_resume_refuses_what_is_not_a_run_directory(env, capsys):
    (env / "empty").mkdir()
    (env / "file.txt").write_text("x")
    for target, needle in (("nope", "no such run directory"), ("empty", "no config.yaml"),
                           ("file.txt", "no such run directory")):
        code, err = nstjax(capsys, "resume", target)
        assert code == 2, err
        one_error(err, target, needle)
    (env / "half").mkdir()
    (env / "half" / "config.yaml").write_text(yaml.safe_dump(TINY))
    (env / "half" / "run.json").write_text("{not json")
    code, err = nstjax(capsys, "resume", "half")
    assert code == 2
    one_error(err, "run.json", "unreadable")


def test_resume_refuses_a_live_run(env, capsys, monkeypatch):
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    rec = record(d)
    # Another live process (the parent); this process's own pid means its run ended (a failed
    # write left run.json `running`): test_faults.py resumes such a run.
    rec.update(status="running", pid=os.getppid(), host=platform.node())
    (d / "run.json").write_text(json.dumps(rec))
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 2
    one_error(err, "still going", f"pid {os.getppid()}")


@pytest.mark.parametrize("override,needles", [
    ("loss.tv_weight=1.0", ("loss.tv_weight", "only solver.* and output.*")),
    ("image.size=64", ("image.size", "cannot change")),
    ("solver.maxiter=-1", ("solver.maxiter",)),
    ("solver.maxiterr=9", ("did you mean solver.maxiter?",)),
])
def test_resume_refuses_bad_overrides(env, capsys, monkeypatch, override, needles):
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    code, err = nstjax(capsys, "resume", str(d), override)
    assert code == 2
    one_error(err, *needles)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_resume_refuses_a_pickled_or_wrong_last_image(env, capsys, monkeypatch):
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    np.save(d / "last.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 2
    one_error(err, "last.npy", "cannot resume")
    np.save(d / "last.npy", np.zeros((1, 16, 16, 3), np.float32))
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 2
    one_error(err, "last.npy", "(1, 32, 32, 3)")
    (d / "last.npy").unlink()
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 2
    one_error(err, "no last.npy")


def test_resume_refuses_a_multiscale_run(env, capsys, monkeypatch):
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    raw = yaml.safe_load((d / "config.yaml").read_text())
    raw["multiscale"] = {"sizes": [16]}
    (d / "config.yaml").write_text(yaml.safe_dump(raw))
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 2
    one_error(err, "multi-scale", "cannot be resumed")


# ---------------------------------------------------------------- locks, hostile run files


def test_resume_refuses_a_locked_run_naming_the_holder(env, capsys, monkeypatch):
    """Another process holds the run directory's lock: exit 2 naming its pid, nothing changed;
    once it is gone (its lock file left behind), the resume runs."""
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom nstjax.runtime import DirLock\n"
         "DirLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)", str(d)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {p.name: p.read_bytes() for p in d.iterdir()}
        code, err = nstjax(capsys, "resume", str(d))
        assert code == 2
        one_error(err, str(d), "in use", f"pid {holder.pid}")
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    finally:
        holder.kill()
        holder.wait()
    assert (d / "run.lock").is_file()  # a killed holder's file: no longer locked by anyone
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 0, err
    assert record(d)["status"] == "done" and not (d / "run.lock").exists()


@pytest.mark.parametrize("field, value", [("wall_seconds", "soon"), ("evaluations", 2.5),
                                          ("resumed", {"a": 1}), ("weights", [1]),
                                          ("pid", "me")])
def test_resume_refuses_a_wrong_typed_run_json_field(env, capsys, monkeypatch, field, value):
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    rec = record(d)
    rec[field] = value
    (d / "run.json").write_text(json.dumps(rec))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 2
    one_error(err, "run.json", repr(field), "resume")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert record(d)["status"] == "interrupted"


def test_resume_refuses_a_run_json_that_is_not_an_object(env, capsys, monkeypatch):
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    (d / "run.json").write_text("[]")
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 2
    one_error(err, "run.json", "not a JSON object")


def npy_header_only(path: Path, shape: tuple, dtype=np.float32, body: bytes = b"") -> bytes:
    """A .npy file whose header declares `shape`/`dtype` but holds only `body`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape})
    data = buf.getvalue()
    path.write_bytes(data + body)
    return data + body


@pytest.mark.parametrize("shape, dtype", [((1, 1 << 19, 1 << 19, 3), np.float32),
                                          ((1, 32, 32, 3), np.float64),
                                          ((1, 32, 32, 3), np.float32)])
def test_resume_refuses_last_npy_from_its_header(env, capsys, monkeypatch, shape, dtype):
    """A small last.npy declaring a 3 TiB image, the wrong dtype, or more data than it holds:
    refused from the header (no MemoryError, no read of the data)."""
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    npy_header_only(d / "last.npy", shape, dtype, b"\0" * 64)
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 2
    one_error(err, "last.npy", "cannot resume")
    assert record(d)["status"] == "interrupted"


def test_resume_ignores_a_solver_state_declaring_a_huge_leaf(env, capsys, monkeypatch):
    """A solver_state.npz member whose header claims 4 TiB: not read, a warning, the solver
    state restarts and the resume completes."""
    d = interrupted_run(capsys, monkeypatch, "part", 1)
    path = d / STATE_FILE
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["leaf_0000.npy"] = npy_header_only(env / "x.npy", (1 << 40,), np.float32, b"\0" * 8)
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 0, err
    assert "solver_state.npz: not used" in err and "Traceback" not in err
    assert record(d)["resumed"][0]["solver_state"] == "restarted"


def test_resume_after_kill_9_adds_up_every_process(env, capsys):
    """A run killed -9 (SIGKILL: no handler, nothing written at the end) during its second
    chunk and then resumed: run.json's counts and seconds include the killed process's work
    (persisted with each chunk's checkpoint), not only the resuming one's."""
    code, err = nstjax(capsys, "run", "ok.yaml", "--out", "whole")
    assert code == 0, err
    kill = ("import os, signal, sys; from nstjax import cli, solvers; real = solvers.minimize\n"
            "def minimize(*a, on_chunk=None, **kw):\n"
            "    n = [0]\n"
            "    def each(x, rows):\n"
            "        n[0] += 1\n"
            "        if n[0] == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
            "        return on_chunk(x, rows)\n"
            "    return real(*a, on_chunk=each, **kw)\n"
            "solvers.minimize = minimize\n"
            "sys.exit(cli.main(['run', 'ok.yaml', '--out', 'part', '--quiet', "
            "'--no-compile-cache']))\n")
    p = subprocess.run([sys.executable, "-c", kill], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    d = env / "part"
    killed = record(d)
    assert killed["status"] == "running" and killed["iterations"] == 2  # the first chunk
    assert killed["evaluations"] == 3 and killed["compile_seconds"] > 0  # x0 + 2 steps
    code, err = nstjax(capsys, "resume", str(d))
    assert code == 0, err
    rec, whole = record(d), record(env / "whole")
    assert rec["iterations"] == 6 and [int(r["iter"]) for r in history(d)] == list(range(7))
    # Adam: one evaluation per step and one at each session's start image (x0, last.npy).
    assert whole["evaluations"] == 7 and rec["evaluations"] == 3 + (6 - 2) + 1
    assert rec["solve_seconds"] > killed["solve_seconds"]
    assert rec["compile_seconds"] >= killed["compile_seconds"]
    assert rec["wall_seconds"] > killed["wall_seconds"]
