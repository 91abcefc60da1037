"""nstjax.config: YAML files, dotted overrides, path resolution and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from nstjax import config as C
from nstjax import solvers
from nstjax.errors import UserError

MINIMAL = "content: a.png\nstyle: b.png\n"


@pytest.fixture
def write(tmp_path: Path):
    """write(text, name=...) -> path of a config file under tmp_path/conf."""

    def _write(text: str, name: str = "run.yaml") -> Path:
        p = tmp_path / "conf" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        return p

    return _write


def error_of(path, overrides=()) -> str:
    with pytest.raises(UserError) as e:
        C.load(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg  # one line
    return msg


# --------------------------------------------------------------------------- defaults


def test_defaults(write, tmp_path):
    cfg = C.load(write(MINIMAL))
    assert cfg.content == str(tmp_path / "conf" / "a.png")
    assert cfg.style == str(tmp_path / "conf" / "b.png")
    assert cfg.init == "noise" and cfg.seed == 0
    assert cfg.image.size == 256
    assert (cfg.model.weights, cfg.model.pooling, cfg.model.remat) == ("hed", "avg", False)
    # The blog post's loss.
    assert cfg.loss.normalization == "seed"
    assert cfg.loss.content_layers == ["block4_conv2"]
    assert cfg.loss.style_layers == [f"block{i}_conv2" for i in range(1, 6)]
    assert cfg.loss.style_weights == [0.05, 0.2, 0.2, 0.25, 0.3]
    assert cfg.loss.style_to_content_ratio == 15.0 and cfg.loss.tv_weight == 0.0
    # The solver section's defaults are the solvers module's.
    assert cfg.solver.settings() == solvers.Settings()
    assert cfg.solver.name == solvers.DEFAULT


def test_empty_file_reports_the_missing_key(write):
    msg = error_of(write(""))
    assert "missing key content" in msg


def test_missing_file_and_non_mapping(write, tmp_path):
    assert "not found" in error_of(tmp_path / "nope.yaml")
    assert "mapping" in error_of(write("- a\n- b\n"))


# --------------------------------------------------------------------------- errors


def test_unknown_key_names_it_and_suggests(write):
    msg = error_of(write(MINIMAL + "loss:\n  style_wieghts: [1, 2, 3, 4, 5]\n"))
    assert "loss.style_wieghts" in msg and "style_weights" in msg
    msg = error_of(write(MINIMAL + "solver:\n  nmae: adam\n"))
    assert "solver.nmae" in msg and "solver.name" in msg
    msg = error_of(write(MINIMAL + "sede: 3\n"))
    assert "sede" in msg and "seed" in msg
    # The message names the file it came from.
    assert "run.yaml" in msg


def test_wrong_type(write):
    msg = error_of(write(MINIMAL + "solver:\n  maxiter: lots\n"))
    assert "solver.maxiter" in msg and "lots" in msg
    msg = error_of(write(MINIMAL + "model:\n  pooling: median\n"))
    assert "model.pooling" in msg and "median" in msg and "avg" in msg


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("loss:\n  tv_weight: -1\n", "loss.tv_weight"),
        ("loss:\n  style_to_content_ratio: 0\n", "loss.style_to_content_ratio"),
        ("loss:\n  style_layers: []\n  style_weights: []\n", "loss.style_layers"),
        ("loss:\n  content_layers: []\n", "loss.content_layers"),
        ("solver:\n  maxiter: -1\n", "solver.maxiter"),
        ("image:\n  size: 8\n", "image.size"),
        ("image:\n  size: [100, 50, 25]\n", "image.size"),
        ("loss:\n  style_weights: [1, -1, 1, 1, 1]\n", "loss.style_weights"),
    ],
)
def test_out_of_range(write, text, key):
    assert key in error_of(write(MINIMAL + text))


def test_unknown_layer_suggests_the_nearest(write):
    msg = error_of(write(MINIMAL + "loss:\n  style_layers: [block4_con2]\n  style_weights: [1]\n"))
    assert "loss.style_layers" in msg and "block4_con2" in msg
    assert "did you mean block4_conv2" in msg
    msg = error_of(write(MINIMAL + "loss:\n  content_layers: [block6_conv1]\n"))
    assert "loss.content_layers" in msg and "block6_conv1" in msg


def test_style_weights_length_mismatch_names_both_keys(write):
    msg = error_of(write(MINIMAL + "loss:\n  style_weights: [1, 2]\n"))
    assert "loss.style_weights" in msg and "loss.style_layers" in msg
    assert "2" in msg and "5" in msg


def test_yaml_syntax_error_gives_the_line(write):
    text = MINIMAL + "solver:\n  maxiter: 5\n   name: adam\nseed: 1\n"  # bad indent on line 5
    msg = error_of(write(text))
    assert "line 5" in msg and "run.yaml" in msg
    msg = error_of(write(MINIMAL + "\tseed: 1\n"))  # a tab on line 3
    assert "line 3" in msg


# --------------------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_yaml(write):
    path = write(MINIMAL + "solver:\n  name: adam\n  maxiter: 10\n")
    cfg = C.load(path, ["image.size=[128,96]", "solver.maxiter=50", "model.weights=hed",
                        "loss.tv_weight=0.5", "model.remat=true"])
    assert cfg.image.size == [128, 96]
    assert cfg.solver.maxiter == 50
    assert cfg.solver.name == "adam"  # a deep merge: the file's other keys stay
    assert cfg.model.weights == "hed"
    assert cfg.loss.tv_weight == 0.5 and cfg.model.remat is True
    assert C.load(path, ["image.size=[128, null]"]).image.size == [128, None]


def test_override_errors_name_the_key(write):
    path = write(MINIMAL)
    msg = error_of(path, ["solver.maxiter=many"])
    assert "solver.maxiter" in msg and "many" in msg
    assert "loss.style_wieghts" in error_of(path, ["loss.style_wieghts=[1]"])


@pytest.mark.parametrize(
    "item", ["solver.maxiter", "=5", "solver..maxiter=5", "solver.max-iter=5", " =1",
             "image.size=[1, 2"],
)
def test_bad_override_syntax(item):
    with pytest.raises(UserError) as e:
        C.parse_overrides([item])
    assert "override" in str(e.value)


def test_parse_overrides_nested():
    out = C.parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]", "f="])
    assert out == {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2], "f": None}


# --------------------------------------------------------------------------- paths


def test_paths_relative_to_config_file(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the config's folder
    path = write(MINIMAL + "init: start.png\nmodel:\n  weights: w/my.npz\n")
    cfg = C.load(path)
    conf = tmp_path / "conf"
    assert cfg.content == str(conf / "a.png")
    assert cfg.style == str(conf / "b.png")
    assert cfg.init == str(conf / "start.png")
    assert cfg.model.weights == str(conf / "w" / "my.npz")


def test_paths_in_overrides_relative_to_cwd(write, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = C.load(write(MINIMAL), ["content=c.png", "init=sub/start.png",
                                  "model.weights=../w.npz"])
    assert cfg.content == str(work / "c.png")
    assert cfg.style == str(tmp_path / "conf" / "b.png")  # from the file: file-relative
    assert cfg.init == str(work / "sub" / "start.png")
    assert cfg.model.weights == str(tmp_path / "w.npz")


def test_absolute_paths_and_home_unchanged(write, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    elsewhere = tmp_path / "elsewhere" / "b.png"
    cfg = C.load(write(f"content: ~/a.png\nstyle: {elsewhere}\n"))
    assert cfg.content == str(tmp_path / "home" / "a.png")
    assert cfg.style == str(elsewhere)


@pytest.mark.parametrize("init", ["noise", "content", "style"])
@pytest.mark.parametrize("weights", ["hed", "imagenet", "random"])
def test_named_values_are_not_paths(write, init, weights):
    cfg = C.load(write(MINIMAL + f"init: {init}\nmodel:\n  weights: {weights}\n"))
    assert (cfg.init, cfg.model.weights) == (init, weights)
    cfg = C.load(write(MINIMAL), [f"init={init}", f"model.weights={weights}"])
    assert (cfg.init, cfg.model.weights) == (init, weights)


# --------------------------------------------------------------------------- dump


def test_dump_round_trips(write, tmp_path):
    cfg = C.load(write(MINIMAL + "init: start.png\nloss:\n  normalization: gatys\n"),
                 ["image.size=[64, 48]", "solver.name=scipy_lbfgsb", "loss.tv_weight=0.25"])
    again = C.load(write(C.dump(cfg), "dumped.yaml"))
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    # Dumped from another folder, absolute paths still point at the same files.
    moved = tmp_path / "other" / "dumped.yaml"
    moved.parent.mkdir()
    moved.write_text(C.dump(cfg), encoding="utf-8")
    assert C.load(moved) == cfg
