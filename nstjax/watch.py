"""Watching a run as it goes: what a `Recorder` tells its watchers after each history row, and
the two watchers there are: a Python callback (`stylize(..., on_progress=fn)`) and TensorBoard
(`output.tensorboard: true`, see `nstjax.tblog`).

A watcher has `rows(rows, image)` (history rows as history.csv has them; `image` the uint8 RGB
picture on snapshot steps, else None) and `close(record, image)` (run.json's content and the
final picture, once, at the end).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    from nstjax.config import Config


class Progress(NamedTuple):
    """One history row, as `on_progress` gets it.

    iteration: the run's iteration number (history.csv's `iter`; multi-scale runs count on over
    scales); scale: the scale index of a multi-scale run, else None; losses: total, content,
    style, tv and every further term of the objective (e.g. `style/<layer>`), as floats;
    seconds: solve seconds since the start; image: the current image as uint8 RGB (H, W, 3)
    on snapshot steps (every `output.save_every` iterations) and at the last iteration (the
    final image, whatever save_every), else None. A run that stops before its last iteration
    (converged, interrupted) ends with its last row once more, carrying the final image.
    """

    iteration: int
    scale: int | None
    losses: dict[str, float]
    seconds: float
    image: np.ndarray | None = None


class Watcher(Protocol):
    def rows(self, rows: list[dict], image: np.ndarray | None) -> None: ...

    def close(self, record: dict, image: np.ndarray | None) -> None: ...


def progress_of(row: dict, image: np.ndarray | None = None) -> Progress:
    scale = row.get("scale")
    return Progress(int(row["iter"]), None if scale is None else int(scale),
                    {k: float(v) for k, v in row.items() if k not in ("iter", "scale", "seconds")},
                    float(row.get("seconds", 0.0)), image)


class Callback:
    """Calls `fn(Progress)` once per history row; the image comes with a chunk's last row when
    a snapshot is due. An exception from `fn`, SystemExit included, ends the run as failed and
    is re-raised; KeyboardInterrupt ends it interrupted (`record.guarded`)."""

    last_image = True  # the final image with the last row (see `rows`)

    def __init__(self, fn: Callable[[Progress], object]):
        if not callable(fn):
            from nstjax.errors import UserError

            raise UserError(f"on_progress: takes a function of one Progress, not a "
                            f"{type(fn).__name__}")
        self.fn = fn
        self.last: Progress | None = None
        self.broken = False  # fn raised (or exited): never called again, not even at close

    def _call(self, p: Progress) -> None:
        try:
            self.fn(p)
        except BaseException:
            self.broken = True
            raise

    def rows(self, rows: list[dict], image: np.ndarray | None) -> None:
        for i, r in enumerate(rows):
            if self.broken:
                return
            self.last = progress_of(r, image if i == len(rows) - 1 else None)
            self._call(self.last)

    def close(self, record: dict, image: np.ndarray | None) -> None:
        """The final image, if the last row came without it (a run that stopped early)."""
        if (not self.broken and self.last is not None and self.last.image is None
                and image is not None):
            self._call(self.last._replace(image=image))


def for_run(d: Path, cfg: Config) -> list[Watcher]:
    """The watchers the config asks for in run directory `d`: TensorBoard or none."""
    if not getattr(cfg.output, "tensorboard", False):
        return []
    from nstjax import tblog

    return [tblog.TensorBoard(d / tblog.SUBDIR, cfg)]


def picture(x) -> np.ndarray:
    """A visible image (preprocessed space, colour controls applied) as uint8 RGB (H, W, 3)."""
    from nstjax import image

    return image.deprocess(np.asarray(x))


def rows(watchers: list[Watcher], rows: list[dict], x=None, snapshot: bool = True) -> None:
    """Tell every watcher about new history rows (`x`: the visible image on snapshot steps,
    and at the last iteration with `snapshot` False: then only watchers whose `last_image` is
    true get it, the others get the final image at `close`)."""
    if watchers and rows:
        img = None if x is None else picture(x)
        for w in watchers:
            w.rows(rows, img if snapshot or getattr(w, "last_image", False) else None)


def close(watchers: list[Watcher], record: dict, x=None) -> None:
    img = None if x is None or not watchers else picture(x)
    for w in watchers:
        w.close(record, img)
