"""Fused, twice-differentiable kernels for the training step.

Training differentiates the loss of forces, which are themselves gradients, so every op runs forward,
backward and backward-of-backward. Autograd expands a chain like ``silu(a·r)·(b·r)`` into dozens of
separate memory-bound passes over edge-sized tensors, and ``torch.compile`` cannot differentiate twice.
Here each chain is one `torch.autograd.Function` whose backward is a second Function. Their bodies are
the forward's vector-Jacobian product and the vjp of that, taken with `torch.func.vjp` inside the function
that ``torch.compile(dynamic=True)`` compiles, so every level is one graph that inductor fuses (batch
sizes change every step, the kernels do not).

The model asks for these kernels in training mode (``fused=True``); they run while `available` is true.
Evaluation keeps plain ops, which `matris.deploy` traces, and so does training with ``MATRIS_COMPILE=0`` or
after compiling has failed (no C++ compiler, an unsupported backend; one warning), since uncompiled the
derived derivatives are no faster than autograd's. A third derivative is not supported. On x86-64 CPUs
with AVX2, `sink_messages` runs as the C++ op of `matris.cpu_kernels` instead, compiling or not.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from matris import cpu_kernels

Kernel = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


class _Compiled:
    """``kernel`` compiled on first call, or run eagerly if compiling is off or has failed."""

    enabled = False  # set by `select_kernels` ("auto" at import)

    def __init__(self, kernel: Kernel, rows_only: bool = False):
        self.kernel, self.rows_only = kernel, rows_only
        self.compiled: Kernel | None = None  # made on first use: importing dynamo costs ~1 s per process

    def _detached(self, arg: torch.Tensor) -> torch.Tensor:
        """``arg`` detached: inputs inside an autograd.Function may or may not require grad, and dynamo
        would compile once for each pattern. With ``rows_only``, its dimensions after the first are
        compiled as constants."""
        arg = arg.detach()
        if self.rows_only:
            for dim in range(1, arg.dim()):
                torch._dynamo.mark_static(arg, dim)
        return arg

    def __call__(self, *args: torch.Tensor):
        # under a Python dispatch mode (janus's FLOP meter, FlopCounterMode) dynamo does not compile: run
        # eagerly for that step rather than count it as a failure
        if _Compiled.enabled and _get_current_dispatch_mode() is None:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.kernel, dynamic=True, fullgraph=True)
                return self.compiled(*(self._detached(arg) for arg in args))
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                # one kernel met with more shapes (rows_only: widths) than dynamo compiles for: only it
                # runs uncompiled, the others keep their graphs
                self.compiled = self.kernel
                warnings.warn(
                    f"matris.fused: {self.kernel.__name__} has been compiled for as many input shapes as "
                    "torch._dynamo.config.recompile_limit allows; it runs uncompiled from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return self.kernel(*args)
            except Exception as error:
                _Compiled.enabled = False
                warnings.warn(
                    f"matris.fused: torch.compile failed ({type(error).__name__}: {error}); "
                    "training with plain ops from now on (set MATRIS_COMPILE=0 to skip compiling)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.kernel(*args)


KERNEL_MODES = ("auto", "plain", "compiled", "cpu")


def select_kernels(mode: str) -> None:
    """How the model's fused ops run in this process: ``plain`` torch ops; ``compiled`` kernels;
    ``cpu``, the C++ ops of `matris.cpu_kernels` where they apply and plain ops elsewhere (no compile
    time); ``auto``, the C++ ops where they apply and compiled kernels elsewhere, each unless its
    environment variable (``MATRIS_CPU_KERNELS=0``, ``MATRIS_COMPILE=0``) turns it off."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode {mode!r}; choose one of {', '.join(KERNEL_MODES)}")
    compiled = {"plain": False, "compiled": True, "cpu": False}
    native = {"plain": False, "compiled": False, "cpu": True}
    _Compiled.enabled = compiled.get(mode, os.environ.get("MATRIS_COMPILE", "1") != "0")
    cpu_kernels.enable(native.get(mode, os.environ.get("MATRIS_CPU_KERNELS", "1") != "0"))


def available() -> bool:
    """Whether the compiled kernels are on: ``MATRIS_COMPILE`` is not 0 and no compile has failed."""
    return _Compiled.enabled


def _renamed(function: types.FunctionType, name: str) -> types.FunctionType:
    """``function`` with a code object of its own named ``name``: dynamo keeps its compiled graphs, and
    its limit of eight recompiles, per code object, which closures made by one factory would share."""
    code = function.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


def twice_differentiable(forward: Kernel, rows_only: bool = False):
    """An op from a pure function ``forward(*inputs) -> tensor`` whose backward and backward-of-backward
    are derived by `torch.func.vjp` and compiled like the forward: each level is one compiled graph.
    ``rows_only``: only the first dimension of the inputs changes between calls (edges, atoms), the others
    are compiled as constants, which lets inductor index slices of a row at fixed offsets.

    Backward recomputes what it needs from the inputs instead of saving intermediates: elementwise work
    is cheaper than the memory traffic of storing it.
    """

    def backward(grad: torch.Tensor, *inputs: torch.Tensor):
        return torch.func.vjp(forward, *inputs)[1](grad)

    def double_backward(*cotangents_grad_and_inputs: torch.Tensor):
        n = len(cotangents_grad_and_inputs) // 2  # n cotangents, one per input; the grad; n inputs
        cotangents, grad_and_inputs = cotangents_grad_and_inputs[:n], cotangents_grad_and_inputs[n:]
        return torch.func.vjp(backward, *grad_and_inputs)[1](cotangents)

    compiled_forward, compiled_backward, compiled_double_backward = (
        _Compiled(_renamed(forward, forward.__name__), rows_only),
        _Compiled(_renamed(backward, f"{forward.__name__}_backward"), rows_only),
        _Compiled(_renamed(double_backward, f"{forward.__name__}_double_backward"), rows_only),
    )

    class Backward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *grad_and_inputs):
            ctx.save_for_backward(*grad_and_inputs)
            return compiled_backward(*grad_and_inputs)

        @staticmethod
        @once_differentiable
        def backward(ctx, *cotangents):
            return compiled_double_backward(*cotangents, *ctx.saved_tensors)

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            return compiled_forward(*inputs)

        @staticmethod
        def backward(ctx, grad):
            return Backward.apply(grad, *ctx.saved_tensors)

    return Op.apply


def _swiglu_forward(
    h: torch.Tensor, x: torch.Tensor, rest_square: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    width = x.shape[-1] * 3  # the row [atom_i | atom_j | x]
    r = ((rest_square + x.square().sum(-1)) / width + eps).rsqrt().unsqueeze(-1)
    hg, hv = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(hg * r) * (hv * r)


_scaled_swiglu = twice_differentiable(_swiglu_forward, rows_only=True)


def scaled_swiglu(
    h: torch.Tensor, x: torch.Tensor, rest_square: torch.Tensor, eps: float, fused: bool = True
) -> torch.Tensor:
    """``silu(h_g · r) · (h_v · r)`` for ``h = [h_g | h_v]`` (rows, 2H), with ``r`` the inverse RMS of the
    row ``[atom_i | atom_j | x]`` (3 equal widths), of which ``x`` (rows, d) is given and the two other
    thirds only by their summed squares ``rest_square`` (rows,): the bond MLP's activation after an
    RMSNorm folded into its first matmul. The row's squares are summed inside the kernel, so no
    edge-sized square and its derivatives pass through memory. ``fused=False``: plain ops."""
    args = (h, x, rest_square, h.new_full((), eps))
    return _scaled_swiglu(*args) if fused and available() else _swiglu_forward(*args)


def _rms_norm_forward(x: torch.Tensor, w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * w


_rms_norm = twice_differentiable(_rms_norm_forward)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = True) -> torch.Tensor:
    """``x / rms(x) · weight`` over the last dimension; ``fused=False``: `torch.nn.functional.rms_norm`."""
    if fused and available():
        return _rms_norm(x, weight, x.new_full((), eps))
    return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)


def capped_weights(scores: torch.Tensor, envelope: torch.Tensor, cap: float) -> torch.Tensor:
    """``envelope · exp(cap · tanh(score / cap))``: attention weights that cannot overflow and vanish
    with the envelope at the cutoff."""
    return envelope * torch.exp(cap * torch.tanh(scores / cap))


@functools.cache
def _sink_messages(cap: float) -> tuple[Kernel, Kernel]:
    """The plain and the fused form of an attention sum's per-edge terms for one score cap."""

    def sink_messages(q, kv, envelope):
        width = q.shape[1] * q.shape[2]
        k, v = kv[:, :width].view(q.shape), kv[:, width:].view(q.shape)
        w = capped_weights((q * k).sum(-1, keepdim=True), envelope[:, None, None], cap)
        return w * torch.nn.functional.pad(v, (0, 1), value=1.0)  # [w v | w]

    return sink_messages, twice_differentiable(sink_messages, rows_only=True)


def sink_messages(
    q: torch.Tensor, kv: torch.Tensor, envelope: torch.Tensor, cap: float, fused: bool = True
) -> torch.Tensor:
    """Per edge and head, ``[w v | w]`` (edges, h, c + 1) with ``w = envelope · exp(cap · tanh(q·k / cap))``:
    what an attention sum scatters to its receiving nodes, numerator and normaliser in one tensor.
    ``q`` (edges, h, c), keys and values side by side as ``kv`` (edges, 2 h c), ``envelope`` (edges,).
    Keys and values come as the one matrix a matmul makes, so that the kernel reads them in place and
    writes their gradient as one tensor: split outside, with the ones channel padded on outside, they
    cost copies and a stack of their two gradients at every derivative level. ``fused`` (training): the
    C++ op of `matris.cpu_kernels` where it applies, else the compiled kernel."""
    plain, op = _sink_messages(cap)
    if fused and cpu_kernels.sink_applies(q):
        return cpu_kernels.sink_messages(q, kv, envelope, cap)
    return op(q, kv, envelope) if fused and available() else plain(q, kv, envelope)


@functools.cache
def _line_weights(cap: float) -> tuple[Kernel, Kernel]:
    """The plain and the fused form of line attention's weights for one score cap."""

    def line_weights(qk, qa, envelope, angle):
        angular = (qa.unsqueeze(-1) * angle.unsqueeze(2)).sum(3)  # Σ_l qa_ahl θ_abl: an 8-long contraction
        w = capped_weights(qk + angular.transpose(1, 2), envelope, cap)
        alpha = w / (1 + w.sum(-1, keepdim=True))
        return alpha.unsqueeze(3) * angle.unsqueeze(1)

    return line_weights, twice_differentiable(line_weights)


def line_attention_weights(
    qk: torch.Tensor,
    qa: torch.Tensor,
    envelope: torch.Tensor,
    angle: torch.Tensor,
    cap: float,
    fused: bool = True,
) -> torch.Tensor:
    """Line attention's weights times the angle basis, (g, h, m, L + 1, m), for one bucket of blocks:
    ``α_ab θ_ab,l`` with α the sink softmax over b of the scores ``qk`` (g, h, m, m) plus the angular
    scores Σ_l ``qa``_ahl θ_ab,l (``qa`` (g, m, h, L + 1)), switched off by ``envelope`` (g, 1, m, m);
    ``angle`` (g, m, L + 1, m). The angular scores are formed here, not as a batched matmul of (h, L + 1)
    by (L + 1, m) matrices, which a CPU runs one small matrix at a time: line attention alone (three
    derivative levels) took 13 % less time compiled and 10 % less with plain ops."""
    plain, op = _line_weights(cap)
    return op(qk, qa, envelope, angle) if fused and available() else plain(qk, qa, envelope, angle)


select_kernels("auto")
