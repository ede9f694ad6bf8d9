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
        rows = sorted(zip(token.tolist(), expert.tolist(), weight.tolist()))
        return [r[:2] for r in rows], torch.tensor([r[2] for r in rows])

    (ids_a, w_a), (ids_b, w_b) = canon(a), canon(b)
    assert ids_a == ids_b
    torch.testing.assert_close(w_a, w_b, atol=1e-6, rtol=1e-5)  # rescaling by sum/sum is 1 up to rounding


# --- Section 2: one merge stage ------------------------------------------------------

@st.composite
def stage_case(draw):
    seq = draw(st.integers(2, 30))
    n = draw(st.integers(0, seq))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    vision = torch.randperm(seq, generator=g)[:n].sort().values
    hidden = torch.randn(seq, 6, generator=g)
    probs = torch.rand(seq, 5, generator=g).softmax(-1)
    attn = torch.rand(seq, generator=g)
    ratio = draw(st.sampled_from([0.25, 0.5, 0.63, 0.794, 0.91, 1.0]))
    merge_ratio = draw(st.sampled_from([0.0, 0.025, 0.2, 0.5, 1.0]))
    window = draw(st.integers(2, 4))
    strategy = draw(st.sampled_from(["hybrid", "routing", "attention"]))
    method = draw(st.sampled_from(["mlerp", "mean"]))
    return hidden, probs, attn, vision, ratio, merge_ratio, window, strategy, method


@settings(max_examples=150, deadline=None)
@given(stage_case())
def test_merge_stage_properties(case):
    hidden, probs, attn, vision, ratio, merge_ratio, window, strategy, method = case
    seq, n = hidden.shape[0], vision.shape[0]
    # The kernel on one sample (a batch of 1): docs/fastmmoe.md's properties hold for it directly.
    keep, new_hidden, new_vision = (t[0] for t in algorithm.merge_stage(
        hidden[None], probs[None], attn[None], vision[None], ratio_q=algorithm.ratio_units(ratio),
        merge_ratio_q=algorithm.ratio_units(merge_ratio), window=window, alpha=0.5, strategy=strategy,
        method=method))
    target = max(1, int(n * ratio + 1e-9)) if n else 0
    expected_n = n if n <= max(1, target) else target
    # token counts per stage; order preserved; text never dropped
    assert new_vision.shape[0] == expected_n
    assert keep.shape[0] == seq - n + expected_n == new_hidden.shape[0]
    assert bool((keep[1:] > keep[:-1]).all())
    text = sorted(set(range(seq)) - set(vision.tolist()))
    assert set(text) <= set(keep.tolist())
    kept_vision = keep[new_vision].tolist()
    assert set(kept_vision) == set(keep.tolist()) - set(text)
    vis = vision.tolist()
    for slot, pos in zip(new_vision.tolist(), kept_vision):
        if torch.equal(new_hidden[slot], hidden[pos]):
            continue
        # a merged token: sits at its window's first token; windows never cross the end
        i = vis.index(pos)
        assert i % window == 0
        members = vis[i:i + window]
        assert len(members) >= 2 and set(members[1:]).isdisjoint(keep.tolist())
        if method == "mlerp":  # MLERP norm = largest member norm
            assert torch.isclose(new_hidden[slot].norm(), hidden[members].norm(dim=-1).max(), rtol=1e-5)
        else:
            assert torch.allclose(new_hidden[slot], hidden[members].mean(dim=0), atol=1e-6)
    # every text token's state is untouched
    for slot, pos in enumerate(keep.tolist()):
        if pos in text:
            assert torch.equal(new_hidden[slot], hidden[pos])


def test_vision_after_stage_is_the_spec_formula_in_floor_divisions():
    for ratio in (0.05, 0.25, 0.5, 0.63, 0.794, 0.9086, 0.999999, 1.0):
        q = algorithm.ratio_units(ratio)
        for n in list(range(0, 2500)) + [algorithm.MAX_VISION_TOKENS - 1, algorithm.MAX_VISION_TOKENS]:
            assert algorithm.vision_after_stage(n, q) == (min(n, max(1, n * q // 1_000_000)) if n else 0)
