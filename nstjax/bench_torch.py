"""The PyTorch side of `nstjax bench --compare-torch`: the same VGG16 prefix and loss in
PyTorch eager, float32 (TF32 on CUDA when timing), timed and solved with torch.optim.LBFGS."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from nstjax import losses, vgg16


def _now() -> float:
    return time.perf_counter()


def _per(seconds: float, iterations: int, evals: int) -> dict:
    """ms per evaluation and per iteration, evaluations per iteration, of one solve."""
    return {"ms_per_eval": round(1e3 * seconds / max(evals, 1), 4),
            "ms_per_iteration": round(1e3 * seconds / max(iterations, 1), 4),
            "evals_per_iteration": round(evals / max(iterations, 1), 3)}


def _import_torch() -> Any:
    from nstjax.runtime import optional

    return optional("torch", "--compare-torch", "pip install torch (or drop --compare-torch)",
                    "PyTorch")


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
        """`iters` iterations of torch.optim.LBFGS (see `lbfgs`), as a bench row."""
        r = lbfgs(self, iters)
        return {"solver": "torch.optim.LBFGS", "iterations": r["iterations"],
                "evaluations": r["evaluations"], "solve_seconds": round(r["solve_seconds"], 4),
                **_per(r["solve_seconds"], r["iterations"], r["evaluations"]),
                "initial_loss": r["initial_loss"], "final_loss": r["final_loss"]}

    def peak_memory_bytes(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.dev.type == "cuda" else None


def _rel(a: np.ndarray | float, b: np.ndarray | float) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def scipy_lbfgsb(tc: Any, iters: int, m: int = 10) -> dict:
    """`iters` iterations of scipy's L-BFGS-B over PyTorch eager value+gradient."""
    from scipy.optimize import fmin_l_bfgs_b

    torch = tc.torch
    shape = tuple(tc.x0.shape)
    evals, trace = 0, []
    last = {}

    def f(z: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal evals
        evals += 1
        x = torch.from_numpy(z.reshape(shape).astype(np.float32))
        x = x.contiguous(memory_format=tc.fmt).requires_grad_(True)
        v = tc.loss(x)
        v.backward()
        last["f"] = float(v.detach())
        return last["f"], x.grad.detach().numpy().astype(np.float64).ravel()

    t0 = time.perf_counter()

    def cb(_xk: np.ndarray) -> None:  # the iterate's loss is the last evaluation's
        trace.append((len(trace) + 1, time.perf_counter() - t0, last["f"], evals))

    x0 = tc.x0.detach().cpu().numpy().astype(np.float64).ravel()
    f0 = f(x0)[0]
    evals = 0
    t0 = time.perf_counter()
    fmin_l_bfgs_b(f, x0, m=m, maxiter=iters, maxfun=100 * iters, pgtol=0.0, factr=0.0,
                  callback=cb)
    secs = time.perf_counter() - t0
    return {"solver": "pytorch+scipy_lbfgsb", "iterations": len(trace), "evaluations": evals,
            "compile_seconds": 0.0, "solve_seconds": secs, "initial_loss": f0,
            "final_loss": trace[-1][2] if trace else f0, "trace": trace}


def lbfgs(tc: Any, iters: int) -> dict:
    """`iters` iterations of torch.optim.LBFGS (strong Wolfe, history 10), one `step` each.

    The first step has unit length, as in nstjax's solvers: PyTorch's own first step,
    min(1, 1/|g|_1) * lr along -g, changes the post's loss (~1e-4, gradients ~1e-8) by less than
    float32 resolves, and the line search then stops without progress. No gradient or change
    tolerances (its defaults stop at once on this loss). The trace's losses are evaluated
    outside the timed region.
    """
    torch = tc.torch
    x = tc.x0.contiguous().clone().requires_grad_(True)
    evals, trace = 0, []

    def closure() -> Any:
        nonlocal evals
        evals += 1
        opt.zero_grad()
        v = tc.loss(x)
        v.backward()
        return v

    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1, max_eval=25, tolerance_grad=0.0,
                            tolerance_change=0.0, history_size=10, line_search_fn="strong_wolfe")
    with torch.no_grad():
        f0 = float(tc.loss(x))
    spent = 0.0
    for i in range(iters):
        t = time.perf_counter()
        if i == 0:  # unit-length first step: PyTorch's own min(1, 1/|g|_1) does not move here
            closure()
            g = x.grad.detach()
            g1, g2 = float(g.abs().sum()), float(g.norm())
            opt.param_groups[0]["lr"] = 1.0 / (g2 * min(1.0, 1.0 / g1)) if g2 > 0 else 1.0
        opt.step(closure)
        if i == 0:
            opt.param_groups[0]["lr"] = 1.0
        spent += time.perf_counter() - t
        with torch.no_grad():  # not timed
            trace.append((i + 1, spent, float(tc.loss(x)), evals))
    return {"solver": "pytorch+torch.optim.LBFGS", "iterations": iters, "evaluations": evals,
            "compile_seconds": 0.0, "solve_seconds": spent, "initial_loss": f0,
            "final_loss": trace[-1][2] if trace else f0, "trace": trace}
