"""A metric plugin: how saturated the result's colours are against the style's.

Selected with `eval.metrics: [..., saturation_gap]` and imported with `eval.plugins:
[saturation_metric.py]` (relative to the config), e.g.
    nstjax run configs/quickstart.yaml eval.plugins=[configs/plugins/saturation_metric.py] \\
        "eval.metrics=[structure, saturation_gap]"
run.json's `metrics` then hold `saturation_gap` (a sweep's summary.csv `metric.saturation_gap`).
"""

import numpy as np

from nstjax import metrics


def saturation(img) -> float:
    """Mean HSV saturation, 0..1, of a preprocessed (1,H,W,3) image."""
    rgb = metrics.rgb(img)
    hi, lo = rgb.max(-1), rgb.min(-1)
    return float(np.mean(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0)))


def saturation_gap(inp: metrics.Inputs) -> float:
    return abs(saturation(inp.x) - saturation(inp.style))


metrics.register("saturation_gap", saturation_gap, better="lower", replace=True,
                 description="|mean HSV saturation of the result - the style's|")
