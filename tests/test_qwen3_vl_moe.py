"""Qwen3-VL-MoE end to end: our input side (chat template, patches, token expansion, 3D rotary
positions) against transformers' own Qwen3VLProcessor and get_rope_index, the exported vision
encoder against get_image_features (pooled + deepstack), identity engines against
Qwen3VLMoeForConditionalGeneration (logits and greedy tokens), a merge engine against the eager
reference with 3D positions and deepstack, batches of different image sizes, and bad inputs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastmmoe_compile import EngineFormatError, FastMMoEConfig, compile_model
from fastmmoe_compile.api import rewrite
from fastmmoe_compile.cli import main
from fastmmoe_compile.models import load_model
from fastmmoe_compile.models.qwen3_vl_moe import FAMILY, additive_deepstack
from fastmmoe_compile.runtime.multimodal import generate_text

from .conftest import (check_common_bad_inputs, hf_last_logits, processor_without_video, prompt, tiny_model,
                       vlm_fixtures)
from .reference import eager_fastmmoe, eager_generate, eager_topkv

PROMPT = "<image>\nWhat is in the picture?"
SIZES = {"wide": (48, 120), "square": (64, 64), "tall": (90, 40)}  # (h, w) px: 3 different patch grids
MERGE = FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5, merge_layers=(1, 3), keep_ratio=0.25,
                       merge_ratio=0.25, window=3, alpha=0.4)  # layer 1 < D = 2: deepstack after a merge
STAGE = (0.5, 0.25, 3, 0.4, "hybrid", "mlerp")


checkpoint, loaded, images, identity_engine = vlm_fixtures("tiny-qwen3-vl-moe", SIZES)


@pytest.fixture(scope="session")
def merge_engine(checkpoint, tmp_path_factory):
    """Python's path: compile_model(checkpoint dir, config, out) -> engine dir -> load_engine."""
    return compile_model(str(checkpoint), MERGE, tmp_path_factory.mktemp("engines") / "merge", backend="export",
                         quiet=True)


def hf_processor(loaded):
    """transformers' own Qwen3VLProcessor, without a video processor (that one needs torchvision)."""
    from transformers import Qwen3VLProcessor

    return processor_without_video(Qwen3VLProcessor, loaded)


def hf_inputs(loaded, paths, text_parts):
    """The HF model's inputs for a user turn of text parts with an image between consecutive ones."""
    content = []
    for i, part in enumerate(text_parts):
        if i:
            content.append({"type": "image"})
        content.append({"type": "text", "text": part})
    processor = hf_processor(loaded)
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    pil = [Image.open(p) for p in paths] or None
    return dict(processor(images=pil, text=[text], return_tensors="pt"))


def test_load_gives_the_backbone_and_the_vision_parts(loaded):
    assert loaded.family.model_type == "qwen3_vl_moe_text" and loaded.vision.family.model_type == "qwen3_vl_moe"
    assert loaded.lm.model is loaded.vision.model.model.language_model  # shared, not copied
    assert loaded.lm.lm_head is loaded.vision.model.lm_head
    assert loaded.family.extra_inputs == ("rope_positions", "deepstack")
    assert loaded.family.deepstack_layers(loaded.config) == 2 == loaded.describe()["deepstack_layers"]


def test_input_side_matches_transformers(identity_engine, loaded, images):
    """input_ids, patches and 3D rotary positions == Qwen3VLProcessor + Qwen3VLMoeModel.get_rope_index."""
    expected = hf_inputs(loaded, images[:2], ["", "\n", "\nCompare them."])
    prepared = identity_engine.prepare(images[:2], "<image>\n<image>\nCompare them.")
    assert torch.equal(prepared.input_ids, expected["input_ids"])
    torch.testing.assert_close(prepared.pixel_values, expected["pixel_values"], atol=0, rtol=0)
    grids = [tuple(g) for g in expected["image_grid_thw"].tolist()]
    assert len(set(grids)) == 2
    image = loaded.vision.model.config.image_token_id
    assert torch.equal(prepared.vision_positions[0], (expected["input_ids"][0] == image).nonzero()[:, 0])
    rope, delta = loaded.vision.model.model.get_rope_index(expected["input_ids"], expected["mm_token_type_ids"],
                                                           image_grid_thw=expected["image_grid_thw"])
    assert torch.equal(prepared.rope_positions, rope)
    next_position = identity_engine.prefill(**prepared.backbone_inputs()).next_positions  # where decode starts
    assert int(next_position) == prepared.input_ids.shape[1] + int(delta) < prepared.input_ids.shape[1]


def test_exported_vision_encoder_is_hf_get_image_features(identity_engine, loaded, images):
    """The engine's exported encoder (one program, any image size) == HF's pooled and deepstack features,
    and they land at the image-token positions of inputs_embeds / deepstack."""
    for path in images[:2]:
        expected = hf_inputs(loaded, [path], ["", " hi"])
        with torch.no_grad():
            hf = loaded.vision.model.model.get_image_features(expected["pixel_values"], expected["image_grid_thw"])
        prepared = identity_engine.prepare([path], "<image> hi")
        mask = prepared.input_ids[0] == loaded.vision.model.config.image_token_id
        torch.testing.assert_close(prepared.inputs_embeds[0, mask], hf.pooler_output[0], atol=1e-5, rtol=0)
        deepstack = torch.stack([f[0] for f in hf.deepstack_features])
        torch.testing.assert_close(prepared.deepstack[:, 0][:, mask], deepstack, atol=1e-5, rtol=0)
        assert prepared.deepstack[:, 0][:, ~mask].abs().max() == 0


@pytest.mark.slow
@pytest.mark.aoti("the default backend's vision program must take every patch grid (dynamic shapes in Inductor)")
def test_aoti_vision_encoder_takes_any_image_size(loaded, images, tmp_path):
    """The default backend's vision program: one AOTInductor package for every patch grid."""
    from fastmmoe_compile.export.vision import export_vision
    from fastmmoe_compile.lower import load_aoti, package_aoti

    encoder = load_aoti(package_aoti(export_vision(loaded), str(tmp_path / "vision.pt2")))
    facts = loaded.vision.describe()
    for path in images:
        expected = hf_inputs(loaded, [path], ["", " hi"])
        grids = [tuple(g) for g in expected["image_grid_thw"].tolist()]
        pooled, deepstack = FAMILY.encode(encoder, expected["pixel_values"], grids, facts)
        with torch.no_grad():
            hf = loaded.vision.model.model.get_image_features(expected["pixel_values"], expected["image_grid_thw"])
        torch.testing.assert_close(pooled, hf.pooler_output[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(deepstack, torch.stack([f[0] for f in hf.deepstack_features]), atol=1e-5, rtol=0)


def test_identity_engine_is_the_hf_model(identity_engine, loaded, images):
    """Image prompts (one and two images) and a text-only prompt: engine logits == the HF model's."""
    cases = (([images[0]], PROMPT, ["", "\nWhat is in the picture?"]),
             (images[1:], "<image> and <image>: same?", ["", " and ", ": same?"]),
             ([], "No image here.", ["No image here."]))
    for paths, text, parts in cases:
        result = identity_engine.prefill(images=paths or None, prompts=text)
        with torch.no_grad():
            hf = loaded.vision.model(**hf_inputs(loaded, paths, parts)).logits[:, -1]
        torch.testing.assert_close(result.logits, hf, atol=1e-5, rtol=0)


def test_generate_and_cli_run_match_hf_greedy(identity_engine, loaded, images, capsys):
    """16 greedy tokens: transformers' generate (3D rotary deltas, deepstack) == generate_text == CLI run."""
    tokenizer = identity_engine.front_end.tokenizer
    inputs = hf_inputs(loaded, [images[0]], ["", "\nWhat is in the picture?"])
    with torch.no_grad():
        out = loaded.vision.model.generate(**inputs, max_new_tokens=16, do_sample=False,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    prepared = identity_engine.prepare([images[0]], PROMPT)
    assert identity_engine.generate(**prepared.backbone_inputs(), max_new_tokens=16,
                                    eos_token_id=tokenizer.eos_token_id)[0].tolist() == expected
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert generate_text(identity_engine, [images[0]], PROMPT, max_new_tokens=16) == [text]
    capsys.readouterr()
    assert main(["run", str(identity_engine.path), "--image", str(images[0]), "--prompt", PROMPT,
                 "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_merge_engine_matches_eager_reference(merge_engine, loaded, images):
    """Top-Kv + merges at layers 1 and 3 (deepstack still added after layer 1, on the kept tokens)
    == the eager reference: logits, kept positions and 8 greedy tokens."""
    engine = merge_engine
    prepared = engine.prepare([images[0]], PROMPT)
    result = engine.prefill(**prepared.backbone_inputs())
    mask = prepared.input_ids == loaded.vision.model.config.image_token_id
    args = (loaded.lm, prepared.inputs_embeds, mask, 2, 2, {1: STAGE, 3: STAGE})
    ref_logits, ref_kept = eager_fastmmoe(*args, rope_positions=prepared.rope_positions,
                                          deepstack=prepared.deepstack)
    assert result.kept_positions.tolist() == ref_kept
    n = int(mask.sum())
    assert result.kept_positions.shape[1] == prepared.input_ids.shape[1] - n + n // 4
    torch.testing.assert_close(result.logits, ref_logits, atol=1e-4, rtol=0)
    # Each extra input matters here: without the deepstack or the 3D positions the answer moves.
    for changed in ({"deepstack": None}, {"rope_positions": None}):
        other, _ = eager_fastmmoe(*args, **{"rope_positions": prepared.rope_positions,
                                            "deepstack": prepared.deepstack, **changed})
        assert (other - ref_logits).abs().max() > 20 * 1e-4
    tokens = engine.generate(**prepared.backbone_inputs(), max_new_tokens=8)[0].tolist()
    assert tokens == eager_generate(*args, 8, rope_positions=prepared.rope_positions,
                                    deepstack=prepared.deepstack)[0]


def test_fastv_before_the_last_deepstack_layer_matches_eager_reference(loaded, images):
    """FastV at layer 0 (< D): the deepstack features of layers 0 and 1 reach only the kept tokens."""
    from fastmmoe_compile.config import FastVConfig

    engine = compile_model(loaded, FastVConfig(prune_layer=0, keep_ratio=0.5), backend="export", quiet=True,
                           decode=False)
    prepared = engine.prepare([images[1]], PROMPT)
    result = engine.prefill(**prepared.backbone_inputs())
    mask = prepared.input_ids == loaded.vision.model.config.image_token_id
    ref_logits, ref_kept = eager_fastmmoe(loaded.lm, prepared.inputs_embeds, mask, 99, 4,
                                          {0: (0.5, 0.0, 2, 0.0, "attention", "mean")},
                                          rope_positions=prepared.rope_positions, deepstack=prepared.deepstack)
    assert result.kept_positions.tolist() == ref_kept and len(ref_kept[0]) == mask.shape[1] - int(mask.sum()) // 2
    torch.testing.assert_close(result.logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["identity", "merge"])
def test_batch_of_three_image_sizes_in_one_call(which, identity_engine, merge_engine, images):
    """Three prompts with images of different sizes (so different lengths, image-token counts and
    3D positions) in ONE generate_text call: each answer == its answer alone."""
    engine = identity_engine if which == "identity" else merge_engine
    prompts = [PROMPT, "<image> Describe it.", "Read <image> please."]
    prepared = engine.prepare(images, prompts)
    assert not prepared.batched and len({len(x) for x in prepared.input_ids}) == 3
    assert len({tuple(r.shape) for r in prepared.rope_positions}) == 3
    together = generate_text(engine, images, prompts, max_new_tokens=8)
    assert together == [generate_text(engine, [path], text, max_new_tokens=8)[0] for path, text in zip(images, prompts)]
    assert len(set(together)) == 3


def test_text_backbone_topkv_and_deepstack_export(loaded):
    """The text family through the generic passes: Top-Kv == the eager reference (Kv = K == HF is the
    identity engine's test), and the exported graph adds deepstack without boolean indexing."""
    embeds, mask = prompt(2, 30, slice(5, 25), loaded.config.hidden_size, seed=1)
    rope = torch.arange(30).expand(3, 2, 30).contiguous()  # a text-like prompt: plain positions, no deepstack
    deepstack = torch.zeros(2, 2, 30, loaded.config.hidden_size)
    _, program, record = rewrite(loaded, FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.25))
    assert [c["kv"] for c in record.passes[0]["changes"]] == [1, 1, 1]
    assert not any(n.target in (torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)
                   for n in program.graph.nodes)
    with torch.no_grad():
        ours = program.module()(embeds, mask.nonzero()[:, 1].reshape(2, -1), rope, deepstack)[0]
    with eager_topkv(loaded.lm, mask, 1, 1):
        reference = hf_last_logits(loaded, embeds)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    assert (ours - hf_last_logits(loaded, embeds)).abs().max() > 20 * 1e-4


def test_additive_deepstack_restores_hf_behaviour(loaded):
    decoder = loaded.lm.model
    with additive_deepstack(decoder):
        assert "_deepstack_process" in decoder.__dict__
    assert "_deepstack_process" not in decoder.__dict__


def test_text_only_preset_builds():
    loaded = tiny_model("tiny-qwen3-vl-moe-text")
    assert type(loaded.lm).__name__ == "Qwen3VLMoeTextForCausalLM" and loaded.describe()["deepstack_layers"] == 0


def test_bad_inputs_are_clear_errors(identity_engine, images, tmp_path):
    engine = identity_engine
    check_common_bad_inputs(engine, images[0], PROMPT, tmp_path)
    sliver = tmp_path / "sliver.png"  # aspect ratio > 200: Qwen's smart_resize refuses it
    Image.fromarray(np.zeros((1, 300, 3), dtype=np.uint8)).save(sliver)
    with pytest.raises(ValueError, match="image processor rejected.*aspect ratio"):
        engine.prepare([sliver], PROMPT)
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> tokens for 1 images"):
        engine.prepare([images[0]], "<image> <|image_pad|>", chat=False)  # a raw image token in the text
    with pytest.raises(ValueError, match="3 image tokens for a 1x4x4 merged grid"):
        FAMILY.rope_positions(torch.tensor([1, 261, 261, 261, 2]), [(1, 8, 8)], engine.front_end.facts)
    facts = engine.front_end.facts
    engine.front_end.facts = {**facts, "max_tiles": 2}  # as an engine whose encoder takes 2 images per call
    try:
        with pytest.raises(ValueError, match="3 image\\(s\\).*at most 2"):
            engine.prepare(images, "<image><image><image>")
    finally:
        engine.front_end.facts = facts
    with pytest.raises(ValueError, match="deepstack must be \\[2, 1, 4, 64\\]"):
        engine.prefill(torch.zeros(1, 4, dtype=torch.long), deepstack=torch.zeros(1, 1, 4, 64))


def test_engine_for_another_vision_family_is_refused(identity_engine):
    """A manifest naming a vision family this version does not run: refused before anything runs."""
    from fastmmoe_compile.runtime.multimodal import load_front_end

    manifest = json.loads((identity_engine.path / "manifest.json").read_text())
    manifest["vision"]["family"] = "qwen2_5_vl"
    with pytest.raises(EngineFormatError, match="vision family 'qwen2_5_vl'"):
        load_front_end(identity_engine.path, manifest)


def test_real_size_preset_on_meta():
    """qwen3-vl-30b-a3b is shapes only: the 30B backbone's facts, 3 deepstack levels, 16 px patches."""
    loaded = load_model("qwen3-vl-30b-a3b")
    assert loaded.on_meta
    info = loaded.describe()
    assert (info["num_layers"], info["num_experts"], info["top_k"], info["hidden_size"]) == (48, 128, 8, 2048)
    assert info["extra_inputs"] == ["rope_positions", "deepstack"] and info["deepstack_layers"] == 3
    assert loaded.vision.describe()["patch_dim"] == 3 * 2 * 16 * 16
