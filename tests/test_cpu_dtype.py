"""A CPU engine's dtype follows the CPU's bf16 speed (runtime/cpu.py, api.choose_dtype), and
`fastmmoe-compile env` reports the machine (collect_env.py).

Both kinds of CPU run here whatever this machine is: FASTMMOE_CPU_CAPABILITY (the override) says
AVX2 (no native bf16) or AVX512_BF16 (native), and oneDNN capped to AVX2 (ONEDNN_MAX_CPU_ISA, in a
subprocess) makes the real micro-GEMM slow on any x86 CPU. Engines use the export backend with no
decode program (seconds); the dtype logic does not depend on the backend.
"""
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fastmmoe_compile.api import choose_dtype, compile_model
from fastmmoe_compile.cli import main
from fastmmoe_compile.runtime import load_engine
from fastmmoe_compile.runtime.cpu import (
    ENV_OVERRIDE, NATIVE_BF16, CpuCapabilityError, SlowBf16Warning, bf16_speed, hardware_capability, measure,
)

ROOT = Path(__file__).resolve().parents[1]
SLOW, FAST = "AVX2", "AVX512_BF16"


@pytest.fixture
def cpu(monkeypatch):
    """cpu(capability): FASTMMOE_CPU_CAPABILITY for the test's duration."""
    return lambda capability: monkeypatch.setenv(ENV_OVERRIDE, capability)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny qwen3_moe checkpoint saved in bf16 by save_pretrained, as real checkpoints are stored."""
    from fastmmoe_compile.models import load_model

    path = tmp_path_factory.mktemp("ckpt") / "bf16"
    load_model("tiny-qwen3-moe").lm.to(torch.bfloat16).save_pretrained(path)
    return path


def _manifest(engine_dir) -> dict:
    return json.loads((Path(engine_dir) / "manifest.json").read_text())


# --- the verdict -------------------------------------------------------------------------------

def test_override_decides_without_timing(cpu):
    cpu(SLOW)
    slow = bf16_speed()
    assert not slow.native and slow.fp32_gflops is None and slow.slowdown == 40.0
    assert "AVX2" in slow.describe() and "40x slower" in slow.describe()
    cpu(FAST.lower())  # case-insensitive
    fast = bf16_speed()
    assert fast.native and fast.slowdown is None and fast.as_dict()["capability"] == FAST


def test_override_must_be_a_known_capability(cpu):
    cpu("AVX9000")
    with pytest.raises(CpuCapabilityError, match="AVX9000.*AVX512_BF16"):
        bf16_speed()


def test_timed_verdict_agrees_with_the_cpu_flags_here():
    """Uncapped, the micro-GEMM says native exactly where the CPU has AMX / AVX-512 BF16 (on this
    project's machines: an AMX Xeon, native; an AVX2 EPYC, not)."""
    speed = measure()
    assert speed.fp32_gflops > 0 and speed.bf16_gflops > 0
    assert speed.native == (hardware_capability() in NATIVE_BF16), speed.describe()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="ONEDNN_MAX_CPU_ISA is x86's")
def test_timed_verdict_is_slow_where_onednn_has_no_bf16_kernels():
    """oneDNN capped to AVX2: the CPU flags may still say AMX, the timing says what runs."""
    code = ("from fastmmoe_compile.runtime.cpu import bf16_speed\n"
            "s = bf16_speed(); print(s.native, s.capability, s.slowdown)")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT)}
    env.pop(ENV_OVERRIDE, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    native, capability, slowdown = out.stdout.split()
    assert native == "False" and capability not in NATIVE_BF16 and float(slowdown) > 2, out.stdout


# --- the choice, before any loading ------------------------------------------------------------

def test_choice_for_a_bf16_checkpoint_follows_the_cpu(cpu, bf16_checkpoint, recwarn):
    cpu(SLOW)
    slow = choose_dtype(str(bf16_checkpoint), None, "cpu")
    assert slow.dtype == torch.float32 and "not the checkpoint's bfloat16" in slow.reason and "AVX2" in slow.reason
    cpu(FAST)
    fast = choose_dtype(str(bf16_checkpoint), None, "cpu")
    assert fast.dtype is None and fast.reason.startswith("the checkpoint's bfloat16")  # loaded as stored
    assert "native bf16" in fast.reason
    assert choose_dtype(str(bf16_checkpoint), None, "cpu", "onnx").dtype == torch.float32  # onnx: float32 only
    assert choose_dtype(str(bf16_checkpoint), None, "cuda").dtype == torch.bfloat16  # GPU targets unchanged
    assert not [w for w in recwarn if issubclass(w.category, SlowBf16Warning)]  # a default is no warning


def test_stored_dtype_from_the_safetensors_header_without_config_dtype(tmp_path):
    from safetensors.torch import save_file

    from fastmmoe_compile.models.loading import stored_dtype

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2, dtype=torch.bfloat16),
               "c": torch.zeros(2), "ids": torch.zeros(2, dtype=torch.int64)}, str(tmp_path / "model.safetensors"))
    assert stored_dtype(str(tmp_path)) == torch.bfloat16
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "torch_dtype": "float16"}))
    assert stored_dtype(str(tmp_path)) == torch.float16
    assert stored_dtype("org/hub-id") is None  # not read before loading: the loader's own default


def test_asking_for_bf16_on_a_slow_cpu_warns_once_and_is_honoured(cpu):
    cpu(SLOW)
    with pytest.warns(SlowBf16Warning) as caught:
        choice = choose_dtype("tiny-qwen3-moe", torch.bfloat16, "cpu")
    assert choice.dtype == torch.bfloat16 and choice.warned and len(caught) == 1
    assert "40x slower than fp32" in str(caught[0].message) and "\n" not in str(caught[0].message)
    cpu(FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowBf16Warning)  # a fast CPU: no warning
        assert choose_dtype("tiny-qwen3-moe", torch.bfloat16, "cpu").dtype == torch.bfloat16
        assert choose_dtype("tiny-qwen3-moe", None, "cpu").dtype is None  # presets: float32 random weights


def test_an_in_memory_bf16_model_is_compiled_as_it_is_with_a_warning(cpu):
    cpu(SLOW)
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)  # choose_dtype reads only its parameters' dtype
    with pytest.warns(SlowBf16Warning, match="the model object is bfloat16"):
        choice = choose_dtype(model, None, "cpu")
    assert choice.dtype is None and choice.reason == "the model object's own (bfloat16)"


# --- end to end: the CLI and load --------------------------------------------------------------

def test_a_checkpoint_found_bf16_only_once_loaded_warns_then(cpu, bf16_checkpoint, tmp_path, monkeypatch):
    """A hub id's dtype is not read before loading (stored_dtype None): the warning comes once it is known."""
    import fastmmoe_compile.models.loading as loading

    cpu(SLOW)
    monkeypatch.setattr(loading, "stored_dtype", lambda path: None)
    with pytest.warns(SlowBf16Warning, match="known only once loaded") as caught:
        engine = compile_model(str(bf16_checkpoint), out=tmp_path / "e", backend="export", decode=False, quiet=True)
    assert len([w for w in caught if issubclass(w.category, SlowBf16Warning)]) == 1
    assert engine.dtype == torch.bfloat16
    assert "known only once loaded" in _manifest(tmp_path / "e")["dtype_reason"]


def test_cli_dtype_bfloat16_on_a_slow_cpu_warns_in_one_line(cpu, tmp_path, capsys):
    cpu(SLOW)
    out = tmp_path / "e"
    assert main(["tiny-qwen3-moe", "--out", str(out), "--dtype", "bfloat16", "--backend", "export",
                 "--no-decode"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "warning" in line.lower()]
    assert len(warned) == 1 and warned[0].startswith("fastmmoe-compile: warning: bfloat16 asked for"), err
    assert "40x slower than fp32" in warned[0]
    assert any(line.startswith("[fastmmoe] dtype bfloat16: bfloat16 as asked") for line in err), err
    assert _manifest(out)["dtype"] == "bfloat16"


def test_bf16_checkpoint_without_dtype_is_float32_on_a_slow_cpu(cpu, bf16_checkpoint, tmp_path, capsys):
    cpu(SLOW)
    out = tmp_path / "e"
    assert main([str(bf16_checkpoint), "--out", str(out), "--backend", "export", "--no-decode"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err.lower()  # the default was chosen for speed: nothing to warn about
    line = [x for x in err.splitlines() if x.startswith("[fastmmoe] dtype ")]
    assert len(line) == 1 and line[0].startswith("[fastmmoe] dtype float32: float32, not the checkpoint's bfloat16")
    manifest = _manifest(out)
    assert manifest["dtype"] == "float32" and manifest["model"]["dtype"] == "float32"
    assert "not the checkpoint's bfloat16" in manifest["dtype_reason"] and "AVX2" in manifest["dtype_reason"]
    assert manifest["cpu"]["capability"] == SLOW and manifest["cpu"]["bf16_native"] is False
    result = load_engine(out).prefill(torch.randint(0, 256, (1, 12)), vision_positions=torch.arange(2, 8)[None])
    assert result.logits.dtype == torch.float32 and torch.isfinite(result.logits).all()


def test_bf16_checkpoint_keeps_bf16_on_a_native_cpu_and_warns_once_where_loaded_on_a_slow_one(
        cpu, bf16_checkpoint, tmp_path):
    cpu(FAST)
    out = tmp_path / "e"
    engine = compile_model(str(bf16_checkpoint), out=out, backend="export", decode=False, quiet=True)
    assert engine.dtype == torch.bfloat16
    manifest = _manifest(out)
    assert manifest["dtype"] == "bfloat16" and manifest["dtype_reason"].startswith("the checkpoint's bfloat16")
    assert manifest["cpu"]["capability"] == FAST
    cpu(SLOW)  # the engine moves to a slow-bf16 CPU
    with pytest.warns(SlowBf16Warning) as caught:
        load_engine(out)
        load_engine(out)
    mine = [w for w in caught if issubclass(w.category, SlowBf16Warning)]
    assert len(mine) == 1, [str(w.message) for w in mine]  # once per engine and process
    assert f"compiled on CPU capability {FAST}" in str(mine[0].message) and "--dtype float32" in str(mine[0].message)


# --- fastmmoe-compile env ----------------------------------------------------------------------

def test_env_reports_the_machine(cpu, capsys):
    cpu(SLOW)
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for expected in ("torch ", "transformers", "onnxruntime", "CPU", "capability    AVX2", "bf16 GEMMs    NOT native",
                     "a bf16 checkpoint compiles to float32", "GPUs", "export / cpu       yes"):
        assert expected in text, (expected, text)
    assert len(text.splitlines()) <= 40  # one screen
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["torch"]["version"] == torch.__version__ and env["cpu"]["bf16_native"] is False
    assert env["backends"]["export"]["cpu"] is None and env["backends"]["onnx"]["cuda"].startswith("runs on the CPU")
    assert env["backends"]["tensorrt"]["cpu"].startswith("backend 'tensorrt' is not built yet")


def test_env_without_onnxruntime(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["packages"]["onnxruntime"]["version"] is None
    why = env["backends"]["onnx"]["cpu"]
    assert "onnxruntime" in why and "pip install 'fastmmoe-compile[onnx]'" in why
    assert env["backends"]["export"]["cpu"] is None  # the others still run
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime   not importable" in text
    assert "onnx / cpu         no: the onnx backend needs the onnx extra (onnxruntime is missing)" in text


def test_env_with_cuda(monkeypatch, capsys):
    """A CUDA machine, simulated: a CUDA build of torch that sees one GPU."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2 ** 30, major=9,
                                                  minor=0))
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["cuda"]["available"] and env["cuda"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert env["backends"]["export"]["cuda"] is None
    assert env["backends"]["onnx"]["cuda"].startswith("runs on the CPU")
    assert main(["env"]) == 0
    assert "cuda:0        NVIDIA H100 80GB HBM3, 80.0 GiB, compute capability 9.0" in capsys.readouterr().out


def test_env_and_compile_refuse_bad_input(cpu, tmp_path, capsys):
    assert main(["env", "--jsn"]) == 2  # argparse's error: one line, exit 2 (cli._Parser)
    err = capsys.readouterr().err.strip()
    assert "unrecognized arguments: --jsn" in err and "\n" not in err
    cpu("AVX9000")
    assert main(["tiny-qwen3-moe", "--out", str(tmp_path / "e"), "--backend", "export"]) == 2  # before any work
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmmoe-compile: error: FASTMMOE_CPU_CAPABILITY='AVX9000'") and "\n" not in err
    assert not (tmp_path / "e").exists()
    assert main(["env"]) == 0  # env still reports the rest, and says what is wrong
    assert "bf16          unknown: FASTMMOE_CPU_CAPABILITY='AVX9000'" in capsys.readouterr().out
