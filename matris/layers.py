"""Building blocks of MatRIS: radial and angular bases, envelopes, gated MLPs and cutoff-smooth attention.

Smoothness rule: every quantity that lets a neighbour influence the energy is multiplied by an envelope
that vanishes with its first two derivatives at the cutoff, including the attention normalisation, which
uses a sink (``w / (1 + Σw)``) so that an edge entering the sum with zero weight changes nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def legendre(x: torch.Tensor, num: int) -> torch.Tensor:
    """Legendre polynomials P_0..P_{num-1} of cos θ (the angle basis), by Bonnet's recursion."""
    terms = [torch.ones_like(x), x]
    for n in range(1, num - 1):
        terms.append(((2 * n + 1) * x * terms[n] - n * terms[n - 1]) / (n + 1))
    return torch.stack(terms[:num], dim=-1)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x); the dense counterpart of one MoE expert."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int | None = None):
        super().__init__()
        self.w1 = nn.Linear(dim_in, hidden, bias=False)
        self.w3 = nn.Linear(dim_in, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim_out or dim_in, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def sink_softmax(scores: torch.Tensor, envelope: torch.Tensor, index: torch.Tensor, size: int, cap: float):
    """Per-head attention weights over the edges of each receiving node, smooth at the cutoff.

    ``w = envelope · exp(cap · tanh(score / cap))`` and ``α = w / (1 + Σ_node w)``: scores are bounded so
    ``exp`` cannot overflow, and the constant sink keeps α continuous when an edge's envelope reaches zero.
    """
    w = envelope.unsqueeze(-1) * torch.exp(cap * torch.tanh(scores / cap))
    denominator = w.new_ones(size, w.shape[1]).index_add(0, index, w)
    return w / denominator[index]


class AtomAttention(nn.Module):
    """Atom-graph attention: each atom i gathers messages over its bonds i→j, built from j and the bond."""

    def __init__(self, dim: int, num_heads: int, cap: float):
        super().__init__()
        self.num_heads, self.cap = num_heads, cap
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(2 * dim, dim, bias=False)
        self.v = nn.Linear(2 * dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, query, source, bond, centre, neighbour, envelope):
        h, n = self.num_heads, query.shape[0]
        q = self.q(query).unflatten(-1, (h, -1))[centre]
        pair = torch.cat([source[neighbour], bond], dim=-1)
        k, v = self.k(pair).unflatten(-1, (h, -1)), self.v(pair).unflatten(-1, (h, -1))
        alpha = sink_softmax((q * k).sum(-1) / math.sqrt(q.shape[-1]), envelope, centre, n, self.cap)
        message = query.new_zeros(n, *v.shape[1:]).index_add(0, centre, alpha.unsqueeze(-1) * v)
        return self.out(message.flatten(1))


class LineAttention(nn.Module):
    """Line-graph attention: bond a = (i→j) gathers from the bonds b = (i→k) through the angle at i."""

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
        h, e = self.num_heads, bond.shape[0]
        q = self.q(bond).unflatten(-1, (h, -1))[target]
        k = (self.k(bond)[source] + self.angle_k(angle)).unflatten(-1, (h, -1))
        v = (self.v(bond)[source] * self.angle_v(angle)).unflatten(-1, (h, -1))
        alpha = sink_softmax((q * k).sum(-1) / math.sqrt(q.shape[-1]), envelope, target, e, self.cap)
        message = bond.new_zeros(e, *v.shape[1:]).index_add(0, target, alpha.unsqueeze(-1) * v)
        return self.out(message.flatten(1))
