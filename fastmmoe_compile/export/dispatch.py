"""The MoE dispatch we own: cost proportional to the (token, expert) pairs routed.

transformers' experts modules call `forward(hidden, top_k_index, top_k_weights)`.
`experts_forward` replaces it during export: the router output becomes a compact
pair list (fastmmoe::route_pairs, which the passes rewrite), and the experts run
as two grouped GEMMs over the pairs sorted by expert. No sentinel ids, so no
uninitialised tail rows and no pairs moved that are not computed.
"""
from __future__ import annotations

import contextlib
import types

import torch

from .. import ops  # noqa: F401  (registers torch.ops.fastmmoe)
from ..errors import UnsupportedModelError


def run_experts(x, token, expert, weight, gate_up, down, apply_gate, num_experts: int):
    """x [T, H]; pairs (token, expert, weight) [P]; gate_up [E, 2I, H]; down [E, H, I] -> [T, H].

    Cost notes (benchmarks/RESULTS.md has the profiles):
    - the routing weight scales the [P, I] intermediate, not the [P, H] output: the down
      projection is linear, so the result is the same up to fp32 rounding, the multiply
      touches half the memory, and Inductor fuses it into the silu * up kernel;
    - the combine is a scatter_add over an expanded index, not index_add: Inductor lowers
      index_add to a loop of per-element atomic adds (about 25 ms a layer at 1088 tokens,
      top-8, on 2 cores) but hands scatter_add to ATen's kernel (~2 ms); eager is unchanged.
    """
    expert, order = torch.sort(expert, stable=True)
    token = token[order]
    weight = weight[order]
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts = counts.scatter_add(0, expert, torch.ones_like(expert, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch.ops.fastmmoe.grouped_mm(x[token], gate_up.transpose(1, 2), offs)
    h = apply_gate(h) * weight[:, None].to(h.dtype)
    y = torch.ops.fastmmoe.grouped_mm(h, down.transpose(1, 2), offs)
    return torch.zeros_like(x).scatter_add(0, token[:, None].expand(-1, x.shape[-1]), y.to(x.dtype))


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    token, expert, weight = torch.ops.fastmmoe.route_pairs(top_k_weights, top_k_index)
    return run_experts(
        hidden_states, token, expert, weight, self.gate_up_proj, self.down_proj, self._apply_gate, self.num_experts
    )


def check_experts_module(module: torch.nn.Module) -> None:
    """The layouts run_experts handles: fused [gate; up], no bias, untransposed."""
    problems = []
    if not getattr(module, "has_gate", True) or not hasattr(module, "gate_up_proj"):
        problems.append("no fused gate_up_proj")
    if getattr(module, "has_bias", False):
        problems.append("expert biases")
    if getattr(module, "is_transposed", False):
        problems.append("transposed expert weights")
    if getattr(module, "is_concatenated", True) is False:
        problems.append("interleaved gate/up layout")
    if problems:
        raise UnsupportedModelError(f"{type(module).__name__}: unsupported experts layout ({', '.join(problems)})")


@contextlib.contextmanager
def owned_dispatch(experts_modules):
    """Route every experts module through run_experts for the duration (then restore)."""
    patched = []
    try:
        for m in experts_modules:
            check_experts_module(m)
            had = "forward" in m.__dict__
            patched.append((m, had, m.__dict__.get("forward")))
            m.forward = types.MethodType(experts_forward, m)
        yield
    finally:
        for m, had, old in patched:
            if had:
                m.forward = old
            else:
                del m.forward
