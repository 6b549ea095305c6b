"""Fused, twice-differentiable elementwise kernels for the training step.

Training differentiates the loss of forces, which are themselves gradients, so every op runs forward,
backward and backward-of-backward. Autograd expands a chain like ``silu(a·r)·(b·r)`` into dozens of
separate memory-bound passes over edge-sized tensors, and ``torch.compile`` cannot differentiate twice.
Here each chain is one `torch.autograd.Function` whose backward is a second Function, with both
derivatives written out by hand, so that every level is a pure elementwise function that inductor fuses
into one loop (``torch.compile(dynamic=True)``: batch sizes change every step, the kernel does not).

The model asks for these kernels in training mode (``fused=True``); they run while `available` is true.
Evaluation keeps plain ops, which `matris.deploy` traces, and so does training with ``MATRIS_COMPILE=0`` or
after compiling has failed (no C++ compiler, an unsupported backend; one warning), since uncompiled the
hand-written derivatives are no faster than autograd's. A third derivative is not supported.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

Kernel = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


class _Compiled:
    """``kernel`` compiled on first call, or run eagerly if compiling is off or has failed."""

    enabled = os.environ.get("MATRIS_COMPILE", "1") != "0"

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.compiled: Kernel | None = None  # made on first use: importing dynamo costs ~1 s per process

    def __call__(self, *args: torch.Tensor):
        # under a Python dispatch mode (janus's FLOP meter, FlopCounterMode) dynamo does not compile: run
        # eagerly for that step rather than count it as a failure
        if _Compiled.enabled and _get_current_dispatch_mode() is None:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.kernel, dynamic=True, fullgraph=True)
                return self.compiled(*args)
            except Exception as error:
                _Compiled.enabled = False
                warnings.warn(
                    f"matris.fused: torch.compile failed ({type(error).__name__}: {error}); "
                    "training with plain ops from now on (set MATRIS_COMPILE=0 to skip compiling)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.kernel(*args)


def available() -> bool:
    """Whether the compiled kernels are on: ``MATRIS_COMPILE`` is not 0 and no compile has failed."""
    return _Compiled.enabled


def twice_differentiable(forward: Kernel, backward: Kernel, double_backward: Kernel):
    """An op from three pure functions: ``forward(*inputs)``, ``backward(*grads, *inputs)`` returning one
    gradient per input, and ``double_backward(*cotangents, *grads, *inputs)`` returning the gradients of
    ``backward``'s inputs given cotangents of its outputs."""

    class Backward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *grads_and_inputs):
            ctx.save_for_backward(*grads_and_inputs)
            return backward(*grads_and_inputs)

        @staticmethod
        @once_differentiable
        def backward(ctx, *cotangents):
            return double_backward(*cotangents, *ctx.saved_tensors)

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            return forward(*inputs)

        @staticmethod
        def backward(ctx, *grads):
            return Backward.apply(*grads, *ctx.saved_tensors)

    return Op.apply


def _silu_derivatives(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """silu(a) = a σ(a), its first and its second derivative."""
    s = torch.sigmoid(a)
    return a * s, s * (1 + a * (1 - s)), s * (1 - s) * (2 + a * (1 - 2 * s))


def _swiglu_forward(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    hg, hv = h.chunk(2, dim=-1)
    r = r.unsqueeze(-1)
    return torch.nn.functional.silu(hg * r) * (hv * r)


def _swiglu_backward(gu: torch.Tensor, h: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hg, hv = h.chunk(2, dim=-1)
    r1 = r.unsqueeze(-1)
    a, b = hg * r1, hv * r1
    s, ds, _ = _silu_derivatives(a)
    ga, gb = gu * b * ds, gu * s
    return torch.cat([ga * r1, gb * r1], dim=-1), (ga * hg + gb * hv).sum(-1)


def _swiglu_double_backward(
    p: torch.Tensor, rho: torch.Tensor, gu: torch.Tensor, h: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """With P = (P_g, P_v) the cotangent of ∂h and ρ that of ∂r, the loss term is
    L = gu (S'(a) b X + S(a) Y), X = P_g r + ρ h_g, Y = P_v r + ρ h_v, a = h_g r, b = h_v r."""
    hg, hv = h.chunk(2, dim=-1)
    pg, pv = p.chunk(2, dim=-1)
    r1, rho = r.unsqueeze(-1), rho.unsqueeze(-1)
    a, b = hg * r1, hv * r1
    s, ds, dds = _silu_derivatives(a)
    x, y = pg * r1 + rho * hg, pv * r1 + rho * hv
    g_gu = ds * b * x + s * y
    g_hg = gu * (dds * r1 * b * x + ds * (b * rho + r1 * y))
    g_hv = gu * (ds * r1 * x + s * rho)
    g_r = (gu * (dds * hg * b * x + ds * (hv * x + b * pg + hg * y) + s * pv)).sum(-1)
    return g_gu, torch.cat([g_hg, g_hv], dim=-1), g_r


_scaled_swiglu = twice_differentiable(
    _Compiled(_swiglu_forward), _Compiled(_swiglu_backward), _Compiled(_swiglu_double_backward)
)


def scaled_swiglu(h: torch.Tensor, r: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """``silu(h_g · r) · (h_v · r)`` for ``h = [h_g | h_v]`` (rows, 2H) and a row scale ``r`` (rows,): the
    gated MLP's activation after an RMSNorm folded into its first matmul. ``fused=False``: plain ops."""
    return _scaled_swiglu(h, r) if fused and available() else _swiglu_forward(h, r)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.square().mean(-1, keepdim=True) + eps).rsqrt()


def _rms_norm_forward(x: torch.Tensor, w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return x * _rms(x, eps) * w


def _rms_norm_backward(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: torch.Tensor):
    rho, d = _rms(x, eps), x.shape[-1]
    t = gy * w
    s = (t * x).sum(-1, keepdim=True)
    gx = rho * t - x * (rho**3 * s / d)
    return gx, (gy * x * rho).flatten(0, -2).sum(0), torch.zeros_like(eps)


def _rms_norm_double_backward(
    cx: torch.Tensor, cw: torch.Tensor, ce: torch.Tensor, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
    eps: torch.Tensor,
):
    """Per row, with ρ = rms(x)⁻¹, t = gy·w, s = Σ t x: L = ρ A − ρ³ s B / d + ρ C for A = Σ cx t,
    B = Σ cx x and C = Σ cw gy x (cx, cw: cotangents of ∂x and ∂w)."""
    rho, d = _rms(x, eps), x.shape[-1]
    rho3 = rho**3
    t = gy * w
    s = (t * x).sum(-1, keepdim=True)
    a = (cx * t).sum(-1, keepdim=True)
    b = (cx * x).sum(-1, keepdim=True)
    c = (cw * gy * x).sum(-1, keepdim=True)
    g_gy = rho * (cx * w + cw * x) - rho3 * b * w * x / d
    g_x = rho * cw * gy - rho3 / d * (t * b + s * cx) + x * (rho3 / d) * (3 * rho**2 * s * b / d - a - c)
    g_w = (rho * cx * gy - rho3 * b * gy * x / d).flatten(0, -2).sum(0)
    return g_gy, g_x, g_w, torch.zeros_like(eps)


_rms_norm = twice_differentiable(
    _Compiled(_rms_norm_forward), _Compiled(_rms_norm_backward), _Compiled(_rms_norm_double_backward)
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = True) -> torch.Tensor:
    """``x / rms(x) · weight`` over the last dimension; ``fused=False``: `torch.nn.functional.rms_norm`."""
    if fused and available():
        return _rms_norm(x, weight, x.new_full((), eps))
    return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)

