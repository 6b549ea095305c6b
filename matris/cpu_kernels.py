"""Two training-step ops in C++ for x86-64 CPUs with AVX2: forward, backward and double backward of each.

- Line attention's bucket (`line_attention`, ``csrc/line_attention.cpp``). The compiled bmm form of
  `matris.layers.line_attention_bucket` writes the (g, h, m, L + 1, m) weights through memory at every
  derivative level and runs the value sums as tiny batched matmuls; this op keeps a block row's scores
  and value sums in vector registers.
- An attention sum's per-edge terms (`sink_messages`, ``csrc/sink_messages.cpp``), the atom attention's
  ``[w v | w]`` of `matris.fused.sink_messages`: one pass over the edges per level, with the eight heads
  of a group in the lanes of a vector, where inductor's code for the same levels took about 2.5× longer.

Both double backwards are their backward's own code run on dual numbers (``csrc/dual.h``). They cover
float32 CPU tensors with a multiple of 8 channels per head (every preset but ``tiny``: 16 channels in
``matris-6l``, 48-72 in the MoE presets) and, for line attention, 8 angle channels (7 Legendre
polynomials and the ones channel), outside a Python dispatch mode, so that FLOP counters see the plain
forms' matmuls. ``benchmarks/bench_line_kernel.py`` and ``benchmarks/bench_fused.py`` time them against
the forms they replace. The extension is built on first use (about a minute; g++, ninja and glibc's
libmvec; cached under ``TORCH_EXTENSIONS_DIR``). Every other case, ``MATRIS_CPU_KERNELS=0``, or a failed
build (one warning) keeps the compiled forms (plain ops with ``MATRIS_COMPILE=0``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "ops.cpp", CSRC / "line_attention.cpp", CSRC / "sink_messages.cpp"]
EXTENSION = "matris_cpu_kernels"
CHANNEL_BLOCK, ANGLE_WIDTH = 8, 8  # the kernels take heads of a multiple of 8 channels, 8 angle channels


class _State:
    supported = (
        platform.system() == "Linux"
        and platform.machine() == "x86_64"
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    )
    enabled = False  # set by `enable` (`matris.fused.select_kernels`, "auto" at import)


def enable(on: bool) -> None:
    """Use the C++ ops where they apply (``on``, and this machine supports them), or not."""
    _State.enabled = on and _State.supported


@functools.cache
def _extension() -> ModuleType:
    from torch.utils.cpp_extension import _get_build_directory, load

    compile_flags, link_flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"], ["-fopenmp", "-lmvec"]
    sources = [str(path) for path in SOURCES]
    build = Path(_get_build_directory(EXTENSION, verbose=False))
    with _sole_builder(build):
        return load(EXTENSION, sources, extra_cflags=compile_flags, extra_ldflags=link_flags)


@contextlib.contextmanager
def _sole_builder(build: Path) -> Iterator[None]:
    """Hold an flock on the build folder while torch builds or loads the extension.

    torch's own build lock is a plain file that a killed builder leaves behind, and every later process
    then waits on it forever. The kernel releases an flock with its holder, so a torch lock found while
    holding ours was left by a dead builder, and is removed.
    """
    build.mkdir(parents=True, exist_ok=True)
    with open(build / "matris.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            warnings.warn(f"removing {stale}, left by a killed build of {EXTENSION}", stacklevel=3)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _applies(q: torch.Tensor) -> bool:
    """Whether the ops run for per-head inputs ``q`` (..., c) (building them on the first call that
    qualifies)."""
    if not (
        _State.enabled
        and q.dtype == torch.float32
        and q.device.type == "cpu"
        and q.shape[-1] % CHANNEL_BLOCK == 0
        and _get_current_dispatch_mode() is None
    ):
        return False
    try:
        _extension()
    except Exception as error:
        _State.enabled = False
        warnings.warn(
            f"matris.cpu_kernels: building the C++ ops failed ({type(error).__name__}: {error}); line "
            "attention and the attention sums keep their compiled forms (set MATRIS_CPU_KERNELS=0 to skip "
            "the build)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def line_applies(q: torch.Tensor, qa: torch.Tensor) -> bool:
    """Whether `line_attention` runs for queries ``q`` (g, m, h, c) and angular queries ``qa``
    (g, m, h, L + 1)."""
    return qa.shape[-1] == ANGLE_WIDTH and _applies(q)


def sink_applies(q: torch.Tensor) -> bool:
    """Whether `sink_messages` runs for queries ``q`` (edges, h, c)."""
    return _applies(q)


def _op(name: str, title: str):
    """The autograd op of the extension's ``{name}_forward``, ``_backward`` and ``_double_backward``, whose
    last argument is a float (the score cap); no third derivative. Its classes are named after ``title``
    (graph nodes ``_{title}Backward`` and ``_{title}VjpBackward``), so that profiles tell them apart."""

    class Backward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, grad, *inputs_and_cap):
            *inputs, cap = inputs_and_cap
            ctx.save_for_backward(grad, *inputs)
            ctx.cap = cap
            return tuple(getattr(_extension(), f"{name}_backward")(grad, *inputs, cap))

        @staticmethod
        @once_differentiable
        def backward(ctx, *cotangents):
            cotangents = [u.contiguous() for u in cotangents]
            double_backward = getattr(_extension(), f"{name}_double_backward")
            return (*double_backward(*ctx.saved_tensors, *cotangents, ctx.cap), None)

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs_and_cap):
            *inputs, cap = inputs_and_cap
            ctx.save_for_backward(*inputs)
            ctx.cap = cap
            return getattr(_extension(), f"{name}_forward")(*inputs, cap)

        @staticmethod
        def backward(ctx, grad):
            return (*Backward.apply(grad.contiguous(), *ctx.saved_tensors, ctx.cap), None)

    # subclasses carry the names: autograd names a Function's graph node when its class is made
    Backward = type(f"_{title}Vjp", (Backward,), {})
    return type(f"_{title}", (Op,), {}).apply


_line_attention, _sink_messages = _op("line", "LineAttention"), _op("sink", "SinkMessages")


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
    """`matris.layers.line_attention_bucket` as the op, same arguments and result; call where
    `line_applies`."""
    g, m = q.shape[:2]
    operands = (q, k, v, qa, envelope.reshape(g, m, m), angle, angle_v.squeeze(2))
    return _line_attention(*(x.contiguous() for x in operands), cap)


def sink_messages(q: torch.Tensor, kv: torch.Tensor, envelope: torch.Tensor, cap: float) -> torch.Tensor:
    """`matris.fused.sink_messages` as the op, same arguments and result; call where `sink_applies`."""
    return _sink_messages(q.contiguous(), kv.contiguous(), envelope.contiguous(), cap)
