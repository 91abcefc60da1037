"""Artistic controls (nstjax.problem, nstjax.multiscale): each one's effect shown with a number.

Random VGG16 weights, images of at most 48 px and a shallow layer set (VGG16 up to block3), so
the whole file stays well under a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from nstjax import cli, config, image, losses, problem, record, run, weights
from nstjax.errors import UserError

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"
W, H = 48, 32
LIGHT = {"content_layers": ["block2_conv2"],
         "style_layers": ["block1_conv2", "block2_conv2", "block3_conv2"],
         "style_weights": [1.0, 1.0, 1.0]}
# Adam makes steady progress from the first step; jaxopt's L-BFGS can idle for several
# iterations from a near-zero start, which makes short solves erratic.
ADAM = {"name": "adam", "learning_rate": 8.0}


# ---------------------------------------------------------------- fixtures and references


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Content and style images (the demo ones plus two flat-coloured textures) and masks."""
    d = tmp_path_factory.mktemp("controls")
    rng = np.random.default_rng(0)
    out = {"content": DEMO / "content.png", "style": DEMO / "style.png"}
    for name, rgb in (("red", (220, 40, 30)), ("blue", (30, 60, 220))):
        tex = np.clip(np.asarray(rgb) + 25 * rng.standard_normal((64, 64, 3)), 0, 255)
        out[name] = d / f"{name}.png"
        Image.fromarray(tex.astype(np.uint8), "RGB").save(out[name])
    gray = np.full((H, W, 3), 128, np.uint8) + rng.integers(0, 8, (H, W, 3), dtype=np.uint8)
    out["gray"] = d / "gray.png"
    Image.fromarray(gray, "RGB").save(out["gray"])
    left = np.zeros((H, W), np.uint8)
    left[:, : W // 2] = 255
    for name, m in (("left", left), ("right", 255 - left)):
        out[name] = d / f"mask_{name}.png"
        Image.fromarray(m, "L").save(out[name])
    return out


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("NSTJAX_HOME", str(tmp_path / "home"))


def make_cfg(files, **extra) -> config.Config:
    raw = {"content": str(files["content"]), "style": str(files["style"]),
           "image": {"size": [W, H]}, "model": {"weights": "random"}, "loss": dict(LIGHT),
           "solver": dict(ADAM, maxiter=10)}
    return config.validate(config.merge(raw, extra))


def rgb_at(path, wh=(W, H)) -> np.ndarray:
    """An image file as float64 RGB at `wh`, loaded as nstjax loads it."""
    return image.deprocess_float(image.load(path, list(wh)))


def np_features(params: dict, rgb: np.ndarray, upto: str) -> dict[str, np.ndarray]:
    """float64 numpy VGG16 (3x3 SAME convs, ReLU, 2x2 average pools) from RGB 0..255."""
    from nstjax.weights import VGG16_CONVS

    h = (rgb[..., ::-1] - np.asarray(image.MEAN_BGR))[None].astype(np.float64)
    out, block = {}, 1
    for name, _, _ in VGG16_CONVS:
        b = int(name[5])
        if b != block:
            n, hh, ww, c = h.shape
            h = h[:, : hh // 2 * 2, : ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c)
            h, block = h.mean(axis=(2, 4)), b
        k = np.asarray(params[name]["kernel"], np.float64)
        pad = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        _, hh, ww, _ = h.shape
        h = sum(np.einsum("nhwc,co->nhwo", pad[:, i : i + hh, j : j + ww], k[i, j])
                for i in range(3) for j in range(3))
        h = np.maximum(h + np.asarray(params[name]["bias"], np.float64), 0.0)
        out[name] = h
        if name == upto:
            return out
    return out


def np_gram(f: np.ndarray, normalization: str = "seed") -> np.ndarray:
    _, h, w, c = f.shape
    flat = f.reshape(h * w, c)
    g = flat.T @ flat
    return g / (h * w * c) if normalization == "seed" else g


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def chroma(rgb: np.ndarray) -> np.ndarray:
    return image.rgb_to_ycbcr(rgb)[..., 1:]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("extra, says", [
    ({"style": ["a.png", "b.png"], "style_blend": [1.0]}, "style_blend has 1 values"),
    ({"style": ["a.png", "b.png"], "style_blend": [1.0, -1.0]}, "style_blend"),
    ({"style_scale": 0}, "style_scale"),
    ({"color": {"preserve": "lum"}}, "color.preserve"),
    ({"masks": {"style": ["m.png", "n.png"]}}, "masks.style has 2 masks"),
    ({"style": ["a.png", "b.png"], "style_blend": [1, 1], "masks": {"style": ["m", "n"]}},
     "style_blend and masks.style"),
    ({"multiscale": {"sizes": [64, 32]}}, "multiscale.sizes: sizes must be strictly ascending"),
    ({"multiscale": {"sizes": [32], "factor": 2}}, "either sizes or factor"),
    ({"multiscale": {"factor": 2}}, "factor and steps go together"),
    ({"multiscale": {"steps": 3, "factor": 2, "maxiter": [1, 2]}}, "maxiter has 2 values"),
    ({"output": {"bits": 16, "format": "jpg"}}, "output: bits: 16 needs format: png"),
    ({"style": 5}, "x.yaml: style: "),
])
def test_bad_control_keys_are_one_line_errors(extra, says):
    raw = config.merge({"content": "c.png", "style": "s.png"}, extra)
    with pytest.raises(UserError) as e:
        config.validate(raw, "x.yaml")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_control_paths_resolve_relative_to_the_config(tmp_path, capsys):
    sub = tmp_path / "cfgs"
    sub.mkdir()
    p = sub / "c.yaml"
    p.write_text(yaml.safe_dump({
        "content": "c.png", "style": ["a.png", "/abs/b.png"],
        "masks": {"style": ["ma.png", "mb.png"], "content": "mc.png"},
    }))
    cfg = config.load(p)
    assert cfg.styles == [str(sub / "a.png"), "/abs/b.png"]
    assert cfg.masks.style == [str(sub / "ma.png"), str(sub / "mb.png")]
    assert cfg.masks.content == str(sub / "mc.png")
    cfg = config.load(p, ["masks.content=rel/m.png", "multiscale.sizes=[24]"])
    assert cfg.masks.content == str(Path.cwd() / "rel" / "m.png")
    assert cfg.multiscale.count == 2
    assert cli.main(["run", str(p), "style_blend=[1]", "--quiet"]) == 2
    assert "style_blend has 1 values" in capsys.readouterr().err


def test_example_configs_validate():
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert len(names) >= 8, names
    for p in EXAMPLES.glob("*.yaml"):
        cfg = config.load(p)
        for f in [cfg.content, *cfg.styles, *(cfg.masks.style or []), cfg.masks.content]:
            assert f is None or Path(f).is_file(), (p.name, f)
        assert p.read_text().startswith("#"), p.name


# ---------------------------------------------------------------- targets: blend, scale, colour


def test_plain_config_targets_match_numpy(files):
    """A single style (a blend of one) gets the float64 reference content features and Grams."""
    cfg = make_cfg(files)
    p = problem.build(cfg)
    params, _ = weights.load("random", seed=cfg.seed)
    fc = np_features(params, rgb_at(files["content"]), "block3_conv2")
    fs = np_features(params, rgb_at(files["style"]), "block3_conv2")
    for n in LIGHT["content_layers"]:
        assert rel(p.targets["content"][n], fc[n]) < 1e-4
    for n in LIGHT["style_layers"]:
        assert p.targets["style"][n].shape == (1, fs[n].shape[-1], fs[n].shape[-1])
        assert rel(p.targets["style"][n][0], np_gram(fs[n])) < 1e-4
    assert p.post is None and p.info == {"weights": p.info["weights"], "content_size": [W, H]}


def test_style_blend_mixes_target_grams(files):
    two = [str(files["style"]), str(files["red"])]
    blend = run.build(make_cfg(files, style=two, style_blend=[7, 3]))  # normalized to 0.7, 0.3
    ga = run.build(make_cfg(files, style=two[0])).targets["style"]
    gb = run.build(make_cfg(files, style=two[1])).targets["style"]
    for n in LIGHT["style_layers"]:
        want = 0.7 * np.asarray(ga[n], np.float64) + 0.3 * np.asarray(gb[n], np.float64)
        assert rel(blend.targets["style"][n], want) < 1e-5
        assert rel(ga[n], want) > 0.05  # the mix is not just one of them
    equal = run.build(make_cfg(files, style=two))
    assert blend.spec == equal.spec  # the blend changes targets only: one compiled program
    assert rel(equal.targets["style"]["block1_conv2"],
               0.5 * (np.asarray(ga["block1_conv2"]) + np.asarray(gb["block1_conv2"]))) < 1e-5


@pytest.mark.parametrize("normalization", ["seed", "gatys"])
def test_style_scale_targets_are_grams_of_the_resized_style(files, normalization):
    loss = dict(LIGHT, normalization=normalization)
    half = run.build(make_cfg(files, style_scale=0.5, loss=loss))
    full = run.build(make_cfg(files, loss=loss))
    assert half.info["style_size"] == [W // 2, H // 2]
    assert half.style.shape == (1, H // 2, W // 2, 3)
    # By hand: Pillow bicubic to half the content's size, numpy VGG16 in float64.
    img = Image.open(files["style"]).convert("RGB").resize((W // 2, H // 2), Image.BICUBIC)
    feats = np_features(weights.random_params(0), np.asarray(img, np.float64), "block2_conv2")
    for n, k in (("block1_conv2", 0), ("block2_conv2", 1)):
        want = np_gram(feats[n], normalization)
        if normalization == "gatys":  # a sum over positions: rescaled to the output's positions
            want = want * ((H >> k) * (W >> k)) / ((H // 2 >> k) * (W // 2 >> k))
        assert rel(half.targets["style"][n][0], want) < 1e-4
        assert rel(full.targets["style"][n][0], want) > 0.02


def test_histogram_matching_gives_the_style_the_contents_colours(files):
    cfg = make_cfg(files, style=str(files["red"]))
    plain = run.build(cfg)
    hist = run.build(make_cfg(files, style=str(files["red"]), color={"preserve": "histogram"}))
    c = image.deprocess_float(plain.content).reshape(-1, 3)
    s0 = image.deprocess_float(plain.style).reshape(-1, 3)
    s1 = image.deprocess_float(hist.style).reshape(-1, 3)
    assert np.abs(s0.mean(0) - c.mean(0)).max() > 40
    assert np.abs(s1.mean(0) - c.mean(0)).max() < 2.0
    assert np.abs(np.cov(s1.T) - np.cov(c.T)).max() < 0.1 * np.abs(np.cov(c.T)).max()
    assert rel(hist.targets["style"]["block1_conv2"], plain.targets["style"]["block1_conv2"]) > 0.1


# ---------------------------------------------------------------- solves


def test_luminance_transfer_keeps_the_contents_chroma(files, tmp_path):
    content = rgb_at(files["content"])
    out = {}
    for mode in ("luminance", "none"):
        cfg = make_cfg(files, color={"preserve": mode})
        r = run.run(cfg, tmp_path / mode, quiet=True)
        assert r.record["status"] == "done"
        out[mode] = np.asarray(Image.open(r.dir / "final.png").convert("RGB"), np.float64)
    d_lum = np.abs(chroma(out["luminance"]) - chroma(content)).mean()
    d_none = np.abs(chroma(out["none"]) - chroma(content)).mean()
    assert d_lum < 2.0 and d_none > 5.0, (d_lum, d_none)
    p = run.build(make_cfg(files, color={"preserve": "luminance"}))
    x = image.deprocess_float(p.content)
    assert np.abs(x[..., 0] - x[..., 2]).max() < 1e-3  # the network sees gray images


def test_content_mask_keeps_the_unmasked_region(files, tmp_path):
    """Black (left) = keep: those pixels equal the content's; white (right) is stylized."""
    cfg = make_cfg(files, masks={"content": str(files["right"])}, output={"save_every": 5})
    r = run.run(cfg, tmp_path / "m", quiet=True)
    content = rgb_at(files["content"])
    for name in ("final.png", "iter_000005.png"):
        got = np.asarray(Image.open(r.dir / name).convert("RGB"), np.float64)
        keep = np.abs(got[:, : W // 2] - content[:, : W // 2]).max()
        styled = np.abs(got[:, W // 2 :] - content[:, W // 2 :]).mean()
        assert keep <= 1.0 and styled > 10.0, (name, keep, styled)
    h = r.result.history
    assert h[-1]["total"] < h[0]["total"]


def test_full_style_mask_equals_no_mask(files):
    """One all-white mask: the guided-Gram loss is exactly the plain style loss."""
    cfg = make_cfg(files)
    p = run.build(cfg)
    x = p.x0 + 10.0 * p.content
    plain = losses.loss_terms(p.params, x, p.targets, p.weights, p.spec)
    spec = losses.Spec(**{**p.spec.__dict__, "style_masks": 1})
    ones = np.ones((1, H, W), np.float32)
    tgt = {**p.targets, "style_masks": {
        n: jnp.asarray(v) for n, v in problem.layer_masks(ones, spec.style_layers).items()}}
    masked = losses.loss_terms(p.params, x, tgt, p.weights, spec)
    assert float(masked["style"]) == pytest.approx(float(plain["style"]), rel=1e-5)


def test_style_masks_put_each_style_in_its_region(files, tmp_path):
    """Red and blue styles with left/right masks: each half takes its style's colour, and
    swapping the masks (same compiled program: masks are arguments) swaps the colours."""
    extra = {"content": str(files["gray"]), "style": [str(files["red"]), str(files["blue"])],
             "init": "content", "loss": dict(LIGHT, style_to_content_ratio=1e4),
             "solver": dict(ADAM, maxiter=40)}
    sides = {}
    for name, masks in (("red_left", ["left", "right"]), ("red_right", ["right", "left"])):
        cfg = make_cfg(files, **extra, masks={"style": [str(files[m]) for m in masks]})
        r = run.run(cfg, tmp_path / name, quiet=True)
        got = np.asarray(Image.open(r.dir / "final.png").convert("RGB"), np.float64)
        red_minus_blue = got[..., 0] - got[..., 2]
        sides[name] = (red_minus_blue[:, : W // 2 - 4].mean(),
                       red_minus_blue[:, W // 2 + 4 :].mean())
    (a_left, a_right), (b_left, b_right) = sides["red_left"], sides["red_right"]
    assert a_left > 100 and a_right < -100 and b_left < -100 and b_right > 100, sides
    p = run.build(cfg)
    assert p.spec.style_masks == 2
    assert p.targets["style"]["block1_conv2"].shape == (2, 64, 64)
    assert p.targets["style_masks"]["block3_conv2"].shape == (2, H // 4, W // 4, 1)


def test_multiscale_beats_one_scale_with_the_same_iterations(files, tmp_path):
    """Coarse to fine from YAML through the CLI: 24 px then 48 px, 10 Adam iterations each,
    against 20 iterations at 48 px only: the final size is the target, the upsampled 24 px
    result starts the 48 px scale far below the noise start, and the final loss is lower.

    (Measured on random weights at this size: lower in 5 seeds out of 5 with Adam at
    learning rate 4. With jaxopt's L-BFGS, whose restart at each scale idles for a few
    iterations, a 10 + 10 split does not beat 20 single-scale iterations at 48 px.)
    """
    p = tmp_path / "ms.yaml"
    p.write_text(yaml.safe_dump({
        "content": str(files["content"]), "style": str(files["style"]),
        "image": {"size": [W, H]}, "model": {"weights": "random"}, "loss": LIGHT,
        "solver": dict(ADAM, learning_rate=4.0, maxiter=20), "multiscale": {"sizes": [W // 2]}}))
    d = tmp_path / "ms"
    assert cli.main(["run", str(p), "--out", str(d), "--quiet"]) == 0
    assert Image.open(d / "final.png").size == (W, H)
    assert Image.open(d / "scale1_final.png").size == (W // 2, H // 2)
    assert np.load(d / "last.npy").shape == (1, H, W, 3)
    rec = json.loads((d / "run.json").read_text())
    assert rec["status"] == "done" and rec["content_size"] == [W, H]
    assert [s["size"] for s in rec["scales"]] == [[W // 2, H // 2], [W, H]]
    assert [s["iterations"] for s in rec["scales"]] == [10, 10] and rec["iterations"] == 20
    with open(d / "history.csv") as f:
        rows = list(csv.DictReader(f))
    cols, layers = list(rows[0]), config.load(p).loss.style_layers
    assert cols[:6] == ["scale", *record.HISTORY_COLUMNS[:-1]] and cols[-1] == "seconds"
    assert cols[6:-1] == sorted(f"style/{n}" for n in layers) and len(rows) == 22
    assert [(r["scale"], r["iter"]) for r in rows[10:13]] == [("1", "10"), ("2", "10"),
                                                              ("2", "11")]
    single = run.run(config.load(p, ["multiscale.sizes=null"]), tmp_path / "one", quiet=True)
    noise_start, one_final = single.result.history[0]["total"], single.result.history[-1]["total"]
    fine_start, ms_final = float(rows[11]["total"]), rec["final_loss"]["total"]
    assert fine_start < 0.6 * noise_start, (fine_start, noise_start)
    assert ms_final < 0.9 * one_final, (ms_final, one_final)


# ---------------------------------------------------------------- output options


def test_exif_orientation_applied_and_16_bit_output_without_metadata(files, tmp_path):
    upright = np.zeros((W, H, 3), np.uint8)  # displayed H wide, W tall (portrait)
    upright[..., 0] = np.linspace(0, 255, H)[None, :]
    upright[..., 1] = np.linspace(0, 255, W)[:, None]
    upright[: W // 4, : H // 4] = (255, 255, 255)  # top-left marker
    stored = Image.fromarray(upright, "RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    jpg = tmp_path / "portrait.jpg"
    stored.save(jpg, quality=95, exif=exif.tobytes())
    assert Image.open(jpg).size == (W, H)  # stored landscape
    p = tmp_path / "exif.yaml"
    p.write_text(yaml.safe_dump({
        "content": str(jpg), "style": str(files["style"]), "init": "content",
        "image": {"size": W}, "model": {"weights": "random"}, "loss": LIGHT,
        "solver": {"name": "adam", "maxiter": 0}, "output": {"bits": 16}}))
    out = tmp_path / "r"
    assert cli.main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    raw = (out / "final.png").read_bytes()
    assert raw[24] == 16 and raw[25] == 2  # IHDR: 16-bit RGB
    assert b"eXIf" not in raw and b"Exif" not in raw
    got = Image.open(out / "final.png")
    assert got.size == (H, W) and not got.getexif()
    want = np.asarray(ImageOps.exif_transpose(Image.open(jpg)).convert("RGB"), np.float64)
    assert np.abs(np.asarray(got.convert("RGB"), np.float64) - want).max() <= 1.0
