"""The command line: presets, diff, errors as one line with exit code 2."""
import pytest

from fastmmoe_compile.cli import main


def test_presets_lists_every_family(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny-qwen3-moe", "tiny-deepseek-v2", "tiny-glm4-moe", "internvl3.5-30b-a3b-backbone"):
        assert name in out


def test_diff_prints_the_rewrite(capsys):
    assert main(["diff", "tiny-qwen3-moe", "--reduce-from-layer", "3", "--vision-topk", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layer 3:\n")
    assert "+ 1 x fastmmoe.route_pairs_topkv" in out and "[B, N], 1)" in out


@pytest.mark.parametrize("argv,message", [
    (["tiny-qwen3-moe", "--out", "x", "--vision-expert-ratio", "0"], "vision_expert_ratio must be in (0, 1]"),
    (["tiny-qwen3-moe", "--out", "x", "--reduce-from-layer", "9"], "out of range: the model has 4 decoder layers"),
    (["tiny-qwen3-moe", "--out", "x", "--merge-layers", "5,2"], "strictly increasing"),
    (["tiny-qwen3-moe", "--out", "x", "--vision-topk", "6"], "exceeds the model's top-k (4)"),
    (["/no/such/checkpoint", "--out", "x"], "no checkpoint directory"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_unsupported_family_lists_supported(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    assert main([str(tmp_path / "llama"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "'llama' is not a supported routed-MoE family" in err and "qwen3_moe" in err


def test_inspect_refuses_a_plain_directory(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a fastmmoe engine" in capsys.readouterr().err


def test_flops_json_on_a_real_size_shape(capsys):
    import json

    assert main(["flops", "internvl3.5-30b-a3b-backbone", "--preset", "internvl3.5-30b-a3b", "--keep-ratio", "0.5",
                 "--vision-tokens", "1024", "--text-tokens", "64", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["baseline_flops"] > d["fastmmoe_flops"] > 0
    assert d["reduction"] == pytest.approx(1 - d["fastmmoe_flops"] / d["baseline_flops"])
    assert 0.3 < d["reduction"] < 0.8


def test_flops_table_for_a_tiny_preset(capsys):
    assert main(["flops", "tiny-qwen3-moe", "--vision-tokens", "24", "--text-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("workload: 16 text + 24 vision tokens") and "fewer FLOPs" in out
