"""TensorBoard events for a run (`output.tensorboard: true`), written by tensorboardX (no
TensorFlow; the optional extra `nstjax[tensorboard]`).

One TensorBoard run per run directory, in `<run>/tensorboard/`: a scalar per history column
(tags as history.csv names them: total, content, style, tv, style/<layer>, ..., seconds,
scale; the step is the row's `iter`), the snapshots as image `snapshot` and the final image as
`final`, the resolved config as text `config` and run.json as text `run`. A sweep cell's events
are in its own directory (`cells/<cell>/tensorboard/`), so

    tensorboard --logdir runs/sweeps/ratio/cells     # one run per cell

A resumed run adds an event file to the same directory (the steps go on).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nstjax.config import Config

SUBDIR = "tensorboard"
INSTALL = "pip install 'nstjax[tensorboard]' (or pip install tensorboardX)"


def check(cfgs: Iterable[Config]) -> None:
    """UserError, before anything is written or compiled, if a config asks for TensorBoard and
    tensorboardX is not installed, or is installed but fails to import (its own error)."""
    if any(getattr(c.output, "tensorboard", False) for c in cfgs):
        _writer_class()


def _writer_class():
    from nstjax.runtime import optional

    return optional("tensorboardX", "output.tensorboard: true", INSTALL).SummaryWriter


def _code(text: str) -> str:
    """`text` as a Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoard:
    """A watcher (see `nstjax.watch`) writing one run's events into `logdir`; the writer opens
    at the first row (nothing is created before)."""

    def __init__(self, logdir: Path, cfg: Config):
        self.logdir, self.cfg, self.writer = Path(logdir), cfg, None
        self.step = 0

    def _open(self):
        if self.writer is None:
            SummaryWriter = _writer_class()  # noqa: N806 - the class
            from nstjax.config import dump

            self.writer = SummaryWriter(str(self.logdir), flush_secs=10)
            self.writer.add_text("config", _code(dump(self.cfg)), 0)
        return self.writer

    def rows(self, rows: list[dict], image: np.ndarray | None) -> None:
        w = self._open()
        for r in rows:
            self.step = int(r["iter"])
            for k, v in r.items():
                if k != "iter":
                    w.add_scalar(k, float(v), self.step)
        if image is not None:
            w.add_image("snapshot", image, self.step, dataformats="HWC")
        w.flush()

    def close(self, record: dict, image: np.ndarray | None) -> None:
        if self.writer is None:
            return
        if image is not None:
            self.writer.add_image("final", image, self.step, dataformats="HWC")
        self.writer.add_text("run", _code(json.dumps(record, indent=2, default=str)), self.step)
        self.writer.close()
        self.writer = None
