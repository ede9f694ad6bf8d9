"""lower/complex_real.py: a program with complex values rewritten onto real (real, imaginary) pairs
computes what the complex program computes (transformers' own DeepSeek-V2 rotary functions, a
complex product, a gather along the sequence), and nothing complex is left for ONNX."""
import pytest
import torch

from fastmmoe_compile.lower.complex_real import ComplexOpError, real_valued
from fastmmoe_compile.models.deepseek import tiny_v2_config


class Rotary(torch.nn.Module):
    """DeepseekV2RotaryEmbedding + apply_rotary_emb as the model runs them, then a gather of the
    table by kept positions (what a merge inserts) and a second rotation with it."""

    def __init__(self):
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

        super().__init__()
        self.rope, self.apply = m.DeepseekV2RotaryEmbedding(tiny_v2_config()), m.apply_rotary_emb

    def forward(self, q, k, keep):
        positions = torch.arange(q.shape[2])[None]
        freqs = self.rope(q, positions)  # complex [1, S, d/2]
        q1, k1 = self.apply(q, k, freqs)
        table = freqs.expand(keep.shape[0], -1, -1)
        kept = torch.gather(table, 1, keep[:, :, None].expand(-1, -1, table.shape[-1]))  # [B, S', d/2]
        q2, _ = self.apply(q1[:, :, : keep.shape[1]], k1[:, :, : keep.shape[1]], kept)
        return q1, k1, q2


def test_real_pairs_compute_the_complex_rotary():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 1, 9, 8, generator=g)
    keep = torch.tensor([[0, 2, 3, 7, 8], [1, 2, 4, 5, 8]])
    program = torch.export.export(Rotary(), (q, k, keep)).run_decompositions({})
    assert any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex() for n in program.graph.nodes)
    expected = program.module()(q, k, keep)
    real = real_valued(program.run_decompositions({}))  # a copy: real_valued rewrites in place
    assert not any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex()
                   for n in real.graph.nodes)
    for mine, theirs in zip(real.module()(q, k, keep), expected):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_unknown_complex_ops_are_named():
    class Exp(torch.nn.Module):
        def forward(self, x):
            return torch.view_as_real(torch.view_as_complex(x).exp())

    with pytest.raises(ComplexOpError, match="aten.exp"):
        real_valued(torch.export.export(Exp(), (torch.randn(3, 2),)).run_decompositions({}))
