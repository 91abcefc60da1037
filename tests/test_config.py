"""nstjax.config: YAML files, dotted overrides, path resolution and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nstjax import config as C
from nstjax import solvers
from nstjax.errors import UserError

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"

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


# --------------------------------------------------------------------------- limits (issue 11)


def test_aliases_within_the_limits_still_work(write):
    """Anchors, aliases and merge keys that stay small load as PyYAML's own safe loader does."""
    text = MINIMAL + ("loss:\n  style_layers: &l [block1_conv1, block2_conv1]\n"
                      "  style_weights: [1, 2]\n  content_layers: *l\n"
                      "solver: &s {maxiter: 7, maxls: 5}\nsweep_base: {<<: *s, tol: 0.5}\n")
    import yaml

    ref = yaml.safe_load(text)
    got = C.read_yaml(write(text))
    assert got == ref
    assert got["sweep_base"] == {"maxiter": 7, "maxls": 5, "tol": 0.5}


@pytest.mark.parametrize(("values", "ok"), [(C.MAX_NODES - 100, True), (C.MAX_NODES, False)])
def test_value_count_limit(write, values, ok):
    path = write("content: a.png\nstyle: [" + ", ".join(["a.png"] * values) + "]\n")
    if ok:
        assert len(C.read_yaml(path)["style"]) == values
    else:
        with pytest.raises(UserError, match="more than"):
            C.read_yaml(path)


@pytest.mark.parametrize(("depth", "ok"), [(C.MAX_DEPTH - 1, True), (C.MAX_DEPTH + 1, False)])
def test_nesting_limit(write, depth, ok):
    # The document's mapping is level 1, so `x` nested `depth - 1` lists deep is at level `depth`.
    path = write("x: " + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "\n")
    if ok:
        v = C.read_yaml(path)["x"]
        for _ in range(depth - 2):
            v = v[0]
        assert v == [1]
    else:
        with pytest.raises(UserError, match="levels deep"):
            C.read_yaml(path)


@pytest.mark.parametrize(("seed", "ok"), [(0, True), (2**32 - 1, True), (2**32, False),
                                          (-1, False), (2**70, False)])
def test_seed_range(write, seed, ok):
    if ok:
        assert C.load(write(MINIMAL), [f"seed={seed}"]).seed == seed
    else:
        assert "seed" in error_of(write(MINIMAL), [f"seed={seed}"])


@pytest.mark.parametrize("factor", [2.0, 1.5, 16.0, 1.0001])
def test_multiscale_factor_steps_bound(write, factor):
    """factor**(steps-1) may not exceed MAX_SIDE (the coarsest scale would be under 1 px)."""
    import math

    largest = min(C.MAX_SCALES, 1 + int(math.log(C.MAX_SIDE) / math.log(factor)))
    cfg = C.load(write(MINIMAL), [f"multiscale.factor={factor}", f"multiscale.steps={largest}"])
    assert cfg.multiscale.count == largest
    assert factor ** (largest - 1) <= C.MAX_SIDE * (1 + 1e-12)
    if largest < C.MAX_SCALES:
        msg = error_of(write(MINIMAL), [f"multiscale.factor={factor}",
                                        f"multiscale.steps={largest + 1}"])
        assert "multiscale" in msg and "factor" in msg


def test_multiscale_maxiter_needs_scales(write):
    assert "multiscale" in error_of(write(MINIMAL), ["multiscale.maxiter=5"])
    cfg = C.load(write(MINIMAL), ["multiscale.sizes=[64]", "multiscale.maxiter=5"])
    assert cfg.multiscale.maxiter == 5


def test_style_blend_sum(write):
    two = MINIMAL.replace("style: b.png", "style: [b.png, c.png]")
    assert C.load(write(two), ["style_blend=[1e300, 1e300]"]).style_blend == [1e300, 1e300]
    for bad in ("[1e308, 1e308]", "[0, 0]", "[.nan, 1]", "[.inf, 1]", "[-1, 2]"):
        assert "style_blend" in error_of(write(two), [f"style_blend={bad}"])


def test_new_keys_maxevals_and_progress_every(write, monkeypatch):
    cfg = C.load(write(MINIMAL), ["solver.maxevals=7", "output.progress_every=3"])
    assert (cfg.solver.maxevals, cfg.output.progress_every) == (7, 3)
    defaults = C.load(write(MINIMAL))
    assert (defaults.solver.maxevals, defaults.output.progress_every) == (0, 0)
    s = cfg.solver.settings()
    assert getattr(s, "maxevals", 7) == 7 and s.maxiter == cfg.solver.maxiter
    # Whichever lands first: a Settings without maxevals still gets the other fields.
    import dataclasses

    fields = [(f.name, f.type, f.default) for f in dataclasses.fields(solvers.Settings)
              if f.name != "maxevals"]
    monkeypatch.setattr(solvers, "Settings", dataclasses.make_dataclass("Settings", fields))
    assert cfg.solver.settings().maxiter == cfg.solver.maxiter


def test_path_overrides_are_raw_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = C.parse_overrides(["content=a #1.png", "init=b: c.png", "style=[x.png, 'y #2.png']",
                             "masks.content=", "model.weights=w #3.npz", "seed=5 # a comment"])
    assert out["content"] == str(tmp_path / "a #1.png")
    assert out["init"] == str(tmp_path / "b: c.png")
    assert out["style"] == [str(tmp_path / "x.png"), str(tmp_path / "y #2.png")]
    assert out["masks"]["content"] is None
    assert out["model"]["weights"] == str(tmp_path / "w #3.npz")
    assert out["seed"] == 5  # other keys stay YAML


@pytest.mark.parametrize("value", ["x" * 10**6, ["y" * 1000] * 1000, {"k": "v" * 10**5}])
def test_preview_is_short(value):
    text = C.preview(value)
    assert len(text) <= C.PREVIEW
    assert text[:5] == repr(value)[:5]


# --------------------------------------------------------------------------- loss kinds, eval


def test_loss_kind_plugins_resolve_and_register(write, tmp_path, monkeypatch):
    p = write(MINIMAL + "loss:\n  kind: t_cfgkind\n  plugins: [plug/k.py, json]\n")
    (tmp_path / "conf" / "plug").mkdir()
    (tmp_path / "conf" / "plug" / "k.py").write_text(
        "from nstjax import losses\n"
        "g = losses.kind('gram')\n"
        "losses.register('t_cfgkind', targets=g.targets, terms=g.terms, replace=True)\n")
    monkeypatch.chdir(tmp_path)  # the plugin path is relative to the config, not the cwd
    cfg = C.load(p)
    assert cfg.loss.kind == "t_cfgkind"
    assert cfg.loss.plugins == [str(tmp_path / "conf" / "plug" / "k.py"), "json"]
    assert "plugins:\n  - " + str(tmp_path / "conf" / "plug" / "k.py") in C.dump(cfg)
    over = C.parse_overrides(["loss.plugins=plug/k.py"])  # an override: relative to the cwd
    assert over["loss"]["plugins"] == str(tmp_path / "plug" / "k.py")
    assert C.parse_overrides(["loss.plugins=[a.py, mod.sub]"])["loss"]["plugins"] == [
        str(tmp_path / "a.py"), "mod.sub"]


def test_unknown_kind_and_bad_plugins_are_one_line(write):
    msg = error_of(write(MINIMAL + "loss: {kind: nope}\n"))
    assert msg.endswith("run.yaml: loss.kind: unknown loss kind 'nope'; registered kinds: "
                        + ", ".join(__import__("nstjax.losses").losses.kinds())
                        + "; a custom kind's file goes in loss.plugins")
    assert "loss.kind: must be a loss kind name" in error_of(write(MINIMAL + "loss: {kind: a-b}\n"))
    p = write(MINIMAL + "loss: {plugins: [missing.py]}\n")
    assert error_of(p).startswith(f"{p}: loss.plugins: {p.parent / 'missing.py'}: loss plugin "
                                  "file not found; check the path")
    assert "loss.plugins: no_such_module_xyz: importing the loss plugin module failed" in (
        error_of(write(MINIMAL + "loss: {plugins: no_such_module_xyz}\n")))


def test_eval_section(write):
    cfg = C.load(write(MINIMAL + "eval: {style_layers: [block1_conv1], normalization: seed}\n"))
    spec = cfg.eval.spec()
    assert spec.style_layers == ("block1_conv1",) and spec.normalization == "seed"
    assert spec.content_layers == ("block4_conv2",) and spec.precision == "highest"
    assert len(C.load(write(MINIMAL)).eval.spec().style_layers) == 10
    assert "eval.style_layers: 'block9_conv1' is not a VGG16 conv layer" in error_of(
        write(MINIMAL + "eval: {style_layers: [block9_conv1]}\n"))
    assert "eval.pooling" in error_of(write(MINIMAL + "eval: {pooling: min}\n"))
    assert "unknown key eval.layers" in error_of(write(MINIMAL + "eval: {layers: [a]}\n"))


def test_replace_applies_dotted_keys_together_and_validates_once(write):
    cfg = C.load(write(MINIMAL))
    new = cfg.replace(**{"loss.style_layers": ["block1_conv1", "block2_conv1"],
                         "loss.style_weights": [0.3, 0.7], "solver.maxiter": 5})
    assert new.loss.style_layers == ["block1_conv1", "block2_conv1"]
    assert (new.loss.style_weights, new.solver.maxiter) == ([0.3, 0.7], 5)
    assert cfg.loss.style_layers == C.POST_STYLE_LAYERS  # unchanged
    with pytest.raises(UserError, match="loss.style_weights has 5 values but loss.style_layers "
                                        "has 1 layers"):
        cfg.replace(**{"loss.style_layers": ["block1_conv1"]})
    with pytest.raises(UserError, match="unknown key loss.nope"):
        cfg.replace(**{"loss.nope": 1})
    with pytest.raises(UserError, match="finite"):
        cfg.replace(**{"loss.tv_weight": float("inf")})


def test_model_arch_and_its_layer_checks(write):
    assert C.load(write(MINIMAL)).model.arch == "vgg16"
    ok = C.load(write(MINIMAL), ["model.arch=vgg19", "model.weights=random",
                                 "loss.style_layers=[block3_conv4, block5_conv4]",
                                 "loss.style_weights=[1, 1]", "eval.swd_layers=[block4_conv4]"])
    assert ok.model.arch == "vgg19" and ok.loss.style_layers == ["block3_conv4", "block5_conv4"]
    msg = error_of(write(MINIMAL), ["loss.style_layers=[block3_conv4]", "loss.style_weights=[1]"])
    assert ("loss.style_layers: 'block3_conv4' is not a VGG16 conv layer (a VGG19 layer: set "
            "model.arch=vgg19); valid: block1_conv1") in msg
    msg = error_of(write(MINIMAL), ["eval.content_layers=[block4_conv4]"])
    assert "eval.content_layers: 'block4_conv4' is not a VGG16 conv layer" in msg
    msg = error_of(write(MINIMAL), ["model.arch=vgg19", "model.weights=random",
                                    "loss.content_layers=[block4_conv5]"])
    assert "'block4_conv5' is not a VGG19 conv layer (did you mean block4_conv" in msg
    assert "block5_conv4" in msg  # the valid list is VGG19's
    msg = error_of(write(MINIMAL), ["model.arch=vgg19", "model.weights=hed"])
    assert "model.weights=hed is a VGG16 backbone, but model.arch=vgg19" in msg
    assert "model.arch=vgg16" in msg and "model.weights=imagenet" in msg
    msg = error_of(write(MINIMAL), ["model.arch=vgg11"])
    assert "model.arch" in msg and "vgg19" in msg


def test_importing_the_config_schema_does_not_import_jax():
    code = ("import sys, nstjax.config; print(sorted(m for m in ('jax', 'jaxlib', 'flax', "
            "'jaxopt', 'optax', 'numpy') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_null_override_unsets_a_key_back_to_its_default(tmp_path):
    """`KEY=null` drops what the file set: a paper config's solver.learning_rate no longer
    blocks solver.name=lbfgs (which refuses a learning rate); an empty content stays a value
    (texture synthesis; a path key takes raw text); a sweep's `set:` null unsets a key too."""
    p = tmp_path / "paper.yaml"
    p.write_text(f"content: {DEMO / 'content.png'}\nstyle: {DEMO / 'style.png'}\n"
                 "solver: {name: adam, learning_rate: 2.0, maxiter: 7}\nloss: {tv_weight: 3.5}\n")
    with pytest.raises(UserError):
        C.load(p, ["solver.name=lbfgs"])
    cfg = C.load(p, ["solver.name=lbfgs", "solver.learning_rate=null", "loss.tv_weight=null"])
    default = C.Config.model_fields["solver"].default_factory().learning_rate
    assert cfg.solver.name == "lbfgs" and cfg.solver.maxiter == 7
    assert cfg.solver.learning_rate == default == 5.0 and cfg.loss.tv_weight == 0.0
    assert C.load(p, ["content="]).content is None  # a path key: empty text is its null
    from nstjax import sweep

    sp = tmp_path / "s.yaml"
    sp.write_text(f"base: {p}\nset: {{solver.learning_rate: null, solver.name: lbfgs}}\n"
                  "axes: {seed: [0, 1]}\n")
    cells = sweep.expand(sweep.load(sp))
    assert [c.cfg.solver.learning_rate for c in cells] == [5.0, 5.0]
