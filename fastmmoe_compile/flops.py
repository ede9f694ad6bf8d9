"""FLOPs of a prefill (spec section 4): an analytic count and a count measured on the graph.

Analytic, per decoder layer, for `n` tokens of which `v` are vision tokens:
- attention projections: 2*n*in*out summed over the nn.Linear modules of the layer's
  attention, read off the real modules (so MLA of DeepSeek-V2 is counted right);
- attention core: QK^T and AV over the FULL n x n score matrix, 2*n*n*h*(d_qk + d_v).
  Full, not causal, because that is what torch's flop counter (and most papers) count;
  a causal kernel such as CPU flash attention does about half of this work;
- router: 2*n*H*E;
- routed experts: 3 matmuls per (token, expert) pair, 2*H*2I + 2*I*H FLOPs, with K pairs
  per text token and, at layers >= reduce_from_layer under FastMMoE, Kv per vision token;
- shared experts / dense MLP layers: 2*n*in*out over their nn.Linear modules;
- the LM head on the last token only (the backbone returns last-position logits).
Norms, rotary, softmax and the elementwise work are left out (negligible, per the spec).

Everything is read from module shapes, so it works on meta-device models.

Measured: run the exported program eagerly under torch.utils.flop_counter.FlopCounterMode,
with formulas for the two ops its registry lacks: our fastmmoe::grouped_mm (the expert
GEMMs) and CPU flash attention (aten._scaled_dot_product_flash_attention_for_cpu).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from .config import FastMMoEConfig

PARTS = ("attn_proj", "attn_core", "router", "routed", "dense")


@dataclass
class LayerFlops:
    layer: int
    tokens: int  # sequence length this layer's attention runs on
    vision: int  # vision tokens among them
    k: int  # experts per text token (0 in a dense layer)
    kv: int  # experts per vision token
    attn_proj: int = 0
    attn_core: int = 0
    router: int = 0
    routed: int = 0
    dense: int = 0  # shared experts, or the MLP of a dense layer

    @property
    def total(self) -> int:
        return sum(getattr(self, p) for p in PARTS)


@dataclass
class FlopsReport:
    layers: list[LayerFlops]
    lm_head: int
    by_part: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers) + self.lm_head

    def to_dict(self) -> dict:
        return {"total": self.total, "lm_head": self.lm_head, "by_part": self.by_part,
                "layers": [dict(asdict(layer), total=layer.total) for layer in self.layers]}

    def table(self) -> str:
        rows = ["| layer | tokens | vision | K/Kv | " + " | ".join(PARTS) + " | total (GFLOPs) |",
                "|---" * (len(PARTS) + 5) + "|"]
        for r in self.layers:
            vals = " | ".join(f"{getattr(r, p) / 1e9:.3f}" for p in PARTS)
            rows.append(f"| {r.layer} | {r.tokens} | {r.vision} | {r.k}/{r.kv} | {vals} | {r.total / 1e9:.3f} |")
        rows.append(f"| lm_head | 1 | | | | | | | | {self.lm_head / 1e9:.3f} |")
        rows.append(f"| **total** | | | | | | | | | **{self.total / 1e9:.3f}** |")
        return "\n".join(rows)


def _linear_flops(module: torch.nn.Module, n: int, skip: tuple[torch.nn.Module, ...] = ()) -> int:
    """2*n*in*out over every nn.Linear under `module` (except those under `skip`)."""
    skipped = {id(m) for s in skip if s is not None for m in s.modules()}
    return sum(2 * n * m.in_features * m.out_features
               for m in module.modules() if isinstance(m, torch.nn.Linear) and id(m) not in skipped)


def _attention_dims(attn: torch.nn.Module, config) -> tuple[int, int, int]:
    """(query heads, q/k head dim, v head dim): MLA has d_qk != d_v."""
    heads = int(getattr(attn, "num_heads", None) or config.num_attention_heads)
    d_qk = getattr(attn, "qk_head_dim", None) or getattr(attn, "head_dim", None) or config.hidden_size // heads
    return heads, int(d_qk), int(getattr(attn, "v_head_dim", None) or d_qk)


def vision_schedule(config: FastMMoEConfig, num_layers: int, num_vision: int) -> list[tuple[int, int]]:
    """Per layer (vision tokens at attention, vision tokens at the MoE block) under the
    merge stages of spec section 2: at merge layer l the stage runs after attention, so
    layer l's attention sees N and its MoE block and every later layer see T."""
    from .algorithm import stage_ratios

    ratios = dict(zip(config.merge_layers, stage_ratios(config.keep_ratio, len(config.merge_layers),
                                                        config.stage_ratios)))
    n, out = num_vision, []
    for layer in range(num_layers):
        before = n
        if layer in ratios and n > 0:
            n = min(n, max(1, int(n * ratios[layer] + 1e-9)))  # T = max(1, floor(N*r)); N <= T: no-op
        out.append((before, n))
    return out


def analytic_flops(loaded, config: FastMMoEConfig | None, text_tokens: int,
                   vision_tokens: int | Sequence[int] | Sequence[tuple[int, int]]) -> FlopsReport:
    """Prefill FLOPs of one sample (batch 1) with `text_tokens` text and some vision tokens.

    config None is the unmodified model. vision_tokens: an int (the merge stages of
    `config` then set the per-layer counts), or one count per layer, or per layer
    (count at attention, count at the MoE block)."""
    lm, family, cfg = loaded.lm, loaded.family, loaded.config
    layers = family.decoder(lm).layers
    num_layers = len(layers)
    if isinstance(vision_tokens, int):
        sched = vision_schedule(config or FastMMoEConfig(), num_layers, vision_tokens) if config else \
            [(vision_tokens, vision_tokens)] * num_layers
    else:
        sched = [v if isinstance(v, tuple) else (v, v) for v in vision_tokens]
        if len(sched) != num_layers:
            raise ValueError(f"{len(sched)} per-layer vision counts for {num_layers} layers")
    moe = dict(family.moe_blocks(lm))
    top_k = family.top_k(cfg)
    report = []
    for i, layer in enumerate(layers):
        v_attn, v_mlp = sched[i]
        n_attn, n = text_tokens + v_attn, text_tokens + v_mlp
        heads, d_qk, d_v = _attention_dims(layer.self_attn, cfg)
        row = LayerFlops(i, n_attn, v_attn, 0, 0,
                         attn_proj=_linear_flops(layer.self_attn, n_attn),
                         attn_core=2 * n_attn * n_attn * heads * (d_qk + d_v))
        block = moe.get(i)
        if block is None:
            row.dense = _linear_flops(layer.mlp, n)
        else:
            experts, gate = block.experts, block.gate
            num_e, hidden = gate.weight.shape
            row.router = 2 * n * hidden * num_e
            two_i, h = experts.gate_up_proj.shape[-2:]
            h_down, i_down = experts.down_proj.shape[-2:]
            per_pair = 2 * h * two_i + 2 * i_down * h_down
            kv = config.kv(top_k) if config is not None and i >= config.reduce_from_layer else top_k
            row.k, row.kv = top_k, kv
            row.routed = per_pair * (text_tokens * top_k + v_mlp * kv)
            row.dense = _linear_flops(block, n, skip=(experts, gate))
        report.append(row)
    head = lm.lm_head
    out = FlopsReport(report, 2 * head.in_features * head.out_features)
    out.by_part = {p: sum(getattr(r, p) for r in report) for p in PARTS} | {"lm_head": out.lm_head}
    return out


def compare(loaded, config: FastMMoEConfig, text_tokens: int, vision_tokens: int) -> dict:
    """Baseline vs FastMMoE totals and their ratio (baseline / FastMMoE: the ideal speedup)."""
    base = analytic_flops(loaded, None, text_tokens, vision_tokens)
    fast = analytic_flops(loaded, config, text_tokens, vision_tokens)
    return {"baseline": base.total, "fastmmoe": fast.total, "ratio": base.total / fast.total,
            "reduction": 1 - fast.total / base.total,
            "baseline_by_part": base.by_part, "fastmmoe_by_part": fast.by_part}


# --- measured -------------------------------------------------------------------------

def _grouped_mm_flops(x_shape, w_shape, offs_shape=None, *args, out_shape=None, **kwargs) -> int:
    # Every row of x meets exactly one [in, out] matrix: 2*rows*in*out.
    return 2 * x_shape[0] * w_shape[-2] * w_shape[-1]


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    # Keys are overload packets (the counter looks up func._overloadpacket); FlopCounterMode
    # wraps the formulas so they receive shapes.
    mapping = {torch.ops.fastmmoe.grouped_mm: _grouped_mm_flops}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    return mapping


def measured_flops(program_or_module, *inputs) -> tuple[int, dict]:
    """Run the program (an ExportedProgram runs eagerly via .module()) under FlopCounterMode:
    (total, {op name: flops})."""
    from torch.utils.flop_counter import FlopCounterMode

    from . import ops  # noqa: F401  (registers torch.ops.fastmmoe)

    fn = program_or_module.module() if isinstance(program_or_module, torch.export.ExportedProgram) \
        else program_or_module
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with counter, torch.no_grad():
        fn(*inputs)
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op
