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
    assert "README.md" in text and "keys table" in text and "config show" in text


def test_sweep_help_shows_a_file_that_loads(capsys, tmp_path):
    text = _help(capsys, "sweep")
    assert "sweep file format" in text and "axes:" in text and "zip:" in text
    block = text[text.index("sweep file format"):].split("\n\n")[1]
    doc = yaml.safe_load(block)
    assert set(doc) == set(sweep.spec.SECTIONS)
    assert set(doc["sweep"]) == set(sweep.spec.SETTINGS)
    # As a file next to configs/quickstart.yaml it is a valid sweep: 3 x 2 x 2 cells.
    from sweep_helpers import ROOT

    p = tmp_path / "example.yaml"
    p.write_text(block.replace("../quickstart.yaml", str(ROOT / "configs" / "quickstart.yaml")))
    sw = sweep.load(p)
    assert sw.name == "ratio" and len(sweep.expand(sw)) == 12
