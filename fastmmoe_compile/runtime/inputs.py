"""What the Engine's entry points accept, checked in one place.

Every public entry point (Engine.prefill, generate, start_decode, decode, embed, prepare and
the prompts= forms) passes its arguments through the checks here before anything runs. A bad
argument is one EngineInputError (a ValueError; EngineInputTypeError, also a TypeError, for a
wrong dtype or Python type) naming the argument, what it must be and what was given, never a
torch error from inside a program, and never a silent cast (float ids, float masks and float
positions are refused, not truncated).

All tensor arguments go through `tensor_arg` (conversion + dtype), then their shape checks:
- batch_inputs: prefill's batched form ([B, S] ids or [B, S, H] embeddings, [B, S] vision_mask
  or [B, N] vision_positions, and the extra inputs of the engine's InputSpecs, runtime/specs.py);
- sample_inputs: generate's forms (a batch, one sample, or a list of samples of different
  lengths, each with its own vision tokens and extras);
- step_inputs: decode's one token per sample; prefill_results / positive_int / token_id_set:
  start_decode's and generate's other arguments; prompts_and_images / prompt_token_counts:
  the prompts= forms.
"""
from __future__ import annotations

import operator

import torch

from ..errors import UserInputError
from .specs import known_spec


class EngineInputError(UserInputError):
    """An Engine entry point was given an argument it cannot take."""


class EngineInputTypeError(EngineInputError, TypeError):
    """An argument of the wrong dtype or Python type."""


class PromptTooLongError(EngineInputError):
    """A prompt tokenized to more than the caller's max_length (Engine.prepare): found before
    anything is embedded or encoded. length: its tokens; limit: max_length."""

    def __init__(self, length: int, limit: int):
        super().__init__(f"the prompt is {length} tokens; at most {limit} allowed")
        self.length, self.limit = length, limit


def _a(kind: str) -> str:
    return ("an " if kind[:1] in ("a", "e", "i", "o") else "a ") + kind


def given(x) -> str:
    """What was passed, for messages: dtype and shape of a tensor or array, else the type."""
    if isinstance(x, torch.Tensor):
        return f"{_a(str(x.dtype).replace('torch.', ''))} tensor of shape {list(x.shape)}"
    if hasattr(x, "dtype") and hasattr(x, "shape"):  # a numpy array
        return f"{_a(str(x.dtype))} {type(x).__name__} of shape {list(x.shape)}"
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)} item(s)"
    text = repr(x)
    return f"{type(x).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


_KINDS = {
    "integer": lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool,
    "floating-point": lambda d: d.is_floating_point,
    "bool": lambda d: d == torch.bool,
}
_HINTS = {
    "integer": "",
    "bool": " (a mask is True at the vision tokens: pass mask.bool() or mask != 0)",
    "floating-point": "",
}


def tensor_arg(name: str, x, kind: str, shape: str) -> torch.Tensor:
    """`x` (a tensor, an array or a nested list) as a tensor whose dtype is of `kind` ("integer",
    "floating-point" or "bool"); `shape` is the expected shape, for the message. An empty tensor
    passes whatever its dtype (Python's [] is float32, and there is nothing in it to misread)."""
    if not isinstance(x, torch.Tensor):
        if x is None or isinstance(x, (str, bytes, dict, set)):
            raise EngineInputTypeError(f"{name} must be {_a(kind)} tensor {shape}, got {given(x)}")
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise EngineInputTypeError(f"{name} must be {_a(kind)} tensor {shape}, got {given(x)} that does not "
                                       f"convert to one ({e}; samples of different lengths go to generate as "
                                       "a list)") from None
    if x.numel() and not _KINDS[kind](x.dtype):
        raise EngineInputTypeError(f"{name} must be {_a(kind)} tensor {shape}, got {given(x)}{_HINTS[kind]}")
    return x


def positive_int(name: str, value) -> int:
    """An int >= 1 (max_new_tokens): not a bool, a float or a string."""
    if isinstance(value, bool) or isinstance(value, float):
        raise EngineInputTypeError(f"{name} must be a positive int, got {given(value)}")
    try:
        n = operator.index(value)
    except TypeError:
        raise EngineInputTypeError(f"{name} must be a positive int, got {given(value)}") from None
    if n < 1:
        raise EngineInputError(f"{name} must be >= 1, got {n}")
    return n


def token_id_set(name: str, value) -> frozenset:
    """eos_token_id: None, a token id, or a list / tensor of them -> the set of ids."""
    if value is None:
        return frozenset()
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    items = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
    out = []
    for item in items:
        if isinstance(item, (bool, float)):
            raise EngineInputTypeError(f"{name} must be a token id (int) or a list of them, got {given(value)}")
        try:
            out.append(operator.index(item))
        except TypeError:
            raise EngineInputTypeError(
                f"{name} must be a token id (int) or a list of them, got {given(value)}") from None
    return frozenset(out)


def exactly_one(input_ids, inputs_embeds) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise EngineInputError("pass exactly one of input_ids or inputs_embeds")


def token_ids(engine, name: str, x, shape: str, dims: tuple[int, ...]) -> torch.Tensor:
    """Integer token ids of one of the dims, non-empty, each in [0, vocab)."""
    x = tensor_arg(name, x, "integer", shape)
    if x.dim() not in dims:
        raise EngineInputError(f"{name} must be {shape}, got {given(x)}")
    if x.numel() == 0:
        raise EngineInputError(f"{name} is empty ({given(x)}): a prompt needs at least 2 tokens")
    if engine.embeddings is None:
        raise EngineInputError("this engine was built without its token embeddings; pass inputs_embeds")
    vocab = engine.embeddings.shape[0]
    low, high = int(x.min()), int(x.max())
    if low < 0 or high >= vocab:
        raise EngineInputError(f"{name} must be in [0, {vocab}) (the vocabulary), got ids from {low} to {high}")
    return x.to(device=engine.embeddings.device, dtype=torch.long)  # greedy's ids come from a CUDA engine's logits


def embeddings(engine, name: str, x, shape: str, dims: int) -> torch.Tensor:
    """Floating-point embeddings with `dims` dims whose last is the engine's hidden size."""
    hidden = engine.info["hidden_size"]
    x = tensor_arg(name, x, "floating-point", shape)
    if x.dim() != dims or x.shape[-1] != hidden:
        raise EngineInputError(f"{name} must be {shape}, got {given(x)}")
    return x


def batch_inputs(engine, input_ids, inputs_embeds, vision_mask, vision_positions, given_extras: dict):
    """prefill's inputs -> (inputs_embeds [B, S, H], vision positions [B, N] int64, the backbone's
    extra inputs). input_ids may also be one sample [S]; given_extras: {name: value} as passed."""
    exactly_one(input_ids, inputs_embeds)
    hidden = engine.info["hidden_size"]
    if input_ids is not None:
        ids = token_ids(engine, "input_ids", input_ids, "[B, S] (or one sample [S])", (1, 2))
        inputs_embeds = torch.nn.functional.embedding(ids if ids.dim() == 2 else ids[None], engine.embeddings)
    else:
        inputs_embeds = embeddings(engine, "inputs_embeds", inputs_embeds, f"[B, S, {hidden}]", 3)
    batch, seq = inputs_embeds.shape[:2]
    if batch < 1:
        raise EngineInputError(f"{'input_ids' if input_ids is not None else 'inputs_embeds'} has no samples (B = 0)")
    if seq < 2:
        raise EngineInputError(f"the prompt must have at least 2 tokens, got S = {seq}")
    positions = vision_positions_of(batch, seq, vision_mask, vision_positions)
    extras = extra_inputs(engine, batch, seq, given_extras)
    return inputs_embeds, positions, extras


def vision_positions_of(batch: int, seq: int, mask=None, positions=None) -> torch.Tensor:
    """Validated [B, N] int64 positions from a bool mask [B, S] or integer positions [B, N] (or
    [N], the same for every sample); N may be 0."""
    if mask is not None and positions is not None:
        raise EngineInputError("pass vision_mask or vision_positions, not both")
    if mask is not None:
        shape = f"[B, S] = [{batch}, {seq}]"
        mask = tensor_arg("vision_mask", mask, "bool", shape)
        if tuple(mask.shape) != (batch, seq):
            raise EngineInputError(f"vision_mask must be {shape}, got {given(mask)}")
        counts = mask.sum(dim=1)
        if (counts != counts[0]).any():
            raise EngineInputError(
                f"every sample must have the same number of vision tokens, got {counts.tolist()} "
                "(pad samples to equal image-token counts)"
            )
        return mask.nonzero()[:, 1].reshape(batch, int(counts[0])).contiguous()
    if positions is None:
        return torch.zeros(batch, 0, dtype=torch.long)
    shape = f"[B, N] with B = {batch}"
    positions = tensor_arg("vision_positions", positions, "integer", shape).to(torch.long)
    if positions.dim() == 1:
        positions = positions[None].expand(batch, -1)
    if positions.dim() != 2 or positions.shape[0] != batch:
        raise EngineInputError(f"vision_positions must be {shape}, got {given(positions)}")
    if positions.numel():
        if positions.min() < 0 or positions.max() >= seq:
            raise EngineInputError(f"vision_positions must lie in [0, {seq}), got positions from "
                                   f"{int(positions.min())} to {int(positions.max())}")
        if (positions[:, 1:] <= positions[:, :-1]).any():
            raise EngineInputError("vision_positions must be strictly increasing within each sample")
    return positions.contiguous()


def _refuse_unknown_extras(engine, given_extras: dict) -> None:
    names = [spec.name for spec in engine.input_specs]
    for name, value in given_extras.items():
        if name not in names:
            takes = ", ".join(["inputs_embeds", "vision_positions", *names])
            # Another family's input is a wrong value here; a name no family declares, a wrong keyword.
            error = EngineInputError if known_spec(name) is not None else EngineInputTypeError
            raise error(f"this {engine.info.get('model_type')} engine takes no {name} (its backbone inputs: {takes})")


def extra_inputs(engine, batch: int, seq: int, given_extras: dict) -> list[torch.Tensor]:
    """The backbone's inputs after the vision positions (engine.input_specs), checked or defaulted."""
    _refuse_unknown_extras(engine, {k: v for k, v in given_extras.items() if v is not None})
    out = []
    for spec in engine.input_specs:
        shape, names = spec.shape(batch, seq, engine.info), spec.names()
        value = given_extras.get(spec.name)
        if value is None:  # a text-only prompt: plain positions, no visual features
            value = spec.absent_value(batch, seq, engine.info, engine.dtype)
        value = tensor_arg(spec.name, value, spec.kind, f"{list(shape)} ({names})")
        if tuple(value.shape) != shape:
            raise EngineInputError(f"{spec.name} must be {list(shape)} ({names}), got {given(value)}")
        out.append(value.to(spec.torch_dtype(engine.dtype)).contiguous())
    return out


# --- generate: one sample or many, of different lengths ------------------------------------

def sample_inputs(engine, input_ids, inputs_embeds, vision_positions, vision_mask, given_extras: dict) -> list[tuple]:
    """[(embeds [S, H], vision positions [N], extras {name: per-sample tensor})] from a batch, one
    sample, or per-sample lists (each extra input: a batch on its spec's B axis, or a list of
    per-sample tensors of its shape without B)."""
    exactly_one(input_ids, inputs_embeds)
    if vision_positions is not None and vision_mask is not None:
        raise EngineInputError("pass vision_mask or vision_positions, not both")
    hidden = engine.info["hidden_size"]
    if input_ids is not None:
        seqs = _split(input_ids, 1, "input_ids")
        embeds = []
        for i, s in enumerate(seqs):
            with _sample(i, len(seqs)):
                s = token_ids(engine, "input_ids", s, "[S] with S >= 2 per sample", (1,))
                if s.numel() < 2:
                    raise EngineInputError(f"input_ids must be [S] with S >= 2 per sample, got {given(s)}")
                embeds.append(torch.nn.functional.embedding(s, engine.embeddings))
    else:
        samples = _split(inputs_embeds, 2, "inputs_embeds")
        embeds = []
        for i, e in enumerate(samples):
            with _sample(i, len(samples)):
                e = embeddings(engine, "inputs_embeds", e, f"[S, {hidden}] per sample", 2)
                if e.shape[0] < 2:
                    raise EngineInputError(f"the prompt must have at least 2 tokens, got {e.shape[0]}")
                embeds.append(e)
    vision = vision_positions if vision_positions is not None else vision_mask
    name = "vision_mask" if vision_mask is not None else "vision_positions"
    if vision is None:
        per_sample = [None] * len(embeds)
    else:
        per_sample = _split(vision, 1, name)
        if len(per_sample) != len(embeds):
            raise EngineInputError(f"{len(embeds)} samples but vision tokens for {len(per_sample)} ({name})")
    out = []
    for i, (e, v) in enumerate(zip(embeds, per_sample)):
        seq = e.shape[0]
        with _sample(i, len(embeds)):
            if v is None:
                positions = vision_positions_of(1, seq)
            elif vision_mask is not None:
                v = tensor_arg(name, v, "bool", f"[S] = [{seq}] per sample")
                if v.dim() != 1:
                    raise EngineInputError(f"vision_mask must be [S] = [{seq}] per sample, got {given(v)}")
                positions = vision_positions_of(1, seq, mask=v[None])
            else:
                v = tensor_arg(name, v, "integer", "[N] per sample")
                if v.dim() > 1 and v.numel():
                    raise EngineInputError(f"vision_positions must be [N] per sample, got {given(v)}")
                positions = vision_positions_of(1, seq, positions=v.reshape(1, -1))
        out.append((e, positions[0], {}))
    given_extras = {k: v for k, v in given_extras.items() if v is not None}
    _refuse_unknown_extras(engine, given_extras)
    for spec in engine.input_specs:
        name, value = spec.name, given_extras.get(spec.name)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):  # a batch: samples on the spec's B axis
            rows = list(value.unbind(spec.batch_axis)) if value.dim() > spec.batch_axis else [value]
        elif isinstance(value, (list, tuple)):
            rows = list(value)
        else:
            raise EngineInputTypeError(f"{name} must be a tensor or a list of per-sample tensors, got {given(value)}")
        if len(rows) != len(out):
            raise EngineInputError(f"{len(out)} samples but {name} for {len(rows)}")
        for i, ((e, _, extras), row) in enumerate(zip(out, rows)):
            shape, names = spec.shape(None, e.shape[0], engine.info), spec.names(per_sample=True)
            with _sample(i, len(out)):
                row = tensor_arg(name, row, spec.kind, f"{list(shape)} ({names}) per sample")
                if tuple(row.shape) != shape:
                    raise EngineInputError(f"{name} must be {list(shape)} ({names}) per sample, got {given(row)}")
            extras[name] = row
    return out


class _sample:
    """Prefix an EngineInputError raised inside with "sample i: " (when there are several samples)."""

    def __init__(self, index: int, count: int):
        self.index, self.count = index, count

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, EngineInputError) and self.count > 1:
            raise type(error)(f"sample {self.index}: {error}") from None
        return False


def _split(x, sample_dims: int, name: str) -> list:
    """A batched tensor (sample_dims + 1 dims), one sample (sample_dims dims), or a list of samples."""
    if hasattr(x, "shape") and not isinstance(x, torch.Tensor):  # a numpy array
        kind = {"inputs_embeds": "floating-point", "vision_mask": "bool"}.get(name, "integer")
        x = tensor_arg(name, x, kind, "(a batch, one sample, or a list of samples)")
    if isinstance(x, torch.Tensor):
        if x.dim() == sample_dims:
            return [x]
        if x.dim() == sample_dims + 1:
            if x.shape[0] == 0:
                raise EngineInputError(f"{name} has no samples ({given(x)})")
            return list(x.unbind(0))
        raise EngineInputError(f"{name} must be a {sample_dims + 1}-D batch, a {sample_dims}-D sample or a list "
                               f"of samples, got {given(x)}")
    if isinstance(x, (list, tuple)):
        if not x:
            raise EngineInputError(f"{name} is empty")
        if sample_dims == 1 and all(isinstance(s, (int, float, bool)) for s in x):
            return [x]  # one sample as a flat list of numbers
        return list(x)
    raise EngineInputTypeError(f"{name} must be a tensor or a list of per-sample tensors, got {given(x)}")


# --- decode ------------------------------------------------------------------------------------

def step_inputs(engine, state, input_ids, inputs_embeds, state_class: type) -> torch.Tensor:
    """decode's one token per sample: ids [B, 1] (or [B]) or embeddings [B, 1, H] -> [B, 1, H].
    state_class: generate.DecodeState (passed in: generate imports this module, not the reverse)."""
    if not isinstance(state, state_class):
        raise EngineInputTypeError(f"decode needs the DecodeState from engine.start_decode(prefill results), "
                                   f"got {given(state)}")
    exactly_one(input_ids, inputs_embeds)
    batch, hidden = state.batch, engine.info["hidden_size"]
    if input_ids is not None:
        shape = f"[B, 1] = [{batch}, 1] (one token per sample)"
        ids = token_ids(engine, "input_ids", input_ids, shape, (1, 2))
        if ids.dim() == 1:
            ids = ids[:, None]
        if tuple(ids.shape) != (batch, 1):
            raise EngineInputError(f"decode takes one token per sample: input_ids {shape}, got {given(ids)}")
        return torch.nn.functional.embedding(ids, engine.embeddings)
    shape = f"[B, 1, H] = [{batch}, 1, {hidden}] (one token per sample)"
    inputs_embeds = tensor_arg("inputs_embeds", inputs_embeds, "floating-point", shape)
    if tuple(inputs_embeds.shape) != (batch, 1, hidden):
        raise EngineInputError(f"decode takes one token per sample: inputs_embeds {shape}, got {given(inputs_embeds)}")
    return inputs_embeds


def prefill_results(results, result_type) -> list:
    """start_decode's results: one PrefillResult or a non-empty list of them."""
    items = [results] if isinstance(results, result_type) else results
    if not isinstance(items, (list, tuple)) or not items:
        raise EngineInputTypeError(f"results must be a PrefillResult (from engine.prefill) or a non-empty list "
                                   f"of them, got {given(results)}")
    for i, r in enumerate(items):
        if not isinstance(r, result_type):
            raise EngineInputTypeError(f"results[{i}] must be a PrefillResult (from engine.prefill), got {given(r)}")
    return list(items)


# --- prompts= ----------------------------------------------------------------------------------

def prompts_and_images(images, prompts) -> tuple[list[str], list[list]]:
    """(prompts, images per prompt). One prompt: images is one image, a list, or None.
    Several prompts: images is a list with one entry (an image, a list or None) per prompt."""
    if isinstance(prompts, str):
        texts = [prompts]
        images = [images if isinstance(images, (list, tuple)) else ([] if images is None else [images])]
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        texts = list(prompts)
        if images is None:
            images = [[] for _ in prompts]
        if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
            raise EngineInputError(f"with {len(prompts)} prompts, pass images as a list of {len(prompts)} entries "
                                   f"(an image, a list of images, or None each), got {given(images)}")
        images = [im if isinstance(im, (list, tuple)) else ([] if im is None else [im]) for im in images]
    else:
        raise EngineInputTypeError(f"prompts must be a string or a non-empty list of strings, got {given(prompts)}")
    for i, text in enumerate(texts):
        if not text.strip():
            where = "prompts" if isinstance(prompts, str) else f"prompts[{i}]"
            raise EngineInputError(f"{where} is empty: pass the text of the user turn "
                                   "(with one <image> where each image goes)")
    return texts, [list(x) for x in images]


def prompt_token_counts(ids: list, prompts: list[str], chat: bool, max_length: int | None = None) -> None:
    """Each tokenized prompt must give the backbone at least 2 tokens (EngineInputError), and at
    most max_length where one is given (PromptTooLongError)."""
    for i, x in enumerate(ids):
        if max_length is not None and len(x) > max_length:
            raise PromptTooLongError(len(x), max_length)
        if len(x) < 2:
            where = "prompts" if len(ids) == 1 else f"prompts[{i}]"
            mode = "" if chat else " with chat=False"
            raise EngineInputError(f"{where} ({prompts[i]!r}) gives {len(x)} token(s){mode}; "
                                   "a prompt needs at least 2 tokens")
