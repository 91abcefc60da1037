"""A second run of the same shapes compiles nothing: no XLA compilation, compile_seconds 0."""

from __future__ import annotations

import json
from pathlib import Path

import jax.monitoring

from nstjax import config, run

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def test_second_run_does_not_recompile(tmp_path: Path) -> None:
    cfg = config.load(None, [f"content={DEMO / 'content.png'}", f"style={DEMO / 'style.png'}",
                             "image.size=[40, 32]", "model.weights=random",
                             "solver.maxiter=3", "output.save_every=2"])
    first = run.run(cfg, tmp_path / "a", quiet=True)
    assert first.record["status"] == "done"

    compiles: list[str] = []

    def listener(event: str, duration: float, **kwargs: object) -> None:
        if event == BACKEND_COMPILE:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second = run.run(cfg, tmp_path / "b", quiet=True)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)

    rec = json.loads((tmp_path / "b" / "run.json").read_text())
    assert rec["status"] == "done" and rec["iterations"] == 3
    assert rec["compile_seconds"] == 0
    assert compiles == [], f"{len(compiles)} XLA compilations in the second run"
    assert rec["final_loss"] == first.record["final_loss"]  # same program, same result
    assert second.record["wall_seconds"] > 0
