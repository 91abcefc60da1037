"""The `nstjax` command's own surface: `config show`, `run --help`, `sweep --help`."""

from __future__ import annotations

import pytest
import yaml

from nstjax import cli, sweep


def test_config_show_prints_what_a_run_directory_holds(env, capsys):
    assert cli.main(["config", "show", "ok.yaml", "solver.maxiter=3", "seed=7"]) == 0
    shown = capsys.readouterr().out
    cfg = yaml.safe_load(shown)
    assert cfg["solver"]["maxiter"] == 3 and cfg["seed"] == 7
    assert cfg["content"].endswith("configs/demo/content.png") and cfg["content"].startswith("/")
    assert cfg["loss"]["normalization"] == "seed"  # defaults filled in
    assert sorted(p.name for p in env.iterdir()) == ["ok.yaml"]  # showing wrote nothing
    assert cli.main(["run", "ok.yaml", "solver.maxiter=3", "seed=7", "--out", "r", "--quiet",
                     "--no-compile-cache"]) == 0
    capsys.readouterr()
    assert shown == (env / "r" / "config.yaml").read_text()


@pytest.mark.parametrize(("args", "what"), [
    (["config", "show", "missing.yaml"], "missing.yaml"),
    (["config", "show", "ok.yaml", "solver.maxiterr=3"], "solver.maxiter"),
])
def test_config_show_bad_input_is_one_line_exit_2(env, capsys, args, what):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("nstjax: error: ") and err.count("\n") == 1 and what in err


def _help(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_run_help_lists_every_config_section_and_points_to_the_table(capsys):
    from nstjax import config

    text = _help(capsys, "run")
    for name, field in config.Config.model_fields.items():
        keys = getattr(field.annotation, "model_fields", None)
        assert f"  {name}.{{" in text if keys else f"  {name}\n" in text
    assert "solver.{name, maxiter," in text
    assert "docs/guides/configs.md" in text and "keys table" in text and "config show" in text


def test_sweep_help_shows_a_file_that_loads(capsys, tmp_path):
    text = _help(capsys, "sweep")
    assert "sweep file format" in text and "axes:" in text and "zip:" in text
    block = text[text.index("sweep file format"):].split("\n\n")[1]
    doc = yaml.safe_load(block)
    assert set(doc) == set(sweep.spec.SECTIONS)
    assert set(doc["sweep"]) == set(sweep.spec.SETTINGS)
    # As a file next to configs/quickstart.yaml, with one photo and the two paintings its
    # pairs name, it is a valid sweep: (1 x 2 pairs) x 3 x 2 x 2 cells.
    from PIL import Image
    from sweep_helpers import ROOT

    (tmp_path / "photos").mkdir()
    for name in ("photos/x.jpg", "a.jpg", "b.jpg"):
        Image.new("RGB", (32, 24), "gray").save(tmp_path / name)
    p = tmp_path / "example.yaml"
    p.write_text(block.replace("../quickstart.yaml", str(ROOT / "configs" / "quickstart.yaml")))
    sw = sweep.load(p)
    assert sw.name == "ratio" and len(sweep.expand(sw)) == 24


# ------------------------------------------- every subcommand x every numeric flag x bad values


def _flags(p, path=()) -> list[tuple[tuple[str, ...], object]]:
    """(subcommand path, action) of every option of every (sub)command of the parser."""
    import argparse

    out = []
    for act in p._actions:
        if isinstance(act, argparse._SubParsersAction):
            for name, sub in act.choices.items():
                out += _flags(sub, (*path, name))
        elif act.option_strings:
            out.append((path, act))
    return out


def _bounds() -> dict[tuple[str, ...], dict]:
    from nstjax import bench, race, sweep
    from nstjax.sweep import frontier

    return {("bench",): {**bench.FLAG_BOUNDS, **race.FLAG_BOUNDS}, ("sweep",): sweep.FLAG_BOUNDS,
            ("frontier",): frontier.FLAG_BOUNDS}


# Flags whose value is text holding numbers: (command, dest) -> bad values.
_SIZES = ["0x0", "-1x32", "999999x999999", "abc"]
_AUTO = ["0", "-1", "1" + "0" * 30, "abc", "1.5"]
TEXT_NUMBERS = {("bench", "sizes"): _SIZES, ("bench", "race_speed_size"): _SIZES,
                ("sweep", "batch_size"): _AUTO, ("sweep", "lanes"): _AUTO,
                ("frontier", "at"): ["abc", "nan", "inf", "-inf", "1e400"]}
POSITIONAL = {("sweep",): ["missing-sweep.yaml"], ("frontier",): ["missing-sweep-dir"]}
# checked after the flags


def _cases() -> list[tuple[tuple[str, ...], str, str]]:
    bounds = _bounds()
    cases = []
    for path, act in _flags(cli.parser()):
        flag = max(act.option_strings, key=len)
        if (*path, act.dest) in TEXT_NUMBERS:
            cases += [(path, flag, v) for v in TEXT_NUMBERS[(*path, act.dest)]]
        elif act.type in (int, float):
            lo, hi = bounds[path][act.dest]  # KeyError: a numeric flag without bounds
            cases += [(path, flag, v) for v in (str(lo - 1), str(hi + 1), "1" + "0" * 30,
                                                "abc", "1.5")]
    return cases


def test_every_numeric_flag_has_bounds_or_a_parser():
    seen = {(*path, act.dest) for path, act in _flags(cli.parser())
            if act.type in (int, float) or (*path, act.dest) in TEXT_NUMBERS}
    bounded = {(*path, d) for path, b in _bounds().items() for d in b}
    assert seen == bounded | set(TEXT_NUMBERS)
    assert len(_cases()) >= 40


@pytest.mark.parametrize(("path", "flag", "value"), _cases(),
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else v)
def test_every_numeric_flag_refuses_bad_values_in_one_line(tmp_path, capsys, path, flag, value):
    has_out = any("--out" in act.option_strings for p, act in _flags(cli.parser()) if p == path)
    out = ["--out", str(tmp_path / "o")] if has_out else []
    argv = [*path, *POSITIONAL.get(path, []), f"{flag}={value}", *out]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("nstjax: error:") and flag in err, err
    assert not (tmp_path / "o").exists()


def test_weights_commands_take_the_arch(env, capsys, monkeypatch):
    from weights_helpers import TINY19, make_params, write_legacy

    from nstjax import weights

    monkeypatch.setitem(weights.ARCHS, "vgg19", TINY19)
    write_legacy(env / "v19.h5", make_params(TINY19))
    assert cli.main(["weights", "convert", "v19.h5", "v19.npz", "--arch", "vgg19"]) == 0
    assert "16 layers" in capsys.readouterr().out
    assert weights.read_npz(env / "v19.npz", convs=TINY19)[1]["arch"] == "vgg19"
    assert cli.main(["weights", "fetch", "hed", "--arch", "vgg19"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "hed is a VGG16 backbone" in err
    assert cli.main(["weights", "list"]) == 0
    assert "arch=vgg19" in capsys.readouterr().out


def test_metrics_scores_files_as_a_run_scores_its_final_image(env, capsys):
    """The content scores as the content (structure and edges 1, content distance 0), the style
    as the style (colour, swd and Gram distances 0), and a run's final.png as its run.json."""
    import json

    from conftest import DEMO

    assert cli.main(["run", "ok.yaml", "--out", "r", "--quiet", "--no-compile-cache"]) == 0
    capsys.readouterr()
    paths = [str(DEMO / "content.png"), str(DEMO / "style.png"), "r/final.png"]
    assert cli.main(["metrics", "r", *paths, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    c, s, f = (got[p] for p in paths)
    assert c["structure"] == pytest.approx(1) and c["edges"] == pytest.approx(1)
    assert c["content"] == pytest.approx(0, abs=1e-6) and c["style"] > 0
    assert s["color"] == pytest.approx(0, abs=1e-6) and s["swd"] == pytest.approx(0, abs=1e-6)
    assert s["style"] == pytest.approx(0, abs=1e-6) and s["structure"] < 0.9
    want = json.loads((env / "r" / "run.json").read_text())["metrics"]
    for k in ("structure", "edges", "color", "swd", "style", "content"):
        assert f[k] == pytest.approx(want[k], rel=0.02, abs=1e-3), k
    assert cli.main(["metrics", "ok.yaml", paths[0], "--set", "style=" + paths[0]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("\t")[:3] == ["image", "structure", "edges"] and len(table) == 2
    row = dict(zip(table[0].split("\t"), table[1].split("\t")))
    assert float(row["color"]) == pytest.approx(0, abs=1e-3)  # scored against itself as style


@pytest.mark.parametrize(("args", "what"), [
    (["metrics", "ok.yaml", "nothere.png"], "nothere.png"),
    (["metrics", "missing.yaml", "ok.yaml"], "missing.yaml"),
    (["metrics", "ok.yaml", "ok.yaml"], "ok.yaml"),
])
def test_metrics_bad_input_is_one_line_exit_2(env, capsys, args, what):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("nstjax: error: ") and err.count("\n") == 1 and what in err


def test_run_dry_run_validates_and_estimates_without_running(env, capsys):
    """`run --dry-run`: the validated problem, a time estimate, and the device memory of the
    sweep planner's model, written out here for 32x32 and one VGG layer (3 -> 64 channels):
    solver state 4 B x (2 x history 10 + 16) x 32x32x3, activations 4 B x 1.5 x 4 x 32x32x64,
    weights 4 B x (9 x 3 x 64 + 64); no run directory; a bad key exits 2 with one line."""
    import re

    assert cli.main(["run", "ok.yaml", "--dry-run", "--out", "r"]) == 0
    out = capsys.readouterr().out
    assert "ok.yaml: valid" in out and "image 32x32" in out and "adam 6 it" in out
    est = re.search(r"~(\d+) s compiling \+ ~(\d+) s solving", out)
    assert est and int(est[1]) >= 1
    state, acts, weights = 4 * 36 * 32 * 32 * 3, 4 * 1.5 * 4 * 32 * 32 * 64, 4 * (9 * 3 * 64 + 64)
    mib = float(re.search(r"memory: ~([\d.]+) MiB", out)[1])
    assert mib == pytest.approx((state + acts + weights) / 2**20, rel=5e-3)
    assert not (env / "r").exists() and not (env / "runs").exists()
    assert cli.main(["run", "ok.yaml", "--dry-run", "solver.maxiterr=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "solver.maxiter" in err
