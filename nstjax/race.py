"""`nstjax bench --race`: time to reach a loss, nstjax against PyTorch eager + scipy L-BFGS-B.

One script run, side by side, on the config's real problem (images, weights, loss):
- the peer: the same VGG16 prefix and loss in PyTorch eager (`bench.TorchCase`), value and
  gradient handed to scipy's `fmin_l_bfgs_b` (m=10, no tolerances): the post's own scheme. Its
  loss after `iters` iterations is the target.
- optionally `torch.optim.LBFGS` (strong Wolfe, history 10), made to move as `bench.TorchCase`
  does: a unit-length first step and no gradient/change tolerances.
- each nstjax solver as a user runs it: `nstjax run CONFIG ... --out DIR --no-compile-cache` in a
  fresh process (cold compilation cache). From its run directory: seconds from process start to
  final.png, compile seconds, and from history.csv the first iteration at or below the target
  (time to target = compile + that row's solve seconds), evaluations per iteration, and the run's
  own ms per evaluation (run.json).
- with a speed size: PyTorch's ms per evaluation there, before and after 10-iteration runs of
  each solver and of each variant that changes a setting (e.g. `model.conv=direct`).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nstjax.errors import UserError


def _problem(cfg_path: str, overrides: list[str]):
    """A `bench.Inputs` holding the config's own images, weights and x0 (host arrays)."""
    import jax

    from nstjax import bench, config, problem

    cfg = config.load(cfg_path, overrides)
    pb = problem.build(cfg)
    host = jax.device_get
    bp = bench.Inputs(width=int(pb.content.shape[2]), height=int(pb.content.shape[1]),
                       params=host(pb.params), content=np.asarray(host(pb.content)),
                       style=np.asarray(host(pb.style)), x0=np.asarray(host(pb.x0)),
                       loss_cfg=cfg.loss)
    return cfg, bp


def torch_ms_per_eval(tc: Any, repeats: int) -> float:
    tc.call()
    return 1e3 * float(np.median([tc.call() for _ in range(repeats)]))


def nstjax_run(cfg_path: str, overrides: list[str], solver: str, iters: int, out: Path,
               label: str | None = None, warm: bool = False) -> dict:
    """`nstjax run` in a fresh process; what its run directory says. Cold: without the
    persistent compilation cache; `warm`: with it, after one untimed run that fills it."""
    cmd = [sys.executable, "-m", "nstjax.cli", "run", cfg_path, f"solver.name={solver}",
           f"solver.{'rounds' if solver == 'scipy_lbfgsb' else 'maxiter'}={iters}",
           "output.save_every=0", *overrides, "--quiet"]
    if warm:
        subprocess.run([*cmd, "--out", str(out) + "-fill"], capture_output=True, text=True)
    else:
        cmd.append("--no-compile-cache")
    cmd += ["--out", str(out)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0 or not (out / "run.json").is_file():
        raise UserError(f"race: nstjax run with {solver} failed: {p.stderr.strip()[-300:]}")
    rec = json.loads((out / "run.json").read_text())
    with open(out / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "scale" in rows[0]:  # coarse to fine: losses compare at the final size only
        last = max(r["scale"] for r in rows)
        rows = [r for r in rows if r["scale"] == last]
    trace = [(int(r["iter"]), float(r["seconds"]), float(r["total"]), None) for r in rows[1:]]
    return {"solver": label or solver, "iterations": rec["iterations"],
            "evaluations": rec["evaluations"],
            "compile_seconds": rec["compile_seconds"], "solve_seconds": rec["solve_seconds"],
            "ms_per_evaluation": rec.get("ms_per_evaluation"), "wall_seconds": wall,
            "initial_loss": float(rows[0]["total"]), "final_loss": trace[-1][2] if trace else None,
            "trace": trace}


def reach(row: dict, target: float) -> dict:
    """Iteration, evaluations and seconds (compile + solve) at which row first gets <= target."""
    for it, secs, loss, evals in row["trace"]:
        if loss <= target:
            return {"reach_iter": it, "reach_seconds": row["compile_seconds"] + secs,
                    "reach_evals": evals}
    return {"reach_iter": None, "reach_seconds": None, "reach_evals": None}


def race(cfg_path: str, overrides: list[str], solvers: list[str], iters: int = 80,
         threads: int = 0, torch_optim: bool = False, speed_size: str | None = None,
         repeats: int = 5, quiet: bool = False,
         variants: list[tuple[str, list[str], bool]] = ()) -> dict:
    """The side-by-side report (see the module docstring). `variants`: extra runs of the first
    solver as (label, overrides, warm compilation cache)."""
    from nstjax import bench, bench_torch

    def say(msg: str) -> None:
        if not quiet:
            print(f"[race] {msg}", file=sys.stderr, flush=True)

    cfg, pb = _problem(cfg_path, overrides)
    if cfg.loss.kind != "gram":
        raise UserError(f"--race: the PyTorch peer implements the Gram loss only, not "
                        f"loss.kind {cfg.loss.kind}")
    spec = pb.spec(cfg.model.precision, conv=cfg.model.conv)
    tc = bench_torch.TorchCase(pb, spec, threads, "nhwc")
    say(f"{pb.width}x{pb.height}: PyTorch eager + scipy L-BFGS-B, {iters} iterations")
    rows = [bench_torch.scipy_lbfgsb(tc, iters)]
    target = rows[0]["final_loss"]
    if torch_optim:
        say("PyTorch eager + torch.optim.LBFGS")
        rows.append(bench_torch.lbfgs(tc, iters))
    with tempfile.TemporaryDirectory(prefix="nstjax-race-") as tmp:
        for s in solvers:
            say(f"nstjax run, solver {s}")
            # Past the peer's count, to see when the target is reached.
            rows.append(nstjax_run(cfg_path, overrides, s, iters + iters // 4, Path(tmp) / s))
        for i, (label, extra, warm) in enumerate(variants):
            say(f"nstjax run, {label}")
            rows.append(nstjax_run(cfg_path, [*overrides, *extra], solvers[0],
                                   iters + iters // 4, Path(tmp) / f"v{i}", label, warm))
        speed = None
        if speed_size:
            w, h = bench.parse_sizes(speed_size)[0]
            sz = [f"image.size=[{w},{h}]"]
            say(f"{w}x{h}: ms per evaluation, PyTorch eager vs the run's own (run.json)")
            _, pb2 = _problem(cfg_path, [*overrides, *sz])
            tc2 = bench_torch.TorchCase(pb2, spec, threads, "nhwc")
            torch_ms = torch_ms_per_eval(tc2, repeats)
            runs = {s: nstjax_run(cfg_path, [*overrides, *sz], s, 10, Path(tmp) / f"speed-{s}")
                    for s in solvers}
            for i, (label, extra, _) in enumerate(variants):
                if extra:  # a changed setting, e.g. model.conv=direct: its speed too
                    runs[label] = nstjax_run(cfg_path, [*overrides, *extra, *sz], solvers[0], 10,
                                             Path(tmp) / f"speed-v{i}", label)
            # Measured again after the runs: a change of load shows as two different numbers.
            torch_ms = [torch_ms, torch_ms_per_eval(tc2, repeats)]
            speed = {"size": f"{w}x{h}", "torch_ms_per_eval": min(torch_ms),
                     "torch_ms_per_eval_before_after": torch_ms,
                     "run_ms_per_eval": {s: r["ms_per_evaluation"] for s, r in runs.items()}}
    for r in rows:
        r.update(reach(r, target))
        at = [loss for it, _, loss, _ in r["trace"] if it <= iters]
        r["loss_at_iters"] = at[-1] if at else r["initial_loss"]
        r["evals_per_iteration"] = r["evaluations"] / max(r["iterations"], 1)
    return {"size": f"{pb.width}x{pb.height}", "iters": iters, "target_loss": target,
            "weights": cfg.model.weights, "threads": tc.torch.get_num_threads(),
            "rows": rows, "speed": speed}


def table(report: dict) -> str:
    """Markdown table of a race report."""
    peer = report["rows"][0]["solve_seconds"]
    out = [f"{report['size']}, {report['iters']} iterations, target loss "
           f"{report['target_loss']:.4g} (PyTorch+scipy's final), {report['threads']} threads",
           "", "| system | iterations | evals | evals/iter | compile s | solve s | loss at "
           f"{report['iters']} it | reaches target at (it, s) | / peer solve s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        at = (f"{r['reach_iter']}, {r['reach_seconds']:.1f}" if r["reach_iter"] is not None
              else "never")
        ratio = f"{r['reach_seconds'] / peer:.2f}" if r["reach_seconds"] is not None else "-"
        out.append(f"| {r['solver']} | {r['iterations']} | {r['evaluations']} | "
                   f"{r['evals_per_iteration']:.2f} | {r['compile_seconds']:.1f} | "
                   f"{r['solve_seconds']:.1f} | {r['loss_at_iters']:.4g} | {at} | {ratio} |")
    sp = report.get("speed")
    if sp:
        runs = ", ".join(f"{k} {v:.0f}" for k, v in sp["run_ms_per_eval"].items())
        ba = "/".join(f"{v:.0f}" for v in sp.get("torch_ms_per_eval_before_after", []))
        out += ["", f"{sp['size']}: PyTorch eager {sp['torch_ms_per_eval']:.0f} ms/eval "
                f"(before/after the runs: {ba}); "
                f"nstjax runs' own ms/eval (run.json): {runs}"]
    return "\n".join(out)


def lanes(sweep_path: str, overrides: list[str], widths: tuple[int, ...] = (1, 4),
          quiet: bool = False) -> list[dict]:
    """`nstjax sweep` once per lane count (fresh process and directory, cold compilation
    cache): compile, solve and wall seconds as the sweep reports them."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="nstjax-lanes-") as tmp:
        for n in widths:
            if not quiet:
                print(f"[race] nstjax sweep {sweep_path} --lanes {n}", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "nstjax.cli", "sweep", sweep_path, *overrides,
                   "--lanes", str(n), "--out", str(Path(tmp) / f"lanes{n}"), "--quiet",
                   "--no-compile-cache"]
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t
            m = re.search(r"(\d+) ran, (\d+) failed.*\(([\d.]+) s\), solve ([\d.]+) s, "
                          r"wall ([\d.]+) s", p.stdout + p.stderr)
            if p.returncode != 0 or m is None:
                raise UserError(f"lanes: the sweep with --lanes {n} failed: "
                                f"{(p.stderr or p.stdout).strip()[-300:]}")
            rows.append({"lanes": n, "cells": int(m[1]), "failed": int(m[2]),
                         "compile_seconds": float(m[3]), "solve_seconds": float(m[4]),
                         "sweep_wall_seconds": float(m[5]), "process_seconds": wall})
    return rows


def lanes_table(rows: list[dict]) -> str:
    base = rows[0]["compile_seconds"] + rows[0]["solve_seconds"]
    out = ["| lanes | cells | compile s | solve s | compile + solve / 1 lane's | process s |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        cs = r["compile_seconds"] + r["solve_seconds"]
        out.append(f"| {r['lanes']} | {r['cells']} | {r['compile_seconds']:.1f} | "
                   f"{r['solve_seconds']:.1f} | {cs / base:.2f} | {r['process_seconds']:.1f} |")
    return "\n".join(out)


def parse_variant(text: str) -> tuple[str, list[str], bool]:
    """'LABEL:key=value;key=value' (or 'warm' for the warm compilation cache)."""
    label, _, rest = text.partition(":")
    if label == "warm":
        return ("warm compile cache", [], True)
    if not rest:
        raise UserError(f"--variant {text!r}: expected LABEL:key=value[;key=value...] or warm")
    return (label, rest.split(";"), False)


FLAG_BOUNDS = {"race_iters": (1, 100_000)}


def check_flags(a: Any) -> None:
    """The race's flags (the timing table's: `bench.check_flags`): one line naming the flag."""
    from nstjax import bench, errors, solvers

    errors.check_flags(a, FLAG_BOUNDS)
    if a.race_speed_size:
        bench.parse_sizes(a.race_speed_size, "--race-speed-size")
    names = [s for s in a.race_solvers.split(",") if s]
    bad = [s for s in names if s not in solvers.NAMES]
    if bad or not names:
        raise UserError(f"--race-solvers {a.race_solvers[:60]!r}: give solver names from "
                        f"{', '.join(solvers.NAMES)}, comma-separated")


def add_arguments(p: Any) -> None:
    """`nstjax bench`'s options: the timing table's (nstjax.bench) and the race's."""
    from nstjax import bench

    bench.add_arguments(p)
    r = p.add_argument_group("race (time to reach a loss, against PyTorch eager + scipy L-BFGS-B)")
    r.add_argument("--lanes-sweep", metavar="SWEEP",
                   help="run this sweep with --lanes 1 and 4 and compare the times")
    r.add_argument("--race", metavar="CONFIG",
                   help="race on this config's problem instead of the timing table (needs torch)")
    r.add_argument("--race-set", dest="race_overrides", action="append", metavar="KEY=VALUE",
                   help="config override for the race (repeatable)")
    r.add_argument("--race-iters", type=int, default=80,
                   help="the peer's iterations; its final loss is the target (default 80)")
    r.add_argument("--race-solvers", default="lbfgs,jaxopt_lbfgs",
                   help="nstjax solvers, each an `nstjax run` with a cold compilation cache")
    r.add_argument("--race-torch-optim", action="store_true",
                   help="also torch.optim.LBFGS (unit first step, no tolerances)")
    r.add_argument("--race-speed-size", metavar="WxH",
                   help="also the run's own ms per evaluation (run.json) against PyTorch's here")
    r.add_argument("--variant", dest="race_variants", action="append", metavar="LABEL:K=V;..",
                   help="an extra run of the first solver with overrides; 'warm': warm cache")


def main(a: Any) -> int:
    """`nstjax bench`: the race with `--race CONFIG`, else the timing table (nstjax.bench)."""
    from nstjax import bench

    bench.check_flags(a)  # every flag checked first, whichever mode uses it
    check_flags(a)
    if a.out and not a.table and (a.race or not a.lanes_sweep):
        bench.refuse_overwrite(a.out, a.force)
    if a.lanes_sweep:
        rows = lanes(a.lanes_sweep, list(a.race_overrides or []), quiet=a.quiet)
        print(lanes_table(rows))
        return 0
    if not a.race:
        return bench.main(a)
    solvers = [s for s in a.race_solvers.split(",") if s]
    variants = [parse_variant(v) for v in a.race_variants or []]
    report = race(a.race, list(a.race_overrides or []), solvers, iters=a.race_iters,
                  threads=a.torch_threads, torch_optim=a.race_torch_optim,
                  speed_size=a.race_speed_size, repeats=a.repeats, quiet=a.quiet,
                  variants=variants)
    text = table(report)
    print(text)
    if a.out:
        from nstjax.runtime import write_atomic

        write_atomic(Path(a.out), json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.out}")
    return 0
