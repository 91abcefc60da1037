"""`nstjax bench`: time loss+gradient evaluations and L-BFGS solves per image size and precision.

For each size: random content and style images, the loss of `nstjax.losses` (the post's layers
and weights, `seed` normalization), and per precision one AOT-compiled
`jax.value_and_grad` program. Reported per (size, precision): compile seconds, ms per evaluation
(median and min of `--repeats`, each `block_until_ready`), evaluations per second, GFLOP per
evaluation (XLA's cost analysis), the program's memory (XLA's memory analysis), the device's
peak memory (None where the backend keeps no statistics, as on CPU), and a solve of `--iters`
L-BFGS iterations through `solvers.minimize`.

`--compare-torch` runs the same network and loss in PyTorch eager (float32; TF32 allowed on
CUDA, as PyTorch's convolutions do by default) in the same process: it first checks PyTorch's
loss (relative 1e-4) and gradient against JAX's in `highest` precision, both without TF32, then
times forward+backward with respect to the image, and solves with `torch.optim.LBFGS`. Timings
of all programs of one size are interleaved round by round, so a busy machine slows them alike.
`--table FILE` prints the table of an earlier JSON report (`--markdown`: as markdown tables).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import config, errors, image, losses, runtime, solvers, vgg16, weights
from nstjax.bench_torch import TorchCase, _import_torch, _now, _per, _rel
from nstjax.errors import UserError

SCHEMA = 1
ALIASES = {"4k": (3840, 2160), "1080p": (1920, 1080), "720p": (1280, 720)}
DEFAULT_SIZES = "128x96,256x192,512x384"
# The config's default image.max_pixels: a larger size is refused before anything is allocated.
MAX_BENCH_PIXELS = config.ImageCfg.model_fields["max_pixels"].default
MATCH_RTOL = 1e-4  # loss
# Gradient: float32 roundoff amplified through 13 ReLU layers; measured 3e-4..5e-4 at 256x192 and
# 512x384 (2.6e-8 with both sides in float64), so a wrong network or loss shows as O(1).
GRAD_RTOL = 1e-2
# Ops that would move data between host and device inside a compiled solver chunk.
HOST_OPS = re.compile(r"\b(infeed|outfeed|send|recv|send-done|recv-done)\(|callback", re.I)


# ---------------------------------------------------------------- arguments


def parse_sizes(text: str, flag: str = "--sizes") -> list[tuple[int, int]]:
    """'512x384,4k' -> [(512, 384), (3840, 2160)] as (width, height)."""
    out = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        if item in ALIASES:
            out.append(ALIASES[item])
            continue
        m = re.fullmatch(r"(\d+)x(\d+)", item)
        if not m or min(int(m[1]), int(m[2])) < 16 or max(int(m[1]), int(m[2])) > config.MAX_SIDE \
                or int(m[1]) * int(m[2]) > MAX_BENCH_PIXELS:
            raise UserError(f"{flag}: {item[:40]!r} is not WIDTHxHEIGHT with sides in "
                            f"16..{config.MAX_SIDE} and at most {MAX_BENCH_PIXELS} pixels "
                            f"(or one of {', '.join(ALIASES)}), e.g. 512x384")
        out.append((int(m[1]), int(m[2])))
    if not out:
        raise UserError(f"{flag}: give at least one size, e.g. 512x384")
    return list(dict.fromkeys(out))


def parse_precisions(text: str) -> list[str]:
    """'default,bfloat16' -> ['default', 'bfloat16'], checked against vgg16.PRECISIONS."""
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in vgg16.PRECISIONS]
    if bad or not out:
        raise UserError(f"--precisions: {', '.join(bad) or 'nothing given'}; "
                        f"use one or more of {', '.join(vgg16.PRECISIONS)}")
    return list(dict.fromkeys(out))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `nstjax bench` options."""
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"WIDTHxHEIGHT list, or 4k/1080p/720p (default {DEFAULT_SIZES})")
    p.add_argument("--precisions", default="default",
                   help="model.precision list: highest, default, bfloat16 (default: default)")
    p.add_argument("--iters", type=int, default=10,
                   help="L-BFGS iterations of the solve per case; 0 skips solving (default 10)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed evaluations per case; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed evaluations first (default 1)")
    p.add_argument("--chunk", type=int, default=50,
                   help="solver iterations per compiled chunk (default 50)")
    p.add_argument("--loss-kind", default="gram",
                   help="the loss kind timed (default gram, the post's); see --loss-plugin")
    p.add_argument("--loss-plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="a .py file or module that registers loss kinds (repeatable)")
    p.add_argument("--weights", default="random",
                   help="VGG16 weights: random (default; same speed), hed, imagenet or a file")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and images")
    p.add_argument("--remat", action="store_true", help="model.remat: recompute activations")
    p.add_argument("--out", default="bench.json", help="JSON file to write (default bench.json)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="use JAX's persistent compilation cache in DIR (default: off)")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the same network and loss in PyTorch eager (needs torch)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads on CPU (default 0: PyTorch's own choice)")
    p.add_argument("--torch-layout", choices=("nhwc", "nchw"), default="nhwc",
                   help="PyTorch memory format: nhwc = channels_last (default), nchw")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--table", metavar="JSON",
                   help="print the table of an earlier report and exit (measures nothing)")
    p.add_argument("--memory", action="store_true",
                   help="memory per size instead of timings: XLA's memory analysis of the "
                   "compiled solver chunk (and the device's peak after running it, on GPUs)")



# ---------------------------------------------------------------- problem


@dataclass
class Inputs:
    """One size: images and weights on the host; specs and loss weights per precision."""

    width: int
    height: int
    params: dict  # numpy
    content: np.ndarray  # (1,H,W,3) preprocessed
    style: np.ndarray
    x0: np.ndarray
    loss_cfg: config.LossCfg = field(default_factory=config.LossCfg)

    def spec(self, precision: str, remat: bool = False, conv: str = "auto") -> losses.Spec:
        lc = self.loss_cfg
        return losses.Spec(tuple(lc.content_layers), tuple(lc.style_layers), "avg",
                           lc.normalization, precision, remat, kind=lc.kind, conv=conv)

    def weights(self, spec: losses.Spec) -> dict:
        lc = self.loss_cfg
        return losses.default_weights(spec, lc.style_weights, lc.style_to_content_ratio,
                                      lc.tv_weight, lc.content_weights)


def make_inputs(params: dict, width: int, height: int, seed: int = 0) -> Inputs:
    """Random content and style images (uniform pixels), and the post's noise x0."""
    rng = np.random.default_rng(seed)
    content, style = (image.preprocess(rng.uniform(0, 255, (height, width, 3)))
                      for _ in range(2))
    x0 = rng.uniform(-2.5, 2.5, content.shape).astype(np.float32) / 100.0
    return Inputs(width, height, params, content.astype(np.float32),
                   style.astype(np.float32), x0)


def jax_args(pb: Inputs, spec: losses.Spec) -> tuple:
    """(params, targets, weights) on the device: the arguments of the objective."""
    params = vgg16.prepare(pb.params, spec.conv, spec.precision, (pb.height, pb.width))
    tgt = losses.targets(params, jnp.asarray(pb.content), jnp.asarray(pb.style), spec)
    return params, tgt, pb.weights(spec)


# ---------------------------------------------------------------- helpers


def _stats(times: Sequence[float]) -> dict:
    ms = [1e3 * t for t in times]
    med = float(np.median(ms)) if ms else math.nan
    return {"ms_per_eval": round(med, 4), "ms_per_eval_min": round(min(ms), 4) if ms else None,
            "evals_per_second": round(1e3 / med, 3) if ms else None, "repeats": len(ms)}


def _flops(compiled: Any) -> float | None:
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        f = float(ca.get("flops", 0.0))
        return f if f > 0 else None
    except Exception:  # optional per backend
        return None


def _program_bytes(compiled: Any) -> dict:
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
        return {"program_bytes": int(total), "program_temp_bytes": int(m.temp_size_in_bytes)}
    except Exception:  # optional per backend
        return {"program_bytes": None, "program_temp_bytes": None}


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first device so far in this process (None on CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # no statistics on this backend
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def host_transfer_ops(compiled: Any) -> list[str]:
    """Host<->device transfer ops (infeed, outfeed, send/recv, callbacks) in a compiled program."""
    text = compiled.as_text() or ""
    return sorted({m.group(0).rstrip("(").lower() for m in HOST_OPS.finditer(text)})


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- JAX


@dataclass
class JaxCase:
    """One compiled value_and_grad program and what is measured of it."""

    precision: str
    spec: losses.Spec
    args: tuple
    x: jax.Array
    fn: Any
    row: dict
    ref: tuple[float, np.ndarray] | None = None  # (loss, grad) at x0, kept for `highest`
    times: list[float] = field(default_factory=list)

    def call(self) -> float:
        t = _now()
        jax.block_until_ready(self.fn(self.x, *self.args))
        return _now() - t


def jax_case(pb: Inputs, precision: str, remat: bool, warmup: int) -> JaxCase:
    """Lower and compile (timed) one precision's loss+gradient; evaluate it once at x0."""
    spec = pb.spec(precision, remat)
    args = jax_args(pb, spec)
    x = jnp.asarray(pb.x0)
    vg = jax.jit(jax.value_and_grad(losses.objective(spec), has_aux=True))
    t = _now()
    lowered = vg.lower(x, *args)
    t_lower = _now() - t
    compiled = lowered.compile()
    t_total = _now() - t
    (loss, _), grad = compiled(x, *args)
    flops = _flops(compiled)
    row = {"size": f"{pb.width}x{pb.height}", "width": pb.width, "height": pb.height,
           "pixels": pb.width * pb.height, "precision": precision, "remat": remat,
           "lower_seconds": round(t_lower, 4), "compile_seconds": round(t_total, 4),
           "gflop_per_eval": round(flops / 1e9, 3) if flops else None,
           **_program_bytes(compiled), "loss": float(loss),
           "grad_norm": float(jnp.linalg.norm(grad))}
    ref = (float(loss), np.asarray(grad)) if precision == "highest" else None
    case = JaxCase(precision, spec, args, x, compiled, row, ref)
    for _ in range(warmup):
        case.call()
    return case


def jax_solve(case: JaxCase, iters: int, chunk: int) -> dict:
    """`iters` iterations of the default solver (jaxopt L-BFGS) through `solvers.minimize`."""
    s = solvers.Settings(maxiter=iters)
    fun = losses.objective(case.spec)
    chunk = max(1, min(chunk, iters))
    t = _now()
    init_c, chunk_c = solvers.compile_program(s, fun, case.x, case.args, chunk)
    compile_s = _now() - t
    res = solvers.minimize(s, fun, case.x, case.args, chunk=chunk, compiled=(init_c, chunk_c))
    return {"solver": s.name, "iterations": res.iterations, "evaluations": res.evals,
            "compile_seconds": round(compile_s, 4), "solve_seconds": round(res.solve_seconds, 4),
            **_per(res.solve_seconds, res.iterations, res.evals),
            "initial_loss": res.history[0]["total"], "final_loss": res.history[-1]["total"],
            "status": res.status, "host_transfer_ops": host_transfer_ops(chunk_c)}


# ---------------------------------------------------------------- PyTorch (bench_torch.py)


def torch_case(pb: Inputs, remat: bool, threads: int, layout: str,
               ref: tuple[float, np.ndarray] | None = None) -> tuple[TorchCase, dict]:
    """Build the PyTorch case; check its loss and gradient against JAX `highest` (`ref`)."""
    spec = pb.spec("highest", remat)
    if ref is None:
        vg = jax.jit(jax.value_and_grad(losses.objective(spec), has_aux=True))
        (jloss, _), jgrad = vg(jnp.asarray(pb.x0), *jax_args(pb, spec))
        ref = (float(jloss), np.asarray(jgrad))
    jloss, jgrad = ref
    tc = TorchCase(pb, spec, threads, layout)
    tc.tf32(False)
    tloss, tgrad = tc.value_and_grad()
    loss_rel, grad_rel = _rel(tloss, jloss), _rel(tgrad, jgrad)
    tc.tf32(tc.dev.type == "cuda")
    row = {"size": f"{pb.width}x{pb.height}", "device": str(tc.dev),
           "threads": tc.torch.get_num_threads(), "layout": layout,
           "tf32": tc.dev.type == "cuda", "loss": tloss, "jax_highest_loss": jloss,
           "loss_rel_diff": loss_rel, "grad_rel_diff": grad_rel,
           "match": bool(loss_rel <= MATCH_RTOL and grad_rel <= GRAD_RTOL)}
    return tc, row


# ---------------------------------------------------------------- driver


def bench_size(pb: Inputs, precisions: Sequence[str], a: argparse.Namespace) -> tuple[list, dict]:
    """All measurements of one size: JAX rows per precision and the PyTorch row (or None)."""
    size = f"{pb.width}x{pb.height}"
    cases = []
    for prec in precisions:
        _say(a.quiet, f"{size} {prec}: compiling")
        cases.append(jax_case(pb, prec, a.remat, a.warmup))
        _say(a.quiet, f"{size} {prec}: compiled in {cases[-1].row['compile_seconds']:.2f}s")
    tc, trow = None, None
    if a.compare_torch:
        ref = next((c.ref for c in cases if c.ref is not None), None)
        tc, trow = torch_case(pb, a.remat, a.torch_threads, a.torch_layout, ref)
        _say(a.quiet, f"{size} torch: loss rel diff {trow['loss_rel_diff']:.2e}, "
                      f"grad rel diff {trow['grad_rel_diff']:.2e}")
        for _ in range(a.warmup):
            tc.call()
    contestants: list[Any] = [*cases, *([tc] if tc else [])]
    for r in range(a.repeats):  # interleaved rounds
        for c in contestants:
            c.times.append(c.call())
        _say(a.quiet, f"{size} round {r + 1}/{a.repeats}: "
                      + ", ".join(f"{1e3 * c.times[-1]:.1f}" for c in contestants) + " ms")
    rows = []
    for c in cases:
        row = {**c.row, **_stats(c.times)}
        flops = row["gflop_per_eval"]
        row["tflops_per_second"] = (round(flops / row["ms_per_eval"], 3)
                                    if flops and row["ms_per_eval"] else None)
        if a.iters > 0:
            _say(a.quiet, f"{size} {c.precision}: solving {a.iters} iterations")
            row["solve"] = jax_solve(c, a.iters, a.chunk)
        row["peak_memory_bytes"] = peak_memory_bytes()
        rows.append(row)
    if tc is not None:
        trow.update(_stats(tc.times))
        if a.iters > 0:
            _say(a.quiet, f"{size} torch: solving {a.iters} iterations")
            trow["solve"] = tc.solve(a.iters)
        trow["peak_memory_bytes"] = tc.peak_memory_bytes()
        for row in rows:
            row["torch_speedup"] = round(trow["ms_per_eval"] / row["ms_per_eval"], 3)
            if "solve" in row and "solve" in trow:
                row["torch_solve_speedup"] = round(
                    trow["solve"]["solve_seconds"] / max(row["solve"]["solve_seconds"], 1e-9), 3)
    return rows, trow


def environment() -> dict:
    """Versions, device and flags that the numbers depend on."""
    dev = jax.devices()[0]
    env = {"versions": runtime.versions(), "platform": jax.default_backend(), "device": str(dev),
           "device_kind": dev.device_kind, "device_count": jax.device_count(),
           "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average": _load()}
    try:
        import torch

        env["versions"]["torch"] = torch.__version__
    except ImportError:
        env["versions"]["torch"] = None
    return env


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover -- not on every OS
        return None


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(report: dict, markdown: bool = False) -> str:
    """The results as a plain-text (or Markdown) table, then one line per PyTorch size."""
    torch_by_size = {t["size"]: t for t in report["torch"]}
    head = ("size", "precision", "compile s", "ms/eval", "eval/s", "TFLOP/s", "peak MB",
            "solve s", "iters", "evals", "torch ms", "speedup")
    lines = []
    for r in report["results"]:
        s, t = r.get("solve") or {}, torch_by_size.get(r["size"]) or {}
        peak = r["peak_memory_bytes"] or r["program_bytes"]
        lines.append((r["size"] + (" remat" if r["remat"] else ""), r["precision"],
                      _fmt(r["compile_seconds"], ".2f"), _fmt(r["ms_per_eval"], ".2f"),
                      _fmt(r["evals_per_second"], ".1f"), _fmt(r["tflops_per_second"], ".2f"),
                      _fmt(peak and peak / 2**20, ".0f"), _fmt(s.get("solve_seconds"), ".2f"),
                      _fmt(s.get("iterations"), "d"), _fmt(s.get("evaluations"), "d"),
                      _fmt(t.get("ms_per_eval"), ".2f"), _fmt(r.get("torch_speedup"), ".2f")))
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in lines]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *lines)]
        out = ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in (head, *lines)]
    out.append("")
    for t in report["torch"]:
        s = t.get("solve") or {}
        out.append(f"torch {t['size']} on {t['device']} ({t['layout']}, {t['threads']} threads"
                   f"{', tf32' if t['tf32'] else ''}): loss rel diff {t['loss_rel_diff']:.1e}, "
                   f"grad rel diff {t['grad_rel_diff']:.1e} ({'ok' if t['match'] else 'MISMATCH'})"
                   + (f"; LBFGS {s['iterations']} it, {s['evaluations']} evals in "
                      f"{s['solve_seconds']:.2f}s" if s else ""))
    if any(r["peak_memory_bytes"] is None for r in report["results"]):
        out.append("peak MB: XLA's program memory (arguments + outputs + temporaries) where the "
                   "device keeps no statistics")
    out.append(f"{report['device_kind']} ({report['platform']}), jax "
               f"{report['versions'].get('jax')}, {report['created']}")
    return "\n".join(out)


def memory_row(pb: Inputs, precision: str, remat: bool, chunk: int) -> dict:
    """XLA's memory analysis of the default solver's compiled chunk (the program a run
    spends its time in) at one size, with direct convolutions (what `model.conv: auto` is on
    accelerators); where the device keeps statistics (GPUs), `chunk` iterations are run and
    its peak bytes in use recorded (the process's peak so far: run sizes in ascending order)."""
    spec = pb.spec(precision, remat, conv="direct")
    args = jax_args(pb, spec)
    s = replace(config.SolverCfg().settings(), maxiter=chunk)
    fun, x = losses.objective(spec), jnp.asarray(pb.x0)
    t = _now()
    init_c, chunk_c = solvers.compile_program(s, fun, x, args, chunk)
    compile_s = _now() - t
    m = chunk_c.memory_analysis()
    row = {"size": f"{pb.width}x{pb.height}", "width": pb.width, "height": pb.height,
           "pixels": pb.width * pb.height, "precision": precision, "remat": remat,
           "solver": s.name, "conv": spec.conv, "compile_seconds": round(compile_s, 3),
           "argument_bytes": int(m.argument_size_in_bytes),
           "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
    row["program_bytes"] = (row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"]
                            - row["alias_bytes"])
    row["peak_memory_bytes"] = None
    if peak_memory_bytes() is not None:  # the backend keeps statistics (not CPU): run it
        solvers.minimize(s, fun, x, args, chunk=chunk, compiled=(init_c, chunk_c))
        row["peak_memory_bytes"] = peak_memory_bytes()
    return row


def memory_table(report: dict, markdown: bool = False) -> str:
    """The memory report as a table (MiB)."""
    head = ("size", "precision", "remat", "program MiB", "temporaries MiB", "arguments MiB",
            "device peak MiB")
    mib = 2.0**20
    lines = [(r["size"], r["precision"], "yes" if r["remat"] else "no",
              _fmt(r["program_bytes"] / mib, ".0f"), _fmt(r["temp_bytes"] / mib, ".0f"),
              _fmt(r["argument_bytes"] / mib, ".0f"),
              _fmt(r["peak_memory_bytes"] and r["peak_memory_bytes"] / mib, ".0f"))
             for r in report["memory"]]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in lines]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *lines)]
        out = ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in (head, *lines)]
    out.append(f"{report['device_kind']} ({report['platform']}), jax "
               f"{report['versions'].get('jax')}, {report['created']}; program: XLA's memory "
               f"analysis of the {report['memory'][0]['solver'] if report['memory'] else ''} "
               "chunk (arguments + outputs + temporaries)")
    return "\n".join(out)


def run_memory(a: argparse.Namespace) -> dict:
    """`--memory`: one row per size and precision; the JSON is rewritten after each."""
    sizes, precisions = parse_sizes(a.sizes), parse_precisions(a.precisions)
    params, winfo = weights.load(a.weights, seed=a.seed, quiet=True)
    report = {"schema": SCHEMA, "created": datetime.now().isoformat(timespec="seconds"),
              **environment(), "weights": winfo["source"], "memory": []}
    for w, h in sizes:
        for prec in precisions:
            _say(a.quiet, f"{w}x{h} {prec}: compiling the solver chunk")
            report["memory"].append(memory_row(make_inputs(params, w, h, a.seed), prec,
                                               a.remat, max(1, min(a.chunk, 5))))
            write_json(a.out, report)
    return report


def run_bench(a: argparse.Namespace) -> dict:
    """Measure every size and precision; the JSON at `a.out` is rewritten after each size."""
    sizes, precisions = parse_sizes(a.sizes), parse_precisions(a.precisions)
    check_flags(a)
    for ref in a.loss_plugin:
        losses.load_plugin(ref)
    losses.kind(a.loss_kind)  # an unknown kind: one line listing the registered ones
    loss_cfg = config.LossCfg().model_copy(update={"kind": a.loss_kind})
    if a.compare_torch:
        if a.loss_kind != "gram":
            raise UserError(f"--compare-torch: the PyTorch side implements the Gram loss only, "
                            f"not --loss-kind {a.loss_kind}; drop one of them")
        _import_torch()
    if a.compile_cache:
        runtime.enable_compile_cache(a.compile_cache)
    params, winfo = weights.load(a.weights, seed=a.seed, quiet=True)
    report: dict = {"schema": SCHEMA, "created": datetime.now().isoformat(timespec="seconds"),
                    **environment(), "weights": winfo["source"],
                    "settings": {"sizes": [f"{w}x{h}" for w, h in sizes],
                                 "precisions": precisions, "iters": a.iters,
                                 "repeats": a.repeats, "warmup": a.warmup, "chunk": a.chunk,
                                 "seed": a.seed, "remat": a.remat,
                                 "loss": loss_cfg.model_dump(),
                                 "compile_cache": a.compile_cache},
                    "results": [], "torch": []}
    for w, h in sizes:
        inputs = make_inputs(params, w, h, a.seed)
        inputs.loss_cfg = loss_cfg
        rows, trow = bench_size(inputs, precisions, a)
        report["results"] += rows
        if trow is not None:
            report["torch"].append(trow)
        write_json(a.out, report)  # a run cut short keeps the sizes it finished
    return report


# Bounds of the numeric flags, as the config schema bounds its keys: (lowest, highest).
FLAG_BOUNDS = {"iters": (0, config.MAX_ITER), "warmup": (0, 1000), "repeats": (1, 1000),
               "chunk": (1, config.MAX_ITER), "seed": (0, 2**63 - 1), "torch_threads": (0, 4096)}


def check_flags(a: argparse.Namespace) -> None:
    """Every flag with a value checked: one line naming the flag, else UserError."""
    errors.check_flags(a, FLAG_BOUNDS)
    parse_sizes(a.sizes)
    parse_precisions(a.precisions)


def refuse_overwrite(path: str | Path, force: bool, flag: str = "--out") -> None:
    """UserError if `path` exists and `force` is not set: nothing is replaced unasked."""
    if Path(path).exists() and not force:
        raise UserError(f"{flag} {path}: exists; pass --force to replace it, or pick a new "
                        "name")


def write_json(path: str | Path, report: dict) -> None:
    """Write the report atomically (temporary file, then rename)."""
    runtime.write_atomic(Path(path), json.dumps(report, indent=2, allow_nan=True) + "\n")


def main(a: argparse.Namespace) -> int:
    """`nstjax bench`: measure, print the table, write the JSON; 1 if PyTorch disagrees."""
    if a.table:
        try:
            report = json.loads(Path(a.table).read_text())
            print(memory_table(report, a.markdown) if "memory" in report
                  else table(report, a.markdown))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--table {a.table}: not a readable bench report ({e})") from None
        return 0
    if Path(a.out).parent and not Path(a.out).parent.is_dir():
        raise UserError(f"--out {a.out}: directory {Path(a.out).parent} does not exist")
    refuse_overwrite(a.out, getattr(a, "force", False))
    if getattr(a, "memory", False):
        print(memory_table(run_memory(a), a.markdown))
        print(f"wrote {a.out}")
        return 0
    report = run_bench(a)
    print(table(report, a.markdown))
    print(f"wrote {a.out}")
    bad = [t["size"] for t in report["torch"] if not t["match"]]
    if bad:
        print(f"nstjax: error: PyTorch and JAX disagree (loss rel > {MATCH_RTOL:g} or gradient "
              f"rel > {GRAD_RTOL:g}) at {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
