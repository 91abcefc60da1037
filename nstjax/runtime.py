"""Process-level plumbing shared by every command: atomic files, `.npy` bytes, versions, cache
directories, the compilation-cache switch, run-directory locks and a `StopFlag` for signals.

Nothing here imports JAX at module level (the CLI imports this before JAX is loaded).
"""

from __future__ import annotations

import errno
import io
import os
import platform
import re
import secrets
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import numpy as np

from nstjax import __version__
from nstjax.errors import UserError

# Exit status of a run stopped by a signal: 128 + the signal's number, as shells report it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LOCK_FILE = "run.lock"


def signal_exit_code(signum: int | None) -> int:
    return 128 + int(signum) if signum else 0


# ---------------------------------------------------------------- files


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file that appears at `path` complete (written to a temp name, fsynced, renamed)
    only if the block succeeds; on any error, Ctrl-C included, no temporary file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # honours umask
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; check permissions and free "
                        "disk space") from None
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the filesystem, not the data
TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")  # atomic_file's temporary names


def claim_file(path: str | os.PathLike, data: bytes | str) -> bool:
    """Create `path` holding `data` only if it does not exist: written complete to a temporary
    name, then hard-linked to `path` (atomic and exclusive), so a full disk never leaves a
    partial file under its final name. False if `path` exists; UserError naming it on any
    other failure (no temporary file is left)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; check permissions and free "
                        "disk space") from None
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def only_temp_files(d: Path) -> bool:
    """Whether directory `d` holds nothing but temporary files of nstjax's writes (left by a
    process killed mid-write): such a directory counts as empty."""
    return all(TEMP_NAME.fullmatch(p.name) and p.is_file() for p in d.iterdir())


def npy_bytes(x) -> bytes:
    """`x` as the bytes of a float32 `.npy` file (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(x, np.float32), allow_pickle=False)
    return buf.getvalue()


def npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of the `.npy` data at `f`'s position, reading no data
    (`f` is left at the first data byte). Raises ValueError for a bad or Fortran-order header."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(f, max_header_size=10_000)
    if fortran:
        raise ValueError("Fortran-ordered array")
    return tuple(shape), np.dtype(dtype)


# ---------------------------------------------------------------- environment


def versions() -> dict:
    """Versions of nstjax, Python and the packages a run depends on (None where absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"nstjax": __version__, "python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "jaxopt", "optax", "numpy", "scipy", "pillow", "h5py"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def cache_dir() -> Path:
    """``$NSTJAX_HOME``, else ``$XDG_CACHE_HOME/nstjax``, else ``~/.cache/nstjax``."""
    if os.environ.get("NSTJAX_HOME"):
        return Path(os.environ["NSTJAX_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "nstjax"
    return Path.home() / ".cache" / "nstjax"


def enable_compile_cache(path: str | Path | None = None) -> Path:
    """Turn on JAX's persistent compilation cache (default: `<cache dir>/jax`)."""
    import jax

    path = Path(path) if path else cache_dir() / "jax"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def use_compile_cache(on: bool | None = None, path: str | Path | None = None) -> Path | None:
    """The compilation-cache switch of every command and of `nstjax.stylize`: on unless `on` is
    False or (`on` None) the environment says NSTJAX_COMPILE_CACHE=0/false/no/off. A cache that
    cannot be set up is only a warning (it is a speed-up). Returns its directory, or None."""
    import sys

    if on is None:
        on = os.environ.get("NSTJAX_COMPILE_CACHE", "1").strip().lower() not in (
            "0", "false", "no", "off")
    if not on:
        return None
    try:
        return enable_compile_cache(path)
    except (OSError, UserError) as e:
        print(f"nstjax: warning: no compilation cache ({e})", file=sys.stderr)
        return None


# ---------------------------------------------------------------- locks


class DirLock:
    """An exclusive `flock` on `<dir>/run.lock`, holding this process's pid; removed on release.

    `acquire` never waits: if another process holds the lock it raises UserError naming that
    process's pid. The kernel drops the lock when the holder dies, so a killed run's stale
    file never blocks anyone.
    """

    def __init__(self, d: str | os.PathLike, what: str = "the run"):
        self.path = Path(d) / LOCK_FILE
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        import fcntl

        for _ in range(100):  # the file may be removed by its releasing holder under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise UserError(f"{self.path}: cannot create the lock file "
                                f"({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise UserError(f"{self.path}: cannot lock ({e.strerror or e})") from None
                raise UserError(f"{self.path.parent}: {self.what} is in use by another nstjax "
                                f"process ({self._holder()}); wait for it or stop it first"
                                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()} {platform.node()}\n".encode())
                except OSError as e:  # e.g. a full disk: the lock is held, say whose it is not
                    os.close(fd)
                    with suppress(OSError):
                        self.path.unlink()
                    raise UserError(f"cannot write {self.path}: {e.strerror or e}; check "
                                    "permissions and free disk space") from None
                self.fd = fd
                return self
            os.close(fd)  # locked a file its holder had just removed: lock the new one
        raise UserError(f"{self.path}: cannot lock (the lock file keeps changing)")

    def _holder(self) -> str:
        with suppress(OSError, ValueError):
            pid, _, host = self.path.read_text().strip().partition(" ")
            return f"pid {int(pid)}" + (f" on {host}" if host and host != platform.node() else "")
        return "pid unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        with suppress(OSError):
            self.path.unlink()  # before unlocking: a waiter then re-checks the inode
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> DirLock:
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- signals


class StopFlag:
    """SIGINT, SIGTERM and SIGHUP ask a solve to stop after its current chunk.

    `with flag.installed(): ...` sets the handlers (main thread only) and restores them after.
    The first signal is recorded in `signum`; a second one raises KeyboardInterrupt when control
    is back in Python, unless `finishing` is set (final files are being written: signals are then
    ignored, as finishing is quick). SIGHUP stops like SIGTERM (exit 128 + 1 = 129). A signal
    that is ignored on entry stays ignored: SIGINT in a background job of a non-interactive
    shell, SIGHUP under nohup, SIGTERM where a supervisor chose so.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.finishing = False

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return signal_exit_code(self.signum)

    def stop(self, signum: int = signal.SIGINT) -> None:
        if self.signum is None:
            self.signum = signum

    def _handler(self, signum: int, _frame) -> None:
        if self.finishing:
            return
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        old = {}
        try:
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                old[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: no handlers
            pass
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)


def optional(module: str, needed_by: str, install: str, name: str | None = None):
    """Import an optional extra: a one-line UserError naming `needed_by` and `install` when it
    is not installed, and its own import error when it is installed but broken."""
    import importlib
    import importlib.util
    import sys

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = True  # a broken parent package: importing says why
    if not found or (module in sys.modules and sys.modules[module] is None):  # blocked
        raise UserError(f"{needed_by} needs {name or module}, which is not installed: "
                        f"{install}")
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the extra's own import
        msg = " ".join(str(e).split()) or "(no message)"
        raise UserError(f"{needed_by}: {module} is installed but importing it failed "
                        f"({type(e).__name__}: {msg[:300]}); repair it: {install}") from None
