import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub

TINY = ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-olmoe", "tiny-mixtral",
        "tiny-deepseek-v2", "tiny-deepseek-v3", "tiny-glm4-moe"]


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/* from the current output instead of comparing")


@pytest.fixture(scope="session")
def update_golden(request):
    return request.config.getoption("--update-golden")


_MODELS = {}


def tiny_model(name: str):
    """One random tiny model per preset for the whole session (read-only in tests)."""
    from fastmmoe_compile.models import load_model

    if name not in _MODELS:
        _MODELS[name] = load_model(name)
    return _MODELS[name]


def hf_last_logits(loaded, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.lm(inputs_embeds=embeds).logits[:, -1]


def prompt(batch: int, seq: int, vision: slice | list, hidden: int, seed: int = 0):
    """Random embeddings and the [B, S] vision mask of the given positions."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, seq, hidden, generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[:, vision] = True
    return embeds, mask


def save_vlm_checkpoint(preset: str, path):
    """A tiny VLM preset written as a user's local checkpoint: model, tokenizer, processor files."""
    from fastmmoe_compile.models import load_model

    loaded = load_model(preset)
    loaded.vision.model.save_pretrained(path)
    loaded.vision.tokenizer.save_pretrained(path)
    loaded.vision.image_processor.save_pretrained(path)
    return path
