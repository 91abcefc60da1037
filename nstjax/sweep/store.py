"""The sweep directory on disk: what makes a directory a sweep's, where each cell lives, which
cells are finished, and how a cell's directory appears (atomically, keeping the user's files).

    OUT/sweep.json        the plan; its "format" marks OUT as written by `nstjax sweep`
    OUT/cells/<dir>/      one complete run directory per cell
    OUT/.partial/         cell directories being written (the sweep's scratch space)

A sweep writes only into a directory that is new, empty or already marked by a sweep of the
same name. A cell's directory is its name; if that directory holds a cell run with other
settings (or anything else), it is left alone and the cell goes to `<name>-<config hash>`.
A cell directory is replaced only by a rerun of the same config, and files in it that are
not part of the run format are carried over into the new one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from nstjax import runtime
from nstjax.errors import UserError
from nstjax.sweep.spec import Cell, Sweep, short_hash

MARK = "nstjax-sweep/1"
SCRATCH = ".partial"
FINISHED = ("done", "converged")
# Files a run or sweep cell writes; anything else in a cell directory belongs to the user.
_RUN_FILES = re.compile(
    r"(config\.yaml|run\.json|run\.lock|history\.csv|last\.npy|solver_state\.npz"
    r"|(scale\d+_)?(final|iter_\d+)\.\w+|\..+\.tmp(-\d+)?)$")
_TMP = re.compile(r"(?P<dir>.+)\.(tmp|old)-(?P<pid>\d+)$")


# ---------------------------------------------------------------- the sweep directory


def read_mark(out: Path) -> dict | None:
    """The sweep.json of `out` if it was written by `nstjax sweep`, else None."""
    try:
        info = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("name"), str):
        return None
    legacy = {"name", "dims", "groups", "cells"} <= set(info)  # before the format mark
    return info if info.get("format") == MARK or legacy else None


def check_owned(out: Path, sw: Sweep) -> None:
    """Fail unless `out` is this sweep's directory (for --summarize-only: it must exist)."""
    info = read_mark(out)
    if info is None:
        raise UserError(f"--out {out}: not a sweep directory (no sweep.json written by "
                        "nstjax sweep); give the directory a sweep ran into")
    _same_sweep(out, sw, info)


def _same_sweep(out: Path, sw: Sweep, info: dict) -> None:
    if info["name"] != sw.name:
        raise UserError(f"--out {out}: holds the sweep {info['name']!r}, not {sw.name!r}; "
                        "pick a new directory with --out")


def check_target(out: Path, sw: Sweep) -> bool:
    """Whether `out` is this sweep's directory already; UserError if a sweep may not use it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory; pick a new directory")
    info = read_mark(out)
    for _ in range(50):  # another process of this sweep may be writing it right now
        if info is not None or not (out / "sweep.json").is_file():
            break
        time.sleep(0.1)
        info = read_mark(out)
    if info is not None:
        _same_sweep(out, sw, info)
        return True
    try:
        empty = not out.exists() or runtime.only_temp_files(out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot read directory: {e.strerror}") from None
    if not empty:
        raise UserError(f"--out {out}: exists, is not empty and is not a sweep directory "
                        "(no sweep.json written by nstjax sweep); pick a new directory")
    return False


def claim(out: Path, sw: Sweep) -> None:
    """Make `out` this sweep's directory: create it, or check that it is one already."""
    marked = check_target(out, sw)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create directory: {e.strerror}") from None
    try:
        # A lost race is fine only against another process of this same sweep.
        if not marked and not _create_mark(out, sw) and not check_target(out, sw):
            raise UserError(f"--out {out}: another sweep is starting in it; pick a new "
                            "directory")
    except UserError:
        if made:  # as it was: a rerun after the cause is fixed starts afresh
            with suppress(OSError):
                out.rmdir()
        raise
    for sub in (out / "cells", out / SCRATCH):
        try:
            sub.mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"{sub}: cannot create directory: {e.strerror}") from None


def _create_mark(out: Path, sw: Sweep) -> bool:
    """Create sweep.json exclusively and complete (two sweeps never share a new directory; a
    full disk leaves none, see `runtime.claim_file`); False if it exists already."""
    mark = json.dumps({"format": MARK, "name": sw.name, "file": sw.source})
    return runtime.claim_file(out / "sweep.json", mark)


def write_plan(out: Path, plan: dict) -> None:
    runtime.write_atomic(out / "sweep.json", json.dumps({"format": MARK, **plan}, indent=2,
                                                        default=str))


# ---------------------------------------------------------------- cells


def cell_dir(out: Path, c: Cell) -> Path:
    return out / "cells" / (c.dir or c.name)


def config_text(c: Cell) -> str:
    """What the cell's config.yaml holds (the raw config for a cell that did not validate)."""
    import yaml

    from nstjax import config

    return config.dump(c.cfg) if c.cfg is not None else yaml.safe_dump(c.raw, sort_keys=False)


def _same_config(d: Path, text: str) -> bool:
    if not d.is_dir():
        return False
    try:
        return (d / "config.yaml").read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def locate(out: Path, cells: list[Cell]) -> list[Cell]:
    """Set each cell's directory; return the cells whose own name holds other settings."""
    moved = []
    for c in cells:
        text = config_text(c)
        names = [c.name, f"{c.name}-{short_hash(text, 8)}"]
        names += [f"{names[1]}-{i}" for i in range(2, 100)]
        # The config's own names first; then names in the order they are taken: the cell is at
        # or before the first free one.
        found = next((n for n in names[:2] if _same_config(out / "cells" / n, text)), None)
        for n in names if found is None else ():
            d = out / "cells" / n
            if not os.path.lexists(d) or _same_config(d, text):
                found = n
                break
        if found is None:
            raise UserError(f"{out / 'cells' / c.name}: no free directory name for this cell")
        c.dir = found
        if c.dir != c.name:
            moved.append(c)
    return moved


def record(d: Path) -> dict | None:
    """The cell's run.json as a dict; None if absent; {} (with `error`) if unreadable."""
    try:
        rec = json.loads((d / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def finished(d: Path, warn: Callable[[str], Any] | None = None) -> bool:
    """Whether the cell in `d` (whose config matches, see `locate`) needs no rerun."""
    rec = record(d)
    if rec is None:
        return False
    if not rec or not isinstance(rec.get("status"), str):
        if warn:
            warn(f"{d / 'run.json'}: not a run record; the cell runs again")
        return False
    return rec["status"] in FINISHED


def differing_keys(out: Path, c: Cell, limit: int = 4) -> list[str]:
    """Dotted keys whose values differ between the cell's config and the one on disk."""
    import yaml

    try:
        old = yaml.safe_load((out / "cells" / c.name / "config.yaml").read_text())
        new = yaml.safe_load(config_text(c))
    except (OSError, ValueError, yaml.YAMLError):
        return []
    keys = sorted(k for k in set(_flat(old)) | set(_flat(new))
                  if _flat(old).get(k, ...) != _flat(new).get(k, ...))
    return keys[:limit] + (["..."] if len(keys) > limit else [])


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d} if prefix else {}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else
                   {f"{prefix}{k}": v})
    return out


# ---------------------------------------------------------------- writing a cell


def scratch_dir(out: Path, c: Cell, *, create: bool = True) -> Path:
    """A fresh temporary directory for the cell (out/.partial/<dir>.tmp-<pid>)."""
    d = out / SCRATCH / f"{c.dir or c.name}.tmp-{os.getpid()}"
    if d.exists():
        shutil.rmtree(d)
    if create:
        d.mkdir(parents=True)
    return d


def publish(out: Path, tmp: Path, c: Cell) -> None:
    """Make the complete directory `tmp` the cell's directory (a rename: never half seen).

    An existing directory (an unfinished run of the same config, see `locate`) is replaced;
    files in it that a run does not write are moved into the new one first.
    """
    final = cell_dir(out, c)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    for f in final.iterdir():
        if not _RUN_FILES.fullmatch(f.name) and not os.path.lexists(tmp / f.name):
            os.rename(f, tmp / f.name)
    old = out / SCRATCH / f"{final.name}.old-{os.getpid()}"
    if os.path.lexists(old):
        shutil.rmtree(old)
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale(out: Path, cells: list[Cell], warn: Callable[[str], Any] | None = None
                ) -> list[Path]:
    """Remove what killed runs of this sweep left in its scratch space for these cells.

    A leftover holding files a run does not write (a user's files being carried over when the
    process died) is kept, with a warning.
    """
    names = {c.dir or c.name for c in cells}
    removed = []
    scratch = out / SCRATCH
    for d in sorted(scratch.iterdir()) if scratch.is_dir() else []:
        m = _TMP.fullmatch(d.name)
        if not (m and m["dir"] in names and d.is_dir() and not d.is_symlink()
                and not _alive(int(m["pid"]))):
            continue
        if all(_RUN_FILES.fullmatch(f.name) and f.is_file() for f in d.iterdir()):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        elif warn:
            warn(f"{d}: left by a stopped sweep and holds files of yours; move them out and "
                 "delete it")
    return removed
