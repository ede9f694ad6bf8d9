"""The onnx backend: ONNX Runtime engines compute what the rewritten program computes (Top-Kv,
token merging, FastV; two families; batch 1 and 2; several sequence and vision lengths), keep
Top-Kv's savings (the grouped GEMM sees exactly the routed pairs), and pass the ONNX checker
with full shape inference."""
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

from fastmmoe_compile import FastMMoEConfig, FastVConfig, compile_model, load_engine  # noqa: E402
from fastmmoe_compile.api import rewrite  # noqa: E402
from fastmmoe_compile.cli import main  # noqa: E402
from fastmmoe_compile.lower.onnx import DOMAIN, export_onnx  # noqa: E402
from fastmmoe_compile.runtime.onnx_runtime import OrtBackbone  # noqa: E402

from .conftest import hf_last_logits, tiny_model  # noqa: E402

TOPKV = FastMMoEConfig(vision_expert_ratio=0.5, reduce_from_layer=1)
# Top-Kv and two merge stages; a merge ratio high enough that windows really merge (M > 0) at these N
MERGE = FastMMoEConfig(vision_expert_ratio=0.5, reduce_from_layer=1, merge_layers=(1, 2), keep_ratio=0.5,
                       merge_ratio=0.3)
FASTV = FastVConfig(prune_layer=2, keep_ratio=0.5)
CASES = ["qwen3-topkv", "deepseek3-merge", "qwen3-fastv"]
# (batch, seq, vision positions): batch 1 and 2, a prompt without vision tokens, vision at the end
SHAPES = [(1, 20, range(3, 11)), (2, 33, range(5, 30)), (2, 9, range(0)), (1, 16, range(4, 15))]


@pytest.fixture(scope="session")
def onnx_engines(tmp_path_factory):
    """(loaded, program, engine dir) per case: one export each for the whole session. The first
    goes through compile_model (an engine dir, loaded by load_engine), the others straight
    through export_onnx into a directory of their own (to save a second rewrite)."""
    root = tmp_path_factory.mktemp("onnx")
    cases = {}
    for key, name, config in [("qwen3-topkv", "tiny-qwen3-moe", TOPKV), ("deepseek3-merge", "tiny-deepseek-v3", MERGE),
                              ("qwen3-fastv", "tiny-qwen3-moe", FASTV)]:
        loaded = tiny_model(name)
        _, program, _ = rewrite(loaded, config)
        out = root / key
        if key == "qwen3-topkv":
            compile_model(loaded, config, out, backend="onnx", quiet=True)
        else:
            out.mkdir()
            export_onnx(program, out / "backbone.onnx")
        cases[key] = (loaded, program, out)
    return cases


def _runner(out):
    """prefill of the engine dir, or the bare ORT session where the case has no manifest."""
    if (out / "manifest.json").is_file():
        engine = load_engine(out)
        assert engine.manifest["backend"] == "onnx"

        def run(embeds, positions):
            result = engine.prefill(inputs_embeds=embeds, vision_positions=positions)
            return result.logits, result.kept_positions

        return run
    return OrtBackbone(out / "backbone.onnx")


def _inputs(loaded, batch, seq, vision, seed=0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, seq, loaded.config.hidden_size, generator=g)
    positions = torch.tensor(list(vision), dtype=torch.long).expand(batch, -1).contiguous()
    return embeds, positions


@pytest.mark.parametrize("key", CASES)
def test_onnx_engine_matches_the_program(onnx_engines, key):
    loaded, program, out = onnx_engines[key]
    run, module = _runner(out), program.module()
    for i, (batch, seq, vision) in enumerate(SHAPES):
        embeds, positions = _inputs(loaded, batch, seq, vision, seed=i)
        logits, kept = run(embeds, positions)[:2]
        with torch.no_grad():
            expected = module(embeds, positions)
        torch.testing.assert_close(logits, expected[0], atol=1e-4, rtol=0)
        assert torch.equal(kept, expected[1])
        if key != "qwen3-topkv" and len(vision) > 2:
            assert kept.shape[1] < seq  # the reduced configs did drop tokens
        if not vision:  # no vision token: the original model
            torch.testing.assert_close(logits, hf_last_logits(loaded, embeds), atol=1e-4, rtol=0)


def test_onnx_model_passes_the_checker(onnx_engines):
    for _, _, out in onnx_engines.values():
        onnx.checker.check_model(str(out / "backbone.onnx"), full_check=True)
        model = onnx.load(str(out / "backbone.onnx"))
        assert [i.name for i in model.graph.input] == ["inputs_embeds", "vision_positions"]
        dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
        assert all(isinstance(d, str) for d in dims[0][:2] + dims[1]), dims  # batch, sequence, vision are dynamic


def test_onnx_moe_computes_only_the_routed_pairs(onnx_engines, tmp_path):
    """Every expert GEMM of the ONNX graph is our grouped_mm (no all-experts matmul), and the rows
    it is handed, counted by running ORT with them as extra outputs, are n_text*K + n_vision*Kv."""
    loaded, _, out = onnx_engines["qwen3-topkv"]
    model = onnx.load(str(out / "backbone.onnx"))
    calls = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == "grouped_mm"]
    layers = loaded.config.num_hidden_layers
    assert len(calls) == 2 * layers  # gate_up and down per MoE layer
    experts = loaded.config.num_experts
    for n in model.graph.node:  # no dense expert compute: nothing else reads an [E, ...] expert weight
        if n.op_type in ("MatMul", "Gemm", "Einsum"):
            for name in n.input:
                init = next((t for t in model.graph.initializer if t.name == name), None)
                assert init is None or len(init.dims) < 3 or init.dims[0] != experts, (n.name, name)
    for n in calls[::2]:
        model.graph.output.append(onnx.helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None))
    probe = tmp_path / "probe.onnx"
    onnx.save(model, str(probe))
    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    batch, seq, vision = 2, 33, range(5, 30)
    embeds, positions = _inputs(loaded, batch, seq, vision)
    rows = [o.shape[0] for o in session.run(None, {"inputs_embeds": embeds.numpy(),
                                                   "vision_positions": positions.numpy()})[-layers:]]
    k, kv, n_vis = loaded.config.num_experts_per_tok, TOPKV.kv(loaded.config.num_experts_per_tok), len(vision)
    full, reduced = batch * seq * k, batch * ((seq - n_vis) * k + n_vis * kv)
    assert rows == [full] * TOPKV.reduce_from_layer + [reduced] * (layers - TOPKV.reduce_from_layer)
    assert reduced < full


def test_onnx_identity_config_in_process():
    """Kv == K through compile_model without out= (an in-process ORT session): the HF model."""
    loaded = tiny_model("tiny-qwen3-moe")
    engine = compile_model(loaded, FastMMoEConfig(vision_expert_ratio=1.0), backend="onnx", quiet=True)
    embeds, positions = _inputs(loaded, 2, 24, range(2, 20))
    result = engine.prefill(inputs_embeds=embeds, vision_positions=positions)
    torch.testing.assert_close(result.logits, hf_last_logits(loaded, embeds), atol=1e-4, rtol=0)


def test_unsupported_onnx_inputs_fail_cleanly(tmp_path, capsys):
    assert main(["tiny-qwen3-moe", "--out", str(tmp_path / "trt"), "--backend", "tensorrt", "--quiet"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err and not (tmp_path / "trt").exists()
    _, program, _ = rewrite(tiny_model("tiny-qwen3-moe"), FastMMoEConfig())
    for name, t in program.state_dict.items():
        if t.is_floating_point():
            program.state_dict[name] = t.to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        export_onnx(program, tmp_path / "x.onnx")
    _, program, _ = rewrite(tiny_model("tiny-deepseek-v2"), FastMMoEConfig())
    with pytest.raises(NotImplementedError, match="complex"):  # its rotary embedding: torch.onnx cannot yet
        export_onnx(program, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []
