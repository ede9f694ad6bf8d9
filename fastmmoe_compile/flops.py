"""FLOPs of a prefill (docs/fastmmoe.md section 4): an analytic count and a count measured on the graph.

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
- the LM head on the last token only (the backbone returns last-position logits);
- token reduction (routing_merge, FastV): at each stage layer the attention runs on the
  tokens before the stage and the MoE block and every later layer on those after it
  (algorithm.vision_after_stage, docs/fastmmoe.md's T = max(1, floor(N*r)) compounding); the
  stage's own work is the `merge` part: the cloned router on the pre-stage tokens
  (2*n*H*E, FastMMoE only: FastV scores by attention alone) and the last query's score
  row (2*n*h*d_qk). The selection itself (sorts, window cosine scores, gathers) is
  elementwise work and left out like the norms;
- SparseVLM (docs/fastmmoe.md 5.2): the stage's `merge` part is the raters' attention over every
  query row (2*n*n*h*d_qk, the rater rows are data-dependent), the recycling distances among the
  stage's vision tokens (2*v*v*H), and at the first stage the raters' choice (2*V*S*H, once).
A stage's `merge` part is its method's Method.stage_flops (fastmmoe_compile/methods), and so are the
experts per vision token (Method.vision_experts).
Norms, rotary, softmax and the elementwise work are left out (negligible, per docs/fastmmoe.md).

Everything is read from module shapes, so it works on meta-device models.

Measured: run the exported program eagerly under torch.utils.flop_counter.FlopCounterMode,
with formulas for the two ops its registry lacks: our fastmmoe::grouped_mm (the expert
GEMMs) and CPU flash attention (aten._scaled_dot_product_flash_attention_for_cpu).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from .methods import Config, StageDims, method_of

PARTS = ("attn_proj", "attn_core", "router", "routed", "dense", "merge")


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
    merge: int = 0  # a token-reduction stage at this layer: cloned router + last-token scores

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
        def row(*cells) -> str:
            return "| " + " | ".join(map(str, cells)) + " |"

        def gflops(x) -> str:
            return f"{x / 1e9:.3f}"

        header = ["layer", "tokens", "vision", "K/Kv", *PARTS, "total (GFLOPs)"]
        rows = [row(*header), "|---" * len(header) + "|"]
        for r in self.layers:
            rows.append(row(r.layer, r.tokens, r.vision, f"{r.k}/{r.kv}", *(gflops(getattr(r, p)) for p in PARTS),
                            gflops(r.total)))
        blank = [""] * (len(header) - 3)
        rows.append(row("lm_head", 1, *blank, gflops(self.lm_head)))
        rows.append(row("**total**", "", *blank, f"**{gflops(self.total)}**"))
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


def _stages(config: "Config | None") -> tuple:
    """The token-reduction stages a config asks for (none for the unmodified model)."""
    return () if config is None else method_of(config).stages(config)


def vision_schedule(config: "Config | None", num_layers: int,
                    num_vision: int) -> list[tuple[int, int]]:
    """Per layer (vision tokens at attention, vision tokens at the MoE block) under the
    token-reduction stages of docs/fastmmoe.md section 2 (or FastV): at stage layer l the stage runs
    after attention, so layer l's attention sees N and its MoE block and every later layer
    see min(N, max(1, floor(N*r))), computed as the graph computes it
    (algorithm.vision_after_stage on the ratio in integer units)."""
    stages = {stage.layer: stage for stage in _stages(config)}
    n, out = num_vision, []
    for layer in range(num_layers):
        before = n
        if layer in stages:
            n = stages[layer].vision_after(n)  # the graph's own count (authors_compat included)
        out.append((before, n))
    return out


def analytic_flops(loaded, config: "Config | None", text_tokens: int,
                   vision_tokens: int | Sequence[int] | Sequence[tuple[int, int]]) -> FlopsReport:
    """Prefill FLOPs of one sample (batch 1) with `text_tokens` text and some vision tokens.

    config None is the unmodified model, else a registered method's configuration (methods.METHODS:
    its experts per vision token and its stages' own FLOPs). vision_tokens: an int (the merge /
    pruning stages of `config` then set
    the per-layer counts), or one count per layer, or per layer (count at attention, count
    at the MoE block)."""
    lm, family, cfg = loaded.lm, loaded.family, loaded.config
    layers = family.decoder(lm).layers
    num_layers = len(layers)
    if isinstance(vision_tokens, int):
        sched = vision_schedule(config, num_layers, vision_tokens)
    else:
        sched = [v if isinstance(v, tuple) else (v, v) for v in vision_tokens]
        if len(sched) != num_layers:
            raise ValueError(f"{len(sched)} per-layer vision counts for {num_layers} layers")
    moe = dict(family.moe_blocks(lm))
    top_k = family.top_k(cfg)
    stages = {stage.layer: stage for stage in _stages(config)}
    method = None if config is None else method_of(config)
    width = lm.lm_head.in_features
    report = []
    for i, layer in enumerate(layers):
        v_attn, v_mlp = sched[i]
        n_attn, n = text_tokens + v_attn, text_tokens + v_mlp
        heads, d_qk, d_v = _attention_dims(layer.self_attn, cfg)
        row = LayerFlops(i, n_attn, v_attn, 0, 0,
                         attn_proj=_linear_flops(layer.self_attn, n_attn),
                         attn_core=2 * n_attn * n_attn * heads * (d_qk + d_v))
        block = moe.get(i)
        if i in stages:
            row.merge = method.stage_flops(stages[i], StageDims(
                tokens=n_attn, vision=v_attn, heads=heads, d_qk=d_qk, hidden=width,
                router_weights=0 if block is None else block.gate.weight.numel(), text=text_tokens,
                prompt_vision=sched[0][0]))
        if block is None:
            row.dense = _linear_flops(layer.mlp, n)
        else:
            experts, gate = block.experts, block.gate
            num_e, hidden = gate.weight.shape
            row.router = 2 * n * hidden * num_e
            two_i, h = experts.gate_up_proj.shape[-2:]
            h_down, i_down = experts.down_proj.shape[-2:]
            per_pair = 2 * h * two_i + 2 * i_down * h_down
            kv = top_k if method is None else method.vision_experts(config, i, top_k)
            row.k, row.kv = top_k, kv
            row.routed = per_pair * (text_tokens * top_k + v_mlp * kv)
            row.dense = _linear_flops(block, n, skip=(experts, gate))
        report.append(row)
    head = lm.lm_head
    out = FlopsReport(report, 2 * head.in_features * head.out_features)
    out.by_part = {p: sum(getattr(r, p) for r in report) for p in PARTS} | {"lm_head": out.lm_head}
    return out


def compare(loaded, config: "Config", text_tokens: int, vision_tokens: int) -> dict:
    """Baseline vs FastMMoE (or FastV) totals and their ratio (baseline / reduced: the ideal speedup)."""
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


def _last_token_attention_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    # One query row against every key, per query head (grouped-query keys repeat).
    return 2 * q_shape[0] * q_shape[1] * k_shape[2] * q_shape[3]


def _sparsevlm_raters_flops(embeds_shape, vision_shape, *args, out_shape=None, **kwargs) -> int:
    # Vision x all tokens dot products of the embeddings: [B, N, H] @ [B, H, S].
    return 2 * embeds_shape[0] * vision_shape[1] * embeds_shape[1] * embeds_shape[2]


def _rater_attention_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    # Every query row against every key, per query head.
    return 2 * q_shape[0] * q_shape[1] * q_shape[2] * k_shape[2] * q_shape[3]


def _sparsevlm_tokens_flops(hidden_shape, scores_shape, vision_shape, *args, out_shape=None, **kwargs) -> int:
    # The Gram matrix of the stage's vision tokens (recycling distances): [B, N, H] @ [B, H, N].
    return 2 * hidden_shape[0] * vision_shape[1] * vision_shape[1] * hidden_shape[2]


def _custom_mapping() -> dict:
    # Keys are overload packets (the counter looks up func._overloadpacket); FlopCounterMode
    # wraps the formulas so they receive shapes. Our ops are leaves to the counter (it does not see
    # the matmuls inside their kernels), so each one with matmuls has its formula here.
    mapping = {torch.ops.fastmmoe.grouped_mm: _grouped_mm_flops,
               torch.ops.fastmmoe.last_token_attention: _last_token_attention_flops,
               torch.ops.fastmmoe.sparsevlm_raters: _sparsevlm_raters_flops,
               torch.ops.fastmmoe.rater_attention: _rater_attention_flops,
               torch.ops.fastmmoe.sparsevlm_tokens: _sparsevlm_tokens_flops}
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
