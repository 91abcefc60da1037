"""Running a sweep: this process's unfinished cells, group by group and batch by batch.

Each cell is written as a complete run directory (`record.Recorder`, the same format as
`nstjax run`) in the sweep's scratch space and then published under cells/ (see `store`). A
crashing batch fails only its cells; out of device memory, the batch is halved. SIGINT,
SIGTERM and SIGHUP stop the sweep after the current chunk, the cells written as interrupted.
With `jax.distributed`, each process runs a contiguous share of the cells and process 0
writes the summary.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import nstjax.sweep.batched as batched
import nstjax.sweep.report as report
import nstjax.sweep.store as store
from nstjax import costs, losses, runtime, tblog
from nstjax.errors import UserError, one_line
from nstjax.sweep.plan import Group, batch_size, batches, lanes_for, multiscale, owned, params_key
from nstjax.sweep.spec import Cell, Sweep

if TYPE_CHECKING:
    from nstjax.config import Config


class OutOfMemory(Exception):
    pass


class BatchCost(NamedTuple):
    """What the last batch (or host cell) measured, for the cost cache (`nstjax.costs`)."""

    compile_s: float = 0.0  # 0.0: the program was reused
    warm: bool = False  # XLA binaries from the persistent compilation cache
    solve_s: float = 0.0
    evals: int = 0  # the most any cell of the batch made


def cell_seconds(evals, solve_s: float, compile_s: float) -> tuple[list[float], list[float]]:
    """Each cell's own seconds of a batch it shared: the solve time in proportion to the
    cell's loss evaluations (a cell that stopped early was charged for fewer), the compile
    time in equal shares; each list sums to the batch's time (recorded beside them as
    batch_solve_seconds and batch_compile_seconds)."""
    ev = [max(int(e), 0) for e in evals]
    total = sum(ev)
    n = max(len(ev), 1)
    solve = [solve_s * e / total for e in ev] if total else [solve_s / n] * len(ev)
    return solve, [compile_s / n] * len(ev)


@dataclass
class Outcome:
    """What one `run_sweep` did in this process."""

    out: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: bool = False
    signal: int | None = None
    compilations: int = 0
    compile_seconds: float = 0.0
    solve_seconds: float = 0.0
    wall_seconds: float = 0.0
    batch_seconds: float = 0.0  # wall seconds inside batches (and host cells)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return runtime.signal_exit_code(self.signal) or 130
        return 1 if self.failed else 0


class Runner:
    """Runs groups of cells on a mesh of local devices and publishes their run directories."""

    def __init__(self, sw: Sweep, out: Path, devices: list, *, batch: int | None,
                 lanes: int | None, quiet: bool, process: int = 0):
        import numpy as np
        from jax.sharding import Mesh

        self.sw, self.out, self.devices, self.quiet, self.process = sw, out, devices, quiet, process
        self.mesh = Mesh(np.array(devices), ("cells",))
        self.batch, self.lanes = batch, lanes
        self.backend = devices[0].platform
        self.params: dict[tuple, tuple] = {}
        self.flag = runtime.StopFlag()
        self.outcome = Outcome(out)
        self.kind = getattr(devices[0], "device_kind", self.backend)
        self.last = BatchCost()

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def sweep_info(self, c: Cell, g: Group | None, **extra) -> dict:
        return {"sweep": {"name": self.sw.name, "file": self.sw.source, "cell": c.name,
                          "dir": c.dir or c.name, "index": c.index,
                          "group": g.name if g else "", "values": c.values,
                          "process": self.process, **extra}}

    def write_failed(self, c: Cell, error: str, g: Group | None = None) -> None:
        """A complete directory for a cell that could not run: config and run.json with error."""
        from nstjax import record

        d = store.scratch_dir(self.out, c)
        runtime.write_atomic(d / "config.yaml", store.config_text(c))
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        rec = {"status": "failed", "error": error, "versions": runtime.versions(),
               "started": now, "finished": now, **self.sweep_info(c, g)}
        runtime.write_atomic(d / "run.json", record.record_json(rec))
        store.publish(self.out, d, c)
        self.outcome.failed.append(c.name)
        self.log(f"  {c.name}: failed: {error}")

    def params_for(self, cfg: Config) -> tuple:
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from nstjax import vgg16, weights

        key = params_key(cfg)
        if key not in self.params:
            params, info = weights.load(cfg.model.weights, seed=cfg.seed, arch=cfg.model.arch,
                                        quiet=bool(self.params) or self.quiet)
            params = vgg16.prepare(params, cfg.model.conv, cfg.model.precision)
            params = jax.device_put(params, NamedSharding(self.mesh, P()))
            self.params[key] = (params, info)
        return self.params[key]

    def program(self, g: Group, b: int, lanes: int, xb, argsb) -> tuple[tuple, float]:
        prog, dt, cached = batched.program(g, self.mesh, xb, argsb, lanes)
        self.last = BatchCost(dt, cached)
        if dt:
            self.outcome.compilations += 1
            self.outcome.compile_seconds += dt
            how = " (XLA binaries from the persistent cache)" if cached else ""
            self.log(f"  {g.name}: compiled for batch {b} ({lanes} lane(s) per device) in "
                     f"{dt:.1f} s{how}")
        return prog, dt

    # ---- groups and batches

    def run_group(self, g: Group, cells: list[Cell], share: int | None = None) -> None:
        """Run `cells` of group g. Batches are sized for `share` (this process's cells of the
        group, finished ones included), so a resumed sweep reuses the same program."""
        if g.host:
            self.log(f"{g.name}: {len(cells)} cell(s), one by one ({g.settings.name})")
            for c in cells:
                if self.flag.stopped:
                    return
                self.run_host(g, c)
            return
        ndev = len(self.devices)
        b = batch_size(g, max(share or 0, len(cells)), self.devices, self.batch, self.lanes,
                       self.backend)
        todo = list(cells)
        while todo and not self.flag.stopped:
            lanes = lanes_for(g, b // ndev, self.lanes, self.backend, self.devices)
            parts = batches(todo, b)
            self.log(f"{g.name}: {len(todo)} cell(s) in {len(parts)} batch(es) of {b} on "
                     f"{ndev} device(s), {lanes} lane(s) each")
            try:
                for k, batch in enumerate(parts):
                    if self.flag.stopped:
                        return
                    self.run_batch(g, batch, b, lanes, f"{k + 1}/{len(parts)}")
                    done = {c.name for c in batch}
                    todo = [c for c in todo if c.name not in done]
            except OutOfMemory as e:
                if b <= ndev:
                    for c in todo:
                        self.write_failed(c, f"out of device memory at batch {b}: {e}", g)
                    return
                b = max(ndev, b // 2 // ndev * ndev)
                self.log(f"{g.name}: out of device memory; retrying with batch {b}")

    def _problems(self, g: Group, batch: list[Cell]) -> tuple[list, list]:
        from nstjax import problem

        probs, live = [], []
        for c in batch:
            try:
                p = problem.build(c.cfg, *self.params_for(c.cfg))
                if tuple(p.x0.shape[1:3]) != g.hw:
                    raise UserError(f"init image shape {tuple(p.x0.shape[1:3])} is not {g.hw}")
            except (UserError, OSError, ValueError) as e:
                self.write_failed(c, str(e), g)
                continue
            probs.append(p)
            live.append(c)
        return probs, live

    def run_batch(self, g: Group, batch: list[Cell], b: int, lanes: int, tag: str) -> None:
        """Build, stack, solve and write one batch; a crash fails only this batch's cells."""
        t0 = time.perf_counter()
        probs, live = self._problems(g, batch)
        if not live:
            return
        dirs: list[Path] = []
        try:
            xb, argsb, mask = batched.stack(probs, b, self.mesh)
            prog, compile_s = self.program(g, b, lanes, xb, argsb)
            dirs = [store.scratch_dir(self.out, c) for c in live]
            info = {"batch": tag, "batch_size": b, "lanes": lanes, "devices": len(self.devices)}
            self.solve(g, live, probs, dirs, prog, compile_s, (xb, argsb, mask), info)
            self.measured(g, b, lanes, len(live), time.perf_counter() - t0)
        except (KeyboardInterrupt, OutOfMemory):
            raise
        except Exception as e:  # noqa: BLE001 - one batch's crash must not stop the sweep
            for d in dirs:
                if d.exists():
                    shutil.rmtree(d, ignore_errors=True)
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                raise OutOfMemory(one_line(e)) from e
            for c in live:
                if c.name not in self.outcome.ran:
                    self.write_failed(c, one_line(e),
                                      g)

    def solve(self, g: Group, live: list[Cell], probs: list, dirs: list[Path], prog,
              compile_s: float, inputs: tuple, info: dict) -> None:
        """One batch through `solvers.drive` (the host loop of single runs too): chunks until
        every cell made its iterations or is done, or a signal came; rows go to each cell's
        recorder with seconds placed by that cell's evaluations."""
        import jax
        import numpy as np
        from tqdm.auto import tqdm

        from nstjax import record, solvers

        s = g.settings
        t_start = time.perf_counter()
        recs = []
        for c, p, d in zip(live, probs, dirs):
            rec = record.Recorder(d, c.cfg, {**record.start_record(c.cfg, p, announce=False),
                                             **self.sweep_info(c, g, **info)},
                                  post=p.post, problem=p)
            rec.start()
            rec.stage(total=s.maxiter)
            recs.append(rec)
        init_c, chunk_c = prog
        xb, argsb, mask = inputs
        t0 = time.perf_counter()
        st = solvers.evaluate_start(chunk_c, init_c(xb, argsb, mask), argsb)
        terms0, it0 = jax.device_get((st.terms, st.it))
        for i, rec in enumerate(recs):
            rec.first({"iter": int(it0[i]), **{k: float(v[i]) for k, v in terms0.items()},
                       "seconds": 0.0})
        bar = tqdm(total=s.maxiter, disable=self.quiet, unit="it", dynamic_ncols=True,
                   file=sys.stderr, desc=f"{g.name} {info['batch']}")

        def each(ch: solvers.Chunk) -> bool:
            x = np.asarray(jax.device_get(ch.state.x))
            for i, rec in enumerate(recs):
                rows = solvers.rows_of({k: v[i] for k, v in ch.trace.items()}, t0,
                                       start=ch.start, evals0=int(ch.evals0[i]), end=ch.end)
                if rows:
                    rec.add(x[i], rows)
            bar.update(min(r.history[-1]["iter"] for r in recs) - bar.n)
            bar.set_postfix(best=f"{min(r.history[-1]['total'] for r in recs):.4g}")
            return self.flag.stopped

        if not self.flag.stopped:
            st, _ = solvers.drive(chunk_c, st, argsb, maxiter=s.maxiter, chunk=g.chunk,
                                  maxevals=s.maxevals, on_chunk=each)
        bar.close()
        self._close(live, recs, dirs, st, compile_s, time.perf_counter() - t0, t_start)

    def _close(self, live, recs, dirs, st, compile_s: float, solve_s: float,
               t_start: float) -> None:
        """Complete and publish each cell's directory (signals wait while this runs)."""
        import jax
        import numpy as np

        from nstjax import solvers

        self.flag.finishing = True
        fin = jax.device_get(st._replace(opt=None, terms=None))  # per-cell scalars and x
        self.outcome.solve_seconds += solve_s
        self.last = self.last._replace(solve_s=solve_s, evals=int(np.max(fin.evals)))
        solve_share, compile_share = cell_seconds(np.asarray(fin.evals)[: len(live)], solve_s,
                                                  compile_s)
        try:
            for i, (c, rec, d) in enumerate(zip(live, recs, dirs)):
                one = jax.tree.map(lambda v, i=i: v[i], fin)
                rec.record["batch_solve_seconds"] = round(solve_s, 4)
                rec.record["batch_compile_seconds"] = round(compile_s, 4)
                rec.record["batch_cells"] = len(live)
                res = solvers.Result(x=np.asarray(one.x), evals=int(one.evals),
                                     iterations=int(one.it),
                                     compile_seconds=compile_share[i],
                                     solve_seconds=solve_share[i])
                res.status, res.error = solvers.status_of(one)
                crash = rec.close(res, t_start, self.flag)
                if crash is not None:
                    raise crash
                store.publish(self.out, d, c)
                self.outcome.ran.append(c.name)
                if res.status == solvers.Status.FAILED:
                    self.outcome.failed.append(c.name)
                    self.log(f"  {c.name}: failed: {res.error}")
        finally:
            self.flag.finishing = False
        if self.flag.stopped:
            self.outcome.interrupted = True

    def measured(self, g: Group, b: int, lanes: int, n: int, wall: float) -> None:
        """Put the last batch's costs into the cost cache (`nstjax.costs`) for dry runs."""
        from nstjax import record

        self.outcome.batch_seconds += wall
        m = self.last
        if self.flag.stopped or multiscale(g.cells[0].cfg):
            return
        costs.record_batch(costs.program_key(g.key, self.backend, self.kind, len(self.devices)),
                           f"{g.name} {g.hw[1]}x{g.hw[0]} {g.settings.name}", b, lanes,
                           compile_s=m.compile_s, warm=m.warm, solve_s=m.solve_s, evals=m.evals,
                           iterations=record.steps(g.settings),
                           cell_s=(wall - m.compile_s - m.solve_s) / n)

    def run_host(self, g: Group, c: Cell) -> None:
        """One cell on its own, exactly as `nstjax run` runs it (host solver, multi-scale)."""
        from nstjax import problem, record, run

        t0 = time.perf_counter()
        built = None
        if not multiscale(c.cfg):  # run.run builds multi-scale runs itself
            try:
                built = problem.build(c.cfg, *self.params_for(c.cfg))
            except (UserError, OSError, ValueError) as e:
                self.write_failed(c, str(e), g)
                return
        d = store.scratch_dir(self.out, c, create=False)  # run.run makes it
        try:
            r = run.run(c.cfg, d, quiet=self.quiet, problem=built)
            rec, result = r.record, r.result
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - run.run re-raises after writing its directory
            shutil.rmtree(d, ignore_errors=True)
            self.write_failed(c, one_line(e), g)
            return
        rec.update(self.sweep_info(c, g, batch="1/1", batch_size=1, lanes=1, devices=1))
        runtime.write_atomic(d / "run.json", record.record_json(rec))
        self.outcome.compilations += 1
        self.outcome.compile_seconds += result.compile_seconds
        self.outcome.solve_seconds += result.solve_seconds
        self.last = BatchCost(result.compile_seconds, False, result.solve_seconds, result.evals)
        store.publish(self.out, d, c)
        self.measured(g, 1, 1, 1, time.perf_counter() - t0)
        self.outcome.ran.append(c.name)
        if rec["status"] == "failed":
            self.outcome.failed.append(c.name)
        if rec["status"] == "interrupted":
            self.flag.stop(rec.get("signal") or 2)
            self.outcome.interrupted = True


def plan_json(sw: Sweep, cells: list[Cell], groups: list[Group]) -> dict:
    """sweep.json's content: dims, groups and cells (with their directories)."""
    return {
        "name": sw.name, "file": str(Path(sw.source).resolve()), "description": sw.description,
        "label_metric": sw.label_metric,
        "dims": [{"keys": list(d.keys), "values": [list(v) for v in d.values],
                  "labels": list(d.labels) if d.labels else None} for d in sw.dims],
        "groups": [{"name": g.name, "label": g.label, "size_wh": [g.hw[1], g.hw[0]],
                    "solver": g.settings.name, "cells": [c.name for c in g.cells]}
                   for g in groups],
        "cells": [{"name": c.name, "dir": f"cells/{c.dir or c.name}", "index": c.index,
                   "group": c.group, "values": c.values, "error": c.error} for c in cells],
    }


def barrier(name: str) -> bool:
    """Wait for every process of a jax.distributed job; False if that failed (logged)."""
    try:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return True
    except Exception as e:  # noqa: BLE001 - a dead peer must not lose this process's summary
        print(f"nstjax: warning: waiting for the other processes failed: {one_line(e)}",
              file=sys.stderr)
        return False


def _warn(message: str) -> None:
    print(f"nstjax: warning: {message}", file=sys.stderr)


def _announce_moved(r: Runner, moved: list[Cell]) -> None:
    if moved:
        keys = store.differing_keys(r.out, moved[0])
        r.log(f"sweep {r.sw.name}: {len(moved)} cell(s) have other settings than the "
              f"directories under their names ({', '.join(keys) or 'other files'}); those are "
              f"kept, these run into cells/<name>-<hash> (e.g. cells/{moved[0].dir})")


def _progress(out: Path, sw: Sweep, cells: list[Cell]) -> None:
    """summary.csv and report.html after a group; a failure is a warning (the end retries)."""
    try:
        report.progress(out, sw, cells)
    except Exception as e:  # noqa: BLE001 - the page must not stop the sweep
        _warn(f"report.html not updated: {one_line(e)}")


def run_sweep(sw: Sweep, cells: list[Cell], groups: list[Group], out: str | Path, *,
              devices: list | None = None, batch: int | None = None, lanes: int | None = None,
              quiet: bool = False, process: int = 0, count: int = 1) -> Outcome:
    """Run this process's unfinished cells and (process 0) write the sweep's summary files."""
    import jax

    t_start = time.perf_counter()
    tblog.check(c.cfg for c in cells if c.cfg is not None)  # before anything is written
    from nstjax import record

    record.announce_plugins(record.plugins(c.cfg for c in cells if c.cfg is not None))
    out = Path(out)
    store.claim(out, sw)
    moved = store.locate(out, cells)
    devices = list(devices or jax.local_devices())
    r = Runner(sw, out, devices, batch=batch or sw.batch_size, lanes=lanes or sw.lanes,
               quiet=quiet, process=process)
    if process == 0:
        store.write_plan(out, plan_json(sw, cells, groups))
    mine = owned(groups, cells, process, count)
    lock_dir = out / store.SCRATCH / (f"process-{process}" if count > 1 else "")
    lock_dir.mkdir(exist_ok=True)
    with runtime.DirLock(lock_dir, "the sweep" + (f" (process {process})" if count > 1 else "")):
        store.clean_stale(out, mine, _warn)
        todo = [c for c in mine if not store.finished(store.cell_dir(out, c), _warn)]
        names = {c.name for c in todo}
        r.outcome.skipped = [c.name for c in mine if c.name not in names]
        who = f"process {process}/{count}: " if count > 1 else ""
        _announce_moved(r, [c for c in moved if c in mine])
        r.log(f"sweep {sw.name}: {who}{len(mine)} cell(s), {len(r.outcome.skipped)} finished "
              f"already, {len(todo)} to run -> {out}")
        with r.flag.installed():
            for c in todo:
                if c.key is None:
                    r.write_failed(c, c.error)
            for g in groups:
                mine_g = [c for c in todo if c.key == g.key]
                if mine_g and not r.flag.stopped:
                    with losses.isolated(g.plugins):  # the group's plugins only
                        r.run_group(g, mine_g, sum(1 for c in mine if c.key == g.key))
                    if count == 1:
                        _progress(out, sw, cells)
    r.outcome.signal = r.flag.signum
    r.outcome.interrupted = r.outcome.interrupted or r.flag.stopped
    if count > 1:
        barrier(f"nstjax-sweep-{sw.name}-done")
    if process == 0:
        report.summarize(out, sw, cells, groups)
    r.outcome.wall_seconds = time.perf_counter() - t_start
    return r.outcome


def init_distributed(a: argparse.Namespace) -> tuple[int, int]:
    """(process index, count): jax.distributed.initialize only when asked."""
    if not (a.coordinator or a.num_processes or a.distributed):
        return 0, 1
    if not a.distributed:
        if not (a.coordinator and a.num_processes and a.process_id is not None):
            raise UserError("--coordinator, --num-processes and --process-id go together "
                            "(or use --distributed on a cluster)")
        if not 0 <= a.process_id < a.num_processes:
            raise UserError(f"--process-id {a.process_id}: must be in 0..{a.num_processes - 1}")
    import jax

    try:
        jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"jax.distributed.initialize failed: {one_line(e)}") from None
    return jax.process_index(), jax.process_count()
