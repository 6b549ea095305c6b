"""Line attention's bucket as one C++ op on x86-64 CPUs with AVX2: forward, backward and double backward.

The compiled bmm form of `matris.layers.line_attention_bucket` writes the (g, h, m, L + 1, m) weights
through memory at every derivative level and runs the value sums as tiny batched matmuls; this op keeps a
block row's scores and value sums in vector registers instead (``csrc/line_attention.cpp``), and its double
backward is its backward's own code run on dual numbers. On the issue batch one block's buckets take
about 2.5× less time at the three levels of a training step (``benchmarks/bench_line_kernel.py``).

It covers float32 CPU tensors with a multiple of 8 channels per head and 8 angle channels (every preset
but ``tiny``: 16 channels in ``matris-6l``, 48-72 in the MoE presets, 7 Legendre polynomials and the
ones channel), outside a Python dispatch mode, so that FLOP counters see the plain form's matmuls. The
extension is built on first use (about a minute; g++, ninja and glibc's libmvec; cached under
``TORCH_EXTENSIONS_DIR``). Every other case, ``MATRIS_LINE_KERNEL=0``, or a failed build (one warning)
keeps the bmm form (compiled unless ``MATRIS_COMPILE=0``).
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

SOURCE = Path(__file__).with_name("csrc") / "line_attention.cpp"
CHANNEL_BLOCK, ANGLE_WIDTH = 8, 8  # the kernels take heads of a multiple of 8 channels, 8 angle channels


class _State:
    enabled = (
        os.environ.get("MATRIS_LINE_KERNEL", "1") != "0"
        and platform.system() == "Linux"
        and platform.machine() == "x86_64"
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    )


@functools.cache
def _extension() -> ModuleType:
    from torch.utils.cpp_extension import load

    compile_flags, link_flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"], ["-fopenmp", "-lmvec"]
    return load("matris_line_attention", [str(SOURCE)], extra_cflags=compile_flags, extra_ldflags=link_flags)


def applies(q: torch.Tensor, qa: torch.Tensor) -> bool:
    """Whether the op runs for queries ``q`` (g, m, h, c) and angular queries ``qa`` (g, m, h, L + 1)
    (building it on the first call that qualifies)."""
    if not (
        _State.enabled
        and q.dtype == torch.float32
        and q.device.type == "cpu"
        and q.shape[-1] % CHANNEL_BLOCK == 0
        and qa.shape[-1] == ANGLE_WIDTH
        and _get_current_dispatch_mode() is None
    ):
        return False
    try:
        _extension()
    except Exception as error:
        _State.enabled = False
        warnings.warn(
            f"matris.line_kernel: building the line-attention kernel failed "
            f"({type(error).__name__}: {error}); line attention keeps its bmm form "
            "(set MATRIS_LINE_KERNEL=0 to skip the build)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


class _Backward(torch.autograd.Function):
    """The op's backward: the seven input gradients from the cotangent G; its own backward is the kernel's
    double backward (no third derivative)."""

    @staticmethod
    def forward(ctx, grad, *inputs_and_cap):
        *inputs, cap = inputs_and_cap
        ctx.save_for_backward(grad, *inputs)
        ctx.cap = cap
        return tuple(_extension().backward(grad, *inputs, cap))

    @staticmethod
    @once_differentiable
    def backward(ctx, *cotangents):
        cotangents = [u.contiguous() for u in cotangents]
        return (*_extension().double_backward(*ctx.saved_tensors, *cotangents, ctx.cap), None)


class _LineAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs_and_cap):
        *inputs, cap = inputs_and_cap
        ctx.save_for_backward(*inputs)
        ctx.cap = cap
        return _extension().forward(*inputs, cap)

    @staticmethod
    def backward(ctx, grad):
        return (*_Backward.apply(grad.contiguous(), *ctx.saved_tensors, ctx.cap), None)


def line_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qa: torch.Tensor,
    envelope: torch.Tensor,
    angle: torch.Tensor,
    angle_v: torch.Tensor,
    cap: float,
) -> torch.Tensor:
    """`matris.layers.line_attention_bucket` as the op, same arguments and result; call where `applies`."""
    g, m = q.shape[:2]
    operands = (q, k, v, qa, envelope.reshape(g, m, m), angle, angle_v.squeeze(2))
    return _LineAttention.apply(*(x.contiguous() for x in operands), cap)
