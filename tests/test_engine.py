"""Engine dirs: a local checkpoint through the CLI to an AOTInductor engine and back;
manifests that catch corrupt or foreign dirs; nothing half-written after a failure."""
import json
import math
import shutil

import pytest
import torch

from fastmmoe_compile import EngineFormatError, FastMMoEConfig, FastVConfig, compile_model, load_engine
from fastmmoe_compile.api import rewrite
from fastmmoe_compile.cli import main

from .conftest import hf_last_logits, tiny_model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny qwen3_moe checkpoint written by save_pretrained, as a user's local dir would be."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-moe"
    tiny_model("tiny-qwen3-moe").lm.save_pretrained(path)
    return path


# The README's Top-Kv + token merging engine (`fastmmoe-compile tiny-qwen3-moe --out ./engine-merge
# --merge-layers 1,3 --keep-ratio 0.5`, defaults reduce_from_layer=2, vision_expert_ratio=0.5), here
# from a checkpoint dir holding the same weights: the same programs, so the session's AOTInductor
# compile cache (tests/conftest.py) builds them once for this file, tests/test_readme.py and
# tests/test_attention_impl.py.
README_MERGE_FLAGS = ["--merge-layers", "1,3", "--keep-ratio", "0.5"]
README_MERGE = FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5, merge_layers=(1, 3), keep_ratio=0.5)


@pytest.fixture(scope="session")
def aoti_engine(checkpoint, tmp_path_factory):
    """AOTInductor (needed: what these tests check is the AOTInductor package and its loader): one
    build of prefill + decode for the file, made through the CLI from the checkpoint dir."""
    out = tmp_path_factory.mktemp("engines") / "engine"
    rc = main([str(checkpoint), "--out", str(out), *README_MERGE_FLAGS, "--quiet"])
    assert rc == 0
    return out


def _inputs(seq=48, batch=2):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[:, 4:36] = True
    return ids, mask


@pytest.mark.slow
@pytest.mark.aoti("the default backend through the CLI from a checkpoint dir, loaded back")
def test_cli_checkpoint_to_engine_and_back(aoti_engine, checkpoint):
    engine = load_engine(aoti_engine)
    manifest = engine.manifest
    assert manifest["backend"] == "inductor"
    assert manifest["model"]["source"] == str(checkpoint) and manifest["model"]["model_type"] == "qwen3_moe"
    assert manifest["config"]["vision_expert_ratio"] == 0.5 and manifest["config"]["merge_layers"] == [1, 3]
    assert [c["layer"] for c in manifest["passes"][0]["changes"]] == [2, 3]
    ids, mask = _inputs()
    result = engine.prefill(ids, vision_mask=mask)
    assert result.logits.shape == (2, 256)
    assert result.kept_positions.shape[1] < 48  # the merges pruned
    # The compiled engine computes what the rewritten exported program computes.
    loaded, program, _ = rewrite(str(checkpoint), README_MERGE)
    positions = mask.nonzero()[:, 1].reshape(2, -1)
    with torch.no_grad():
        expected, expected_kept = program.module()(engine.embed(ids), positions)[:2]
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=0)
    assert torch.equal(result.kept_positions, expected_kept)
    # A dynamic sequence length and batch, and a prompt with no image: the original model.
    ids1 = ids[:1, :29]
    no_image = engine.prefill(ids1)
    torch.testing.assert_close(no_image.logits, hf_last_logits(loaded, engine.embed(ids1)), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.aoti("how an AOTInductor package gets its weights (load_constants, user-managed) is what it checks")
def test_aoti_package_reads_the_shared_weights_in_place(aoti_engine):
    """The AOTInductor package holds no weights: it runs on the tensors load_weights() read, not a
    copy (load_constants(user_managed=True)), so a change to them shows in its logits."""
    from fastmmoe_compile.runtime.backends import load_role, load_weights

    manifest = json.loads((aoti_engine / "manifest.json").read_text())
    assert manifest["weights"] == {"file": "weights.safetensors"} and manifest["programs"]["backbone"]["weights"] == {}
    weights = load_weights(aoti_engine, manifest)
    backbone = load_role(aoti_engine, manifest, "backbone", weights)
    assert set(backbone.get_constant_fqns()) <= set(weights)
    embeds = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(1))
    positions = torch.zeros(1, 0, dtype=torch.long)
    assert backbone(embeds, positions)[0].abs().sum() > 0
    weights["lm.lm_head.weight"].zero_()
    assert torch.equal(backbone(embeds, positions)[0], torch.zeros(1, 256))


@pytest.mark.slow
@pytest.mark.aoti("the input checks in front of the default backend's programs (the file's one AOTInductor engine)")
def test_engine_rejects_bad_inputs(aoti_engine):
    engine = load_engine(aoti_engine)
    ids, mask = _inputs()
    with pytest.raises(ValueError, match="exactly one"):
        engine.prefill()
    with pytest.raises(ValueError, match="same number of vision tokens"):
        bad = mask.clone()
        bad[0, 40] = True
        engine.prefill(ids, vision_mask=bad)
    with pytest.raises(ValueError, match=r"\[0, 48\)"):
        engine.prefill(ids, vision_positions=torch.tensor([[3, 60], [3, 4]]))
    with pytest.raises(ValueError, match="strictly increasing"):
        engine.prefill(ids, vision_positions=torch.tensor([[5, 4], [3, 4]]))
    with pytest.raises(ValueError, match="input_ids must be in"):
        engine.prefill(ids + 1000)
    # The engine stays usable after a rejected call.
    assert engine.prefill(ids, vision_mask=mask).logits.isfinite().all()


@pytest.mark.slow
@pytest.mark.aoti("a corrupted or missing AOTInductor package must be refused (the file's one AOTInductor engine)")
def test_corrupt_and_foreign_dirs_are_refused(aoti_engine, tmp_path):
    with pytest.raises(EngineFormatError, match="no manifest.json"):
        load_engine(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(aoti_engine, copy)
    (copy / "weights.safetensors").write_bytes(b"x" * (copy / "weights.safetensors").stat().st_size)
    with pytest.raises(EngineFormatError, match="sha256"):
        load_engine(copy)
    (copy / "backbone.pt2").unlink()
    with pytest.raises(EngineFormatError, match="missing"):
        load_engine(copy)
    manifest = json.loads((aoti_engine / "manifest.json").read_text())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(EngineFormatError, match="not a fastmmoe-engine manifest"):
        load_engine(foreign)
    (foreign / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(EngineFormatError, match="version 99"):
        load_engine(foreign)
    (foreign / "manifest.json").write_text("{not json")
    with pytest.raises(EngineFormatError, match="corrupt"):
        load_engine(foreign)


def test_failed_compile_leaves_nothing_on_disk(tmp_path, monkeypatch):
    import fastmmoe_compile.lower.inductor as inductor

    def broken(program, path, **options):
        open(path, "wb").write(b"partial")
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(inductor, "package_aoti", broken)
    with pytest.raises(RuntimeError, match="lowering failed"):
        compile_model(tiny_model("tiny-olmoe"), out=tmp_path / "engine", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_existing_dir_needs_overwrite(tmp_path):
    """An existing engine needs overwrite (the hint says so); any other existing directory is refused
    with no such hint, since overwrite replaces only an engine (issue 22: hints name what works)."""
    out = tmp_path / "engine"
    out.mkdir()
    with pytest.raises(FileExistsError, match="not a fastmmoe engine") as info:
        compile_model(tiny_model("tiny-olmoe"), out=out, quiet=True)
    assert "--overwrite" not in str(info.value)
    out.rmdir()
    compile_model(tiny_model("tiny-olmoe"), out=out, backend="export", quiet=True, decode=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        compile_model(tiny_model("tiny-olmoe"), out=out, quiet=True)


def test_export_backend_roundtrip_and_overwrite(tmp_path):
    """The `export` backend (no Inductor) saves and reloads the rewritten program; --overwrite replaces.
    With a merge: the merge replaces the kept_positions output, which the saved signature must name."""
    out = tmp_path / "engine"
    loaded = tiny_model("tiny-mixtral")
    config = FastMMoEConfig(reduce_from_layer=1, vision_topk=1, merge_layers=(1,), keep_ratio=0.5)
    first = compile_model(loaded, config, out, backend="export", quiet=True, decode=False)
    (out / "stale-file").write_text("x")
    compile_model(loaded, config, out, backend="export", overwrite=True, quiet=True, decode=False)
    assert not (out / "stale-file").exists()
    ids, mask = _inputs(seq=20, batch=1)
    mask[:, 16:] = False
    got, want = load_engine(out).prefill(ids, vision_mask=mask), first.prefill(ids, vision_mask=mask)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)
    assert torch.equal(got.kept_positions, want.kept_positions) and got.kept_positions.shape[1] < 20


@pytest.mark.slow
@pytest.mark.parametrize("config", [FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5, merge_layers=(1,)),
                                    FastVConfig(prune_layer=1, keep_ratio=0.5)], ids=["merge", "fastv"])
def test_in_process_torch_compile_matches_exported_program(config):
    """Batch 1 too: the example batch of the export is 2, and no guard may pin it."""
    loaded = tiny_model("tiny-deepseek-v3")
    compiled = compile_model(loaded, config, quiet=True, decode=False)  # no out: torch.compile in this process
    exported = compile_model(loaded, config, backend="export", quiet=True, decode=False)
    for batch, seq in [(1, 33), (3, 41)]:
        ids, mask = _inputs(seq=seq, batch=batch)
        got, want = compiled.prefill(ids, vision_mask=mask), exported.prefill(ids, vision_mask=mask)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=0)
        assert torch.equal(got.kept_positions, want.kept_positions)


@pytest.mark.slow
@pytest.mark.aoti("sequence lengths that change mid-graph must stay dynamic in Inductor's codegen")
def test_aoti_engine_with_merges_and_fastv_shapes(aoti_engine):
    """Merges change the sequence mid-graph; the AOTInductor engine must follow any S and N. At N = 90
    the stages really merge windows (floor(T * merge_ratio) >= 1); below, they only keep."""
    engine = load_engine(aoti_engine)
    reference = compile_model(tiny_model("tiny-qwen3-moe"), README_MERGE, backend="export", quiet=True, decode=False)
    for batch, seq, n in [(2, 40, 24), (1, 57, 31), (2, 33, 1), (1, 20, 0), (1, 100, 90)]:
        ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seq))
        positions = torch.arange(3, 3 + n).expand(batch, n)
        got, want = engine.prefill(ids, vision_positions=positions), reference.prefill(ids, vision_positions=positions)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=0)
        assert torch.equal(got.kept_positions, want.kept_positions)
        left = n
        for _ in range(2):  # two stages at r = 0.5 ** (1/2), docs/fastmmoe.md 2.1
            if left:
                assert n < 90 or math.floor(math.floor(left * 0.5 ** 0.5) * README_MERGE.merge_ratio) >= 1
            left = min(left, max(1, math.floor(left * 0.5 ** 0.5))) if left else 0
        assert got.kept_positions.shape[1] == seq - n + left


def test_engine_dir_permissions_follow_umask(tmp_path):
    import os
    import stat

    out = tmp_path / "engine"
    compile_model(tiny_model("tiny-olmoe"), out=out, backend="export", quiet=True, decode=False)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


# --- manifests that lack or garble what the loader relies on: one EngineFormatError each -----------

@pytest.fixture(scope="module")
def export_engines(tmp_path_factory):
    """Cheap engine dirs to copy and edit: a text-only one with a decode program, a prefill-only VLM."""
    root = tmp_path_factory.mktemp("export-engines")
    compile_model("tiny-qwen3-moe", FastMMoEConfig(), out=root / "text", backend="export", quiet=True)
    compile_model("tiny-internvl", FastMMoEConfig(), out=root / "vlm", backend="export", quiet=True, decode=False)
    return {"text": root / "text", "vlm": root / "vlm"}


def _set(*keys_value):
    *keys, value = keys_value

    def edit(m):
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value
    return edit


def _drop(*keys):
    def edit(m):
        for k in keys[:-1]:
            m = m[k]
        del m[keys[-1]]
    return edit


SHA = "0" * 64
MANIFEST_CASES = {  # id: (engine, edit of the manifest dict, message fragment)
    "backend-unknown": ("text", _set("backend", "tensorrt"),
                        "manifest field backend is 'tensorrt'; expected one of inductor, export, onnx"),
    "backend-not-a-string": ("text", _set("backend", ["export"]), "manifest field backend is ['export']"),
    "backend-missing": ("text", _drop("backend"), "manifest field backend is None; expected one of inductor"),
    "backend-wrong": ("text", _set("backend", "inductor"), "backbone.pt2 does not load as an inductor program"),
    "backend-onnx-without-onnx-files": ("text", _set("backend", "onnx"),
                                        "backbone.pt2 does not load as an onnx program"),
    "dtype-unknown": ("text", _set("model", "dtype", "float99"),
                      "manifest field model.dtype is 'float99'; expected one of float32, bfloat16, float16"),
    "dtype-integer": ("text", _set("model", "dtype", "int64"), "manifest field model.dtype is 'int64'"),
    "dtype-missing": ("text", _drop("model", "dtype"), "manifest field model.dtype is None"),
    "model-missing": ("text", _drop("model"), "manifest field model is None"),
    "hidden-size-string": ("text", _set("model", "hidden_size", "64"),
                           "manifest field model.hidden_size is '64'; expected a positive int"),
    "hidden-size-wrong": ("text", _set("model", "hidden_size", 32),
                          "weights.safetensors holds a float32 tensor of shape [256, 64] under "
                          "'lm.model.embed_tokens.weight', not the [vocab, 32]"),
    "vocab-size-zero": ("text", _set("model", "vocab_size", 0), "manifest field model.vocab_size is 0"),
    "model-type-missing": ("text", _drop("model", "model_type"), "manifest field model.model_type is None"),
    "extra-inputs-unknown": ("text", _set("model", "extra_inputs", ["position_ids"]),
                             "manifest field model.extra_inputs is ['position_ids']; expected a list of distinct "
                             "names from rope_positions, deepstack"),
    "deepstack-layers-missing": ("text", _set("model", "extra_inputs", ["deepstack"]),
                                 "manifest field model.deepstack_layers is None"),
    "decode-file-unknown": ("text", _set("programs", "decode", {"file": "nope.pt2"}),
                            "nope.pt2 is not listed in the manifest's files, so its size and hash cannot be verified"),
    "decode-not-an-object": ("text", _set("programs", "decode", "yes"), "manifest field programs.decode is 'yes'"),
    "decode-backend-unknown": ("text", _set("programs", "decode", "backend", "tensorrt"),
                               "manifest field programs.decode is {'file': 'decode.pt2', 'weights': {}, 'cache'"),
    "programs-missing": ("text", _drop("programs"), "manifest field programs is None; expected an object with a "
                         "backbone entry"),
    "programs-role-unknown": ("text", _set("programs", "encoder", {"file": "backbone.pt2"}),
                              "manifest field programs is {"),
    "programs-without-backbone": ("text", _drop("programs", "backbone"), "manifest field programs is {'decode'"),
    "programs-vision-without-facts": ("vlm", _drop("vision"), "manifest field programs.vision is {'file': "
                                      "'vision.pt2', 'weights': {}}; expected an entry exactly when"),
    "embeddings-not-an-object": ("text", _set("embeddings", "embeddings.safetensors"),
                                 "manifest field embeddings is 'embeddings.safetensors'"),
    "embeddings-tensor-not-a-string": ("text", _set("embeddings", "tensor", 3),
                                       "manifest field embeddings is {'file': 'weights.safetensors', 'tensor': 3}"),
    "embeddings-tensor-unknown": ("text", _set("embeddings", "tensor", "nope"),
                                  "weights.safetensors does not hold the token embeddings 'nope'"),
    "decode-data-unknown": ("text", _set("programs", "decode", "data", "nope.data"),
                            "nope.data is not listed in the manifest's files"),
    "decode-data-not-a-string": ("text", _set("programs", "decode", "data", 1),
                                 "manifest field programs.decode is {'file': 'decode.pt2'"),
    "files-missing": ("text", _drop("files"), 'has no "files" table'),
    "files-not-a-table": ("text", _set("files", ["backbone.pt2"]), 'has a malformed "files" table'),
    "files-entry-without-sha256": ("text", _drop("files", "backbone.pt2", "sha256"),
                                   "the manifest's entry for backbone.pt2 is {'bytes':"),
    "files-entry-bad-bytes": ("text", _set("files", "backbone.pt2", "bytes", "many"),
                              "the manifest's entry for backbone.pt2"),
    "files-entry-bad-sha256": ("text", _set("files", "backbone.pt2", "sha256", "abc"),
                               "the manifest's entry for backbone.pt2"),
    "files-entry-not-an-object": ("text", _set("files", "backbone.pt2", 5), "the manifest's entry for backbone.pt2"),
    "files-outside-dot-dot": ("text", _set("files", "../text/backbone.pt2", {"bytes": 1, "sha256": SHA}),
                              "lists the file '../text/backbone.pt2', which is not a path inside the engine directory"),
    "files-outside-absolute": ("text", _set("files", "/etc/hostname", {"bytes": 1, "sha256": SHA}),
                               "lists the file '/etc/hostname', which is not a path inside"),
    "files-lists-the-manifest": ("text", _set("files", "manifest.json", {"bytes": 1, "sha256": SHA}),
                                 "lists the file 'manifest.json'"),
    "files-without-backbone": ("text", _drop("files", "backbone.pt2"),
                               "backbone.pt2 is not listed in the manifest's files, so its size and hash cannot be "
                               "verified"),
    "files-without-decode": ("text", _drop("files", "decode.pt2"), "decode.pt2 is not listed"),
    "files-without-weights": ("text", _drop("files", "weights.safetensors"), "weights.safetensors is not listed"),
    "files-without-vision": ("vlm", _drop("files", "vision.pt2"), "vision.pt2 is not listed"),
    "vision-family-unknown": ("vlm", _set("vision", "family", "llava_onevision"),
                              "vision family 'llava_onevision' (manifest field vision.family) is not one this "
                              "fastmmoe-compile runs; legal values: internvl,"),
    "vision-family-not-a-string": ("vlm", _set("vision", "family", ["internvl"]),
                                   "vision family ['internvl'] (manifest field vision.family)"),
    "vision-family-missing": ("vlm", _drop("vision", "family"), "vision family None"),
    "vision-not-an-object": ("vlm", _set("vision", "internvl"), "manifest field vision is 'internvl'"),
    "vision-max-tiles": ("vlm", _set("vision", "max_tiles", 0), "manifest field vision.max_tiles is 0"),
    "vision-image-token": ("vlm", _set("vision", "image_token_id", 10 ** 6),
                           "manifest field vision.image_token_id is 1000000; expected a token id in [0, 288)"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_lacking_what_the_loader_relies_on_is_refused(export_engines, tmp_path, case):
    from fastmmoe_compile.runtime.engine import check_manifest
    from fastmmoe_compile.runtime.manifest import read_manifest

    which, edit, fragment = MANIFEST_CASES[case]
    copy = tmp_path / "engine"
    shutil.copytree(export_engines[which], copy)
    original = (copy / "manifest.json").read_text()
    manifest = json.loads(original)
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFormatError) as info:
        load_engine(copy)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    # The engine as written passes the same checks: the edit is what was refused.
    (copy / "manifest.json").write_text(original)
    check_manifest(copy, read_manifest(copy, verify_hashes=False))


EDITS = {  # id: (edit of a field the checks above cannot judge (any value is legal), the field named)
    "num-layers": (_set("model", "num_layers", 3), "model.num_layers"),
    "vision-expert-ratio": (_set("config", "vision_expert_ratio", 0.75), "config.vision_expert_ratio"),
    "pass-record": (_set("passes", []), "passes"),
    "source": (_set("model", "source", "someone/else"), "model.source"),
    "field-added": (_set("config", "keep_ratio_note", "0.5"), "config.keep_ratio_note"),
    "field-removed": (_drop("versions", "transformers"), "versions.transformers"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_an_edited_manifest_field_is_refused_by_name(export_engines, tmp_path, capsys, case):
    edit, field = EDITS[case]
    copy = tmp_path / "engine"
    shutil.copytree(export_engines["text"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFormatError, match=f"engine manifest was edited: {field} ") as info:
        load_engine(copy)
    assert "\n" not in str(info.value)
    capsys.readouterr()
    assert main(["inspect", str(copy)]) == 2  # inspect reports nothing the engine would not run
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"engine manifest was edited: {field} " in err, err


def test_engines_written_before_the_integrity_record_still_load(export_engines, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(export_engines["text"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["integrity"]  # what every engine written before it looks like
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert len(load_engine(copy).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)[0]) == 2


@pytest.mark.parametrize("command,case", [("run", "backend-unknown"), ("run", "dtype-unknown"),
                                          ("run", "vision-family-unknown"), ("run", "files-missing"),
                                          ("inspect", "files-missing"), ("inspect", "files-outside-dot-dot")])
def test_cli_says_a_bad_manifest_in_one_line(export_engines, tmp_path, capsys, command, case):
    which, edit, fragment = MANIFEST_CASES[case]
    copy = tmp_path / "engine"
    shutil.copytree(export_engines[which], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([command, str(copy)] + (["--prompt", "hi"] if command == "run" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmmoe-compile: error: ") and len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err


def test_loaded_export_engines_still_load_and_run(export_engines):
    engine = load_engine(export_engines["text"])
    assert engine.decode_step is not None and engine.front_end is None
    assert len(engine.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)[0]) == 2
