"""Images + prompts -> what the backbone takes: input_ids, inputs_embeds with the projected
image features at the image-token positions, and vision_positions.

The engine dir carries everything this needs (the compiled vision encoder, the
tokenizer, image processor and chat template), so it runs without the source
checkpoint. Family rules (chat template use, tiling, token expansion) come from the
family's front end (runtime/frontends/) named in the manifest's vision.family; transformers' processor classes are not used
(InternVL's needs torchvision, which the CPU torch here cannot have).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import inputs
from .backends import load_role
from .frontends import FRONT_ENDS, PLACEHOLDER
from .frontends.base import PromptBatch
from .inputs import EngineInputError
from .manifest import EngineFormatError

PROCESSOR_DIR = "processor"  # tokenizer, chat template and image processor files, save_pretrained layout


@dataclass
class Prepared:
    """The backbone's inputs for a batch of prompts. When every sample has the same length and
    image-token count they are batched tensors ([B, ...]); otherwise per-sample lists (the batch
    dimension dropped), which generate() takes as they are and prefill() refuses. samples: the
    same inputs parsed, one runtime.inputs.Sample per prompt (what prefill, generate and the
    server run)."""

    input_ids: torch.Tensor | list  # [B, S]
    inputs_embeds: torch.Tensor | list  # [B, S, H]
    vision_positions: torch.Tensor | list  # [B, N]: the image-feature tokens
    pixel_values: torch.Tensor | None  # every image's pixel input (tiles [T, 3, h, w], or patches), in prompt order
    tiles_per_image: list[list[int]]  # per sample, per image
    extras: dict = field(default_factory=dict)  # the engine's extra backbone inputs (runtime/specs.py), by name
    samples: list = field(default_factory=list)  # [runtime.inputs.Sample], one per prompt

    @property
    def batched(self) -> bool:
        return isinstance(self.input_ids, torch.Tensor)

    def __getattr__(self, name: str):
        """An extra input by its name (prepared.<name>, for each of the engine's input specs)."""
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or extra input {name!r}")

    def backbone_inputs(self) -> dict:
        """Keyword arguments for engine.prefill / engine.generate."""
        return {"inputs_embeds": self.inputs_embeds, "vision_positions": self.vision_positions, **self.extras}


class FrontEnd:
    """The vision encoder and input processing of one engine."""

    def __init__(self, family, facts: dict, encoder: Callable, tokenizer, image_processor):
        self.family = family  # frontends.FrontEndFamily (a compile-time adapter is one too)
        self.facts = facts  # manifest["vision"]: image_size, tokens_per_tile, image_token_id, max_tiles
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def prepare(self, engine, images, prompts, chat: bool = True, max_length: int | None = None) -> Prepared:
        if self.tokenizer is None or self.image_processor is None:
            raise EngineInputError("this engine has no tokenizer/image processor (its source, an in-memory "
                                   "model or a checkpoint without them, had none): compile a checkpoint "
                                   "directory that has them")
        prompts, per_sample = inputs.prompts_and_images(images, prompts)
        texts, all_images, counts = [], [], []
        for prompt, imgs in zip(prompts, per_sample):
            if prompt.count(PLACEHOLDER) != len(imgs):
                raise EngineInputError(f"the prompt has {prompt.count(PLACEHOLDER)} {PLACEHOLDER} placeholder(s) "
                                       f"for {len(imgs)} image(s): put one {PLACEHOLDER} where each image goes")
            texts.append(self.family.prompt_text(self.tokenizer, prompt, chat))
            all_images += [load_image(im) for im in imgs]
            counts.append(len(imgs))
        pixel_values, tiles, layouts, per_sample_layouts = None, [], [], []
        for i, count in enumerate(counts):  # per prompt: tiling may depend on the prompt's image count
            sample_images = all_images[sum(counts[:i]):sum(counts[:i]) + count]
            try:
                pixels, sample_tiles, *layout = self.family.tiles(self.image_processor, sample_images) if count else (None, [])
            except (ValueError, TypeError, OSError) as e:
                raise EngineInputError(f"the image processor rejected the image(s): {e}") from e
            per_sample_layouts.append(layout[0] if layout else sample_tiles)
            tiles += sample_tiles
            layouts += per_sample_layouts[-1]
            if pixels is not None:
                pixel_values = pixels if pixel_values is None else torch.cat([pixel_values, pixels])
        if len(tiles) != len(all_images):
            raise EngineInputError(f"the image processor returned {len(tiles)} tile groups for "
                                   f"{len(all_images)} images")
        if sum(tiles) > self.facts["max_tiles"]:
            raise EngineInputError(f"{len(all_images)} image(s) make {sum(tiles)} tiles; this engine's vision "
                                   f"encoder takes at most {self.facts['max_tiles']} per call: pass fewer images")
        per_sample_tiles = [tiles[sum(counts[:i]):sum(counts[:i + 1])] for i in range(len(counts))]
        texts = [self.family.expand(self.tokenizer, t, n, self.facts) for t, n in zip(texts, per_sample_layouts)]
        ids = [torch.tensor(x, dtype=torch.long) for x in self.tokenizer(texts)["input_ids"]]
        inputs.prompt_token_counts(ids, prompts, chat, max_length)  # before the embedding and the vision encoder
        masks = [x == self.facts["image_token_id"] for x in ids]
        embeds = [engine.embed(x[None])[0] for x in ids]
        features, outputs = None, None
        if pixel_values is not None:
            outputs = self.family.encode(self.encoder, pixel_values.to(engine.dtype), layouts, self.facts)
            features = self.family.arrange(outputs, layouts, self.facts).to(engine.dtype)
            total = sum(int(m.sum()) for m in masks)
            if features.shape[0] != total:
                raise ValueError(f"{total} image tokens in the prompts for {features.shape[0]} image features")
        offset = 0
        for i, (x, mask) in enumerate(zip(ids, masks)):
            n = int(mask.sum())
            if n:
                embeds[i] = embeds[i].clone()
                embeds[i][mask] = features[offset:offset + n]  # row-major, as HF's masked_scatter
            offset += n
        batch = PromptBatch(ids, masks, embeds, per_sample_layouts, layouts, outputs, self.facts, engine.info,
                            engine.dtype)
        extras = {spec.name: [self.family.sample_input(spec, batch, i) for i in range(len(ids))]
                  for spec in engine.input_specs}
        positions = [m.nonzero()[:, 0] for m in masks]
        samples = inputs.parse(engine, inputs_embeds=embeds, vision_positions=positions, extras=extras)
        prepared = Prepared(ids, embeds, positions, pixel_values, per_sample_tiles, extras, samples)
        if len({s.shape for s in samples}) == 1:
            prepared = Prepared(torch.stack(ids), torch.stack(embeds), torch.stack(positions), pixel_values,
                                per_sample_tiles, {spec.name: torch.stack(extras[spec.name], dim=spec.batch_axis)
                                                   for spec in engine.input_specs}, samples)
        return prepared


def load_image(image):
    """A path or a PIL image -> a PIL image (arrays and tensors go to the image processor as they are)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise EngineInputError(f"{path} is not an image file PIL can read: {e}") from e
    if isinstance(image, Image.Image) or hasattr(image, "shape"):
        return image
    raise EngineInputError(f"an image must be a path, a PIL image, an array or a tensor, got {type(image).__name__}")


def check_vision_facts(path: Path, facts, model: dict) -> None:
    """The manifest's "vision" facts the front end relies on: a family this version runs, max_tiles
    and image_token_id (the family reads its own facts)."""
    def wrong(field, value, expected):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return EngineFormatError(f"{path}: manifest field {field} is {shown}; expected {expected} "
                                 "(a corrupt or hand-edited manifest: recompile the model)")

    if not isinstance(facts, dict):
        raise wrong("vision", facts, "an object with the vision encoder's facts")
    family = facts.get("family")
    if not isinstance(family, str) or family not in FRONT_ENDS:
        raise EngineFormatError(f"{path}: vision family {family!r} (manifest field vision.family) is not one this "
                                f"fastmmoe-compile runs; legal values: {', '.join(FRONT_ENDS)}")
    max_tiles = facts.get("max_tiles")
    if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 1:
        raise wrong("vision.max_tiles", max_tiles, "a positive int")
    token, vocab = facts.get("image_token_id"), model.get("vocab_size")
    if not isinstance(token, int) or isinstance(token, bool) or token < 0 or \
            (isinstance(vocab, int) and token >= vocab):
        raise wrong("vision.image_token_id", token, f"a token id in [0, {vocab})")


def load_front_end(path: Path, manifest: dict, weights: dict | None = None) -> FrontEnd | None:
    """The front end of an engine dir, or None for a text-only engine (weights: the engine's shared
    weights, runtime.backends.load_weights)."""
    facts = manifest.get("vision")
    if facts is None:
        return None
    check_vision_facts(path, facts, manifest.get("model") or {})
    family = FRONT_ENDS[facts["family"]]
    encoder = load_role(path, manifest, "vision", weights)
    tokenizer = image_processor = None
    if (path / PROCESSOR_DIR).is_dir():
        tokenizer, image_processor = family.load_processing(path / PROCESSOR_DIR)
    return FrontEnd(family, facts, encoder, tokenizer, image_processor)


def generate_text(engine, images, prompts, max_new_tokens: int = 32, chat: bool = True, sampling=None) -> list[str]:
    """Answers (decoded text, special tokens dropped) to image + prompt inputs, per prompt: greedy,
    or as `sampling` (a runtime.sampling.SamplingParams, stop strings included) says."""
    return joined(stream_texts(engine, images, prompts, max_new_tokens, chat, sampling))


def stream_texts(engine, images, prompts, max_new_tokens: int = 32, chat: bool = True, sampling=None):
    """Answers as they are generated: yields, per decode step, each prompt's new text piece
    ("" while its text is held back: a multi-byte character or a possible stop string not yet
    complete; None once the prompt has ended). Each prompt's pieces join to its generate_text
    answer. Bad inputs raise here, at the call."""
    from .generate import GenerateParams

    return answer_steps(engine, images, prompts, GenerateParams.of(max_new_tokens, None, sampling), chat)


def answer_steps(engine, images, prompts, params, chat: bool = True):
    """stream_texts with its settings checked already (a runtime.generate.GenerateParams; generation
    also ends at the tokenizer's eos)."""
    from .generate import generate

    prepared = engine.prepare(images, prompts, chat=chat)
    tokenizer = engine.front_end.tokenizer
    eos = params.eos | inputs.token_id_set("eos_token_id", tokenizer.eos_token_id)
    steps = generate(engine, prepared.samples, replace(params, eos=eos), stream=True)
    return _texts(tokenizer, steps, len(prepared.samples), params.sampling.stop)


def joined(steps) -> list[str]:
    """Each prompt's whole answer from answer_steps' pieces."""
    return ["".join(p for p in pieces if p) for pieces in zip(*steps)]


def _texts(tokenizer, steps, count: int, stop=()):
    from .sampling import TextStream

    streams = [TextStream(tokenizer, stop) for _ in range(count)]
    for step in steps:
        pieces = [None if token is None or s.stopped else s.add(token) for s, token in zip(streams, step)]
        if all(p is None for p in pieces):
            break
        yield pieces
        if all(s.stopped for s in streams):
            steps.close()  # every answer has met a stop string: no more decode steps
            break
    rest = [s.finish() for s in streams]
    if any(rest):  # what was held back at the end
        yield rest


def stream_text(engine, images, prompt: str, max_new_tokens: int = 32, chat: bool = True):
    """One prompt's answer as it is generated: its non-empty text pieces (stream_texts)."""
    return (pieces[0] for pieces in stream_texts(engine, images, prompt, max_new_tokens, chat) if pieces[0])
