"""nstjax.runtime: atomic files, .npy bytes, the run-directory lock and the StopFlag."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nstjax import runtime
from nstjax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "sub" / "a.txt"
    runtime.write_atomic(p, "one")
    runtime.write_atomic(p, b"two")
    assert p.read_bytes() == b"two" and os.listdir(p.parent) == ["a.txt"]

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(UserError, match=r"cannot write .*a\.txt: No space left on device"):
        runtime.write_atomic(p, "three")
    assert p.read_bytes() == b"two" and os.listdir(p.parent) == ["a.txt"]


def test_atomic_file_interrupted_mid_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), runtime.atomic_file(p) as f:
        f.write(b"half")
        raise KeyboardInterrupt
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_npy_bytes_is_a_float32_npy_without_pickle():
    x = np.arange(24, dtype=np.float64).reshape(1, 2, 4, 3) / 7
    y = np.load(io.BytesIO(runtime.npy_bytes(x)), allow_pickle=False)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x.astype(np.float32))


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("NSTJAX_HOME", str(tmp_path / "h"))
    assert runtime.cache_dir() == tmp_path / "h"
    monkeypatch.delenv("NSTJAX_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert runtime.cache_dir() == tmp_path / "x" / "nstjax"


def test_versions_names_the_packages():
    v = runtime.versions()
    assert v["nstjax"] and v["numpy"] == np.__version__ and "jax" in v and "flax" in v


# ---------------------------------------------------------------- lock


def test_lock_is_exclusive_across_processes_and_names_the_holder(tmp_path):
    code = ("import sys, time\nfrom nstjax.runtime import DirLock\n"
            "DirLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by another nstjax process \(pid "
                                            rf"{holder.pid}\)"):
            runtime.DirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with runtime.DirLock(tmp_path) as lock:  # the dead holder's file is free
        assert (tmp_path / "run.lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            runtime.DirLock(tmp_path).acquire()  # a second open file: flock refuses it too
    assert lock.fd is None and not (tmp_path / "run.lock").exists()


# ---------------------------------------------------------------- StopFlag


@pytest.fixture(autouse=True)
def _default_stop_signals():
    """The handlers of a foreground terminal: a background job of a non-interactive shell starts
    with SIGINT ignored, and StopFlag rightly keeps an ignored signal ignored."""
    saved = {s: signal.getsignal(s) for s in runtime.STOP_SIGNALS}
    for s in runtime.STOP_SIGNALS:
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_flag_records_the_first_signal_and_restores_handlers(sig):
    before = {s: signal.getsignal(s) for s in runtime.STOP_SIGNALS}
    flag = runtime.StopFlag()
    with flag.installed():
        os.kill(os.getpid(), sig)
        assert flag.stopped and flag.signum == sig and flag.exit_code == 128 + sig
        with pytest.raises(KeyboardInterrupt):  # a second signal: stop now
            os.kill(os.getpid(), sig)
        flag.finishing = True
        os.kill(os.getpid(), sig)  # ignored while the final files are written
    assert {s: signal.getsignal(s) for s in runtime.STOP_SIGNALS} == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_flag_leaves_an_ignored_signal_ignored(sig):
    """nohup ignores SIGHUP, a non-interactive shell's background job SIGINT: still ignored
    while a run goes, and the other two signals still stop it."""
    old = signal.signal(sig, signal.SIG_IGN)
    try:
        flag = runtime.StopFlag()
        with flag.installed():
            assert signal.getsignal(sig) == signal.SIG_IGN
            os.kill(os.getpid(), sig)
            assert not flag.stopped
            other = next(s for s in runtime.STOP_SIGNALS if s != sig)
            os.kill(os.getpid(), other)
            assert flag.signum == other
        assert signal.getsignal(sig) == signal.SIG_IGN
    finally:
        signal.signal(sig, old)


def test_exit_codes_are_128_plus_the_signal():
    assert [runtime.signal_exit_code(s) for s in (None, 2, 15, 1)] == [0, 130, 143, 129]
