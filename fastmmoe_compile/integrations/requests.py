"""One evaluation request against a VLM engine: images + a question -> a greedy answer, or the
log-probability of a given continuation. Plain functions (no lmms-eval import), so evaluation
harnesses stay thin wrappers and this part is tested without them."""
from __future__ import annotations

import torch

from ..runtime.frontends import PLACEHOLDER
from ..runtime.multimodal import generate_text


def with_placeholders(context: str, n_images: int) -> str:
    """The prompt with one <image> per image: kept if the task already placed them all, else
    (none or a mismatch) prepended, as lmms-eval's own InternVL models do."""
    if context.count(PLACEHOLDER) == n_images:
        return context
    stripped = context.replace(PLACEHOLDER, "")
    return "\n".join([PLACEHOLDER] * n_images + [stripped]) if n_images else stripped


def truncate_at(text: str, until) -> str:
    """Cut the answer at the first stop string (generate_until's contract)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def rgb(images: list) -> list:
    """Task images come as PIL images in any mode (OCRBench has RGBA/grayscale); the image
    processors expect RGB. Paths go through unchanged (load_image reads them)."""
    return [im.convert("RGB") if hasattr(im, "convert") and getattr(im, "mode", "RGB") != "RGB" else im
            for im in images]


def answer(engine, context: str, images: list, max_new_tokens: int, until=None, chat: bool = True) -> str:
    """Greedy answer to one request."""
    images = rgb(images)
    text = generate_text(engine, images, with_placeholders(context, len(images)), max_new_tokens, chat=chat)[0]
    return truncate_at(text, until)


@torch.no_grad()
def continuation_logprob(engine, context: str, continuation: str, images: list,
                         chat: bool = True) -> tuple[float, bool]:
    """(log P(continuation | images, context), whether greedy decoding gives it): prefill the
    prompt, then feed the continuation's tokens through the engine's decode step."""
    images = rgb(images)
    prepared = engine.prepare(images, with_placeholders(context, len(images)), chat=chat)
    ids = engine.front_end.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the continuation is empty: there is nothing to score")
    result = engine.prefill(samples=prepared.samples)
    state = engine.start_decode(result, len(ids)) if len(ids) > 1 else None
    logits, total, greedy = result.logits, 0.0, True
    for i, token in enumerate(ids):
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        total += float(logp[token])
        greedy = greedy and int(logp.argmax()) == token
        if i + 1 < len(ids):
            logits = engine.decode(state, torch.tensor([[token]]))
    return total, greedy
