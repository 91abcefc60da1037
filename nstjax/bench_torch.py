"""The PyTorch side of `nstjax bench --compare-torch`: the same VGG16 prefix and loss in
PyTorch eager, float32 (TF32 on CUDA when timing), timed and solved with torch.optim.LBFGS."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from nstjax import losses, vgg16
from nstjax.errors import UserError


def _now() -> float:
    return time.perf_counter()


def _per(seconds: float, iterations: int, evals: int) -> dict:
    """ms per evaluation and per iteration, evaluations per iteration, of one solve."""
    return {"ms_per_eval": round(1e3 * seconds / max(evals, 1), 4),
            "ms_per_iteration": round(1e3 * seconds / max(iterations, 1), 4),
            "evals_per_iteration": round(evals / max(iterations, 1), 3)}


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise UserError("--compare-torch needs PyTorch, which is not installed: "
                        "pip install torch (or drop --compare-torch)") from None
    return torch


class TorchCase:
    """The same VGG16 prefix and loss in PyTorch eager, float32, on CUDA if there is one."""

    def __init__(self, pb: Any, spec: losses.Spec, threads: int, layout: str) -> None:
        """`pb`: a `bench.Inputs` (params, content, style, x0 and `weights(spec)`)."""
        torch = self.torch = _import_torch()
        if threads > 0:
            torch.set_num_threads(threads)
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.backends.cudnn.benchmark = True
        self.spec, self.layout = spec, layout
        self.fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        last = max(vgg16.NAMES.index(n) for n in spec.layers)
        self.names = vgg16.NAMES[: last + 1]
        self.w = {n: (self._t(pb.params[n]["kernel"].transpose(3, 2, 0, 1)),
                      torch.from_numpy(np.asarray(pb.params[n]["bias"])).to(self.dev))
                  for n in self.names}
        lw = pb.weights(spec)
        self.lw = jax.tree.map(float, lw)
        with torch.no_grad():
            fc = self.features(self._img(pb.content))
            fs = self.features(self._img(pb.style))
            self.P = {n: fc[n] for n in spec.content_layers}
            self.A = {n: self.gram(fs[n]) for n in spec.style_layers}
        self.x0 = self._img(pb.x0)
        self.x = self.x0.clone().requires_grad_(True)
        self.times: list[float] = []

    def _t(self, a: np.ndarray) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(self.dev)
        return t.contiguous(memory_format=self.fmt) if t.ndim == 4 else t

    def _img(self, nhwc: np.ndarray) -> Any:
        return self._t(np.asarray(nhwc).transpose(0, 3, 1, 2))

    def tf32(self, on: bool) -> None:
        self.torch.backends.cudnn.allow_tf32 = on
        self.torch.backends.cuda.matmul.allow_tf32 = on

    def features(self, x: Any) -> dict:
        F = self.torch.nn.functional
        wanted, out, h = set(self.spec.layers), {}, x
        for i, n in enumerate(self.names):
            if i and vgg16.block(n) != vgg16.block(self.names[i - 1]):
                h = F.avg_pool2d(h, 2) if self.spec.pooling == "avg" else F.max_pool2d(h, 2)
            h = F.relu(F.conv2d(h, self.w[n][0], self.w[n][1], padding=1))
            if n in wanted:
                out[n] = h
        return out

    def gram(self, f: Any) -> Any:
        n, c, h, w = f.shape
        flat = f.reshape(n, c, h * w)
        g = flat @ flat.transpose(1, 2)
        return g / (h * w * c) if self.spec.normalization == "seed" else g

    def loss(self, x: Any) -> Any:
        """losses.loss_terms(...)['total'], NCHW."""
        f, lw, seed = self.features(x), self.lw, self.spec.normalization == "seed"
        content = 0.0
        for n in self.spec.content_layers:
            _, c, h, w = f[n].shape
            d2 = (f[n] - self.P[n]) ** 2
            term = d2.mean(1).sum() / (h * w * c) if seed else 0.5 * d2.sum()
            content = content + lw["content"][n] * term
        style = 0.0
        for n in self.spec.style_layers:
            _, c, h, w = f[n].shape
            d2 = (self.gram(f[n]) - self.A[n]) ** 2
            term = d2.mean(-1).sum() if seed else d2.sum() / (4.0 * c**2 * (h * w) ** 2)
            style = style + lw["style"][n] * term
        if seed:
            _, c, h, w = f[self.spec.style_layers[0]].shape
            style = style / (h * w * c)
        h, w = x.shape[2:]
        tv = (((x[:, :, 1:] - x[:, :, :-1]) ** 2).sum()
              + ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).sum()) / (h * w)
        return style + content / lw["ratio"] + lw["tv"] * tv

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def value_and_grad(self) -> tuple[float, np.ndarray]:
        self.x.grad = None
        v = self.loss(self.x)
        v.backward()
        self.sync()
        return v.item(), self.x.grad.detach().permute(0, 2, 3, 1).cpu().numpy()

    def call(self) -> float:
        t = _now()
        self.x.grad = None
        self.loss(self.x).backward()
        self.sync()
        return _now() - t

    def solve(self, iters: int) -> dict:
        """`iters` iterations of torch.optim.LBFGS (strong Wolfe line search, history 10).

        The first step has unit length, as in `solvers` (jaxopt's gamma = 1/|g|): PyTorch's own
        first step, min(1, 1/|g|_1) * lr along -g, changes the post's loss (~1, gradients ~1e-4)
        by less than float32 resolves, and the line search then stops without progress.
        """
        torch = self.torch
        # L-BFGS views the gradient flat: the image must be in the default (NCHW) format.
        x = self.x0.contiguous().clone().requires_grad_(True)
        evals = 0

        def closure() -> Any:
            nonlocal evals
            evals += 1
            opt.zero_grad()
            v = self.loss(x)
            v.backward()
            return v

        with torch.no_grad():
            initial = float(self.loss(x))
        self.sync()
        t = _now()
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1, max_eval=25, tolerance_grad=0.0,
                                tolerance_change=0.0, history_size=10,
                                line_search_fn="strong_wolfe")
        closure()
        g = x.grad.detach()
        g1, g2 = float(g.abs().sum()), float(g.norm())
        opt.param_groups[0]["lr"] = 1.0 / (g2 * min(1.0, 1.0 / g1)) if g2 > 0 else 1.0
        opt.step(closure)  # iteration 1: step length 1
        if iters > 1:  # the rest continue from the same state, with PyTorch's own steps
            opt.param_groups[0].update(lr=1.0, max_iter=iters - 1, max_eval=25 * iters)
            opt.step(closure)
        self.sync()
        secs = _now() - t
        with torch.no_grad():
            final = float(self.loss(x))
        it = int(opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0))
        return {"solver": "torch.optim.LBFGS", "iterations": it, "evaluations": evals,
                "solve_seconds": round(secs, 4), **_per(secs, it, evals),
                "initial_loss": initial, "final_loss": final}

    def peak_memory_bytes(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.dev.type == "cuda" else None


def _rel(a: np.ndarray | float, b: np.ndarray | float) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
