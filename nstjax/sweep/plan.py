"""Planning a sweep: groups of cells that share one compiled program, this process's share,
the batch and lane layout, a cost model and the dry run (which writes nothing)."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nstjax.sweep.store as store
from nstjax import losses
from nstjax.errors import UserError
from nstjax.sweep.spec import Cell, Sweep, canon, safe_name

if TYPE_CHECKING:
    from nstjax.config import Config

# Model seconds per compilation (measured on 2 CPU cores: 2-4 s for one VGG16 program at
# 64-256 px, 6-11 s for 6 lanes at 256 px; accelerators: a guess).
MODEL_COMPILE_S = {"cpu": 4.0, "gpu": 30.0, "tpu": 30.0}

# A whole evaluation runs at this fraction of `conv_rate` (the 3- and 64-channel layers,
# pooling, Grams; measured on 2 CPU cores at 256x192: 0.55-0.6 in one run and in 6 lanes),
# and each cell costs `MODEL_CELL_S` outside its solve (targets, final image, metrics).
MODEL_EFFICIENCY = 0.6
MODEL_CELL_S = 2.0
MODEL_SWEEP_S = 3.0  # a sweep's start-up and summaries, until one was measured here

# Rough evaluations per iteration (measured on the demo images; for the estimate only).
_EVALS_PER_ITER = {"lbfgs": 1.1, "jaxopt_lbfgs": 1.1, "optax_lbfgs": 3.0, "adam": 1.0}


@dataclass
class Group:
    """Cells sharing one compiled program."""

    name: str
    key: tuple
    cells: list[Cell]
    hw: tuple[int, int]
    label: str = ""

    @property
    def spec(self):
        return self.key[0]

    @property
    def settings(self):
        return self.key[1]

    @property
    def chunk(self) -> int:
        return self.key[2]

    @property
    def host(self) -> bool:
        """Cells run one by one, as `nstjax run` runs them (not batched)."""
        return self.key[5]

    @property
    def plugins(self) -> tuple[str, ...]:
        """The cells' loss.plugins: the kinds the group's cells see (`losses.isolated`)."""
        return self.key[6]


def structure(cfg: Config, hw: tuple[int, int]) -> tuple:
    """What shapes the compiled program: (spec, solver settings, chunk, weights, (H, W), host,
    loss plugins).

    `host`: the cell runs on its own, as `nstjax run` does (a host-side solver, multi-scale).
    The plugins are part of it: one kind name may be two plugins' functions.
    """
    from nstjax import problem, record, solvers

    s = cfg.solver.settings()
    host = s.name not in solvers.COMPILED or multiscale(cfg)
    return (problem.spec_of(cfg), s, record.chunk_size(cfg), cfg.model.weights, tuple(hw), host,
            tuple(cfg.loss.plugins))


def params_key(cfg: Config) -> tuple:
    """Cells with equal keys share VGG params (random weights depend on the seed; the prepared
    kernels on the convolution algorithm and precision)."""
    w, m = cfg.model.weights, cfg.model
    return (w, cfg.seed if w == "random" else None, m.conv, m.precision == "bfloat16", m.arch)


def _content_hw(cfg: Config, cache: dict) -> tuple[int, int]:
    from nstjax import image, problem

    im = cfg.image
    key = (cfg.content, tuple(cfg.styles), canon(im.size), im.resample, im.max_pixels)
    if key not in cache:
        try:
            content = problem.load_content(cfg)
            h, w = int(content.shape[1]), int(content.shape[2])
            image.load(cfg.styles[0], [w, h], im.resample, max_pixels=im.max_pixels)  # readable?
            cache[key] = (h, w)
        except (UserError, OSError, ValueError) as e:
            cache[key] = str(e)
    if isinstance(cache[key], str):
        raise UserError(cache[key])
    return cache[key]


def make_groups(sw: Sweep, cells: list[Cell]) -> list[Group]:
    """Group the valid cells by structure (loads each distinct image once to know its shape)."""
    shapes: dict = {}
    by_key: dict[tuple, list[Cell]] = {}
    for c in cells:
        if c.cfg is None:
            continue
        try:
            hw = _content_hw(c.cfg, shapes)
            with losses.isolated(c.cfg.loss.plugins):  # the kinds this cell's config imports
                c.key = structure(c.cfg, hw)
        except UserError as e:
            c.error = str(e)
            continue
        by_key.setdefault(c.key, []).append(c)
    groups = [Group("", k, cs, k[4]) for k, cs in by_key.items()]
    _name_groups(sw, groups)
    return groups


def _name_groups(sw: Sweep, groups: list[Group]) -> None:
    """g0, g1, ... plus the values of the dims that separate the groups (e.g. g1-pool-max)."""
    split = []
    for j in range(len(sw.dims)):
        constant = all(len({c.combo[j] for c in g.cells}) == 1 for g in groups)
        if constant and len({g.cells[0].combo[j] for g in groups}) > 1:
            split.append(j)
    for i, g in enumerate(groups):
        g.label = "__".join(g.cells[0].parts[j] for j in split)
        g.name = safe_name(f"g{i}-{g.label}" if g.label else f"g{i}", 64)
        for c in g.cells:
            c.group = g.name


def owned(groups: list[Group], cells: list[Cell], process: int, count: int) -> list[Cell]:
    """This process's share: a contiguous slice of the cells ordered by group, then index."""
    order = [c for g in groups for c in g.cells] + [c for c in cells if c.key is None]
    n = len(order)
    return order[process * n // count:(process + 1) * n // count]


def device_memory(devices: list) -> int:
    """Bytes free for one device: its allocator limit, else the host's RAM shared by devices."""
    try:
        st = devices[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        st = {}
    if st.get("bytes_limit"):
        return int(st["bytes_limit"]) - int(st.get("bytes_in_use", 0))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return ram // len(devices)


def _conv_layers(spec, hw: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(h, w, cin, cout) of every conv the objective computes."""
    from nstjax import vgg16

    order = vgg16.names(spec.arch)
    last = max(order.index(n) for n in spec.layers)
    out, cin = [], 3
    for n in order[: last + 1]:
        b = vgg16.block(n)
        out.append((hw[0] >> (b - 1), hw[1] >> (b - 1), cin, vgg16.CHANNELS[n]))
        cin = vgg16.CHANNELS[n]
    return out


def cell_bytes(g: Group) -> tuple[int, int]:
    """Rough device bytes of one cell: (its solver state, one evaluation's working set)."""
    acts = sum(h * w * c for h, w, _, c in _conv_layers(g.spec, g.hw))
    x = g.hw[0] * g.hw[1] * 3
    return 4 * (2 * g.settings.history_size + 16) * x, int(4 * 1.5 * 4 * acts)


CPU_LANES = 8  # measured on 2 cores: 4 lanes 0.58-0.73x, 8 lanes 0.67x the time per cell


def lanes_for(g: Group, per_device: int, asked: int | None, backend: str,
              devices: list | None = None) -> int:
    """Cells per device solved in lockstep with vmap (1: one after another in the program).

    `lbfgs` evaluates once per step in every lane, so N lanes cost one batched evaluation per
    step: on CPU a batch of 4 cells took 0.58x (64x48) to 0.73x (128x96) the time of 4 cells one
    after another, 8 cells 0.67x; auto takes up to CPU_LANES. The other L-BFGS solvers'
    line searches turn into selects that evaluate every branch under vmap (~3x the
    evaluations): auto is 1 for them on CPU. On accelerators, as many lanes as make ~20 GFLOP per
    evaluation (not measured: no GPU yet). Always within half the device's free memory.
    """
    if asked:
        return max(1, min(asked, per_device))
    lockstep = g.settings.name in ("lbfgs", "adam")
    if backend == "cpu":
        lanes = CPU_LANES if lockstep else 1
    else:
        lanes = int(20e9 // max(eval_flops(g), 1.0))
    if devices:
        lanes = min(lanes, int(0.5 * device_memory(devices) // sum(cell_bytes(g))))
    return max(1, min(per_device, lanes))


def batch_size(g: Group, n: int, devices: list, asked: int | None, lanes: int | None = None,
               backend: str = "cpu") -> int:
    """Cells per compiled batch, a multiple of the device count.

    `asked` if given; else one vmap width per device (`lanes_for`): more cells per batch would
    run one after another anyway, and smaller batches finish (and can be resumed) sooner.
    """
    ndev = len(devices)

    def up(k: int) -> int:
        return max(ndev, -(-k // ndev) * ndev)

    if asked:
        return up(min(asked, n))
    per_dev = -(-n // ndev)
    return up(min(n, ndev * lanes_for(g, per_dev, lanes, backend, devices)))


def batches(cells: list[Cell], b: int) -> list[list[Cell]]:
    """Split into batches of at most b; a new batch whenever the VGG params change."""
    out: list[list[Cell]] = []
    for _, grp in itertools.groupby(sorted(cells, key=lambda c: (params_key(c.cfg), c.index)),
                                    key=lambda c: params_key(c.cfg)):
        grp = list(grp)
        out += [grp[i:i + b] for i in range(0, len(grp), b)]
    return out

# Time per FLOP of a Winograd layer relative to the direct convolution (per layer on 2 CPU
# cores: 512 channels at 24x32 0.52, 256 channels at 48x64 0.71; see `vgg16.uses_winograd`).
WINOGRAD_COST = 0.6


def conv_rate(devices: list, precision: str = "default") -> float:
    """Measured FLOP/s of one device on a 3x3 convolution's forward and input gradient (128
    channels on a 64x64 map, the direct algorithm): what an evaluation mostly is. A few tenths
    of a second."""
    import jax
    import jax.numpy as jnp

    from nstjax import vgg16

    x = jax.device_put(jnp.ones((1, 64, 64, 128), jnp.float32), devices[0])
    k = jax.device_put(jnp.full((3, 3, 128, 128), 1e-3, jnp.float32), devices[0])
    prec = "highest" if precision == "highest" else "default"
    f = jax.jit(jax.grad(lambda x: jnp.sum(vgg16.conv(x, k, prec, "direct") ** 2)))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(3):  # the fastest of three windows: less of other processes' load
        t, reps = time.perf_counter(), 0
        while time.perf_counter() - t < 0.1:
            f(x).block_until_ready()
            reps += 1
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * 2 * 9 * 64 * 64 * 128 * 128 / best


def eval_flops(g: Group) -> float:
    """Direct-convolution FLOPs of one loss+gradient evaluation of one cell (forward and input
    gradient; the kernels get none), Winograd layers counted at `WINOGRAD_COST`."""
    from nstjax import vgg16

    spec = g.spec
    names = vgg16.names(spec.arch)
    wino = set() if getattr(spec, "seamless", False) else set(
        vgg16.winograd_layers(spec.conv, spec.precision, g.hw, names))
    return sum(2 * 2 * 9 * h * w * ci * co * (WINOGRAD_COST if n in wino else 1.0)
               for n, (h, w, ci, co) in zip(names, _conv_layers(spec, g.hw)))


def layout(g: Group, n: int, devices: list, batch: int | None, lanes: int | None,
           backend: str, share: int = 0) -> tuple[int, int, int]:
    """(batch size, lanes per device, number of batches) for n cells of a group."""
    if n == 0:
        return 0, 0, 0
    b = batch_size(g, max(n, share), devices, batch, lanes, backend)
    return b, lanes_for(g, b // len(devices), lanes, backend, devices), -(-n // b)


def measured(g: Group, cells: list[Cell], doc: dict, devices: list, batch: int | None,
             lanes: int | None, backend: str, warm: bool) -> tuple[float, float, str] | None:
    """(compile s, solve and per-cell s, how) for `cells` of g from the cost cache
    (`nstjax.costs`), or None where this structure was never measured here."""
    from nstjax import costs, record

    kind = getattr(devices[0], "device_kind", backend)
    key = costs.program_key(g.key, backend, kind, len(devices))
    n = len(cells)
    b, k, _ = (1, 1, 0) if g.host else layout(g, n, devices, batch, lanes, backend,
                                               share=len(g.cells))
    m = costs.lookup(doc, key, b, k) if not multiscale(g.cells[0].cfg) else None
    if m is None:
        return None
    evals = record.steps(g.settings) * m.evals_per_iter + 1
    runs = n if g.host else len(batches(cells, b))
    how = f"measured {m.updated[:16]}" + (f", scaled from batch {m.layout[0]}"
                                          if m.scale != 1.0 else "")
    return m.compile(warm), runs * evals * m.eval_s + n * m.cell_s, how


def estimate(groups: list[Group], todo: list[Cell], devices: list, batch: int | None,
             lanes: int | None, backend: str, doc: dict | None = None,
             warm: bool = True) -> dict:
    """Seconds to expect: from the cost cache (`doc`, see `nstjax.costs`) where it has the
    group's structure, else a model (`MODEL_COMPILE_S` per compilation, convolution FLOPs over
    a measured convolution rate, `conv_rate`). `how` says, per group, which was used."""
    rate = None
    per_compile = MODEL_COMPILE_S.get(backend, MODEL_COMPILE_S["gpu"])
    compiles, solve, compile_s, how = 0, 0.0, 0.0, {}
    for g in groups:
        cells = [c for c in todo if c.key == g.key]
        if not cells:
            continue
        m = measured(g, cells, doc or {}, devices, batch, lanes, backend, warm)
        compiles += 1 if m or not g.host else len(cells)
        if m is not None:
            compile_s, solve, how[g.name] = compile_s + m[0], solve + m[1], m[2]
            continue
        how[g.name] = "model"
        compile_s += per_compile * (len(cells) if g.host else 1)
        rate = rate or MODEL_EFFICIENCY * conv_rate(devices, g.spec.precision)
        solve += len(cells) * MODEL_CELL_S
        s, f = g.settings, eval_flops(g)
        if g.host:
            evals = (s.rounds * s.maxfun + s.rounds if s.name == "scipy_lbfgsb"
                     else s.maxiter * _EVALS_PER_ITER.get(s.name, 3.0))
            solve += len(cells) * (evals + 1) * f / rate
            continue
        b, k, _ = layout(g, len(cells), devices, batch, lanes, backend, share=len(g.cells))
        nb = len(batches(cells, b))
        evals = s.maxiter * _EVALS_PER_ITER.get(s.name, 3.0) + 1
        redundancy = 3.0 if k > 1 and s.name not in ("adam", "lbfgs") else 1.0  # vmapped branches
        per_dev = b // len(devices)
        steps = -(-per_dev // k) * k * (len(devices) if backend == "cpu" else 1)
        solve += nb * steps * evals * redundancy * f / rate
    return {"compilations": compiles, "compile_s": compile_s, "solve_s": solve, "how": how}


def dry_run(sw: Sweep, cells: list[Cell], groups: list[Group], out: Path, devices: list,
            batch: int | None, lanes: int | None, count: int = 1) -> str:
    """The plan as text: cells and groups, compilations, a time estimate."""
    backend = devices[0].platform
    lines = [f"sweep {sw.name} ({sw.source}): {len(cells)} cell(s), {len(groups)} group(s), "
             f"{len(devices)} {backend} device(s) -> {out}"]
    for d in sw.dims:
        lines.append(f"  {' + '.join(d.keys)}: {len(d)} value(s)"
                     + (f" ({', '.join(d.labels)})" if d.labels else ""))
    if out.exists():
        store.check_target(out, sw)
    moved = {c.name for c in store.locate(out, cells)}
    done = {c.name for c in cells if store.finished(store.cell_dir(out, c))}
    owner = {c.name: p for p in range(count) for c in owned(groups, cells, p, count)}
    todo = [c for c in cells if c.name not in done and c.key is not None]
    for g in groups:
        n = sum(1 for c in g.cells if c.name not in done)
        s = g.settings
        b, k, nb = layout(g, n, devices, batch, lanes, backend, share=len(g.cells))
        how = "one by one, as `nstjax run`" if g.host else (
            f"{nb} batch(es) of {b}, {k} lane(s) per device" if n else "nothing to run")
        lines.append(f"group {g.name}: {len(g.cells)} cell(s), {n} to run, "
                     f"{g.hw[1]}x{g.hw[0]}, {s.name} {s.maxiter} it, {how}")
        for c in g.cells:
            state = "finished" if c.name in done else "to run"
            if c.name in moved:
                keys = ", ".join(store.differing_keys(out, c)) or "other files"
                state += f" in cells/{c.dir}: cells/{c.name} has other settings: {keys}"
            who = f"  [process {owner[c.name]}]" if count > 1 else ""
            lines.append(f"    {c.name:40s} {c.label}  ({state}){who}")
    for c in cells:
        if c.key is None:
            lines.append(f"  invalid {c.name}: {c.error}")
    lines += _estimate_lines(sw, groups, todo, devices, batch, lanes, len(done))
    return "\n".join(lines)


def _estimate_lines(sw: Sweep, groups: list[Group], todo: list[Cell], devices: list,
                    batch: int | None, lanes: int | None, n_done: int) -> list[str]:
    from nstjax import costs

    backend = devices[0].platform
    warm = bool(sw.compile_cache) and os.environ.get("NSTJAX_COMPILE_CACHE", "1").strip() \
        .lower() not in ("0", "false", "no", "off")
    doc = costs.load()
    est = estimate(groups, todo, devices, batch, lanes, backend, doc, warm)
    how = est["how"]
    rest = (costs.overhead(doc, backend) or MODEL_SWEEP_S) if todo else 0.0
    total = est["compile_s"] + est["solve_s"] + rest
    lines = [f"compilations: {est['compilations']}; {len(todo)} cell(s) to run, "
             f"{n_done} finished"]
    lines += [f"  {name}: estimated from {h}" for name, h in how.items()]
    n_model = sum(1 for h in how.values() if h == "model")
    source = ("nothing to run" if not how else "measured costs" if not n_model else
              "a rough model, nothing measured here yet" if n_model == len(how) else
              "measured costs where cached, a rough model for the rest")
    lines.append(f"estimate ({source}; {costs.path()}): ~{est['compile_s']:.0f} s compiling "
                 f"+ ~{est['solve_s']:.0f} s solving"
                 + (f" + ~{rest:.0f} s start-up and summaries" if rest else "")
                 + f" = ~{total:.0f} s")
    return lines


def multiscale(cfg: Config) -> bool:
    ms = getattr(cfg, "multiscale", None)
    return bool(ms is not None and ms.count)



def weight_bytes(g: Group) -> int:
    """Bytes of the VGG kernels and biases the objective uses (float32)."""
    return sum(4 * (9 * ci * co + co) for _, _, ci, co in _conv_layers(g.spec, g.hw))


def run_dry_run(cfg, source: str, devices: list) -> str:
    """`nstjax run --dry-run`: the validated config's problem (size, layers, solver) with the
    time (the sweep dry run's cost model: measured costs where cached, else the FLOP model)
    and device memory to expect; nothing runs but a fraction-of-a-second convolution timing."""
    from nstjax import costs

    cell = Cell(0, (), {}, {}, (), (), {}, name="run", cfg=cfg)
    sw = Sweep(name="run", source=source, base={}, dims=[], here=Path.cwd())
    groups = make_groups(sw, [cell])
    if not groups:
        raise UserError(cell.error or f"{source}: nothing to run")
    g = groups[0]
    backend = devices[0].platform
    warm = os.environ.get("NSTJAX_COMPILE_CACHE", "1").strip().lower() not in (
        "0", "false", "no", "off")
    est = estimate(groups, [cell], devices, 1, 1, backend, costs.load(), warm)
    state, work = cell_bytes(g)
    weights = weight_bytes(g)
    s = g.settings
    how = est["how"].get(g.name, "model")

    def mib(n: float) -> str:
        return f"{n / (1 << 20):.3g} MiB"

    return "\n".join([
        f"config {source}: valid",
        f"  content {cfg.content or '(none: texture synthesis)'}",
        f"  style {', '.join(cfg.styles)}",
        f"  image {g.hw[1]}x{g.hw[0]}, {cfg.model.arch} {cfg.model.weights}, loss {cfg.loss.kind}"
        f", {s.name} {s.maxiter} it" + (", multi-scale" if multiscale(cfg) else ""),
        f"estimate ({'measured costs' if how != 'model' else 'a rough model'}; "
        f"{backend}): ~{est['compile_s']:.0f} s compiling + ~{est['solve_s']:.0f} s solving",
        f"memory: ~{mib(state + work + weights)} on the device (solver state {mib(state)}, "
        f"one evaluation's activations {mib(work)}, weights {mib(weights)}); "
        f"{mib(device_memory(devices))} free"])
