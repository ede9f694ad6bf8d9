"""InternVL end to end: our prompt/tile/token expansion against transformers' own processor,
engine logits against InternVLForConditionalGeneration and the eager reference, engines
that run from an image file without the source checkpoint, and the bad-input errors."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastmmoe_compile import Engine, EngineFormatError, FastMMoEConfig, compile_model, load_engine
from fastmmoe_compile.cli import main
from fastmmoe_compile.models import load_model

from .conftest import check_common_bad_inputs, processor_without_video, vlm_fixtures
from .reference import eager_fastmmoe, eager_generate

PROMPT = "<image>\nWhat is in the picture?"
TOKENS_PER_TILE = 16  # tiny-internvl: 112 px tiles, 14 px patches, pixel shuffle 0.5


# A wide image (3x1 grid + thumbnail = 4 tiles) and a square one (1 tile).
checkpoint, loaded, images, identity_engine = vlm_fixtures("tiny-internvl", {"wide": (100, 250), "square": (80, 80)})


def test_load_gives_the_backbone_and_the_vision_parts(loaded):
    assert loaded.family.model_type == "qwen3_moe" and loaded.vision.family.model_type == "internvl"
    assert loaded.lm.model is loaded.vision.model.model.language_model  # shared, not copied
    assert loaded.lm.lm_head is loaded.vision.model.lm_head
    assert loaded.vision.describe()["tokens_per_tile"] == TOKENS_PER_TILE
    assert all(p.device.type == "cpu" for p in loaded.lm.parameters())


def test_expansion_matches_transformers_processor(identity_engine, loaded, images):
    """input_ids and pixel tiles equal what InternVLProcessor itself produces."""
    from transformers import InternVLProcessor

    processor = processor_without_video(InternVLProcessor, loaded, image_seq_length=TOKENS_PER_TILE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n"}, {"type": "image"},
                                             {"type": "text", "text": "\nCompare them."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pil = [Image.open(p) for p in images]
    expected = processor(images=pil, text=[text], return_tensors="pt")

    prepared = identity_engine.prepare(images, "<image>\n<image>\nCompare them.")
    assert prepared.tiles_per_image == [[4, 1]]
    assert torch.equal(prepared.input_ids, expected["input_ids"])
    torch.testing.assert_close(prepared.pixel_values, expected["pixel_values"], atol=0, rtol=0)
    image_token = loaded.vision.model.config.image_token_id
    assert torch.equal(prepared.vision_positions[0], (expected["input_ids"][0] == image_token).nonzero()[:, 0])
    assert prepared.vision_positions.shape == (1, 5 * TOKENS_PER_TILE)


def test_identity_engine_is_the_hf_model(identity_engine, loaded, images):
    """Image + prompt through the engine == InternVLForConditionalGeneration on the same inputs."""
    for imgs, prompt in (([images[0]], PROMPT), (images, "<image> and <image>: same?"), (None, "No image here.")):
        prepared = identity_engine.prepare(imgs, prompt)
        result = identity_engine.prefill(images=imgs, prompts=prompt)
        with torch.no_grad():
            hf = loaded.vision.model(input_ids=prepared.input_ids, pixel_values=prepared.pixel_values).logits[:, -1]
        torch.testing.assert_close(result.logits, hf, atol=1e-5, rtol=0)


def test_batch_of_prompts(identity_engine, images):
    prompts = [PROMPT, PROMPT.replace("picture", "imagery")]  # same token count
    batch = identity_engine.prefill(images=[images[0], images[0]], prompts=prompts)
    for i, prompt in enumerate(prompts):
        single = identity_engine.prefill(images=images[0], prompts=prompt)
        torch.testing.assert_close(batch.logits[i:i + 1], single.logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="session")
def merge_engine(loaded):
    config = FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5, merge_layers=(1, 3), keep_ratio=0.25,
                            merge_ratio=0.25, window=3, alpha=0.4)
    return compile_model(loaded, config, backend="export", quiet=True)  # in process


def test_merge_engine_matches_eager_reference(merge_engine, loaded, images):
    """Top-Kv + token merging on the real image tokens == docs/fastmmoe.md's eager reference."""
    engine = merge_engine
    prepared = engine.prepare([images[0]], PROMPT)
    result = engine.prefill(inputs_embeds=prepared.inputs_embeds, vision_positions=prepared.vision_positions)
    mask = prepared.input_ids == loaded.vision.model.config.image_token_id
    stage = (0.5, 0.25, 3, 0.4, "hybrid", "mlerp")
    ref_logits, ref_kept = eager_fastmmoe(loaded.lm, prepared.inputs_embeds, mask, 2, 2, {1: stage, 3: stage})
    assert result.kept_positions.tolist() == ref_kept
    n = 4 * TOKENS_PER_TILE
    assert result.kept_positions.shape[1] == prepared.input_ids.shape[1] - n + n // 4
    torch.testing.assert_close(result.logits, ref_logits, atol=1e-4, rtol=0)
    with torch.no_grad():  # and the reduction did change the answer
        hf = loaded.vision.model(input_ids=prepared.input_ids, pixel_values=prepared.pixel_values).logits[:, -1]
    assert (result.logits - hf).abs().max() > 20 * 1e-4
    tokens = engine.generate(**prepared.backbone_inputs(), max_new_tokens=16)  # decode after the pruned prefill
    assert [t.tolist() for t in tokens] == eager_generate(loaded.lm, prepared.inputs_embeds, mask, 2, 2,
                                                          {1: stage, 3: stage}, 16)


@pytest.mark.parametrize("which", ["identity", "merge"])
def test_batch_of_different_image_sizes_in_one_call(which, identity_engine, merge_engine, images, tmp_path):
    """Three prompts whose images tile differently (4, 1 and 3 tiles: different lengths and image-token
    counts) in ONE generate_text call: each answer == its answer alone."""
    from fastmmoe_compile.runtime.multimodal import generate_text

    engine = identity_engine if which == "identity" else merge_engine
    tall = tmp_path / "tall.png"
    Image.fromarray((np.random.RandomState(1).rand(200, 100, 3) * 255).astype("uint8")).save(tall)
    imgs = [images[0], images[1], tall]
    prompts = [PROMPT, "<image> Describe it.", "Read <image> please."]
    prepared = engine.prepare(imgs, prompts)
    assert not prepared.batched and len({len(t) for t in prepared.input_ids}) == 3
    assert prepared.tiles_per_image == [[4], [1], [3]]
    together = generate_text(engine, imgs, prompts, max_new_tokens=8)
    alone = [generate_text(engine, [im], p, max_new_tokens=8)[0] for im, p in zip(imgs, prompts)]
    assert together == alone
    assert engine.generate(images=[[im] for im in imgs], prompts=prompts, max_new_tokens=8) == alone
    steps = list(engine.generate(images=[[im] for im in imgs], prompts=prompts, max_new_tokens=8, stream=True))
    assert ["".join(step[i] or "" for step in steps) for i in range(3)] == alone
    new = engine.generate(**prepared.backbone_inputs(), max_new_tokens=8)  # tokens, not just their text
    for i, (im, p) in enumerate(zip(imgs, prompts)):
        assert new[i].tolist() == engine.generate(**engine.prepare([im], p).backbone_inputs(), max_new_tokens=8)[0].tolist()


def test_generate_and_cli_run_match_hf_generate(identity_engine, loaded, images, capsys):
    """16 greedy tokens: transformers' generate == engine.generate == generate_text == `fastmmoe-compile run`."""
    from fastmmoe_compile.runtime.multimodal import generate_text, stream_text

    prepared = identity_engine.prepare([images[0]], PROMPT)
    tokenizer = identity_engine.front_end.tokenizer
    with torch.no_grad():
        out = loaded.vision.model.generate(input_ids=prepared.input_ids, pixel_values=prepared.pixel_values,
                                           max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                           pad_token_id=tokenizer.pad_token_id)
    expected = out[0, prepared.input_ids.shape[1]:].tolist()
    assert len(expected) == 16
    tokens = identity_engine.generate(**prepared.backbone_inputs(), max_new_tokens=16,
                                      eos_token_id=tokenizer.eos_token_id)
    assert tokens[0].tolist() == expected
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert generate_text(identity_engine, [images[0]], PROMPT, max_new_tokens=16) == [text]
    pieces = list(stream_text(identity_engine, [images[0]], PROMPT, max_new_tokens=16))  # as they come
    assert len(pieces) > 1 and "".join(pieces) == text
    capsys.readouterr()
    assert main(["run", str(identity_engine.path), "--image", str(images[0]), "--prompt", PROMPT,
                 "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == text + "\n"
    assert main(["run", str(identity_engine.path), "--image", str(images[0]), "--prompt", "no placeholder"]) == 2


@pytest.mark.slow
@pytest.mark.aoti("the default backend's VLM engine (vision program, backbone, decode) runs without the checkpoint")
def test_aoti_engine_runs_from_an_image_file_without_the_checkpoint(checkpoint, loaded, images, tmp_path):
    """AOTInductor backbone + vision encoder + processing files; the source checkpoint is gone when
    the engine runs."""
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoint, source)
    out = tmp_path / "engine"
    # The README's `fastmmoe-compile tiny-internvl --out ./vlm` (default config, with decode) from a
    # checkpoint of the same weights: the same three programs, built once per session by the compile
    # cache (tests/conftest.py) for this test and tests/test_readme.py.
    compile_model(str(source), FastMMoEConfig(vision_expert_ratio=0.5, reduce_from_layer=2), out, quiet=True)
    shutil.rmtree(source)
    engine = load_engine(out)
    files = engine.manifest["files"]
    assert {"vision.pt2", "backbone.pt2", "processor/tokenizer.json", "processor/preprocessor_config.json",
            "processor/chat_template.jinja"} <= set(files)
    assert engine.manifest["vision"]["family"] == "internvl"
    result = engine.prefill(images=str(images[0]), prompts=PROMPT)
    prepared = engine.prepare([images[0]], PROMPT)
    with torch.no_grad():  # the AOTI vision encoder == HF's get_image_features
        hf_features = loaded.vision.model.model.get_image_features(pixel_values=prepared.pixel_values).pooler_output
    mask = prepared.input_ids == loaded.vision.model.config.image_token_id
    torch.testing.assert_close(prepared.inputs_embeds[mask], hf_features.reshape(-1, hf_features.shape[-1]),
                               atol=1e-5, rtol=0)
    ref_logits, _ = eager_fastmmoe(loaded.lm, prepared.inputs_embeds, mask, 2, 2, {})
    torch.testing.assert_close(result.logits, ref_logits, atol=1e-4, rtol=0)


def test_bad_inputs_are_clear_errors(identity_engine, images, tmp_path):
    engine = identity_engine
    check_common_bad_inputs(engine, images[0], PROMPT, tmp_path)
    with pytest.raises(ValueError, match="image processor rejected"):
        engine.prepare([np.zeros((5, 5, 7), dtype=np.uint8)], PROMPT)
    with pytest.raises(ValueError, match="different shapes.*generate"):
        engine.prefill(images=[images[0], images[1]], prompts=[PROMPT, PROMPT])
    with pytest.raises(ValueError, match="prompts= .*alone"):
        engine.prefill(torch.zeros(1, 4, dtype=torch.long), prompts=PROMPT)
    facts = engine.front_end.facts
    engine.front_end.facts = {**facts, "max_tiles": 4}  # as an engine whose vision encoder takes 4 tiles
    try:
        with pytest.raises(ValueError, match="5 tiles.*at most 4"):
            engine.prepare(images, "<image><image>")
    finally:
        engine.front_end.facts = facts
    text_only = Engine(lambda *a: None, {"model_type": "qwen3_moe", "source": "tiny-qwen3-moe", "dtype": "float32"})
    with pytest.raises(ValueError, match="text-only qwen3_moe"):
        text_only.prefill(images=images[0], prompts=PROMPT)


def test_engine_for_another_vision_family_is_refused(identity_engine, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(identity_engine.path, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["vision"]["family"] = "llava_onevision"  # a family this version does not run
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFormatError, match="vision family 'llava_onevision'"):
        load_engine(foreign)


def test_vision_preset_shapes_on_meta():
    loaded = load_model("internvl3.5-30b-a3b")
    assert loaded.on_meta and loaded.describe()["num_experts"] == 128
    assert loaded.vision.describe()["tokens_per_tile"] == 256
    from fastmmoe_compile.export.vision import export_vision

    program = export_vision(loaded)  # InternViT-300M + projector, dynamic tile count, no weights
    out = next(n for n in program.graph.nodes if n.op == "output").args[0][0].meta["val"]
    assert isinstance(out.shape[0], torch.SymInt) and tuple(out.shape[1:]) == (256, 2048)
    assert 316e6 < sum(v.numel() for v in program.state_dict.values()) < 317e6
