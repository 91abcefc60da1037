"""Run configuration: a typed schema, YAML loading, dotted overrides, one-line errors."""

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nstjax import solvers
from nstjax.errors import UserError
from nstjax.weights import VGG16_CONVS

LAYERS = tuple(name for name, _, _ in VGG16_CONVS)
WEIGHT_NAMES = ("imagenet", "hed", "random")
INITS = ("noise", "content", "style")
POST_STYLE_LAYERS = [f"block{i}_conv2" for i in range(1, 6)]
POST_STYLE_WEIGHTS = [0.05, 0.2, 0.2, 0.25, 0.3]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ImageCfg(_Strict):
    size: int | list[int | None] = Field(
        default=256, description="[W, H] (one may be null to keep aspect) or the longer side")
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bicubic"
    max_pixels: int = Field(default=40_000_000, gt=0)

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if isinstance(v, int):
            if v < 16:
                raise ValueError("must be at least 16 pixels")
            return v
        if len(v) != 2 or all(s is None for s in v):
            raise ValueError("must be [W, H] (one of them may be null) or one number")
        if any(s is not None and s < 16 for s in v):
            raise ValueError("each side must be at least 16 pixels")
        return v


class ModelCfg(_Strict):
    weights: str = "hed"
    pooling: Literal["avg", "max"] = "avg"
    precision: Literal["highest", "default", "bfloat16"] = "default"
    remat: bool = False


class LossCfg(_Strict):
    normalization: Literal["seed", "gatys"] = "seed"
    content_layers: list[str] = Field(default_factory=lambda: ["block4_conv2"], min_length=1)
    content_weights: list[float] | None = None
    style_layers: list[str] = Field(default_factory=lambda: list(POST_STYLE_LAYERS), min_length=1)
    style_weights: list[float] = Field(default_factory=lambda: list(POST_STYLE_WEIGHTS))
    style_to_content_ratio: float = Field(default=15.0, gt=0)
    tv_weight: float = Field(default=0.0, ge=0)

    @field_validator("content_layers", "style_layers")
    @classmethod
    def _layers(cls, v):
        for n in v:
            if n not in LAYERS:
                near = difflib.get_close_matches(n, LAYERS, 1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise ValueError(
                    f"{n!r} is not a VGG16 conv layer{hint}; valid: {', '.join(LAYERS)}")
        if len(set(v)) != len(v):
            raise ValueError("lists a layer twice")
        return v

    @field_validator("style_weights", "content_weights")
    @classmethod
    def _weights(cls, v):
        if v is not None and any(w < 0 for w in v):
            raise ValueError("weights must be >= 0")
        return v

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
    name: Literal[solvers.NAMES] = solvers.DEFAULT  # type: ignore[valid-type]
    maxiter: int = Field(default=200, ge=0)
    history_size: int = Field(default=10, ge=1)
    maxls: int = Field(default=20, ge=1)
    tol: float = Field(default=0.0, ge=0)
    learning_rate: float = Field(default=5.0, gt=0)
    rounds: int = Field(default=10, ge=1)
    maxfun: int = Field(default=20, ge=1)
    pgtol: float = Field(default=0.0, ge=0)
    factr: float = Field(default=0.0, ge=0)

    def settings(self) -> solvers.Settings:
        return solvers.Settings(**self.model_dump())


class OutputCfg(_Strict):
    save_every: int = Field(default=0, ge=0)
    bits: Literal[8, 16] = 8
    format: Literal["png", "jpg"] = "png"

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
        default=None, description="one mask image per style image; white = that style's region")
    content: str | None = Field(
        default=None, description="white = stylize, black = keep the content's pixels")


class MultiscaleCfg(_Strict):
    sizes: list[int] | None = Field(
        default=None, description="longer sides of the coarser scales, ascending; "
        "the last scale is always image.size")
    factor: float | None = Field(default=None, gt=1, description="size ratio between scales")
    steps: int | None = Field(default=None, ge=1, description="number of scales, final included")
    maxiter: int | list[int] | None = Field(
        default=None, description="iterations per scale (one number or one per scale); "
        "null splits solver.maxiter (solver.rounds for scipy_lbfgsb) evenly")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v):
        if v is not None:
            if not v:
                raise ValueError("give at least one size, or null for a single scale")
            if any(s < 1 for s in v):
                raise ValueError("sizes must be positive")
            if any(b <= a for a, b in zip(v, v[1:])):
                raise ValueError("sizes must be strictly ascending")
        return v

    @field_validator("maxiter")
    @classmethod
    def _maxiter(cls, v):
        if v is not None and any(n < 0 for n in (v if isinstance(v, list) else [v])):
            raise ValueError("iterations must be >= 0")
        return v

    @model_validator(mode="after")
    def _one_way(self):
        if self.sizes is not None and (self.factor is not None or self.steps is not None):
            raise ValueError("give either sizes or factor and steps, not both")
        if (self.factor is None) != (self.steps is None):
            raise ValueError("factor and steps go together (e.g. factor: 2, steps: 3)")
        n = self.count
        if isinstance(self.maxiter, list) and n and len(self.maxiter) != n:
            raise ValueError(f"maxiter has {len(self.maxiter)} values for {n} scales: "
                             "give one per scale (the final one included) or one number")
        return self

    @property
    def count(self) -> int:
        """Number of scales, the final one included (0 when multi-scale is off)."""
        if self.sizes is not None:
            return len(self.sizes) + 1
        return self.steps if self.steps and self.steps > 1 else 0


class Config(_Strict):
    content: str
    style: str | list[str]
    style_blend: list[float] | None = Field(
        default=None, description="weight of each style's Grams in the target (normalized)")
    style_scale: float = Field(
        default=1.0, gt=0, description="style image size relative to the content's")
    init: str = "noise"
    seed: int = 0
    image: ImageCfg = Field(default_factory=ImageCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    loss: LossCfg = Field(default_factory=LossCfg)
    solver: SolverCfg = Field(default_factory=SolverCfg)
    output: OutputCfg = Field(default_factory=OutputCfg)
    color: ColorCfg = Field(default_factory=ColorCfg)
    masks: MasksCfg = Field(default_factory=MasksCfg)
    multiscale: MultiscaleCfg = Field(default_factory=MultiscaleCfg)

    @field_validator("style")
    @classmethod
    def _style(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one style image")
        return v

    @model_validator(mode="after")
    def _controls(self):
        n = len(self.styles)
        b = self.style_blend
        if b is not None:
            if len(b) != n:
                raise ValueError(f"style_blend has {len(b)} values but style lists {n} "
                                 "image(s): give one weight per style image")
            if any(w < 0 for w in b) or sum(b) <= 0:
                raise ValueError("style_blend: weights must be >= 0 and not all 0")
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


def _is_path_value(key: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    if key == "init":
        return value not in INITS
    if key == "model.weights":
        return value not in WEIGHT_NAMES
    return key in ("content", "style", "masks.style", "masks.content")


def _resolve(key: str, value: Any, base: Path) -> Any:
    if isinstance(value, list) and key in ("content", "style", "masks.style"):
        return [_resolve(key, v, base) for v in value]
    if _is_path_value(key, value):
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())
    return value


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = d.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise UserError(f"override {dotted}: {part} is not a section")
        d = nxt
    d[parts[-1]] = value


PATH_KEYS = ("content", "style", "init", "model.weights", "masks.style", "masks.content")


def resolve_paths(raw: dict, base: Path) -> dict:
    """Make the path values of a raw config absolute, relative to `base`."""
    for key in PATH_KEYS:
        v = _get(raw, key)
        if v is not None:
            _set(raw, key, _resolve(key, v, base))
    return raw


def parse_overrides(items: list[str], base: Path | None = None) -> dict:
    """`a.b=value` strings (values parsed as YAML) into a nested dict; paths relative to `base`."""
    out: dict = {}
    base = base or Path.cwd()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p.isidentifier() for p in key.split(".")):
            raise UserError(f"bad override {item!r}: write key=value, e.g. solver.maxiter=50")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise UserError(f"override {key}: value {text!r} is not valid YAML") from None
        _set(out, key, _resolve(key, value, base))
    return out


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge `extra` into a copy of `base`."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file (safe loader), with the line of any syntax error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: YAML error{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read config: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of keys to values")
    return raw


def _fields_at(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        f = getattr(model, "model_fields", {}).get(part)
        if f is None:
            return []
        model = f.annotation
    return list(getattr(model, "model_fields", {}))


def _message(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = tuple(str(p) for p in e["loc"] if not isinstance(p, int))
    key = ".".join(loc) or "config"
    if e["type"] == "extra_forbidden":
        near = difflib.get_close_matches(loc[-1], _fields_at(loc), 1)
        prefix = ".".join(loc[:-1])
        hint = f" (did you mean {prefix + '.' if prefix else ''}{near[0]}?)" if near else ""
        return f"{source}: unknown key {key}{hint}"
    if e["type"] == "missing":
        return f"{source}: missing key {key}: set it in the config or as {key}=..."
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) and value is not None else ""
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


def validate(raw: dict, source: str = "config") -> Config:
    """A Config from a raw dict, or a one-line UserError naming the key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(_message(err, source)) from None


def load(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Config from a YAML file (paths relative to it) plus dotted overrides (relative to cwd)."""
    raw = dict(base or {})
    source = "overrides"
    if path is not None:
        path = Path(path)
        raw = merge(raw, resolve_paths(read_yaml(path), path.resolve().parent))
        source = str(path)
    raw = merge(raw, parse_overrides(list(overrides)))
    return validate(raw, source)


def dump(cfg: Config) -> str:
    """The fully resolved config as YAML."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
