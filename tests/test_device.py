"""Device plumbing: --device / device= on compile and load, recorded in the manifest, and the
one-line errors for a device this machine lacks or an engine loaded on the wrong one."""
import json

import pytest
import torch

from fastmmoe_compile.api import compile_model, target_device
from fastmmoe_compile.cli import main
from fastmmoe_compile.config import FastMMoEConfig
from fastmmoe_compile.runtime import device as dev
from fastmmoe_compile.runtime.device import DeviceError
from fastmmoe_compile.runtime.engine import load_engine

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


@pytest.fixture(scope="module")
def bf16_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "bf16"
    compile_model("tiny-qwen3-moe", FastMMoEConfig(), out=out, backend="export", dtype=torch.bfloat16,
                  quiet=True, decode=False, device="cpu")
    return out


@no_cuda
def test_cli_device_cuda_without_cuda_is_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sub" / "engine"
    assert main(["tiny-qwen3-moe", "--out", str(out), "--device", "cuda", "--backend", "export"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "--device cpu" in err[0], err
    assert list(tmp_path.iterdir()) == []  # not even the parent directory


@no_cuda
def test_compile_model_device_cuda_without_cuda_fails_before_loading(tmp_path, monkeypatch):
    import fastmmoe_compile.api as api

    monkeypatch.setattr(api, "rewrite", lambda *a, **k: pytest.fail("loaded a model before the device check"))
    with pytest.raises(DeviceError, match="CUDA"):
        compile_model("tiny-qwen3-moe", out=tmp_path / "e", device="cuda")
    with pytest.raises(DeviceError, match="one of cpu, cuda"):
        compile_model("tiny-qwen3-moe", out=tmp_path / "e", device="tpu")
    assert list(tmp_path.iterdir()) == []


def test_onnx_cannot_target_cuda(monkeypatch):
    monkeypatch.setattr(dev, "cuda_missing_reason", lambda: None)  # as on a GPU machine
    with pytest.raises(DeviceError, match="onnx runs on the CPU"):
        target_device("tiny-qwen3-moe", "cuda", "onnx")
    assert target_device("tiny-qwen3-moe", "cuda", "inductor") == "cuda"
    assert target_device("tiny-qwen3-moe", None, "inductor") == "cpu"


def test_manifest_records_device_and_dtype(bf16_engine):
    manifest = json.loads((bf16_engine / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["dtype"] == "bfloat16"
    engine = load_engine(bf16_engine)
    assert engine.device == torch.device("cpu") and engine.dtype == torch.bfloat16
    assert engine.embeddings.device.type == "cpu" and engine.embeddings.dtype == torch.bfloat16


def test_cpu_engine_refuses_cuda(bf16_engine, capsys):
    with pytest.raises(DeviceError) as e:
        load_engine(bf16_engine, device="cuda")
    message = str(e.value)
    assert "\n" not in message and "compiled for cpu" in message and "--device cuda" in message
    assert load_engine(bf16_engine, device="cpu").device.type == "cpu"


@no_cuda
def test_cuda_engine_without_cuda_says_what_to_do(bf16_engine, tmp_path, capsys):
    import shutil

    engine = tmp_path / "cuda_engine"
    shutil.copytree(bf16_engine, engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    (engine / "manifest.json").write_text(json.dumps({**manifest, "device": "cuda"}))  # as a GPU compile writes it
    with pytest.raises(DeviceError, match="compiled for cuda, but .*recompile the model with --device cpu"):
        load_engine(engine)
    assert main(["run", str(engine), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compiled for cuda" in err[0]


def test_on_device_is_the_identity_on_cpu_and_moves_nested_inputs():
    fn = lambda *a: a  # noqa: E731
    assert dev.on_device(fn, "cpu") is fn
    x = {"a": [torch.ones(2)], "b": 3}
    assert dev.to_device(x, torch.device("cpu"))["a"][0] is x["a"][0]
    assert dev.to_device(x, torch.device("meta"))["a"][0].device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_export_engine_matches_cpu_engine(tmp_path):
    config = FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5, merge_layers=(1,), keep_ratio=0.5)
    cpu = compile_model("tiny-qwen3-moe", config, out=tmp_path / "cpu", backend="export", dtype=torch.float32,
                        quiet=True)
    gpu = compile_model("tiny-qwen3-moe", config, out=tmp_path / "gpu", backend="export", dtype=torch.float32,
                        quiet=True, device="cuda")
    assert json.loads((tmp_path / "gpu" / "manifest.json").read_text())["device"] == "cuda"
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    vp = torch.arange(4, 20)[None]
    a, b = cpu.prefill(ids, vision_positions=vp), gpu.prefill(ids, vision_positions=vp)
    assert b.logits.device.type == "cuda" and b.cache[0][0].device.type == "cuda"
    torch.testing.assert_close(b.logits.cpu(), a.logits, rtol=1e-3, atol=1e-3)
    assert [t.tolist() for t in gpu.generate(ids, vision_positions=vp, max_new_tokens=4)] == \
        [t.tolist() for t in cpu.generate(ids, vision_positions=vp, max_new_tokens=4)]
