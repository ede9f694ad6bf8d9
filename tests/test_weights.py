"""Weights stored once per engine (lower/weights.py, runtime/backends.load_weights): one shared
safetensors file for every program, the same outputs as the in-memory programs, clear errors for
a damaged weights file, and engines written before (weights inside each program) still load."""
import json
import os
import shutil

import pytest
import torch

from fastmmoe_compile import EngineFormatError, FastMMoEConfig, compile_model, load_engine
from fastmmoe_compile.runtime.manifest import write_manifest

CONFIG = FastMMoEConfig(vision_expert_ratio=0.5, reduce_from_layer=1)


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory):
    """A tiny qwen3_moe whose weights (about 6 MB) outweigh its graph, saved as a user's checkpoint."""
    from transformers import AutoModelForCausalLM

    from fastmmoe_compile.models.qwen3_moe import tiny_config

    config = tiny_config()
    config.num_hidden_layers, config.moe_intermediate_size = 2, 512
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide") / "ckpt"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def export_engine(wide_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "export"
    compile_model(str(wide_checkpoint), CONFIG, out=out, backend="export", quiet=True)
    return out


@pytest.fixture(scope="session")
def engine(export_engine):
    return load_engine(export_engine)


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 40), generator=g)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, 3:27] = True
    return ids, mask


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_engine_holds_one_copy_of_the_weights(export_engine, wide_checkpoint):
    checkpoint_bytes = (wide_checkpoint / "model.safetensors").stat().st_size
    manifest = json.loads((export_engine / "manifest.json").read_text())
    assert manifest["weights"] == {"file": "weights.safetensors"}
    assert set(manifest["programs"]) == {"backbone", "decode"}
    assert all(entry["weights"] == {} for entry in manifest["programs"].values())  # same names, one key each
    assert "weights.safetensors" in manifest["files"]  # hashed like every file of the engine
    # Before: backbone.pt2 and decode.pt2 each carried all of it (> 2x the checkpoint).
    assert _dir_bytes(export_engine) < 1.3 * checkpoint_bytes
    # The shared file holds exactly the model's tensors, bit for bit (plus the rotary tables, buffers).
    from safetensors.torch import load_file

    from fastmmoe_compile.models import load_model

    stored = load_file(export_engine / "weights.safetensors")
    original = load_model(str(wide_checkpoint)).lm.state_dict()
    assert {k for k in stored if "rotary_emb" not in k} == {"lm." + k for k in original}
    assert all(torch.equal(stored["lm." + k], v) for k, v in original.items())


def test_outputs_equal_the_in_memory_programs(engine, wide_checkpoint):
    reference = compile_model(str(wide_checkpoint), CONFIG, backend="export", quiet=True)  # weights never on disk
    ids, mask = _inputs()
    got, want = engine.prefill(ids, vision_mask=mask), reference.prefill(ids, vision_mask=mask)
    assert torch.equal(got.logits, want.logits)
    tokens = engine.generate(ids, vision_mask=mask, max_new_tokens=4)
    assert all(torch.equal(a, b) for a, b in zip(tokens, reference.generate(ids, vision_mask=mask, max_new_tokens=4)))


def test_programs_share_the_loaded_tensors(export_engine):
    """Both programs read the one loaded copy: a change to it reaches prefill and decode alike."""
    from fastmmoe_compile.runtime.backends import load_role, load_weights

    manifest = json.loads((export_engine / "manifest.json").read_text())
    weights = load_weights(export_engine, manifest)
    backbone, decode = (load_role(export_engine, manifest, role, weights) for role in ("backbone", "decode"))
    shared = weights["lm.lm_head.weight"]
    assert dict(backbone.named_parameters())["lm.lm_head.weight"].data_ptr() == shared.data_ptr()
    assert dict(decode.named_parameters())["lm.lm_head.weight"].data_ptr() == shared.data_ptr()


def test_damaged_weights_file_is_a_clear_error(export_engine, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export_engine, copy)
    weights = copy / "weights.safetensors"
    weights.write_bytes(b"x" * weights.stat().st_size)
    with pytest.raises(EngineFormatError, match="weights.safetensors does not match its sha256"):
        load_engine(copy)
    with pytest.raises(EngineFormatError, match="weights.safetensors does not hold the engine's weights"):
        load_engine(copy, verify_hashes=False)
    weights.unlink()
    with pytest.raises(EngineFormatError, match="weights.safetensors.*missing"):
        load_engine(copy)
    manifest = json.loads((export_engine / "manifest.json").read_text())
    del manifest["weights"], manifest["files"]["weights.safetensors"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFormatError, match="takes its weights from the shared weights file"):
        load_engine(copy)


def test_engine_written_before_still_loads(export_engine, engine, tmp_path):
    """An engine of the earlier format: each program file with its own weights, no shared file."""
    from fastmmoe_compile.runtime.backends import load_weights

    old = tmp_path / "old"
    shutil.copytree(export_engine, old)
    manifest = json.loads((old / "manifest.json").read_text())
    weights = load_weights(old, manifest)
    for role, entry in manifest["programs"].items():
        program = torch.export.load(str(old / entry["file"]))
        program.state_dict.update({k: torch.nn.Parameter(weights[k], requires_grad=False)
                                   for k in program.graph_signature.parameters})
        program.state_dict.update({k: weights[k] for k in program.graph_signature.buffers if k in program.state_dict})
        program.constants.update({k: weights[k] for k in program.constants})
        torch.export.save(program, str(old / entry["file"]))
        del entry["weights"]
    os.remove(old / "weights.safetensors")
    manifest = {k: v for k, v in manifest.items() if k not in ("weights", "files")}
    assert manifest["format_version"] == 3
    write_manifest(old, {**manifest, "format_version": 2})
    ids, mask = _inputs()
    assert torch.equal(load_engine(old).prefill(ids, vision_mask=mask).logits,
                       engine.prefill(ids, vision_mask=mask).logits)
