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
    # The token-embedding table too, under the backbone's own name for it (format 4): no embeddings.safetensors.
    assert manifest["embeddings"] == {"file": "weights.safetensors", "tensor": "lm.model.embed_tokens.weight"}
    assert not (export_engine / "embeddings.safetensors").exists()
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


def stored_tensors(engine_dir):
    """(file, name, elements, sha256 of the bytes) of every tensor stored in the engine dir: the
    safetensors files' tensors and the ONNX files' initializers, inline or external (an external
    one as (data file, "offset+length"), once however many programs point at that region)."""
    import hashlib

    from safetensors import safe_open

    out, regions = [], set()
    for file in sorted(engine_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k).contiguous()
                out.append((file.name, k, t.numel(), hashlib.sha256(t.view(-1).view(torch.uint8).numpy()).hexdigest()))
    for file in sorted(engine_dir.glob("*.onnx")):
        import onnx
        from onnx import numpy_helper

        for init in onnx.load(str(file), load_external_data=False).graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:  # a region of a data file: hashed once per region
                info = {e.key: e.value for e in init.external_data}
                region = (info["location"], int(info.get("offset", 0)), int(info["length"]))
                if region in regions:
                    continue
                with open(engine_dir / region[0], "rb") as f:
                    f.seek(region[1])
                    data = f.read(region[2])
                regions.add(region)
                numel = region[2] // onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
                out.append((region[0], f"{region[1]}+{region[2]}", numel, hashlib.sha256(data).hexdigest()))
            else:
                array = numpy_helper.to_array(init)
                out.append((file.name, init.name, array.size, hashlib.sha256(array.tobytes()).hexdigest()))
    return out


def assert_each_tensor_stored_once(engine_dir, min_elements=4096):
    """No two stored tensors of `min_elements` or more hold the same bytes (random weights: equal
    bytes are a second copy; smaller ones, e.g. norm weights all ones, may rightly repeat)."""
    seen = {}
    for file, name, numel, digest in stored_tensors(engine_dir):
        if numel >= min_elements:
            assert digest not in seen, f"{file}:{name} repeats {seen[digest]}"
            seen[digest] = f"{file}:{name}"
    return seen


def test_no_tensor_is_stored_twice(export_engine):
    """The embedding table included: it lives in weights.safetensors once, not also in a file of its own."""
    seen = assert_each_tensor_stored_once(export_engine)
    assert "weights.safetensors:lm.model.embed_tokens.weight" in seen.values()
    assert {f.split(":")[0] for f in seen.values()} == {"weights.safetensors"}


def test_embedding_table_is_the_shared_tensor(engine):
    """A CPU engine embeds prompts with the very tensor the programs hold: one copy in memory too."""
    manifest = engine.manifest
    key = manifest["embeddings"]["tensor"]
    from fastmmoe_compile.runtime.backends import load_weights

    weights = load_weights(engine.path, manifest)
    assert torch.equal(engine.embeddings, weights[key])
    ids, _ = _inputs()
    assert torch.equal(engine.embed(ids), torch.nn.functional.embedding(ids, weights[key]))


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
    del manifest["weights"], manifest["files"]["weights.safetensors"], manifest["embeddings"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFormatError, match="takes its weights from the shared weights file"):
        load_engine(copy)


def _as_format_3(engine_dir, old):
    """A copy of a format-4 engine in format 3: the embedding table in embeddings.safetensors
    (as key "weight"), the manifest's embeddings entry naming that file alone."""
    from safetensors.torch import save_file

    from fastmmoe_compile.runtime.backends import load_weights

    shutil.copytree(engine_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    table = load_weights(old, manifest)[manifest["embeddings"]["tensor"]]
    save_file({"weight": table.contiguous()}, str(old / "embeddings.safetensors"))
    manifest = {k: v for k, v in manifest.items() if k != "files"}
    assert manifest["format_version"] == 4
    write_manifest(old, {**manifest, "format_version": 3, "embeddings": {"file": "embeddings.safetensors"}})
    return old


def test_format_3_engine_still_loads(export_engine, engine, tmp_path):
    """Format 3: the weights shared, the embedding table in a file of its own."""
    old = _as_format_3(export_engine, tmp_path / "v3")
    ids, mask = _inputs()
    loaded = load_engine(old)
    assert json.loads((old / "manifest.json").read_text())["format_version"] == 3
    assert torch.equal(loaded.prefill(ids, vision_mask=mask).logits, engine.prefill(ids, vision_mask=mask).logits)
    assert all(torch.equal(a, b) for a, b in zip(loaded.generate(ids, vision_mask=mask, max_new_tokens=3),
                                                 engine.generate(ids, vision_mask=mask, max_new_tokens=3)))


def test_newer_format_is_refused_clearly(export_engine, tmp_path):
    """What a format-4 engine looks like to a reader of this version, one format further on."""
    newer = tmp_path / "newer"
    shutil.copytree(export_engine, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": 5}))
    with pytest.raises(EngineFormatError, match="version 5 was written by a newer fastmmoe-compile.*upgrade"):
        load_engine(newer)


def test_engine_written_before_still_loads(export_engine, engine, tmp_path):
    """An engine of format 2: each program file with its own weights, no shared file, the
    embedding table in embeddings.safetensors."""
    from fastmmoe_compile.runtime.backends import load_weights

    old = _as_format_3(export_engine, tmp_path / "old")
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


def test_checkpoint_is_read_once_into_memory_of_its_own(wide_checkpoint, tmp_path, monkeypatch):
    """Loading a checkpoint for the CPU (models/loading.one_host_copy): transformers reads it in
    order with pread, not ahead with mmap. With mmap every page read stayed resident (the tensors
    transformers does not convert stay views of the mapping) beside the fused experts, 2.1x the
    checkpoint in peak RSS; reading ahead with pread held every per-expert piece, 1.9x
    (benchmarks/bench_load_rss.py). The CPU-observable half of that: how the file was opened, no
    mapping of it left, and each parameter in memory of its own, once."""
    import transformers.modeling_utils as modeling_utils

    from fastmmoe_compile.models import load_model
    from fastmmoe_compile.models.loading import one_host_copy
    from fastmmoe_compile.transformers_compat import SEQUENTIAL_LOAD_ENV

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(wide_checkpoint, checkpoint)  # a file no other test has mapped in this process
    monkeypatch.delenv(SEQUENTIAL_LOAD_ENV, raising=False)
    original, opened = modeling_utils.safe_open, []

    def spy(filename, framework, device="cpu", **kwargs):
        opened.append((str(filename), device, kwargs.get("backend"), os.environ.get(SEQUENTIAL_LOAD_ENV)))
        return original(filename, framework=framework, device=device, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_open", spy)
    loaded = load_model(str(checkpoint))
    assert opened == [(str(checkpoint / "model.safetensors"), "cpu", "pread", "1")]
    assert modeling_utils.safe_open is spy and SEQUENTIAL_LOAD_ENV not in os.environ  # both restored
    if os.path.exists("/proc/self/maps"):
        assert str(checkpoint / "model.safetensors") not in open("/proc/self/maps").read()
    storages = {}
    for name, p in loaded.lm.named_parameters():
        storages.setdefault(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes())
    assert sum(storages.values()) <= (checkpoint / "model.safetensors").stat().st_size
    with one_host_copy("cuda"):  # a GPU target: each tensor goes to the device as read; nothing changes
        assert modeling_utils.safe_open is spy and SEQUENTIAL_LOAD_ENV not in os.environ


@pytest.mark.onnx("how the ONNX writer stores the weights (one external-data file) is what it checks")
def test_onnx_engine_stores_the_weights_once(wide_checkpoint, engine, tmp_path):
    """The ONNX programs (prefill and decode) point into one external-data file, each distinct
    tensor once (lower/onnx.py SHARED_DATA_FILE); before, each .onnx carried all the weights (over
    2x the checkpoint). Its logits and tokens are the export backend's."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    import onnx

    out = tmp_path / "onnx"
    compile_model(str(wide_checkpoint), CONFIG, out=out, backend="onnx", quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {role: entry["data"] for role, entry in manifest["programs"].items()} == \
        {"backbone": "weights.onnx.data", "decode": "weights.onnx.data"}
    checkpoint_bytes = (wide_checkpoint / "model.safetensors").stat().st_size
    # The exporter's folded constants (transposed weights) are the same size as the weights; the
    # alignment padding is at most a page per tensor.
    assert (out / "weights.onnx.data").stat().st_size < 1.1 * checkpoint_bytes
    for program in ("backbone.onnx", "decode.onnx"):  # the graphs: no weights inline
        graph = onnx.load(str(out / program), load_external_data=False).graph
        assert sum(len(i.raw_data) for i in graph.initializer) < 16 * 1024
    seen = assert_each_tensor_stored_once(out)
    assert sum(f.startswith("weights.onnx.data:") for f in seen.values()) > 0
    onnx_engine = load_engine(out)
    ids, mask = _inputs()
    torch.testing.assert_close(onnx_engine.prefill(ids, vision_mask=mask).logits,
                               engine.prefill(ids, vision_mask=mask).logits, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(onnx_engine.generate(ids, vision_mask=mask, max_new_tokens=4),
                                                 engine.generate(ids, vision_mask=mask, max_new_tokens=4)))
    # A data file the programs point into is one the loader checks for before ORT reads it.
    (out / "weights.onnx.data").unlink()
    with pytest.raises(EngineFormatError, match="weights.onnx.data.*missing"):
        load_engine(out)
