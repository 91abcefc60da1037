"""Run directories: a new one claimed for exactly one run (`make_run_dir`: `--out` if free,
else a unique dated name under `--runs-dir`) and the early check that one can be made
(`check_out`), before any image or weight is loaded."""

from __future__ import annotations

import os
from contextlib import suppress
from datetime import datetime
from pathlib import Path

from nstjax import runtime
from nstjax.config import Config
from nstjax.errors import UserError


def _slug(text: str) -> str:
    s = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in text)
    return s.strip("-")[:40] or "run"


CLAIM = '{"status": "starting"}\n'  # run.json from a directory's claim until the run starts


def _is_empty(d: Path) -> bool:
    """`d` is a directory with nothing in it but a killed write's temporary files."""
    return d.is_dir() and runtime.only_temp_files(d)


def _claim(d: Path, made: bool) -> bool:
    """Claim directory `d` by creating its run.json exclusively and complete (see
    `runtime.claim_file`): two runs never share it. On failure the directory is left as it was
    (removed if `made` here), so a rerun after the cause is fixed finds it free."""
    try:
        return runtime.claim_file(d / "run.json", CLAIM)
    except UserError:
        if made:
            with suppress(OSError):
                d.rmdir()
        raise


def make_run_dir(out: str | Path | None, cfg: Config, parent: str | Path = "runs") -> Path:
    """A new run directory, claimed (its run.json holds status `starting`): `out` if it is
    absent or empty, else a unique name under `parent`."""
    if out is not None:
        out = Path(out)
        busy = UserError(f"--out {out} exists and is not empty: pick a new directory")
        if out.exists() and not _is_empty(out):
            raise busy
        made = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create directory: {e.strerror}") from None
        if not _claim(out, made):
            raise busy
        return out
    parent = Path(parent)
    first = Path(cfg.content).stem if cfg.content else "texture"
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{_slug(first)}-" \
           f"{_slug(Path(cfg.styles[0]).stem)}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create a run directory in {parent}: {e.strerror}") from None
    for i in range(10_000):
        d = parent / (stem if i == 0 else f"{stem}-{i}")
        try:
            d.mkdir()  # atomic: two runs at once never share a directory
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot create a run directory {d}: {e.strerror}") from None
        if _claim(d, made=True):
            return d
    raise UserError(f"no free run directory name under {parent}")


def check_out(out: str | Path | None, parent: str | Path = "runs") -> None:
    """Fail fast, before loading images or weights, where no run directory could be made."""
    target = Path(out) if out is not None else Path(parent)
    what = "--out" if out is not None else "--runs-dir"
    if out is not None and target.exists() and not _is_empty(target):
        raise UserError(f"--out {target} exists and is not empty: pick a new directory")
    probe = target.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {target}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {target}: {probe} is not writable (permission denied); "
                        "pick another directory")
