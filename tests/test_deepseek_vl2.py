"""DeepSeek-VL2 end to end, from a checkpoint written in the official layout (config.json with
vision/projector/language sub-configs, weights under the official names): the vision tower, projector
and tile layout against an eager re-implementation of the official forward (written here from
deepseek-ai/DeepSeek-VL2's modeling_deepseek_vl_v2.py and siglip_vit.py, reading the official
weights directly), the prompt expansion against the official processor's formula, engine logits
and greedy tokens against the loaded backbone and the eager reference, and the bad-input errors."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from fastmmoe_compile import FastMMoEConfig, compile_model, load_engine
from fastmmoe_compile.cli import main
from fastmmoe_compile.models import load_model

from .conftest import cli_identity_engine, save_vlm_checkpoint, write_images
from .reference import eager_fastmmoe, eager_generate

PROMPT = "<image>\nWhat is in the picture?"
# The published variants, each as a tiny checkpoint of its form (deepseek_vl2_language.py): "small"
# (deepseek-vl2-small: MLA, softmax), "base" (deepseek-vl2: MLA, sigmoid + correction bias, noaux_tc),
# "tiny" (deepseek-vl2-tiny: multi-head attention). Tests of the language side run on all three; the
# vision side and the front end are the same code for all, tested on Small.
VARIANTS = ["small", "base", "tiny"]
PRESET = {"small": "tiny-deepseek-vl2", "base": "tiny-deepseek-vl2-base", "tiny": "tiny-deepseek-vl2-tiny"}
BACKBONE = {"small": "DeepseekV2ForCausalLM", "base": "DeepseekV3ForCausalLM", "tiny": "DeepseekOcr2TextForCausalLM"}
SIDE = 2  # tiny-deepseek-vl2: 42 px tiles of 14 px patches = 3x3, padded to 4x4, 2x2-pooled to 2x2


@pytest.fixture(scope="session", params=["small"])
def variant(request):
    """"small" unless a test parametrizes it (indirect): the session fixtures below exist once per variant
    (a param, not a default, so that Small's are shared between both kinds of test)."""
    return request.param


@pytest.fixture(scope="session")
def checkpoint(variant, tmp_path_factory):
    """The variant's tiny preset written as the official checkpoint layout: config.json + model.safetensors
    (official weight names) + tokenizer + processor_config.json."""
    return save_vlm_checkpoint(PRESET[variant], tmp_path_factory.mktemp("ckpt") / PRESET[variant])


@pytest.fixture(scope="session")
def loaded(checkpoint):
    return load_model(str(checkpoint))


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """wide: 1x3 local tiles; square: 2x2; small: 1x1 (every candidate keeps all its pixels: least padding)."""
    return write_images(tmp_path_factory.mktemp("images"), {"wide": (40, 100), "square": (90, 90), "small": (30, 30)})


def over_variants(test):
    return pytest.mark.parametrize("variant", VARIANTS, indirect=True)(test)


@pytest.fixture(scope="session")
def identity_engine(checkpoint, tmp_path_factory):
    return cli_identity_engine(checkpoint, tmp_path_factory.mktemp("engines") / "identity")


# --- the official forward, re-implemented from the official code's math ------------------------
def official_weights(checkpoint) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def official_vit(w: dict, x: torch.Tensor, heads: int, layers: int) -> torch.Tensor:
    """siglip_vit.VisionTransformer.forward with ignore_head: patch embed, + pos_embed, pre-norm
    blocks (fused qkv, softmax attention, GELU-tanh MLP, LayerNorm eps 1e-6), final norm."""
    x = F.conv2d(x, w["vision.patch_embed.proj.weight"], w["vision.patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2) + w["vision.pos_embed"]
    b, n, c = x.shape

    def norm(t, name):
        return F.layer_norm(t, (c,), w[name + ".weight"], w[name + ".bias"], eps=1e-6)

    for i in range(layers):
        p = f"vision.blocks.{i}."
        qkv = F.linear(norm(x, p + "norm1"), w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(o, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        hidden = F.gelu(F.linear(norm(x, p + "norm2"), w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]),
                        approximate="tanh")
        x = x + F.linear(hidden, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    return norm(x, "vision.norm")


def official_projector(w: dict, x: torch.Tensor, ratio: int = 2) -> torch.Tensor:
    """MlpProjector.forward, downsample_mlp_gelu, depth 2: pad, F.unfold 2x2, Linear GELU Linear."""
    bs, hw, dim = x.shape
    h = int(hw ** 0.5)
    pad = ratio - h % ratio if h % ratio else 0
    x = F.pad(x.reshape(bs, h, h, dim), (0, 0, 0, pad, 0, pad), "constant", 0)
    x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=ratio, stride=ratio, padding=0).permute(0, 2, 1)
    x = F.gelu(F.linear(x, w["projector.layers.0.weight"], w["projector.layers.0.bias"]))
    return F.linear(x, w["projector.layers.2.weight"], w["projector.layers.2.bias"])


def official_layout(w: dict, embeds: torch.Tensor, grids) -> torch.Tensor:
    """prepare_inputs_embeds' 2D tile tag, global view at the head: per image its global view with
    a newline per row, the separator, then the local tiles side by side with a newline per row."""
    _, hw, d = embeds.shape
    h = int(hw ** 0.5)
    newline, separator = w["image_newline"], w["view_seperator"]
    out, index = [], 0
    for th, tw in grids:
        g = torch.cat([embeds[index].view(h, h, d), newline.expand(h, 1, d)], dim=1).reshape(-1, d)
        local = embeds[index + 1:index + 1 + th * tw]
        local = local.reshape(th, tw, h, h, d).permute(0, 2, 1, 3, 4).reshape(th * h, tw * h, d)  # (th h) (tw w) d
        local = torch.cat([local, newline.expand(th * h, 1, d)], dim=1).reshape(-1, d)
        out.append(torch.cat([g, separator[None], local]))
        index += 1 + th * tw
    return torch.cat(out)


def official_count(th: int, tw: int, image_size=42, patch=14, ratio=2) -> int:
    """tokenize_with_images: h(w+1) + 1 + (th h)(tw w + 1), h = w = ceil((image_size // patch) / ratio)."""
    h = w = math.ceil((image_size // patch) / ratio)
    return h * (w + 1) + 1 + (th * h) * (tw * w + 1)


def reference_embeds(loaded, checkpoint, prepared, grids):
    """The official prepare_inputs_embeds: token embeddings, the image features scattered in order."""
    raw = json.loads((checkpoint / "config.json").read_text())["vision_config"]
    w = official_weights(checkpoint)
    with torch.no_grad():
        features = official_projector(w, official_vit(w, prepared.pixel_values, raw["heads"], raw["layers"]))
        image = official_layout(w, features, grids)
        embeds = loaded.lm.model.embed_tokens(prepared.input_ids).clone()
    mask = prepared.input_ids == loaded.vision.describe()["image_token_id"]
    embeds[mask] = image
    return embeds, mask


# --- tests ---------------------------------------------------------------------------------------
@over_variants
def test_load_reads_the_official_layout(loaded, checkpoint, variant):
    assert type(loaded.lm).__name__ == BACKBONE[variant] and loaded.vision.family.model_type == "deepseek_vl_v2"
    assert loaded.lm is loaded.vision.model.language  # the backbone is the checkpoint's language model
    weights = official_weights(checkpoint)
    names = set(weights)
    assert {"vision.blocks.0.attn.qkv.weight", "vision.pos_embed", "projector.layers.0.weight", "image_newline",
            "view_seperator", "language.lm_head.weight", "language.model.layers.1.mlp.experts.7.down_proj.weight",
            "language.model.layers.1.mlp.shared_experts.up_proj.weight"} <= names
    attention = {n.split("self_attn.")[1] for n in names if n.startswith("language.model.layers.0.self_attn.")}
    if variant == "tiny":  # the official MHA layer is LlamaAttention
        assert attention == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    else:  # MLA without a query LoRA (q_lora_rank null)
        assert attention == {"q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight",
                             "kv_b_proj.weight", "o_proj.weight"}
    bias = "language.model.layers.1.mlp.gate.e_score_correction_bias"
    assert (bias in names) == (variant == "base")
    if variant == "base":  # read into the router that selects with it, not left at transformers' zeros
        router = loaded.lm.model.layers[1].mlp.gate
        assert torch.equal(router.e_score_correction_bias, weights[bias]) and weights[bias].abs().sum() > 0
    facts = loaded.vision.describe()
    assert facts["tokens_per_tile"] == SIDE * SIDE and facts["image_size"] == [42, 42]
    assert facts["image_token_id"] == loaded.vision.tokenizer.convert_tokens_to_ids("<image>")


def test_vision_encoder_and_layout_match_the_official_forward(identity_engine, loaded, checkpoint, images):
    """Tiles, tower, projector and layout (newlines, separator) of two multi-tile images == the
    official forward re-implemented eagerly, within 1e-5."""
    prepared = identity_engine.prepare([images["wide"], images["square"]], "<image> and <image>")
    assert prepared.tiles_per_image == [[4, 5]]
    # the global view: the image padded to a 42 px square with the mean colour, normalised by 0.5/0.5
    pil = Image.open(images["wide"]).convert("RGB")
    view = np.asarray(ImageOps.pad(pil, (42, 42), color=(127, 127, 127)), dtype=np.float32) / 255
    torch.testing.assert_close(prepared.pixel_values[0], torch.from_numpy((view - 0.5) / 0.5).permute(2, 0, 1))
    embeds, mask = reference_embeds(loaded, checkpoint, prepared, [(1, 3), (2, 2)])
    torch.testing.assert_close(prepared.inputs_embeds, embeds, atol=1e-5, rtol=0)
    assert torch.equal(prepared.vision_positions[0], mask[0].nonzero()[:, 0])


@pytest.mark.parametrize("name,grid", [("wide", (1, 3)), ("square", (2, 2)), ("small", (1, 1))])
def test_prompt_expansion_is_the_official_one(identity_engine, images, name, grid):
    """input_ids == BOS + "<|User|>: " prompt "\\n\\n<|Assistant|>:" with each <image> expanded to the
    official count, tokenized split by split as tokenize_with_images does."""
    tokenizer = identity_engine.front_end.tokenizer
    prepared = identity_engine.prepare([images[name]], PROMPT)
    n = official_count(*grid)
    assert prepared.vision_positions.shape == (1, n)
    before, after = f"<|User|>: {PROMPT.strip()}\n\n<|Assistant|>:".split("<image>")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    expected = ([tokenizer.bos_token_id] + tokenizer.encode(before, add_special_tokens=False) + [image_id] * n
                + tokenizer.encode(after, add_special_tokens=False))
    assert prepared.input_ids[0].tolist() == expected
    raw = identity_engine.prepare([images[name]], "<image>describe", chat=False)  # no template: BOS + text
    assert raw.input_ids[0, 0] == tokenizer.bos_token_id and raw.input_ids.shape[1] == 1 + n + len("describe")


def test_tokenizer_and_processor_completed_as_the_official_processor_does(checkpoint, tmp_path):
    """A tokenizer without <image>/grounding/chat tokens gets them in the official order, BOS is written
    as text when the tokenizer does not add it, and processor settings fall back to config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastmmoe_compile.models.deepseek_vl2 import BOS, EOS, FAMILY, complete_tokenizer

    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens([BOS, EOS])
    tokenizer = complete_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS))
    added = ["<｜▁pad▁｜>", "<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>",
             "<|Assistant|>"]
    assert tokenizer.convert_tokens_to_ids(added) == list(range(258, 267))
    text = FAMILY.prompt_text(tokenizer, "<image> hi ", chat=True)
    assert text == f"{BOS}<|User|>: <image> hi\n\n<|Assistant|>:"
    assert tokenizer(text)["input_ids"][:2] == [256, 265]
    bare = tmp_path / "ckpt"
    shutil.copytree(checkpoint, bare)
    (bare / "processor_config.json").unlink()
    _, processor = FAMILY.load_processing(bare)
    assert processor.to_dict() == FAMILY.load_processing(checkpoint)[1].to_dict()


def test_more_than_two_images_are_not_cropped(identity_engine, images):
    """The official processor crops only conversations of at most 2 images: 3 images get 1 + 1 tiles each."""
    prepared = identity_engine.prepare([images["wide"]] * 3, "<image><image><image>")
    assert prepared.tiles_per_image == [[2, 2, 2]]
    assert prepared.vision_positions.shape[1] == 3 * official_count(1, 1)


@over_variants
def test_identity_engine_is_the_composed_model(identity_engine, loaded, checkpoint, images):
    """Kv = K: engine logits == the loaded transformers backbone on the official reference embeddings."""
    prepared = identity_engine.prepare([images["square"]], PROMPT)
    embeds, _ = reference_embeds(loaded, checkpoint, prepared, [(2, 2)])
    result = identity_engine.prefill(images=[images["square"]], prompts=PROMPT)
    with torch.no_grad():
        hf = loaded.lm(inputs_embeds=embeds).logits[:, -1]
    torch.testing.assert_close(result.logits, hf, atol=1e-5, rtol=0)


MERGE = FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5, merge_layers=(1, 3), keep_ratio=0.25,
                       merge_ratio=0.25, window=3, alpha=0.4)


@pytest.fixture(scope="session")
def merge_engine(loaded):
    return compile_model(loaded, MERGE, backend="export", quiet=True)  # in process, with decode


@over_variants
def test_merge_engine_matches_eager_reference(merge_engine, loaded, images):
    """Top-Kv + token merging on the image tokens (newlines and separator included) == the eager
    reference: logits and kept tokens, then 16 greedy tokens after the pruned prefill."""
    engine = merge_engine
    prepared = engine.prepare([images["square"]], PROMPT)
    result = engine.prefill(inputs_embeds=prepared.inputs_embeds, vision_positions=prepared.vision_positions)
    mask = torch.zeros_like(prepared.input_ids, dtype=torch.bool)
    mask[0, prepared.vision_positions[0]] = True
    stage = (0.5, 0.25, 3, 0.4, "hybrid", "mlerp")
    kv = MERGE.kv(loaded.family.top_k(loaded.config))  # 2 of Small's 4, 1 of the others' 3
    ref_logits, ref_kept = eager_fastmmoe(loaded.lm, prepared.inputs_embeds, mask, 2, kv, {1: stage, 3: stage})
    assert result.kept_positions.tolist() == ref_kept
    n = official_count(2, 2)
    assert result.kept_positions.shape[1] == prepared.input_ids.shape[1] - n + n // 4
    torch.testing.assert_close(result.logits, ref_logits, atol=1e-4, rtol=0)
    tokens = engine.generate(**prepared.backbone_inputs(), max_new_tokens=16)
    assert [t.tolist() for t in tokens] == eager_generate(loaded.lm, prepared.inputs_embeds, mask, 2, kv,
                                                          {1: stage, 3: stage}, 16)


@pytest.mark.parametrize("which", ["identity", "merge"])
def test_batch_of_different_image_sizes_in_one_call(which, identity_engine, merge_engine, images):
    """Three prompts with 1x3, 2x2 and 1x1 tile grids (all lengths differ) in ONE generate_text call:
    each answer == its answer alone."""
    from fastmmoe_compile.runtime.multimodal import generate_text

    engine = identity_engine if which == "identity" else merge_engine
    imgs = [images["wide"], images["square"], images["small"]]
    prompts = [PROMPT, "<image> Describe it.", "Read <image> please."]
    prepared = engine.prepare(imgs, prompts)
    assert not prepared.batched and len({len(t) for t in prepared.input_ids}) == 3
    together = engine.generate(**prepared.backbone_inputs(), max_new_tokens=8)
    for i, (im, p) in enumerate(zip(imgs, prompts)):
        alone = engine.generate(**engine.prepare([im], p).backbone_inputs(), max_new_tokens=8)
        assert together[i].tolist() == alone[0].tolist()
    assert generate_text(engine, imgs, prompts, max_new_tokens=8) == \
        [generate_text(engine, [im], p, max_new_tokens=8)[0] for im, p in zip(imgs, prompts)]


@over_variants
def test_generate_and_cli_run_match_eager_greedy(identity_engine, loaded, images, capsys, variant):
    prepared = identity_engine.prepare([images["wide"]], PROMPT)
    embeds, tokens = prepared.inputs_embeds, []
    with torch.no_grad():  # greedy, the whole sequence recomputed each step
        for _ in range(16):
            tokens.append(int(loaded.lm(inputs_embeds=embeds).logits[0, -1].argmax()))
            embeds = torch.cat([embeds, loaded.lm.model.embed_tokens(torch.tensor([[tokens[-1]]]))], dim=1)
    new = identity_engine.generate(inputs_embeds=prepared.inputs_embeds, vision_positions=prepared.vision_positions,
                                   max_new_tokens=16)
    assert new[0].tolist() == tokens
    if variant != "small":
        return  # `run` is this engine's load + prepare + generate, whatever the backbone: once is enough for CI
    text = identity_engine.front_end.tokenizer.decode(tokens, skip_special_tokens=True)
    capsys.readouterr()
    assert main(["run", str(identity_engine.path), "--image", str(images["wide"]), "--prompt", PROMPT,
                 "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_bad_inputs_are_clear_errors(identity_engine, checkpoint, images, tmp_path):
    engine = identity_engine
    with pytest.raises(ValueError, match="image processor rejected.*RGB image"):
        engine.prepare([np.zeros((5, 5, 7), dtype=np.uint8)], PROMPT)
    with pytest.raises(ValueError, match="0 <image> placeholder"):
        engine.prepare([images["wide"]], "What is in the picture?")
    with pytest.raises(ValueError, match="not an image file"):
        (tmp_path / "notes.png").write_text("not an image")
        engine.prepare([tmp_path / "notes.png"], PROMPT)
    # checkpoints this adapter cannot read say why, before any weight is read
    for change, message in ((lambda c: c["language_config"].update(scoring_func="sigmoid"),
                             "topk_method 'group_limited_greedy' with sigmoid scoring"),
                            (lambda c: c.update(tile_tag="1D"), "tile_tag '1D'"),
                            (lambda c: c["projector_config"].update(projector_type="mlp_gelu"), "projector_type")):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(checkpoint, bad)
        config = json.loads((bad / "config.json").read_text())
        change(config)
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"unsupported DeepSeek-VL2 config: .*{message}"):
            load_model(str(bad))
    from safetensors.torch import save_file

    bad = tmp_path / "renamed"
    shutil.copytree(checkpoint, bad)
    w = official_weights(checkpoint)
    w["vision.blocks.0.attn.qkv_fused.weight"] = w.pop("vision.blocks.0.attn.qkv.weight")
    save_file(w, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected weights.*qkv_fused"):
        load_model(str(bad))
    assert main([str(bad), "--out", str(tmp_path / "engine"), "--backend", "export", "--quiet"]) == 2
    assert not (tmp_path / "engine").exists()


@pytest.mark.slow
@pytest.mark.aoti("the default backend's vision program (dynamic tile count) and backbone for this family")
def test_aoti_engine_from_an_image_file(checkpoint, loaded, images, tmp_path):
    """AOTInductor backbone + vision encoder (dynamic tile count); the checkpoint is gone when it runs."""
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoint, source)
    out = tmp_path / "engine"
    compile_model(str(source), FastMMoEConfig(vision_expert_ratio=1.0), out, quiet=True, decode=False)
    shutil.rmtree(source)
    engine = load_engine(out)
    assert {"vision.pt2", "backbone.pt2", "processor/processor_config.json"} <= set(engine.manifest["files"])
    for name, grid in (("wide", (1, 3)), ("square", (2, 2))):  # 4 and 5 tiles through one vision program
        prepared = engine.prepare([images[name]], PROMPT)
        embeds, _ = reference_embeds(loaded, checkpoint, prepared, [grid])
        torch.testing.assert_close(prepared.inputs_embeds, embeds, atol=1e-5, rtol=0)
        result = engine.prefill(images=[images[name]], prompts=PROMPT)
        with torch.no_grad():
            hf = loaded.lm(inputs_embeds=embeds).logits[:, -1]
        torch.testing.assert_close(result.logits, hf, atol=1e-4, rtol=0)

