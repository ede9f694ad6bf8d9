"""What the Engine's entry points accept, checked in one place.

Every public entry point (Engine.prefill, generate, start_decode, decode, embed, prepare and
the prompts= forms) passes its arguments through the checks here before anything runs. A bad
argument is one EngineInputError (a ValueError; EngineInputTypeError, also a TypeError, for a
wrong dtype or Python type) naming the argument, what it must be and what was given, never a
torch error from inside a program, and never a silent cast (float ids, float masks and float
positions are refused, not truncated).

All tensor arguments go through `tensor_arg` (conversion + dtype), then their shape checks:
- parse: the prompt inputs (input_ids or inputs_embeds, vision_mask or vision_positions, and the
  extra inputs of the engine's InputSpecs, runtime/specs.py), in every form an entry point takes
  (prefill's one batch; generate's batch, one sample, or list of samples of different lengths),
  parsed once into one Sample per prompt (embeds [S, H], vision [N] int64, extras without the B
  axis): the one form prefill (stack: samples of one shape -> its batch), generate, the server
  (serve/engine_io.py) and lmms-eval (engine.prepare(...).samples) take;
- step_inputs: decode's one token per sample; prefill_results / positive_int / token_id_set:
  start_decode's and generate's other arguments; prompts_and_images / prompt_token_counts:
  the prompts= forms.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

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


def _shaped(name: str, x, kind: str, shape: str, ok) -> torch.Tensor:
    """`x` as a tensor of `kind` (tensor_arg) for which ok(x) holds, else "{name} must be {shape}"."""
    x = tensor_arg(name, x, kind, shape)
    if not ok(x):
        raise EngineInputError(f"{name} must be {shape}, got {given(x)}")
    return x


def token_ids(engine, name: str, x, shape: str, dims: tuple[int, ...]) -> torch.Tensor:
    """Integer token ids of one of the dims, non-empty, each in [0, vocab)."""
    x = _shaped(name, x, "integer", shape, lambda t: t.dim() in dims)
    if x.numel() == 0:
        raise EngineInputError(f"{name} is empty ({given(x)}): a prompt needs at least 2 tokens")
    if engine.embeddings is None:
        raise EngineInputError("this engine was built without its token embeddings; pass inputs_embeds")
    vocab = engine.embeddings.shape[0]
    low, high = int(x.min()), int(x.max())
    if low < 0 or high >= vocab:
        raise EngineInputError(f"{name} must be in [0, {vocab}) (the vocabulary), got ids from {low} to {high}")
    return x.to(device=engine.embeddings.device, dtype=torch.long)  # greedy's ids come from a CUDA engine's logits


# --- the samples: every entry point's prompt inputs, parsed once ------------------------------

@dataclass(frozen=True, eq=False)
class Sample:
    """One prompt as the backbone takes it, checked: what parse() makes of every accepted form,
    what prefill batches (stack), and what generate, the server and lmms-eval pass along.

    embeds: [S, H] floating-point (S >= 2; the caller's dtype, prefill casts to the engine's).
    vision: [N] int64, strictly increasing in [0, S): the vision tokens (N may be 0).
    extras: {name: tensor} for each of the engine's input specs (runtime/specs.py), in their order:
      the spec's shape without the B axis and its dtype; its absent value where none was given.
    """

    embeds: torch.Tensor
    vision: torch.Tensor
    extras: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        """S."""
        return int(self.embeds.shape[0])

    @property
    def vision_tokens(self) -> int:
        """N."""
        return int(self.vision.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(S, N): samples of one shape can share a prefill call."""
        return self.length, self.vision_tokens


def parse(engine, input_ids=None, inputs_embeds=None, vision_mask=None, vision_positions=None,
          extras: dict | None = None, *, samples=None, batched: bool = False) -> list[Sample]:
    """An entry point's prompt inputs -> its samples, in order.

    batched (prefill's form): ONE batch: input_ids [B, S] (or one sample [S]) or inputs_embeds
      [B, S, H]; vision_mask [B, S] or vision_positions [B, N] (or [N], the same for every sample);
      each extra input of its spec's shape (runtime/specs.py). Each is checked as one tensor.
    not batched (generate's forms): that batch, one sample (ids [S] or embeddings [S, H]) or a list
      of samples of different lengths, each with its own vision tokens (an [S] mask or [N]
      positions; None: none) and extra inputs (a batch on the spec's B axis, or a list of
      per-sample tensors of its shape without B; None: its absent value). Each sample is checked
      on its own, its errors prefixed "sample i: ".
    samples: a list of Samples (already parsed: engine.prepare(...).samples, or this function's),
      passed alone. extras: {name: value} as given; None values count as not given."""
    if samples is not None:
        return _given_samples(engine, samples, (input_ids, inputs_embeds, vision_mask, vision_positions), extras)
    exactly_one(input_ids, inputs_embeds)
    if vision_mask is not None and vision_positions is not None:
        raise EngineInputError("pass vision_mask or vision_positions, not both")
    embeds = _prompts(engine, input_ids, inputs_embeds, batched)
    lengths = [e.shape[0] for e in embeds]
    vision = _vision(vision_mask, vision_positions, lengths, batched)
    values = _extras(engine, {k: v for k, v in (extras or {}).items() if v is not None}, lengths, batched)
    return [Sample(e, v, {name: rows[i] for name, rows in values.items()})
            for i, (e, v) in enumerate(zip(embeds, vision))]


def stack(engine, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """prefill's batch of samples of one shape: (inputs_embeds [B, S, H] in the engine's dtype,
    vision positions [B, N] int64, the extra inputs in spec order, each with B on its spec's axis)."""
    lengths = [s.length for s in samples]
    if len(set(lengths)) > 1:
        raise EngineInputError(f"one prefill call takes samples of one length, got S = {lengths} "
                               "(generate batches samples of different lengths)")
    counts = [s.vision_tokens for s in samples]
    if len(set(counts)) > 1:
        raise EngineInputError(f"every sample must have the same number of vision tokens, got {counts} "
                               "(pad samples to equal image-token counts)")
    embeds = torch.stack([s.embeds for s in samples]).to(engine.dtype).contiguous()
    positions = torch.stack([s.vision for s in samples]).contiguous()
    extras = [torch.stack([s.extras[spec.name] for s in samples], dim=spec.batch_axis).contiguous()
              for spec in engine.input_specs]
    return embeds, positions, extras


def _given_samples(engine, samples, tensors: tuple, extras: dict | None) -> list[Sample]:
    """samples= as given: a non-empty list of Samples with this engine's extra inputs, and nothing else."""
    if any(x is not None for x in tensors) or any(v is not None for v in (extras or {}).values()):
        raise EngineInputError("pass samples= alone, or input_ids/inputs_embeds with their vision tokens and "
                               "extra inputs")
    items = list(samples) if isinstance(samples, (list, tuple)) else []
    if not items or not all(isinstance(s, Sample) for s in items):
        raise EngineInputTypeError(f"samples must be a non-empty list of runtime.inputs.Sample (from "
                                   f"engine.prepare(...).samples or runtime.inputs.parse), got {given(samples)}")
    names = [spec.name for spec in engine.input_specs]
    for i, s in enumerate(items):
        if list(s.extras) != names:
            raise EngineInputError(f"samples[{i}] holds the extra inputs {list(s.extras)}; this engine takes {names}")
    return items


def _prompts(engine, input_ids, inputs_embeds, batched: bool) -> list[torch.Tensor]:
    """Each sample's embeddings [S, H] (S >= 2), from its ids or as given."""
    hidden = engine.info["hidden_size"]
    ids = input_ids is not None
    name, value = ("input_ids", input_ids) if ids else ("inputs_embeds", inputs_embeds)
    if batched:
        shape, dims = ("[B, S] (or one sample [S])", (1, 2)) if ids else (f"[B, S, {hidden}]", (3,))
        batch = _prompt(engine, name, value, shape, dims)
        batch = batch if batch.dim() == 3 else batch[None]
        if batch.shape[0] < 1:
            raise EngineInputError(f"{name} has no samples (B = 0)")
        return list(batch.unbind(0))
    shape, dims = ("[S] with S >= 2 per sample", (1,)) if ids else (f"[S, {hidden}] per sample", (2,))
    rows = _split(value, dims[0], name, "integer" if ids else "floating-point")
    out = []
    for i, row in enumerate(rows):
        with _sample(i, len(rows)):
            out.append(_prompt(engine, name, row, shape, dims))
    return out


def _prompt(engine, name: str, x, shape: str, dims: tuple[int, ...]) -> torch.Tensor:
    """Checked ids ([..., S]: their embeddings) or embeddings ([..., S, H]) with S >= 2."""
    if name == "input_ids":
        x = token_ids(engine, name, x, shape, dims)
    else:
        hidden = engine.info["hidden_size"]
        x = _shaped(name, x, "floating-point", shape, lambda e: e.dim() in dims and e.shape[-1] == hidden)
    if x.shape[-1 if name == "input_ids" else -2] < 2:
        raise EngineInputError(f"{name} must be {shape}, got {given(x)}: a prompt needs at least 2 tokens (S >= 2)")
    return torch.nn.functional.embedding(x, engine.embeddings) if name == "input_ids" else x


def _vision(mask, positions, lengths: list[int], batched: bool) -> list[torch.Tensor]:
    """Each sample's vision positions [N] int64, from a bool mask, positions, or neither (N = 0)."""
    count, none = len(lengths), torch.zeros(0, dtype=torch.long)
    if mask is not None:
        rows = _rows("vision_mask", mask, "bool", lengths, batched,
                     lambda b, s: (f"[B, S] = [{b}, {s}]", lambda m: tuple(m.shape) == (b, s)),
                     lambda s: (f"[S] = [{s}] per sample", lambda m: tuple(m.shape) == (s,)), what="vision tokens")
        return [none if m is None else m.nonzero()[:, 0] for m in rows]
    if positions is None:
        return [none] * count
    if batched:  # [N]: the same positions for every sample
        positions = tensor_arg("vision_positions", positions, "integer", f"[B, N] with B = {count}")
        positions = positions[None].expand(count, -1) if positions.dim() == 1 else positions
    rows = _rows("vision_positions", positions, "integer", lengths, batched,
                 lambda b, s: (f"[B, N] with B = {b}", lambda p: p.dim() == 2 and p.shape[0] == b),
                 lambda s: ("[N] per sample", lambda p: p.dim() == 1 or not p.numel()), what="vision tokens")
    out = []
    for i, (p, seq) in enumerate(zip(rows, lengths)):
        with _sample(i, count):
            out.append(none if p is None else _in_order(p.reshape(-1).to(torch.long), seq))
    return out


def _in_order(positions: torch.Tensor, seq: int) -> torch.Tensor:
    """One sample's positions [N]: each in [0, S), strictly increasing."""
    if positions.numel():
        if positions.min() < 0 or positions.max() >= seq:
            raise EngineInputError(f"vision_positions must lie in [0, {seq}), got positions from "
                                   f"{int(positions.min())} to {int(positions.max())}")
        if (positions[1:] <= positions[:-1]).any():
            raise EngineInputError("vision_positions must be strictly increasing within each sample")
    return positions


def _refuse_unknown_extras(engine, given_extras: dict) -> None:
    names = [spec.name for spec in engine.input_specs]
    for name, value in given_extras.items():
        if name not in names:
            takes = ", ".join(["inputs_embeds", "vision_positions", *names])
            # Another family's input is a wrong value here; a name no family declares, a wrong keyword.
            error = EngineInputError if known_spec(name) is not None else EngineInputTypeError
            raise error(f"this {engine.info.get('model_type')} engine takes no {name} (its backbone inputs: {takes})")


def _extras(engine, given_extras: dict, lengths: list[int], batched: bool) -> dict[str, list[torch.Tensor]]:
    """Each of the backbone's inputs after the vision positions (engine.input_specs), per sample:
    checked, or the spec's absent value (a text-only prompt: plain positions, no visual features)."""
    _refuse_unknown_extras(engine, given_extras)
    out = {}
    for spec in engine.input_specs:
        value = given_extras.get(spec.name)
        rows = [None] * len(lengths) if value is None else \
            _rows(spec.name, value, spec.kind, lengths, batched, *_spec_shapes(spec, engine.info),
                  len(spec.dims) - 1, spec.batch_axis)
        out[spec.name] = [(spec.absent_value(None, s, engine.info, engine.dtype) if x is None else x)
                          .to(spec.torch_dtype(engine.dtype)) for x, s in zip(rows, lengths)]
    return out


def _spec_shapes(spec, info: dict):
    """An extra input's (batch(B, S), row(S)) for _rows: its shape for messages and a test of it."""
    def batch(b, s):
        shape = spec.shape(b, s, info)
        return f"{list(shape)} ({spec.names()})", lambda x: tuple(x.shape) == shape

    def row(s):
        shape = spec.shape(None, s, info)
        return f"{list(shape)} ({spec.names(per_sample=True)}) per sample", lambda x: tuple(x.shape) == shape

    return batch, row


def _rows(name: str, value, kind: str, lengths: list[int], batched: bool, batch, row, dims: int = 1,
          axis: int = 0, what: str | None = None) -> list:
    """`value`'s tensor per sample (None where a sample is given none), checked (tensor_arg, then
    the shape): batched, as ONE tensor, batch(B, S) -> (its shape for messages, a test of it), the
    samples on `axis`; else split into samples (_split: a batch, one sample of `dims` dims, or a
    list), each as row(S) says. what: the samples' count's noun in messages (default: name)."""
    if batched:
        return list(_shaped(name, value, kind, *batch(len(lengths), lengths[0])).unbind(axis))
    rows = _split(value, dims, name, kind, axis)
    if len(rows) != len(lengths):
        raise EngineInputError(f"{len(lengths)} samples but {what or name} for {len(rows)}"
                               + (f" ({name})" if what else ""))
    out = []
    for i, (x, seq) in enumerate(zip(rows, lengths)):
        with _sample(i, len(rows)):
            out.append(None if x is None else _shaped(name, x, kind, *row(seq)))
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


def _split(x, sample_dims: int, name: str, kind: str, axis: int = 0) -> list:
    """A batch (sample_dims + 1 dims, the samples on `axis`), one sample (sample_dims dims), or a
    list of samples."""
    if hasattr(x, "shape") and not isinstance(x, torch.Tensor):  # a numpy array
        x = tensor_arg(name, x, kind, "(a batch, one sample, or a list of samples)")
    if isinstance(x, torch.Tensor):
        if x.dim() == sample_dims:
            return [x]
        if x.dim() == sample_dims + 1:
            if x.shape[axis] == 0:
                raise EngineInputError(f"{name} has no samples ({given(x)})")
            return list(x.unbind(axis))
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
