"""GLM-4.5V (glm4v_moe) end to end: our input side (chat template, patches, token expansion,
3D rotary positions) against transformers' Glm4vProcessor and get_rope_index, the exported
vision encoder against get_image_features, engines against Glm4vMoeForConditionalGeneration
(logits and greedy generate) and the eager reference (Top-Kv + merges, 3D positions), batch
invariance over image sizes, and the bad-input errors."""
import json
import shutil

import pytest
import torch
from PIL import Image

from fastmmoe_compile import EngineFormatError, FastMMoEConfig, compile_model, load_engine
from fastmmoe_compile.cli import main
from fastmmoe_compile.models.glm4v_moe import FAMILY
from fastmmoe_compile.models.grid_vlm import rope_index
from fastmmoe_compile.runtime.multimodal import generate_text

from .conftest import check_common_bad_inputs, processor_without_video, vlm_fixtures
from .reference import eager_fastmmoe, eager_generate

PROMPT = "<image>\nWhat is in the picture?"
SIZES = {"tall": (40, 24), "wide": (16, 48), "small": (16, 16)}  # (h, w) px -> 10x6, 4x12, 4x4 patches


checkpoint, loaded, images, identity_engine = vlm_fixtures("tiny-glm4v-moe", SIZES)


def grids_of(loaded, paths) -> list:
    """Each image's patch grid (t, h, w), as the image processor gives it."""
    return FAMILY.tiles(loaded.vision.image_processor, [Image.open(p) for p in paths])[2]


def hf_inputs(loaded, prepared, paths) -> dict:
    """Glm4vMoeForConditionalGeneration's inputs for a prepared prompt (one sample) with these images."""
    ids = prepared.input_ids
    image_token = loaded.vision.model.config.image_token_id
    inputs = {"input_ids": ids, "mm_token_type_ids": (ids == image_token).int()}
    if paths:
        inputs.update(pixel_values=prepared.pixel_values, image_grid_thw=torch.tensor(grids_of(loaded, paths)))
    loaded.vision.model.model.rope_deltas = None  # HF caches the last call's rope deltas
    return inputs


def test_load_gives_the_backbone_and_the_vision_parts(loaded):
    assert loaded.family.model_type == "glm4v_moe_text" and loaded.vision.family.model_type == "glm4v_moe"
    assert loaded.family.extra_inputs == ("rope_positions",)
    assert loaded.lm.model is loaded.vision.model.model.language_model  # shared, not copied
    assert loaded.lm.lm_head is loaded.vision.model.lm_head
    assert loaded.describe()["moe_layers"] == [1, 2]  # first_k_dense_replace = 1


def test_input_side_matches_transformers_processor(identity_engine, loaded, images):
    """input_ids, patches and grids == Glm4vProcessor's; rope positions == HF's get_rope_index."""
    from transformers import Glm4vProcessor

    processor = processor_without_video(Glm4vProcessor, loaded)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n"}, {"type": "image"},
                                             {"type": "text", "text": "\nCompare them."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>")
    expected = processor(images=[Image.open(p) for p in images[:2]], text=[text], return_tensors="pt")

    prepared = identity_engine.prepare(images[:2], "<image>\n<image>\nCompare them.")
    assert grids_of(loaded, images[:2]) == expected["image_grid_thw"].tolist() == [[1, 10, 6], [1, 4, 12]]
    assert torch.equal(prepared.input_ids, expected["input_ids"])
    torch.testing.assert_close(prepared.pixel_values, expected["pixel_values"], atol=0, rtol=0)
    assert prepared.vision_positions.shape == (1, 15 + 12)
    assert torch.equal(prepared.vision_positions[0], expected["mm_token_type_ids"][0].nonzero()[:, 0])

    hf_positions, deltas = loaded.vision.model.model.get_rope_index(
        expected["input_ids"], expected["mm_token_type_ids"], image_grid_thw=expected["image_grid_thw"])
    assert torch.equal(prepared.rope_positions, hf_positions)
    next_position = identity_engine.prefill(**prepared.backbone_inputs()).next_positions  # where decode starts
    assert int(next_position) == int(deltas) + expected["input_ids"].shape[1] < expected["input_ids"].shape[1]


def test_rope_index_refuses_mismatched_images():
    ids = torch.tensor([1, 270, 270, 270, 270, 2])
    assert int(rope_index(ids, [[1, 4, 4]], 270, 2).max()) + 1 == 4  # 1 text + 2x2 image (advances 2) + 1 text
    with pytest.raises(ValueError, match="4 image tokens for a 1x2x3 merged grid"):
        rope_index(ids, [[1, 4, 6]], 270, 2)
    with pytest.raises(ValueError, match="1 image-token runs in the prompt for 2 image"):
        rope_index(ids, [[1, 4, 4], [1, 4, 4]], 270, 2)


def test_exported_encoder_is_get_image_features(identity_engine, loaded, images):
    """The engine's vision program (one image per call, dynamic patch count) == HF's, per image size."""
    prepared = identity_engine.prepare(images[:2], "<image><image>")
    grids = grids_of(loaded, images[:2])
    features = FAMILY.encode(identity_engine.front_end.encoder, prepared.pixel_values, grids,
                             identity_engine.front_end.facts)[0]
    with torch.no_grad():
        hf = loaded.vision.model.model.get_image_features(prepared.pixel_values,
                                                          torch.tensor(grids)).pooler_output
    ours = features.split([15, 12])  # the images' tokens, in order
    assert features.shape == (27, 64) and len(hf) == 2
    for a, b in zip(ours, hf):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_identity_engine_is_the_hf_model(identity_engine, loaded, images):
    for imgs, prompt in (([images[0]], PROMPT), (images[1:], "<image> and <image>: same?"), (None, "No image here.")):
        prepared = identity_engine.prepare(imgs, prompt)
        result = identity_engine.prefill(images=imgs, prompts=prompt)
        with torch.no_grad():
            hf = loaded.vision.model(**hf_inputs(loaded, prepared, imgs)).logits[:, -1]
        torch.testing.assert_close(result.logits, hf, atol=1e-5, rtol=0)


def test_generate_and_cli_run_match_hf_generate(identity_engine, loaded, images, capsys):
    """16 greedy tokens: transformers' generate == generate_text == `fastmmoe-compile run`."""
    tokenizer = identity_engine.front_end.tokenizer
    texts = []
    for imgs, prompt in (([images[0]], PROMPT), (None, "Say something.")):
        prepared = identity_engine.prepare(imgs, prompt)
        inputs = hf_inputs(loaded, prepared, imgs)
        with torch.no_grad():
            out = loaded.vision.model.generate(**inputs, max_new_tokens=16, do_sample=False,
                                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(expected) == 16
        tokens = identity_engine.generate(**prepared.backbone_inputs(), max_new_tokens=16,
                                          eos_token_id=tokenizer.eos_token_id)
        assert tokens[0].tolist() == expected
        text = tokenizer.decode(expected, skip_special_tokens=True)
        assert generate_text(identity_engine, imgs, prompt, max_new_tokens=16) == [text]
        texts.append(text)
    capsys.readouterr()
    assert main(["run", str(identity_engine.path), "--image", str(images[0]), "--prompt", PROMPT,
                 "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == texts[0] + "\n"


@pytest.fixture(scope="session")
def merge_engine(checkpoint, tmp_path_factory):
    """Python's path: compile_model(checkpoint dir, config, out) -> engine dir -> load_engine."""
    config = FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5, merge_layers=(1, 2), keep_ratio=0.25,
                            merge_ratio=0.25, window=3, alpha=0.4)
    return compile_model(str(checkpoint), config, tmp_path_factory.mktemp("engines") / "merge", backend="export",
                         quiet=True)


@pytest.mark.parametrize("name", ["identity_engine", "merge_engine"])
def test_batch_of_image_sizes_is_invariant(name, images, request):
    """3 samples, 3 image sizes (different lengths, vision counts and, after merges, per-layer
    cache lengths) in ONE generate_text call == each sample alone."""
    engine = request.getfixturevalue(name)
    prompts = [PROMPT, "<image> Describe.", "Look: <image>"]
    batch = generate_text(engine, [[p] for p in images], prompts, max_new_tokens=8)
    alone = [generate_text(engine, [p], prompt, max_new_tokens=8)[0] for p, prompt in zip(images, prompts)]
    assert batch == alone and len(set(alone)) > 1


STAGE = (0.5, 0.25, 3, 0.4, "hybrid", "mlerp")


def test_merge_engine_matches_eager_reference(merge_engine, loaded, images):
    """Top-Kv + token merging on real image tokens with 3D positions == docs/fastmmoe.md's eager reference:
    prefill logits and kept positions, then greedy tokens after the pruned prefill."""
    prepared = merge_engine.prepare([images[1]], PROMPT)
    result = merge_engine.prefill(**prepared.backbone_inputs())
    mask = prepared.input_ids == loaded.vision.model.config.image_token_id
    ref_logits, ref_kept = eager_fastmmoe(loaded.lm, prepared.inputs_embeds, mask, 1, 2, {1: STAGE, 2: STAGE},
                                          rope_positions=prepared.rope_positions)
    assert result.kept_positions.tolist() == ref_kept
    assert result.kept_positions.shape[1] < prepared.input_ids.shape[1]
    torch.testing.assert_close(result.logits, ref_logits, atol=1e-4, rtol=0)
    with torch.no_grad():  # the reduction did change the answer
        hf = loaded.vision.model(**hf_inputs(loaded, prepared, [images[1]])).logits[:, -1]
    assert (result.logits - hf).abs().max() > 20 * 1e-4
    tokens = merge_engine.generate(**prepared.backbone_inputs(), max_new_tokens=16)
    expected = eager_generate(loaded.lm, prepared.inputs_embeds, mask, 1, 2, {1: STAGE, 2: STAGE}, 16,
                              rope_positions=prepared.rope_positions)
    assert [t.tolist() for t in tokens] == expected


def test_bad_inputs_are_clear_errors(identity_engine, images, tmp_path):
    engine = identity_engine
    check_common_bad_inputs(engine, images[0], PROMPT, tmp_path)
    with pytest.raises(ValueError, match="image processor rejected.*aspect ratio"):
        engine.prepare([Image.new("RGB", (900, 4))], PROMPT)
    with pytest.raises(ValueError, match="rope_positions must be \\[3, 1, 5\\]"):
        engine.prefill(torch.zeros(1, 5, dtype=torch.long), rope_positions=torch.zeros(3, 1, 4, dtype=torch.long))
    facts = engine.front_end.facts
    engine.front_end.facts = {**facts, "max_tiles": 2}  # as an engine that takes 2 images per call
    try:
        with pytest.raises(ValueError, match="3 tiles.*at most 2"):
            engine.prepare(images, "<image><image><image>")
    finally:
        engine.front_end.facts = facts
    assert engine.prefill(images=images[0], prompts=PROMPT).logits.shape == (1, 288)  # still usable


def test_engine_for_another_vision_family_is_refused(identity_engine, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(identity_engine.path, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["vision"]["family"] = "qwen2_vl"
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFormatError, match="vision family 'qwen2_vl'"):
        load_engine(foreign)
