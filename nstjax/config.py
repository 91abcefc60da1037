"""Run configuration: a typed schema, YAML loading, dotted overrides, one-line errors."""

import dataclasses
import difflib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nstjax import tables
from nstjax.cfgfile import (  # noqa: F401  (re-exported: config.merge, config.read_yaml, ...)
    INITS,
    LIST_PATH_KEYS,
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_KEY_PARTS,
    MAX_NODES,
    MAX_PLUGINS,
    MAX_STYLES,
    PATH_KEYS,
    WEIGHT_NAMES,
    _get,
    _resolve,
    _set,
    apply_overrides,
    merge,
    parse_overrides,
    read_yaml,
    resolve_paths,
)
from nstjax.errors import PREVIEW, UserError, preview

if TYPE_CHECKING:
    from nstjax import metrics, solvers

LAYERS = tuple(name for name, _, _ in tables.CONVS)
ALL_LAYERS = tuple(name for name, _, _ in tables.ARCHS["vgg19"])  # VGG19 has every layer
POST_STYLE_LAYERS = [f"block{i}_conv2" for i in range(1, 6)]
POST_STYLE_WEIGHTS = [0.05, 0.2, 0.2, 0.25, 0.3]

# Sane maxima: a config or override past them is a mistake (or an attack), refused before use.
MAX_ITER = 10_000_000  # iterations, rounds, evaluations per round, chunk lengths
MAX_SIDE = 65_536  # pixels on one side (image.size, multiscale.sizes)
MIN_SIDE = 16  # the smallest side image.size takes
MAX_PIXELS = 1 << 32
MAX_SCALES = 32
MAX_STYLE_SCALE = 100.0
MAX_FACTOR = 1024.0

NonNeg = Annotated[float, Field(ge=0)]
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE)]
Iters = Annotated[int, Field(ge=0, le=MAX_ITER)]

def _layer_error(n: str, arch: str) -> str | None:
    """Why `n` is not a conv layer of `arch` (None if it is)."""
    valid = [name for name, _, _ in tables.ARCHS[arch]]
    if n in valid:
        return None
    near = difflib.get_close_matches(n, valid, 1) if len(n) < 100 else []
    hint = f" (did you mean {near[0]}?)" if near else ""
    other = " (a VGG19 layer: set model.arch=vgg19)" if n in ALL_LAYERS else ""
    return (f"{preview(n)} is not a {arch.upper()} conv layer{other or hint}; "
            f"valid: {', '.join(valid)}")


def _check_layers(v: list[str]) -> list[str]:
    # The names are checked against the config's model.arch in Config._arch.
    if len(set(v)) != len(v):
        raise ValueError("lists a layer twice")
    return v


class _Strict(BaseModel):
    # allow_inf_nan=False: every float field, list items included, is finite (one place).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ImageCfg(_Strict):
    size: Side | list[Side | None] = Field(
        default=256, description="[W, H] (one may be null to keep aspect) or the longer side")
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bicubic"
    max_pixels: int = Field(default=40_000_000, gt=0, le=MAX_PIXELS)
    seamless: bool = Field(default=False, description="circular padding in the network and "
                           "TV: a tileable output (sides multiples of 16 for block5 layers)")

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if isinstance(v, list) and (len(v) != 2 or all(s is None for s in v)):
            raise ValueError("must be [W, H] (one of them may be null) or one number")
        return v


def _path_list(v):
    """A plugins value: one path or a list; `key=` (an empty path value means null): none."""
    return [] if v is None or v == "" else [v] if isinstance(v, str) else v


class ModelCfg(_Strict):
    arch: Literal["vgg16", "vgg19"] = Field(
        default="vgg16",
        description="the backbone: Keras VGG16 or VGG19 (hed is VGG16 only, imagenet_q8 VGG19)")
    weights: str = "hed"
    pooling: Literal["avg", "max"] = "avg"
    precision: Literal["highest", "default", "bfloat16"] = "default"
    remat: bool = False
    conv: Literal["auto", "direct", "winograd"] = "auto"


def _layers_field(default: tuple[str, ...]):
    return Field(default_factory=lambda: list(default), min_length=1,
                 max_length=len(ALL_LAYERS))


class LossCfg(_Strict):
    normalization: Literal["seed", "gatys"] = "seed"
    content_layers: list[str] = _layers_field(("block4_conv2",))
    content_weights: list[NonNeg] | None = Field(default=None, max_length=len(ALL_LAYERS))
    style_layers: list[str] = _layers_field(POST_STYLE_LAYERS)
    style_weights: list[NonNeg] = Field(
        default_factory=lambda: list(POST_STYLE_WEIGHTS), max_length=len(ALL_LAYERS))
    style_to_content_ratio: float = Field(default=15.0, gt=0)
    tv_weight: float = Field(default=0.0, ge=0)
    kind: str = Field(default="gram", max_length=100, description="a registered loss kind "
                      "(nstjax.losses.kinds(): gram, or one a plugin registers)")
    options: dict[str, Any] = Field(
        default_factory=dict, max_length=64, description="the loss kind's own settings, "
        "checked by the kind; config.yaml records them all, defaults filled in")
    reference_pixels: int | None = Field(
        default=None, ge=1, le=1 << 40, description="the pixel count (H x W) at which "
        "style_to_content_ratio and tv_weight are meant: at any image size they are rescaled "
        "so the loss terms keep that balance (losses.size_balanced); null: applied as given "
        "(their balance shifts with the pixel count)")
    style_norm: Literal["none", "content", "layers"] = Field(
        default="none", description="content: each style layer's term divided by its value at "
        "the content image (the initial image without one), so ratios compare across kinds; "
        "layers: brought to the layers' geometric mean there instead (layer weights without hand "
        "constants for any pooling, size or weights; ratio and tv_weight keep their scale)")
    plugins: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list, max_length=MAX_PLUGINS, description=".py files (relative to the "
        "config) or module names imported before the run: they register loss kinds")

    @field_validator("plugins", mode="before")
    @classmethod
    def _plugins(cls, v):
        return _path_list(v)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        if not v.replace("_", "").isalnum():
            raise ValueError("must be a loss kind name such as gram (letters, digits, _)")
        return v

    @field_validator("content_layers", "style_layers")
    @classmethod
    def _layers(cls, v):
        return _check_layers(v)

    @model_validator(mode="after")
    def _lengths(self):
        if len(self.style_weights) != len(self.style_layers):
            raise ValueError(
                f"loss.style_weights has {len(self.style_weights)} values but loss.style_layers "
                f"has {len(self.style_layers)} layers: give one weight per layer")
        cw = self.content_weights
        if cw is not None and len(cw) != len(self.content_layers):
            raise ValueError(
                f"loss.content_weights has {len(cw)} values but loss.content_layers has "
                f"{len(self.content_layers)} layers: give one weight per layer")
        return self


class SolverCfg(_Strict):
    name: Literal[tables.SOLVERS] = tables.DEFAULT_SOLVER  # type: ignore[valid-type]
    maxiter: Iters = 200
    history_size: int = Field(default=10, ge=1, le=1000)
    maxls: int = Field(default=20, ge=1, le=1000)
    tol: float = Field(default=0.0, ge=0)
    learning_rate: float = Field(default=5.0, gt=0)
    rounds: int = Field(default=10, ge=1, le=MAX_ITER)
    maxfun: int = Field(default=20, ge=1, le=MAX_ITER)
    pgtol: float = Field(default=0.0, ge=0)
    factr: float = Field(default=0.0, ge=0)
    maxevals: int = Field(default=0, ge=0, le=100 * MAX_ITER,
                          description="stop after this many loss evaluations (0: no limit)")

    def settings(self) -> "solvers.Settings":
        from nstjax import solvers

        # Only the fields solvers.Settings has (maxevals arrives there separately).
        known = {f.name for f in dataclasses.fields(solvers.Settings)}
        return solvers.Settings(**{k: v for k, v in self.model_dump().items() if k in known})


class OutputCfg(_Strict):
    save_every: Iters = 0
    progress_every: Iters = Field(
        default=0, description="progress line every N iterations (0: once per chunk)")
    bits: Literal[8, 16] = 8
    format: Literal["png", "jpg"] = "png"
    tensorboard: bool = Field(
        default=False, description="TensorBoard events in <run>/tensorboard (needs "
        "tensorboardX: pip install 'nstjax[tensorboard]')")

    @model_validator(mode="after")
    def _bits(self):
        if self.bits == 16 and self.format != "png":
            raise ValueError("bits: 16 needs format: png (JPEG is 8-bit only)")
        return self


class ColorCfg(_Strict):
    preserve: Literal["none", "luminance", "histogram"] = Field(
        default="none", description="luminance: transfer on Y, keep the content's Cb/Cr; "
        "histogram: match the style's colours to the content's before transfer")


class MasksCfg(_Strict):
    style: list[str] | None = Field(
        default=None, max_length=MAX_STYLES,
        description="one mask image per style image; white = that style's region")
    content: str | None = Field(
        default=None, description="white = stylize, black = keep the content's pixels")


class MultiscaleCfg(_Strict):
    sizes: list[Annotated[int, Field(ge=1, le=MAX_SIDE)]] | None = Field(
        default=None, max_length=MAX_SCALES - 1, description="longer sides of the coarser "
        "scales, ascending; the last scale is always image.size")
    factor: float | None = Field(
        default=None, gt=1, le=MAX_FACTOR, description="size ratio between scales")
    steps: int | None = Field(
        default=None, ge=1, le=MAX_SCALES, description="number of scales, final included")
    maxiter: Iters | list[Iters] | None = Field(
        default=None, description="iterations per scale (one number or one per scale); "
        "null splits solver.maxiter (solver.rounds for scipy_lbfgsb) evenly")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v):
        if v is not None:
            if not v:
                raise ValueError("give at least one size, or null for a single scale")
            if any(b <= a for a, b in zip(v, v[1:])):
                raise ValueError("sizes must be strictly ascending")
        return v

    @model_validator(mode="after")
    def _one_way(self):
        if self.sizes is not None and (self.factor is not None or self.steps is not None):
            raise ValueError("give either sizes or factor and steps, not both")
        if (self.factor is None) != (self.steps is None):
            raise ValueError("factor and steps go together (e.g. factor: 2, steps: 3)")
        if self.factor is not None and (self.steps - 1) * math.log2(self.factor) > math.log2(
                MAX_SIDE):
            raise ValueError(f"factor {self.factor:g} over {self.steps} steps shrinks the coarsest "
                             f"scale by more than {MAX_SIDE}x (under 1 pixel): use a smaller "
                             "factor or fewer steps")
        n = self.count
        if self.maxiter is not None and not n:
            raise ValueError("maxiter is set but multi-scale is off: set multiscale.sizes or "
                             "factor and steps (steps >= 2), or drop multiscale.maxiter")
        if isinstance(self.maxiter, list) and len(self.maxiter) != n:
            raise ValueError(f"maxiter has {len(self.maxiter)} values for {n} scales: "
                             "give one per scale (the final one included) or one number")
        return self

    @property
    def count(self) -> int:
        """Number of scales, the final one included (0 when multi-scale is off)."""
        if self.sizes is not None:
            return len(self.sizes) + 1
        return self.steps if self.steps and self.steps > 1 else 0


class EvalCfg(_Strict):
    """The metrics (`nstjax.metrics`) every run scores its final image with."""

    style_layers: list[str] = _layers_field(tables.DEFAULT_STYLE_LAYERS)
    content_layers: list[str] = _layers_field(("block4_conv2",))
    swd_layers: list[str] = _layers_field(tables.DEFAULT_SWD_LAYERS)
    metrics: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=lambda: list(tables.DEFAULT_METRICS), max_length=100,
        description="registered metric names (nstjax.metrics.names())")
    plugins: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list, max_length=MAX_PLUGINS, description=".py files (relative to the "
        "config) or module names imported before the run: they register metrics")
    projections: int = Field(default=64, ge=1, le=4096)
    seed: int = Field(default=0, ge=0, lt=2**32)
    normalization: Literal["seed", "gatys"] = "gatys"
    pooling: Literal["avg", "max"] = "avg"
    precision: Literal["highest", "default", "bfloat16"] = "highest"

    _plugins = field_validator("plugins", mode="before")(lambda v: _path_list(v))

    @field_validator("content_layers", "style_layers", "swd_layers")
    @classmethod
    def _layers(cls, v):
        return _check_layers(v)

    def spec(self) -> "metrics.EvalSpec":
        from nstjax import metrics

        return metrics.EvalSpec(**self.model_dump(exclude={"plugins"}))


class Config(_Strict):
    content: str | None  # null: texture synthesis (style only)
    style: str | Annotated[list[str], Field(max_length=MAX_STYLES)]
    style_blend: list[NonNeg] | None = Field(
        default=None, max_length=MAX_STYLES,
        description="weight of each style's Grams in the target (normalized)")
    style_scale: float = Field(
        default=1.0, gt=0, le=MAX_STYLE_SCALE,
        description="style image size relative to the content's")
    init: str = "noise"
    seed: int = Field(default=0, ge=0, lt=2**32, description="PRNG seed, 0 <= seed < 2**32")
    image: ImageCfg = Field(default_factory=ImageCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    loss: LossCfg = Field(default_factory=LossCfg)
    solver: SolverCfg = Field(default_factory=SolverCfg)
    output: OutputCfg = Field(default_factory=OutputCfg)
    color: ColorCfg = Field(default_factory=ColorCfg)
    masks: MasksCfg = Field(default_factory=MasksCfg)
    multiscale: MultiscaleCfg = Field(default_factory=MultiscaleCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)

    @field_validator("style")
    @classmethod
    def _style(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one style image")
        return v

    @model_validator(mode="after")
    def _arch(self):
        arch = self.model.arch
        if self.model.weights in tables.PIP_ARCH and arch != tables.PIP_ARCH[self.model.weights]:
            from nstjax.weights import pip_arch_error

            raise ValueError(pip_arch_error(self.model.weights, arch))
        for key, layers in (("loss.content_layers", self.loss.content_layers),
                            ("loss.style_layers", self.loss.style_layers),
                            ("eval.content_layers", self.eval.content_layers),
                            ("eval.style_layers", self.eval.style_layers),
                            ("eval.swd_layers", self.eval.swd_layers)):
            for n in layers:
                if why := _layer_error(n, arch):
                    raise ValueError(f"{key}: {why}")
        return self

    @model_validator(mode="after")
    def _paths(self):
        """An empty path is a mistake, not the current directory."""
        given = [("content", self.content), *(("style", p) for p in self.styles),
                 ("init", self.init), ("model.weights", self.model.weights),
                 ("masks.content", self.masks.content),
                 *(("masks.style", p) for p in self.masks.style or [])]
        for key, v in given:
            if isinstance(v, str) and not v.strip():
                names = {"content": "an image file (or null: texture synthesis)",
                         "init": f"one of {', '.join(INITS)} or an image file",
                         "model.weights": f"one of {', '.join(WEIGHT_NAMES)} or an .h5/.npz "
                         "file"}
                raise ValueError(f"{key}: is an empty path; give {names.get(key, 'a file')}")
        return self

    @model_validator(mode="after")
    def _controls(self):
        if self.content is None:
            for bad, why in ((self.init in ("content", "content_matched"), f"init: {self.init}"),
                             (self.masks.content is not None, "masks.content"),
                             (self.color.preserve != "none", "color.preserve")):
                if bad:
                    raise ValueError(f"{why} needs a content image, but content is null "
                                     "(texture synthesis): drop it or give a content image")
        n = len(self.styles)
        b = self.style_blend
        if b is not None:
            if len(b) != n:
                raise ValueError(f"style_blend has {len(b)} values but style lists {n} "
                                 "image(s): give one weight per style image")
            total = sum(b)
            if not 0 < total < math.inf:
                raise ValueError(f"style_blend: weights must be >= 0, not all 0, with a finite "
                                 f"sum (got sum {total:g}): scale them (only ratios matter)")
        m = self.masks.style
        if m is not None:
            if len(m) != n:
                raise ValueError(f"masks.style has {len(m)} masks but style lists {n} "
                                 "image(s): give one mask per style image")
            if b is not None:
                raise ValueError("style_blend and masks.style: give one or the other "
                                 "(with masks, each style has its own region)")
        return self

    @property
    def styles(self) -> list[str]:
        """The style image paths as a list (`style` may be one path or a list)."""
        return [self.style] if isinstance(self.style, str) else list(self.style)

    def replace(self, **changes: Any) -> "Config":
        """A copy with dotted keys changed together, validated once:
        `cfg.replace(**{"loss.style_layers": [...], "loss.style_weights": [...]})`. Relative
        paths resolve against the current directory, as command-line overrides do."""
        raw = self.model_dump()
        for key, value in changes.items():
            parts = key.split(".")
            if len(parts) > MAX_KEY_PARTS or not all(p.isidentifier() for p in parts):
                raise UserError(f"replace: {preview(key)} is not a dotted config key such as "
                                "solver.maxiter")
            _set(raw, key, _resolve(key, value, Path.cwd()))
        return validate(raw, "replace")


# --------------------------------------------------------------------------- errors


def _fields_at(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        f = getattr(model, "model_fields", {}).get(part)
        if f is None:
            return []
        model = f.annotation
    return list(getattr(model, "model_fields", {}))


def _pick(errors: list[dict]) -> dict:
    """The first error; of a union's errors for that field, the one that got deepest (the
    member matching the value's type: `image.size: [8, 8]` is about the list, not the int)."""
    first = errors[0]
    field = _field_loc(tuple(str(p) for p in first["loc"]))
    same = [e for e in errors if _field_loc(tuple(str(p) for p in e["loc"])) == field]
    return max(same, key=lambda e: len(e["loc"]))


def _message(err: ValidationError, source: str) -> str:
    e = _pick(err.errors())
    if e["type"] == "extra_forbidden":
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(preview(p) if len(p) > PREVIEW else p for p in loc)
        near = difflib.get_close_matches(loc[-1], _fields_at(loc), 1) if len(loc[-1]) < 100 else []
        prefix = ".".join(loc[:-1])
        hint = f" (did you mean {prefix + '.' if prefix else ''}{near[0]}?)" if near else ""
        return f"{source}: unknown key {key}{hint}"
    loc = tuple(str(p) for p in e["loc"] if not isinstance(p, int))
    key = ".".join(loc) or "config"
    if e["type"] == "missing":
        return f"{source}: missing key {key}: set it in the config or as {key}=..."
    if e["type"] == "finite_number":
        msg = "must be a finite number (not NaN or infinity)"
    else:
        msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    shown = f" (got {preview(value)})" if not isinstance(value, dict) and value is not None else ""
    loc = _field_loc(loc)  # drop union member tags such as `str` in `style.str`
    return f"{source}: {'.'.join(loc)}: {msg}{shown}" if loc else f"{source}: {msg}{shown}"


def _field_loc(loc: tuple) -> tuple:
    """The leading parts of an error location that name config fields."""
    model: Any = Config
    out = []
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not isinstance(fields, dict) or part not in fields:
            break
        out.append(part)
        model = fields[part].annotation
    return tuple(out)


def _solver_keys(s: SolverCfg, source: str) -> None:
    """UserError for a solver key set (to a value other than its default) that solver
    `s.name` does not use: it would be silently ignored. Defaults pass, so a dumped
    config.yaml (every key written) and a base config carrying defaults stay valid."""
    from nstjax import solvers

    used = solvers.USES[s.name]
    for key in SolverCfg.model_fields:
        if key == "name" or key in used or key not in s.model_fields_set:
            continue
        if getattr(s, key) != SolverCfg.model_fields[key].default:
            users = ", ".join(n for n in solvers.NAMES if key in solvers.USES[n])
            raise UserError(f"{source}: solver.{key}: solver {s.name} ignores it (used by: "
                            f"{users}); drop solver.{key} or set solver.name to one of those")


def validate(raw: dict, source: str = "config") -> Config:
    """A Config from a raw dict, or a one-line UserError naming the key. `loss.plugins` are
    imported (once per process) before `loss.kind` is checked against the registry."""
    from nstjax import losses, metrics

    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(_message(err, source)) from None
    _solver_keys(cfg.solver, source)
    for ref in cfg.loss.plugins:
        try:
            losses.load_plugin(ref)
        except UserError as e:
            raise UserError(f"{source}: loss.plugins: {e}") from None
    if cfg.loss.kind not in losses.kinds():
        plug = "" if cfg.loss.plugins else "; a custom kind's file goes in loss.plugins"
        raise UserError(f"{source}: loss.kind: unknown loss kind {preview(cfg.loss.kind)}; "
                        f"registered kinds: {', '.join(losses.kinds())}{plug}")
    k = losses.kind(cfg.loss.kind)
    if cfg.masks.style is not None and not k.masks:
        raise UserError(f"{source}: masks.style: loss kind {cfg.loss.kind} has no guided "
                        "(masked) form; use loss.kind: gram or drop masks.style")
    try:
        opts = losses.resolve_options(cfg.loss.kind, cfg.loss.options)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    cfg.loss.options = opts  # recorded complete (defaults filled in) in config.yaml
    try:
        metrics.load_plugins(cfg.eval.plugins)
    except UserError as e:
        raise UserError(f"{source}: eval.plugins: {e}") from None
    for name in cfg.eval.metrics:
        if name not in metrics.names():
            raise UserError(f"{source}: eval.metrics: unknown metric {preview(name)}; "
                            f"registered: {', '.join(metrics.names())} (a metric's file goes "
                            "in eval.plugins)")
    return cfg


def load(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Config from a YAML file (paths relative to it) plus dotted overrides (relative to cwd)."""
    raw = dict(base or {})
    source = "overrides"
    if path is not None:
        path = Path(path)
        raw = merge(raw, resolve_paths(read_yaml(path), path.resolve().parent))
        source = str(path)
    raw = apply_overrides(raw, parse_overrides(list(overrides)))
    return validate(raw, source)


def dump(cfg: Config) -> str:
    """The fully resolved config as YAML."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
