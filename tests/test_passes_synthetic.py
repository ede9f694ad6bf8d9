"""The fast tier: each pass on a tiny hand-written backbone (no Hugging Face model), exported
with torch.export and shaped the way the passes look for it: decoder layers at `layers.N`,
attention at `layers.N.self_attn` calling SDPA, the attention residual add in the layer itself,
a router at `layers.N.mlp.gate` (linear -> softmax -> topk) feeding fastmmoe::route_pairs in
`layers.N.mlp.experts`. Layer 0 is dense. The rewritten graphs are checked against an eager
computation written out here, with the per-sample merge loop of tests/merge_reference.py."""
import copy

import pytest
import torch
from torch.export import Dim

from fastmmoe_compile import ops  # noqa: F401  (registers torch.ops.fastmmoe)
from fastmmoe_compile.config import FastMMoEConfig, FastVConfig
from fastmmoe_compile.methods import apply_passes
from fastmmoe_compile.passes import ModalityTopK, diff, find_routers, summarize
from fastmmoe_compile.passes.base import insert_call
from fastmmoe_compile.passes.token_reduction import TokenReduction, TokenReductionError

from .merge_reference import merge_stage_loop

HIDDEN, HEADS, EXPERTS, TOP_K, LAYERS = 16, 2, 4, 2, 3
F = torch.nn.functional


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.o = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)

    def split(self, x):
        b, s, _ = x.shape
        return [t.reshape(b, s, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1)]

    def forward(self, x, mask):
        q, k, v = self.split(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(x.shape))


class Router(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(EXPERTS, HIDDEN))

    def probs(self, x):
        return F.linear(x, self.weight).softmax(dim=-1)

    def forward(self, x):
        w, ids = torch.topk(self.probs(x), TOP_K, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), ids


class Experts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(EXPERTS, HIDDEN, HIDDEN) / HIDDEN ** 0.5)

    def forward(self, x, ids, weights):
        token, expert, weight = torch.ops.fastmmoe.route_pairs(weights, ids)
        y = torch.bmm(x[token][:, None, :], self.w[expert])[:, 0] * weight[:, None]
        return torch.zeros_like(x).index_add(0, token, y)


class MoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.experts = Router(), Experts()

    def forward(self, x):
        flat = x.reshape(-1, HIDDEN)
        w, ids = self.gate(flat)
        return self.experts(flat, ids, w).reshape(x.shape)


class Layer(torch.nn.Module):
    def __init__(self, moe: bool):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = MoE() if moe else torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, mask):
        h = x + self.self_attn(x, mask)
        return h + self.mlp(h)


class Backbone(torch.nn.Module):
    """inputs_embeds [B, S, H], vision_positions [B, N] -> (logits [B, H] of the last token, kept_positions [B, S])."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer(moe=i > 0) for i in range(LAYERS))
        self.head = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, inputs_embeds, vision_positions):
        batch, seq = inputs_embeds.shape[:2]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=inputs_embeds.device).tril()[None, None]
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, mask)
        return self.head(h[:, -1]), torch.arange(seq, device=inputs_embeds.device).expand(batch, seq)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Backbone().eval()


@pytest.fixture(scope="module")
def exported(model):
    return export(model)


@pytest.fixture
def program(exported):
    """A copy per test (exporting takes seconds, copying milliseconds): passes edit it in place."""
    return copy.deepcopy(exported)


def export(model):
    batch, seq, vision = Dim("B", min=1, max=64), Dim("S", min=2, max=256), Dim("N", min=0, max=256)
    example = (torch.zeros(2, 24, HIDDEN), torch.arange(2, 14).expand(2, 12).contiguous())
    with torch.no_grad():
        return torch.export.export(model, example, strict=False, dynamic_shapes={
            "inputs_embeds": {0: batch, 1: seq}, "vision_positions": {0: batch, 1: vision}})


def inputs(batch=2, seq=20, vision=range(3, 15), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, HIDDEN, generator=g), torch.tensor(list(vision)).expand(batch, -1).contiguous()


def count(program, op) -> int:
    return sum(n.target == op for n in program.graph.nodes)


def run(program, embeds, vision):
    with torch.no_grad():
        return program.module()(embeds, vision)


# --- the eager computation the rewritten graphs must reproduce -------------------------

def eager(model, embeds, vision, kv=None, reduce_from=0, stages=()):
    """Top-Kv routing for vision tokens at layers >= reduce_from (kv None: all K), and the
    token-reduction `stages` (MergeStage), sample by sample."""
    stages = {s.layer: s for s in stages}
    batch, seq, _ = embeds.shape
    h, kept = embeds, torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            mask = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()[None, None]
            r = h + layer.self_attn(h, mask)
            if i in stages:
                r, vision, keep = eager_stage(layer, h, r, mask, vision, stages[i])
                kept = torch.gather(kept, 1, keep)
            h = r + (eager_moe(layer.mlp, r, vision, kv if i >= reduce_from else None)
                     if isinstance(layer.mlp, MoE) else layer.mlp(r))
        return model.head(h[:, -1]), kept


def eager_stage(layer, x, r, mask, vision, stage):
    q, k, _ = layer.self_attn.split(x)
    scores = (q[:, :, -1:] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    attn = scores.masked_fill(~mask[..., -1:, :], float("-inf")).softmax(-1).mean(1)[:, 0]
    probs = layer.mlp.gate.probs(r) if stage.use_router else attn[..., None]
    outs = [merge_stage_loop(r[b], probs[b], attn[b], vision[b], **stage.kernel_settings()) for b in range(len(r))]
    keep, r, vision = (torch.stack(t) for t in zip(*outs))
    return r, vision, keep


def eager_moe(moe, x, vision, kv):
    batch, seq, _ = x.shape
    flat = x.reshape(-1, HIDDEN)
    w, ids = moe.gate(flat)
    if kv is not None:  # vision rows keep their kv largest weights, rescaled to the K weights' sum
        rows = (vision + torch.arange(batch)[:, None] * seq).reshape(-1)
        top = w[rows].topk(kv, dim=-1)
        kept = torch.zeros_like(w[rows]).scatter(1, top.indices, top.values)
        w = w.clone()
        w[rows] = kept * (w[rows].sum(-1, keepdim=True) / top.values.sum(-1, keepdim=True))
    y = sum(torch.einsum("th,thd->td", flat, moe.experts.w[ids[:, j]]) * w[:, j:j + 1] for j in range(TOP_K))
    return y.reshape(x.shape)


# --- the passes --------------------------------------------------------------------

def test_find_routers(program):
    sites = find_routers(program.graph)
    assert [s.layer for s in sites] == [1, 2]  # the dense layer 0 has none
    for s in sites:
        assert s.router_path == f"layers.{s.layer}.mlp.gate" and s.top_k == TOP_K
        assert s.scores.target == torch.ops.aten.softmax.int
        assert s.route.target == torch.ops.fastmmoe.route_pairs.default


def test_export_matches_eager(model, program):
    embeds, vision = inputs()
    logits, kept = run(program, embeds, vision)
    ref_logits, ref_kept = eager(model, embeds, vision)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(kept, ref_kept)


def test_modality_topk(model, program):
    result = ModalityTopK(lambda layer, k: 1 if layer >= 1 else k)(program)
    assert result.modified and result.changes == [
        {"layer": i, "router": f"layers.{i}.mlp.gate", "top_k": TOP_K, "kv": 1} for i in (1, 2)]
    assert count(program, torch.ops.fastmmoe.route_pairs.default) == 0
    assert count(program, torch.ops.fastmmoe.route_pairs_topkv.default) == 2
    embeds, vision = inputs()
    logits, _ = run(program, embeds, vision)
    torch.testing.assert_close(logits, eager(model, embeds, vision, kv=1, reduce_from=1)[0], atol=1e-5, rtol=1e-5)
    assert not (logits - eager(model, embeds, vision)[0]).abs().max() < 1e-4  # it did change the model


def test_modality_topk_with_kv_equal_k_changes_nothing(program):
    before = summarize(program)
    result = ModalityTopK(lambda layer, k: k)(program)
    assert not result.modified and result.changes == []
    assert diff(before, summarize(program)) == "no changes\n"


@pytest.mark.parametrize("strategy,method", [("hybrid", "mlerp"), ("routing", "mean"), ("attention", "mlerp")])
def test_routing_merge(model, program, strategy, method):
    config = FastMMoEConfig(merge_layers=(1,), keep_ratio=0.5, merge_ratio=0.3, window=3, alpha=0.4,
                            strategy=strategy, merge_method=method)
    result = TokenReduction(config.stages(), name="routing_merge")(program)
    assert result.modified and [c["layer"] for c in result.changes] == [1]
    assert count(program, torch.ops.fastmmoe.merge_tokens.default) == 1
    assert count(program, torch.ops.fastmmoe.last_token_attention.default) == 1
    assert count(program, torch.ops.aten.softmax.int) == 3  # the layer-1 router, cloned onto the pre-merge stream
    # later reads of the old sequence are gathered: the mask at layer 2 and kept_positions
    assert count(program, torch.ops.fastmmoe.gather_tokens.default) == 2
    embeds, vision = inputs()
    logits, kept = run(program, embeds, vision)
    ref_logits, ref_kept = eager(model, embeds, vision, stages=config.stages())
    assert kept.shape == (2, 20 - 12 + 6) and torch.equal(kept, ref_kept)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_two_stages_and_topkv_through_apply_passes(model, program):
    config = FastMMoEConfig(reduce_from_layer=1, vision_topk=1, merge_layers=(1, 2), keep_ratio=0.25)
    program, record = apply_passes(program, config)
    assert [p["pass"] for p in record.passes] == ["modality_topk", "routing_merge"]
    assert all(p["modified"] for p in record.passes)
    assert "+ 1 x fastmmoe.merge_tokens" in record.graph_diff and "N2 = min(N1" in record.graph_diff
    embeds, vision = inputs(seq=30, vision=range(2, 26))
    logits, kept = run(program, embeds, vision)
    ref_logits, ref_kept = eager(model, embeds, vision, kv=1, reduce_from=1, stages=config.stages())
    assert kept.shape == (2, 30 - 24 + 6) and torch.equal(kept, ref_kept)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_each_stage_size_is_one_symbol_and_the_program_saves(model, program, tmp_path):
    """Each merge stage's sizes are one unbacked symbol, bound to what the kernel returns: the exact
    count in floor divisions holds N three times, so nested over k stages it grows as 3^k, and three
    stages kept Inductor's size simplification busy for over 20 minutes (benchmarks/RESULTS.md). The
    symbols' ranges are in the program's range constraints, so it saves and loads (torch.export.load
    rebuilds every shape from them) and computes what the eager model computes."""
    config = FastMMoEConfig(reduce_from_layer=1, merge_layers=(1, 2), keep_ratio=0.25)
    program, _ = apply_passes(program, config)
    merges = [n for n in program.graph.nodes if n.target == torch.ops.fastmmoe.merge_tokens.default]
    assert len(merges) == 2
    for node in merges:
        keep, hidden, vision = node.meta["val"]
        for d in (keep.shape[1], hidden.shape[1], vision.shape[1]):
            assert isinstance(d, torch.SymInt) and d.node.expr.is_Symbol, d
    torch.export.save(program, tmp_path / "p.pt2")
    loaded = torch.export.load(tmp_path / "p.pt2")
    embeds, vision = inputs(seq=30, vision=range(2, 26))
    logits, kept = run(loaded, embeds, vision)
    ref_logits, ref_kept = eager(model, embeds, vision, kv=config.kv(TOP_K), reduce_from=1, stages=config.stages())
    assert torch.equal(kept, ref_kept) and kept.shape[1] < 30
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_fastv(model, program):
    config = FastVConfig(prune_layer=1, keep_ratio=0.5)
    result = TokenReduction(config.stages(), name="fastv")(program)
    assert result.modified and result.changes[0]["strategy"] == "attention"
    assert count(program, torch.ops.aten.softmax.int) == 2  # scored by attention alone: no router clone
    merge = next(n for n in program.graph.nodes if n.target == torch.ops.fastmmoe.merge_tokens.default)
    assert merge.args[1] is None
    embeds, vision = inputs(seed=3)
    logits, kept = run(program, embeds, vision)
    ref_logits, ref_kept = eager(model, embeds, vision, stages=config.stages())
    assert torch.equal(kept, ref_kept)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_merge_at_a_dense_layer_is_a_clear_error(program):
    with pytest.raises(TokenReductionError, match="merge layer 0 has no routed-MoE router"):
        TokenReduction(FastMMoEConfig(merge_layers=(0,), keep_ratio=0.5).stages(), name="routing_merge")(program)


def test_diff_names_stage_counts(program):
    before = summarize(program)
    TokenReduction(FastMMoEConfig(merge_layers=(2,), keep_ratio=0.5).stages(), name="routing_merge")(program)
    text = diff(before, summarize(program))
    assert text.startswith("where:\n  N1 = min(N, max(1, floor(N * 0.5)))\n  S1 = S - N + N1\nlayer 2:\n")
    assert "fastmmoe.merge_tokens([B, S, 16], [B*S, 4], [B, S], [B, N], 500000, 25000, 3, 0.5, 'hybrid', 'mlerp')" \
        in text


def test_insert_call_takes_settings_by_name_only_when_they_match_the_schema(program):
    route = next(n for n in program.graph.nodes if n.target == torch.ops.fastmmoe.route_pairs.default)
    vision = next(n for n in program.graph.nodes if n.name == "vision_positions")
    new = insert_call(program.graph, torch.ops.fastmmoe.route_pairs_topkv.default, route.args[:2] + (vision,),
                      dict(kv=1), before=route, like=route)
    assert new.args[3] == 1 and new.meta["nn_module_stack"] == route.meta["nn_module_stack"]
    with pytest.raises(TypeError, match="do not match"):
        insert_call(program.graph, torch.ops.fastmmoe.route_pairs_topkv.default, route.args[:2] + (vision,),
                    dict(k=1), before=route)
