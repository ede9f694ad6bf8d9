"""DeepSeek-VL2's front end: the official processor's tiling (a global view + local tiles) and
token layout (rows with a newline token, a separator between the views)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import PLACEHOLDER, FrontEndFamily, register

MODEL_TYPE = "deepseek_vl_v2"
PROCESSOR_FILE = "processor_config.json"
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE = PLACEHOLDER  # the official image token is our placeholder, "<image>"
# Tokens the official processor adds, in its order, when the tokenizer lacks them.
GROUNDING = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]
USER, ASSISTANT = "<|User|>", "<|Assistant|>"


def layout_index(first: int, grid: tuple[int, int], side: int, newline: int, separator: int, head: bool):
    """Row indices into [every tile's tokens..., newline, separator] for one image, in the official
    order: global view rows + newline, separator, local rows (tiles side by side) + newline."""
    hw = side * side
    rows = torch.arange(side)[:, None] * side + torch.arange(side)[None, :]
    nl = torch.full((side, 1), newline)
    global_view = torch.cat([first * hw + rows, nl], dim=1).reshape(-1)
    th, tw = grid
    r, c = torch.arange(th * side)[:, None], torch.arange(tw * side)[None, :]
    tile = first + 1 + (r // side) * tw + c // side
    local = tile * hw + (r % side) * side + c % side
    local = torch.cat([local, torch.full((th * side, 1), newline)], dim=1).reshape(-1)
    sep = torch.tensor([separator])
    return torch.cat([global_view, sep, local] if head else [local, sep, global_view])


def select_best_resolution(size: tuple[int, int], candidates) -> tuple[int, int]:
    """The official rule: the candidate (w, h) keeping the most of the image's pixels, then the least padding."""
    width, height = size
    best, best_effective, best_wasted = None, 0, float("inf")
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cw * ch - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cw, ch), effective, wasted
    return best


class ImageProcessor:
    """The official processor's image side, saved as its processor_config.json."""

    def __init__(self, candidate_resolutions, patch_size: int, downsample_ratio: int,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), normalize: bool = True, **rest):
        self.candidate_resolutions = [[int(a), int(b)] for a, b in candidate_resolutions]
        self.image_size = self.candidate_resolutions[0][0]  # as the official processor takes it
        self.patch_size, self.downsample_ratio = int(patch_size), int(downsample_ratio)
        self.image_mean, self.image_std, self.normalize = list(image_mean), list(image_std), bool(normalize)
        self.rest = rest  # image_token, pad_token, sft_format, ...: kept for save_pretrained

    def to_dict(self) -> dict:
        return {"candidate_resolutions": self.candidate_resolutions, "patch_size": self.patch_size,
                "downsample_ratio": self.downsample_ratio, "image_mean": self.image_mean,
                "image_std": self.image_std, "normalize": self.normalize,
                **{"image_token": IMAGE, "sft_format": "deepseek", "processor_class": "DeepseekVLV2Processor",
                   **self.rest}}

    def save_pretrained(self, path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2))

    def to_tensor(self, image) -> torch.Tensor:
        import numpy as np

        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        if self.normalize:  # as torchvision's ToTensor + Normalize
            mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
            x = x.sub(mean[:, None, None]).div(std[:, None, None])
        return x

    def __call__(self, images: list, cropping: bool) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(tiles [T, 3, s, s]: per image its global view then local tiles row by row, grids [(th, tw)])."""
        from PIL import ImageOps

        s, colour = self.image_size, tuple(int(x * 255) for x in self.image_mean)
        tiles, grids = [], []
        for image in images:
            image = _pil(image)
            best_w, best_h = select_best_resolution(image.size, self.candidate_resolutions) if cropping else (s, s)
            tiles.append(self.to_tensor(ImageOps.pad(image, (s, s), color=colour)))
            local = ImageOps.pad(image, (best_w, best_h), color=colour)
            tiles += [self.to_tensor(local.crop((j, i, j + s, i + s)))
                      for i in range(0, best_h, s) for j in range(0, best_w, s)]
            grids.append((best_h // s, best_w // s))
        return torch.stack(tiles), grids


def _pil(image):
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an RGB image (PIL, or a uint8 [h, w, 3] array), got {array.dtype} {list(array.shape)}")
    return Image.fromarray(array)


def complete_tokenizer(tokenizer):
    """Add the tokens the official processor adds at start-up, in its order, when they are missing."""
    vocab = tokenizer.get_vocab()
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    for tokens in ([IMAGE], GROUNDING, [USER, ASSISTANT]):
        missing = [t for t in tokens if t not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer


def image_tokens(th: int, tw: int, side: int) -> int:
    """The official count: global h(w+1), one separator, local (th h)(tw w + 1)."""
    return side * (side + 1) + 1 + (th * side) * (tw * side + 1)


class DeepseekVL2FrontEnd(FrontEndFamily):
    model_type = MODEL_TYPE

    def load_processing(self, path):
        from transformers import AutoTokenizer

        from transformers.utils import logging

        path = Path(path)
        previous = logging.get_verbosity()
        logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns that it knows no deepseek_vl_v2
        try:
            tokenizer = complete_tokenizer(AutoTokenizer.from_pretrained(str(path)))
        finally:
            logging.set_verbosity(previous)
        if (path / PROCESSOR_FILE).is_file():
            processor = ImageProcessor(**json.loads((path / PROCESSOR_FILE).read_text()))
        else:
            processor = self.default_processor(path)
        return tokenizer, processor

    def default_processor(self, path: Path):
        """The image processor when `path` has no processor_config.json (an engine always has one)."""
        raise FileNotFoundError(f"{path} has no {PROCESSOR_FILE}")

    def prompt_text(self, tokenizer, prompt: str, chat: bool) -> str:
        # The official processor puts BOS first in both cases; add it as text if the tokenizer does not.
        ids = tokenizer("a")["input_ids"]
        bos = "" if ids and ids[0] == tokenizer.bos_token_id else (tokenizer.bos_token or "")
        return bos + (f"{USER}: {prompt.strip()}\n\n{ASSISTANT}:" if chat else prompt)

    def tiles(self, image_processor, images: list):
        # The official processor crops only when the conversation has at most 2 images.
        pixel_values, grids = image_processor(images, cropping=len(images) <= 2)
        return pixel_values, [1 + th * tw for th, tw in grids], grids

    def expand(self, tokenizer, text: str, grids: list, facts: dict) -> str:
        parts = text.split(IMAGE)
        if len(parts) - 1 != len(grids):
            raise ValueError(f"the prompt has {len(parts) - 1} image tokens for {len(grids)} images")
        runs = [IMAGE * image_tokens(th, tw, facts["side"]) for th, tw in grids]
        return parts[0] + "".join(run + part for run, part in zip(runs, parts[1:]))

    def arrange(self, outputs, grids: list, facts: dict) -> torch.Tensor:
        features, specials = outputs
        tiles, hw, dim = features.shape
        table = torch.cat([features.reshape(-1, dim), specials.to(features.dtype)])
        index, first = [], 0
        for grid in grids:
            index.append(layout_index(first, tuple(grid), facts["side"], tiles * hw, tiles * hw + 1,
                                      facts["global_view_pos"] == "head"))
            first += 1 + grid[0] * grid[1]
        return table[torch.cat(index)]


register(DeepseekVL2FrontEnd())
