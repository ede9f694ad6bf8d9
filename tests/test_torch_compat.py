"""torch 2.11 - 2.14: the touch points of fastmmoe_compile/torch_compat.py, and the same greedy tokens on
every release (a golden file written on 2.13, compared on each release .ci/run installs).

What went wrong on torch 2.11 (the GPU loans' release), reproduced here on any release:
- grouped-query attention's K/V repeat as expand + reshape made export add the guard
  `Min(r*S, 2r*S) == r*S` and refuse the dynamic sequence (pytorch PR #185092 simplifies it later);
- FakeTensorProp over a rewritten graph ran aten.linear's C++ composite on symbolic shapes.
"""
import json
from pathlib import Path

import pytest
import torch
from torch.export import Dim

from fastmmoe_compile import FastMMoEConfig, compile_model
from fastmmoe_compile.torch_compat import SUPPORTED_TORCH, copy_program, repeat_kv_heads, supported, torch_version

GOLDEN = Path(__file__).parent / "golden" / "torch_versions_greedy.json"


def test_running_torch_is_a_supported_release():
    assert "%d.%d" % torch_version() in SUPPORTED_TORCH and supported()


def test_repeat_kv_heads_is_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    out = repeat_kv_heads(x, 4)
    assert out.shape == (2, 12, 5, 4) and out.is_contiguous()
    torch.testing.assert_close(out, torch.repeat_interleave(x, 4, dim=1), rtol=0, atol=0)
    assert repeat_kv_heads(x, 1) is x


class _GQA(torch.nn.Module):
    """4 query heads over 2 KV heads, causal boolean mask: the attention of every GQA family."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 8).transpose(1, 2)
        k = repeat_kv_heads(self.k(x).view(b, s, 2, 8).transpose(1, 2), 2)
        v = repeat_kv_heads(self.v(x).view(b, s, 2, 8).transpose(1, 2), 2)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()[None, None]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, 32)


def test_gqa_attention_exports_with_a_dynamic_sequence():
    """The expand + reshape form fails this on torch 2.11 (ConstraintViolationError on S); the engine's
    repeat exports on every release and runs at other lengths than the traced one."""
    model = _GQA().eval()
    program = torch.export.export(model, (torch.randn(2, 8, 32),), strict=False,
                                  dynamic_shapes={"x": {0: Dim("B", min=1, max=64), 1: Dim("S", min=2, max=4096)}})
    x = torch.randn(3, 37, 32)
    torch.testing.assert_close(program.module()(x), model(x))


def test_sdpa_attention_repeats_heads_with_the_engine_repeat_inside_only():
    import transformers.integrations.sdpa_attention as sdpa

    from fastmmoe_compile.models import load_model
    from fastmmoe_compile.transformers_compat import sdpa_attention

    loaded = load_model("tiny-qwen3-moe")
    original = sdpa.repeat_kv
    with sdpa_attention(loaded.lm):
        assert sdpa.repeat_kv is repeat_kv_heads
    assert sdpa.repeat_kv is original


def test_copy_program_rewrites_without_touching_the_original():
    """The passes on a copy give the graph they give on a fresh export; the original is unchanged and
    the copy shares its weights (same tensors)."""
    from fastmmoe_compile.export import export_backbone
    from fastmmoe_compile.models import load_model
    from fastmmoe_compile.methods import apply_passes
    from fastmmoe_compile.passes.diff import summarize

    loaded = load_model("tiny-qwen3-moe")
    config = FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5, merge_layers=(1,), keep_ratio=0.5)
    original = export_backbone(loaded)
    before = summarize(original)
    copy = copy_program(original)
    rewritten, record = apply_passes(copy, config)
    assert summarize(original) == before
    _, fresh = apply_passes(export_backbone(loaded), config)
    assert record.graph_diff == fresh.graph_diff and record.graph_diff
    assert all(rewritten.state_dict[k] is original.state_dict[k] for k in original.state_dict)
    inputs = (torch.randn(2, 24, loaded.config.hidden_size), torch.arange(2, 14).expand(2, 12).contiguous())
    torch.testing.assert_close(original.module()(*inputs)[0], export_backbone(loaded).module()(*inputs)[0])


def _backed_ranges(program) -> dict:
    return {str(k): str(v) for k, v in program.range_constraints.items() if not str(k).startswith("u")}


def test_rewrite_each_exports_once(monkeypatch):
    """One export for several configurations; each gets the record, the guards and the range constraints
    rewrite() gives it alone (the copies share the export's ShapeEnv, to which the merge's passes add
    guards: torch_compat.copy_program puts them back first)."""
    import fastmmoe_compile.api as api

    from fastmmoe_compile.config import FastVConfig

    calls = []
    real = api.export_backbone
    monkeypatch.setattr(api, "export_backbone", lambda *a, **k: calls.append(1) or real(*a, **k))
    configs = {"merge": FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5, merge_layers=(1, 3), keep_ratio=0.5),
               "topkv": FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5),
               "fastv": FastVConfig(prune_layer=1, keep_ratio=0.5)}
    done = []
    loaded, rewritten = api.rewrite_each("tiny-qwen3-moe", configs, on_done=lambda n, s: done.append(n))
    assert len(calls) == 1 and list(rewritten) == done == ["merge", "topkv", "fastv"]
    for name, config in configs.items():
        _, program, alone = api.rewrite(loaded, config)
        assert rewritten[name][1].graph_diff == alone.graph_diff
        assert rewritten[name][0]._guards_code == program._guards_code, name
        assert _backed_ranges(rewritten[name][0]) == _backed_ranges(program), name


def _greedy_case():
    from .test_decode import ids_of, sharp_model

    config = FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5, merge_layers=(1,), keep_ratio=0.5)
    engine = compile_model(sharp_model("tiny-qwen3-moe"), config, backend="export", quiet=True)
    prompts = [ids_of(20, 1), ids_of(13, 2)]
    vision = [torch.arange(2, 14), torch.arange(3, 9)]
    return [t.tolist() for t in engine.generate(prompts, vision_positions=vision, max_new_tokens=8)]


def test_topkv_merge_engine_greedy_tokens_equal_every_torch_release(update_golden):
    """A Top-Kv + merge engine (tiny-qwen3-moe, weights at std 0.15 so that top-2 logit gaps stay
    >= 1e-3) answers the tokens recorded on torch 2.13; .ci/run runs this on 2.11 and 2.14 too."""
    tokens = _greedy_case()
    if update_golden:
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, "tokens": tokens}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert tokens == golden["tokens"], f"torch {torch.__version__} vs {golden['torch']}"
    assert len({t for sample in tokens for t in sample}) > 2  # not one repeated token


def test_cuda_preflight_refuses_a_cpu_only_torch_in_one_line():
    import subprocess
    import sys

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build: .ci/run runs the preflight itself in the 2.11 and 2.14 venvs")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "cuda_preflight.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "CPU-only build" in proc.stderr


def _vision_after_two_stages(n):
    from fastmmoe_compile.algorithm import ratio_units, vision_after_stage

    return vision_after_stage(vision_after_stage(n, ratio_units(0.5)), ratio_units(0.25))


def _stride_decisions(stride):
    """What Inductor's C++ codegen reads from a vector stride (codegen/cpp.py's callers of
    stride_at_vec_range): its value when it is a number (0, 1, a constant stride); otherwise which
    loop variables it still has (need_vec_transpose) and whether it is all size symbols
    (TilingSelect: a constant non-unit stride). Mathematically equal strides in a different sympy
    form make the same decisions."""
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    if stride.is_number:
        return ("number", stride)
    loop_vars = sorted(str(s) for s in stride.free_symbols if str(s)[0] in "xd" and str(s)[1:].isdigit())
    return ("expr", loop_vars, all(symbol_is_type(s, SymT.SIZE) for s in stride.free_symbols))


def test_fast_stride_equals_inductors_on_stage_count_indices():
    """fast_stride_at_vec_range against Inductor's own analysis on the index shapes that made it slow: two
    stages' token counts (algorithm.vision_after_stage, nested) as divisors and coefficients, a var-free
    ModularIndexing of an indirect load, and lane-varying FloorDiv/ModularIndexing terms it must keep."""
    import sympy
    from torch._inductor.codegen import cpp
    from torch.utils._sympy.functions import FloorDiv, ModularIndexing

    from fastmmoe_compile.torch_compat import fast_cpp_stride_analysis, fast_stride_at_vec_range

    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()  # sizes as export and Inductor see them: SymInts whose // is FloorDiv
    s0, s1 = (env.create_symintnode(env.create_symbol(hint, ConstantSource(name)), hint=hint)
              for name, hint in (("S", 48), ("N", 37)))
    kept = (s0 - s1 + _vision_after_two_stages(s1)).node.expr
    s0, s1 = s0.node.expr, s1.node.expr
    assert str(kept).count("//") >= 6, kept
    x0, x1, tmp0 = sympy.symbols("x0 x1 tmp0", integer=True, nonnegative=True)
    indices = [
        64 * s0 * FloorDiv(x0, kept) + x1 + 64 * FloorDiv(s1, 2) * FloorDiv(x0, kept),
        x1 + 64 * ModularIndexing(tmp0, 4, s0 * kept) + 16 * kept * x0,
        4 * ModularIndexing(x1, 1, 16 * kept) + FloorDiv(x1, 16) + s0 * kept,
        FloorDiv(x1, 32) * kept + ModularIndexing(x1, 16, 4) + x0 * s0 * s1,
        s0 * s1 * x0 + s0 * x1 + 3,
        kept * 7,
    ]
    original = cpp.stride_at_vec_range
    fast = fast_stride_at_vec_range(original)
    compared = 0
    for index in indices:
        for var in (x0, x1):
            for vec_length in (None, 16):
                assert (_stride_decisions(fast(index, var, vec_length))
                        == _stride_decisions(original(index, var, vec_length))), (index, var)
                compared += 1
    assert compared == 24
    with fast_cpp_stride_analysis():
        assert cpp.stride_at_vec_range.original is original
        with fast_cpp_stride_analysis():  # nested: still the fast one, restored only by the outer exit
            pass
        assert cpp.stride_at_vec_range is not original
    assert cpp.stride_at_vec_range is original


def test_fast_stride_equals_inductors_in_a_dynamic_cpu_compile():
    """Every stride Inductor's C++ codegen asks for while compiling a dynamic-shape function whose sizes
    are a stage's token count (narrow to vision_after_stage, transpose, flatten, gather): the fast
    analysis gives the original's answer for each, and the compiled function matches eager."""
    from torch._inductor.codegen import cpp

    from fastmmoe_compile.algorithm import ratio_units, vision_after_stage
    from fastmmoe_compile.torch_compat import fast_cpp_stride_analysis

    def f(x, idx):
        kept = x.narrow(1, 0, vision_after_stage(x.shape[1], ratio_units(0.5)))
        return (kept.transpose(1, 2).contiguous() * 2, kept.reshape(kept.shape[0], -1)[:, 3:].sum(-1),
                x.index_select(1, idx))

    calls = []
    with fast_cpp_stride_analysis():
        fast = cpp.stride_at_vec_range

        def spy(index, var, vec_length=None):
            calls.append((index, var, vec_length))
            return fast(index, var, vec_length)

        cpp.stride_at_vec_range = spy
        try:
            torch._dynamo.reset()
            compiled = torch.compile(f, dynamic=True, backend="inductor")
            x, idx = torch.randn(2, 37, 16), torch.tensor([0, 5, 36])
            with torch._inductor.config.patch(force_disable_caches=True):  # codegen runs, not a cache hit
                out = compiled(x, idx)
        finally:
            cpp.stride_at_vec_range = fast
    torch.testing.assert_close(out, f(x, idx))
    assert len(calls) >= 10, calls
    assert any(str(index).count("//") >= 3 for index, _, _ in calls), calls  # the stage counts reached codegen
    same = 0
    for index, var, vec_length in calls:
        mine, inductors = fast(index, var, vec_length), fast.original(index, var, vec_length)
        assert _stride_decisions(mine) == _stride_decisions(inductors), (index, var, mine, inductors)
        same += mine == inductors
    assert same >= len(calls) // 2, (same, len(calls))  # most are the same expression, term for term


class _StageCounts(torch.nn.Module):
    """Sizes like an engine's after a merge stage: products, sums and floor divisions of B, S, N."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, positions):
        n = positions.shape[1]
        kept = x[:, : x.shape[1] - n + (n + 1) // 2]  # S - N + ceil(N / 2) tokens
        h = self.proj(torch.cat([kept, x[:, :1]], dim=1))
        return h.reshape(-1, 8).sum(0), h.flatten(1)


def _meta_lines(program) -> list[str]:
    lines = []
    for node in program.graph.nodes:
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else [val]
        shapes = [(str(v.shape), str(v.stride()), v.dtype) if isinstance(v, torch.Tensor) else repr(v) for v in vals]
        lines.append(f"{node.op} {node.name} {node.target} {node.args} {shapes}")
    return lines


def test_fast_export_load_builds_the_same_program(tmp_path):
    """torch_compat.fast_export_load: torch.export.load with the remembered type hints and size-expression
    parses gives the program plain torch.export.load gives (graph, every node's fake sizes and strides,
    range constraints, outputs), and puts torch's serde back as it was, also when nested."""
    from torch._export.serde import serialize

    from fastmmoe_compile.torch_compat import fast_export_load

    batch, seq, vision = Dim("batch", min=1, max=64), Dim("seq", min=4, max=1024), Dim("vision", min=1, max=512)
    x, positions = torch.randn(2, 20, 8), torch.zeros(2, 6, dtype=torch.int64)
    program = torch.export.export(_StageCounts(), (x, positions), strict=False,
                                  dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: vision}))
    path = tmp_path / "program.pt2"
    torch.export.save(program, path)
    typing_module, sympy_module = serialize.typing, serialize.sympy
    plain = torch.export.load(path)
    with fast_export_load():
        with fast_export_load():
            fast = torch.export.load(path)
        assert serialize.typing is not typing_module  # still on for the outer user
        again = torch.export.load(path)  # with what the first load left in the caches
    assert serialize.typing is typing_module and serialize.sympy is sympy_module
    for loaded in (fast, again):
        assert _meta_lines(loaded) == _meta_lines(plain)
        assert {str(k): str(v) for k, v in loaded.range_constraints.items()} == \
            {str(k): str(v) for k, v in plain.range_constraints.items()}
        for b, s, n in [(1, 9, 3), (3, 40, 17)]:
            args = (torch.randn(b, s, 8), torch.zeros(b, n, dtype=torch.int64))
            for got, want in zip(loaded.module()(*args), plain.module()(*args)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)

