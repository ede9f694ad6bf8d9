"""Properties of the pure Top-Kv math (hypothesis), checked against plain Python."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmmoe_compile import algorithm


@st.composite
def routing(draw):
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(2, 12))
    top_k = draw(st.integers(1, 6))
    experts = draw(st.integers(top_k, 10))
    n_vision = draw(st.integers(0, seq))
    kv = draw(st.integers(1, top_k))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.rand(batch * seq, experts, generator=g)
    weights, ids = torch.topk(scores, top_k, dim=-1, sorted=draw(st.booleans()))
    positions = torch.stack([torch.randperm(seq, generator=g)[:n_vision].sort().values for _ in range(batch)])
    return weights, ids, positions.reshape(batch, n_vision), kv


@settings(max_examples=60, deadline=None)
@given(routing())
def test_modality_pairs_keep_k_text_and_kv_vision_pairs(case):
    weights, ids, positions, kv = case
    batch, n_vision = positions.shape
    num_tokens, top_k = weights.shape
    seq = num_tokens // batch
    token, expert, weight = algorithm.modality_pairs(weights, ids, positions, kv)
    assert token.numel() == algorithm.num_modality_pairs(num_tokens, batch * n_vision, top_k, kv)
    vision_rows = {b * seq + int(p) for b in range(batch) for p in positions[b]}
    for row in range(num_tokens):
        mine = (token == row).nonzero().flatten()
        chosen = {int(expert[i]) for i in mine}
        if row in vision_rows:
            # the kv highest-weight experts of the row's own top-K, rescaled to the K mass
            best = sorted(range(top_k), key=lambda j: -float(weights[row, j]))[:kv]
            assert chosen == {int(ids[row, j]) for j in best}
            assert torch.isclose(weight[mine].sum(), weights[row].sum(), atol=1e-5)
        else:
            assert chosen == {int(i) for i in ids[row]}
            assert torch.allclose(weight[mine].sort().values, weights[row].sort().values)


@settings(max_examples=30, deadline=None)
@given(routing())
def test_kv_equal_k_gives_every_pair(case):
    weights, ids, positions, _ = case
    top_k = weights.shape[1]
    a = algorithm.modality_pairs(weights, ids, positions, top_k)
    b = algorithm.all_pairs(weights, ids)

    def canon(pairs):
        token, expert, weight = pairs
        return sorted(zip(token.tolist(), expert.tolist(), [round(w, 5) for w in weight.tolist()]))

    assert canon(a) == canon(b)
