"""The `nstjax` command: a thin layer over the API. User mistakes exit 2 with one line."""

import argparse
import importlib
import sys

from nstjax.errors import UserError


def _run(a: argparse.Namespace) -> int:
    from nstjax import config, run

    cfg = config.load(a.config, a.overrides)
    if not a.no_compile_cache:
        run.enable_compile_cache()
    r = run.run(cfg, a.out, quiet=a.quiet, parent=a.runs_dir)
    rec = r.record
    msg = (f"{rec['status']}: {r.dir}/final.{cfg.output.format}  loss "
           f"{rec['initial_loss']['total']:.4g} -> {rec['final_loss']['total']:.4g} in "
           f"{rec['iterations']} it ({rec['compile_seconds']:.1f}s compile, "
           f"{rec['solve_seconds']:.1f}s solve)")
    print(msg, file=sys.stderr if rec["status"] in ("failed", "interrupted") else sys.stdout)
    if rec["status"] == "failed":
        print(f"nstjax: error: {rec['error']}; try a lower solver.learning_rate or smaller "
              "loss weights", file=sys.stderr)
    return r.exit_code


def _weights(a: argparse.Namespace) -> int:
    from nstjax import weights

    if a.wcmd == "list":
        for s in weights.sources():
            print("  ".join(f"{k}={v}" for k, v in s.items()))
    elif a.wcmd == "fetch":
        print(weights.fetch(a.name, quiet=a.quiet))
    elif a.wcmd == "convert":
        meta = weights.convert(a.src, a.dst)
        print(f"wrote {a.dst} ({len(meta.get('layers', []))} layers, sha256 of input "
              f"{meta.get('sha256', '')[:12]}...)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nstjax", description="Neural style transfer in JAX.")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="one style transfer from a YAML config")
    r.add_argument("config", help="YAML config file")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. solver.maxiter=50")
    r.add_argument("--out", help="run directory (must not exist or be empty)")
    r.add_argument("--runs-dir", default="runs", help="parent of new run directories")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache")
    r.set_defaults(fn=_run)

    w = sub.add_parser("weights", help="list, fetch and convert VGG16 weights")
    wsub = w.add_subparsers(dest="wcmd", required=True)
    wsub.add_parser("list", help="named sources and what is cached")
    f = wsub.add_parser("fetch", help="download a named source into the cache")
    f.add_argument("name", help="imagenet or hed")
    f.add_argument("--quiet", action="store_true")
    c = wsub.add_parser("convert", help="Keras h5 -> nstjax npz")
    c.add_argument("src")
    c.add_argument("dst")
    w.set_defaults(fn=_weights)

    # Subcommands whose module owns its arguments: add_arguments(parser) and main(args) -> int.
    for name, mod, text in (("sweep", "nstjax.sweep", "a sweep of runs, compiled once per group"),
                            ("bench", "nstjax.bench", "benchmark loss+gradient evaluations")):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        sp = sub.add_parser(name, help=text)
        m.add_arguments(sp)
        sp.set_defaults(fn=m.main)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    # Overrides may follow options (`run x.yaml --quiet solver.maxiter=5`).
    if hasattr(args, "overrides") and all(not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except UserError as e:
        print(f"nstjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nstjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
