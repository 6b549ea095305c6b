"""Building blocks of MatRIS: radial and angular bases, envelopes, gated MLPs and cutoff-smooth attention.

Smoothness rule: every quantity that lets a neighbour influence the energy is multiplied by an envelope
that vanishes with its first two derivatives at the cutoff, including the attention normalisation, which
uses a sink (``w / (1 + Σw)``) so that an edge entering the sum with zero weight changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from matris import cpu_kernels
from matris.fused import line_attention_weights, rms_norm, sink_messages


def polynomial_envelope(r: torch.Tensor, cutoff: float, p: int = 5) -> torch.Tensor:
    """DimeNet envelope: 1 at r=0, zero value, slope and curvature at the cutoff (C² switch-off)."""
    x = (r / cutoff).clamp(max=1.0)
    a, b, c = (p + 1) * (p + 2) / 2, p * (p + 2), p * (p + 1) / 2
    return 1 - a * x**p + b * x ** (p + 1) - c * x ** (p + 2)


class RadialBasis(nn.Module):
    """Bessel functions sin(f_n π r / r_c) / r with learnable frequencies f_n, times the envelope."""

    def __init__(self, num_radial: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.frequencies = nn.Parameter(torch.arange(1, num_radial + 1, dtype=torch.float32) * math.pi)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        bessel = math.sqrt(2 / self.cutoff) * torch.sin(self.frequencies * r / self.cutoff) / r
        return bessel * polynomial_envelope(r, self.cutoff)


def legendre(x: torch.Tensor, num: int, dim: int = -1) -> torch.Tensor:
    """Legendre polynomials P_0..P_{num-1} of cos θ (the angle basis), by Bonnet's recursion, stacked
    along the new dimension ``dim``."""
    terms = [torch.ones_like(x), x]
    for n in range(1, num - 1):
        terms.append(((2 * n + 1) * x * terms[n] - n * terms[n - 1]) / (n + 1))
    return torch.stack(terms[:num], dim=dim)


class RMSNorm(nn.RMSNorm):
    """`torch.nn.RMSNorm` that trains with the fused twice-differentiable kernel of `matris.fused`."""

    def epsilon(self, dtype: torch.dtype) -> float:
        """``eps``, or as `torch.nn.RMSNorm` reads ``eps=None``: the dtype's machine epsilon."""
        return self.eps if self.eps is not None else torch.finfo(dtype).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.epsilon(x.dtype), fused=self.training)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x); the dense counterpart of one MoE expert."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int | None = None):
        super().__init__()
        self.w1 = nn.Linear(dim_in, hidden, bias=False)
        self.w3 = nn.Linear(dim_in, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim_out or dim_in, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def sink_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    envelope: torch.Tensor,
    index: torch.Tensor,
    size: int,
    cap: float,
    fused: bool = False,
) -> torch.Tensor:
    """Per receiving node and head, Σ α v over its incoming edges, smooth at the cutoff.

    ``w = envelope · exp(cap · tanh(q·k / cap))`` and ``α = w / (1 + Σ_node w)``: scores are bounded so
    ``exp`` cannot overflow, and the constant sink keeps α continuous when an edge's envelope reaches zero.
    Computed as ``(Σ w v) / (1 + Σ w)``: one scatter of ``[w v | w]`` (`matris.fused.sink_messages`) and a
    division per node, not a normaliser gathered to every edge. ``q`` (edges, h, c), keys and values side
    by side as ``kv`` (edges, 2 h c), ``envelope`` (edges,); ``fused``: the compiled kernel (training).
    """
    messages = sink_messages(q, kv, envelope, cap, fused=fused)
    summed = messages.new_zeros(size, *messages.shape[1:]).index_add(0, index, messages)
    return summed[..., :-1] / (1 + summed[..., -1:])


class AtomAttention(nn.Module):
    """Atom-graph attention: each atom i gathers messages over its bonds i→j, built from j and the bond.

    Keys and values are linear in the concatenation [source_j, bond_ij], so the source half is applied
    to the n atoms before the gather and only the bond half runs per edge.
    """

    def __init__(self, dim: int, num_heads: int, cap: float):
        super().__init__()
        self.num_heads, self.cap = num_heads, cap
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(2 * dim, dim, bias=False)
        self.v = nn.Linear(2 * dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, query, source, bond, centre, neighbour, envelope):
        h, (n, d) = self.num_heads, query.shape
        # (2d, d) each: contiguous copies, since BLAS runs x @ w.T some 30 % slower when w is a column slice
        source_w, bond_w = (w.contiguous() for w in torch.cat([self.k.weight, self.v.weight]).split(d, dim=1))
        kv = torch.addmm(F.linear(source, source_w).index_select(0, neighbour), bond, bond_w.T)
        q = F.linear(query, self.q.weight / math.sqrt(d // h)).view(n, h, -1).index_select(0, centre)
        message = sink_attention(q, kv, envelope, centre, n, self.cap, fused=self.training)
        return self.out(message.flatten(1))


@dataclass
class TripletBlocks:
    """The line graph as dense blocks: the m short bonds of a centre atom form one m × m block of triplets
    (a, b), a ≠ b, so line attention runs as batched matmuls instead of gathers and scatters over triplets.

    Centres are bucketed by m and each bucket is padded to its largest m (a few buckets keep the padding
    small). Padding slots repeat a real bond of their centre and have zero envelope, so they contribute
    exact zeros. ``bonds`` (P,) is the edge of every slot, bucket after bucket, each bucket (G, M)
    row-major; ``shapes`` the (G, M) of each bucket; per bucket, ``envelope`` (G, 1, M, M) is
    sw(r_a) sw(r_b) off the diagonal (zero on it and at padding) and ``angle`` (G, M, L + 1, M) holds
    P_l(cos θ_ab) times the envelope for l < L, then a channel of ones for the value projection's bias.
    """

    bonds: torch.Tensor
    shapes: list[tuple[int, int]]
    envelope: list[torch.Tensor]
    angle: list[torch.Tensor]


class LineAttention(nn.Module):
    """Line-graph attention: bond a = (i→j) gathers from the bonds b = (i→k) through the angle at i.

    key_ab = k(b) + A_k θ_ab and value_ab = v(b) ⊙ (A_v θ_ab + β), with θ_ab the angle basis. ``forward``
    runs on a triplet list; ``dense`` runs on `TripletBlocks`, with the same result.
    """

    def __init__(self, dim: int, num_angular: int, num_heads: int, cap: float):
        super().__init__()
        self.num_heads, self.cap = num_heads, cap
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.angle_k = nn.Linear(num_angular, dim, bias=False)
        self.angle_v = nn.Linear(num_angular, dim)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, bond, angle, target, source, envelope):
        """Sparse form: ``angle`` (t, L), ``target``/``source`` (t,) bond indices, ``envelope`` (t,).

        For callers that build the triplet list themselves (`matris.deploy` traces it with symbolic
        sizes, which the data-dependent bucket shapes of `dense` would not allow)."""
        h, e = self.num_heads, bond.shape[0]
        q = (self.q(bond) / math.sqrt(bond.shape[1] // h)).unflatten(-1, (h, -1))[target]
        k = self.k(bond)[source] + self.angle_k(angle)
        v = self.v(bond)[source] * self.angle_v(angle)
        kv = torch.cat([k, v], dim=1)
        message = sink_attention(q, kv, envelope, target, e, self.cap, fused=self.training)
        return self.out(message.flatten(1))

    def dense(
        self, x: torch.Tensor, blocks: TripletBlocks, scale: torch.Tensor | float = 1.0
    ) -> torch.Tensor:
        """Updates (P, d) of the slots of ``blocks`` from their bond features ``x`` (P, d), times ``scale``
        (a residual scale, folded into the output projection's weight rather than applied per slot).

        Per head, with c channels: score_ab = q_a·k_b/√c + Σ_l θ_ab,l (A_kᵀ q_a)_l/√c, where A_kᵀ q is
        one more projection of x; the value sum Σ_b α_ab v_b ⊙ (A_v θ̃_ab) is one matmul over (l, b) of
        α_ab θ̃_ab,l with A_v,l ⊙ v_b (θ̃: θ and the ones channel, A_v with the bias as last column).
        """
        h, d = self.num_heads, x.shape[1]
        if not blocks.shapes:
            return x.new_zeros(0, d)
        c, width = d // h, blocks.angle[0].shape[2]  # width: L + 1 angle channels
        angle_k = F.pad(self.angle_k.weight, (0, 1)).view(h, c, width) / math.sqrt(c)
        angle_q = torch.einsum("hcl,hcd->hld", angle_k, self.q.weight.view(h, c, d)).reshape(-1, d)
        angle_v = torch.cat([self.angle_v.weight, self.angle_v.bias.unsqueeze(-1)], dim=1)
        angle_v = angle_v.view(h, c, width).transpose(1, 2).contiguous().unsqueeze(2)  # (h, L + 1, 1, c)
        # one matmul for the four projections: fewer, wider matmuls at each of the three derivative levels
        weight = torch.cat([self.q.weight / math.sqrt(c), self.k.weight, self.v.weight, angle_q])
        projections = F.linear(x, weight).split([g * m for g, m in blocks.shapes])
        out = []
        for (g, m), projection, envelope, angle in zip(
            blocks.shapes, projections, blocks.envelope, blocks.angle, strict=True
        ):
            q, k, v, qa = projection.split([d, d, d, h * width], dim=1)
            q, k, v = (y.view(g, m, h, c) for y in (q, k, v))
            bucket = line_attention_bucket(
                q, k, v, qa.view(g, m, h, width), envelope, angle, angle_v, self.cap, fused=self.training
            )
            out.append(bucket.reshape(g * m, d))
        return F.linear(torch.cat(out), scale * self.out.weight)


def line_attention_bucket(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qa: torch.Tensor,
    envelope: torch.Tensor,
    angle: torch.Tensor,
    angle_v: torch.Tensor,
    cap: float,
    fused: bool = True,
) -> torch.Tensor:
    """Line attention's messages (g, m, h, c) for one bucket of g blocks of m slots: ``q``, ``k``, ``v``
    (g, m, h, c), angular queries ``qa`` (g, m, h, L + 1), ``envelope`` (g, 1, m, m), ``angle``
    (g, m, L + 1, m) and the value projection of the angle basis ``angle_v`` (h, L + 1, 1, c).
    ``fused`` (training): the C++ op of `matris.cpu_kernels` where it applies, else the compiled weights
    kernel of `matris.fused`."""
    if fused and cpu_kernels.line_applies(q, qa):
        return cpu_kernels.line_attention(q, k, v, qa, envelope, angle, angle_v, cap)
    g, m, h, c = q.shape
    width = angle.shape[2]
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # (g, h, m, c)
    weights = line_attention_weights(q @ k.transpose(2, 3), qa, envelope, angle, cap, fused=fused)
    values = (angle_v * v.contiguous().unsqueeze(2)).view(g, h, width * m, c)
    return (weights.view(g, h, m, width * m) @ values).transpose(1, 2)
