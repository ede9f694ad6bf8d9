"""Load an engine directory and run prefill on it.

The runtime imports nothing from the compiler's upper layers (pyproject.toml's import-linter
contract): only the ops (the AOTInductor package calls fastmmoe::grouped_mm through its proxy
executor). Each program's file and format come from the manifest's "programs" (runtime/backends.py);
a VLM's input side from its front end (runtime/frontends/). What the entry points accept is checked in runtime/inputs.py, what the manifest says
in check_manifest, each with one error that says what to fix.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import ops  # noqa: F401  (registers the ops the compiled backbone calls)
from . import inputs
from .inputs import EngineInputError, EngineInputTypeError, Sample  # noqa: F401  (re-exported)
from .backends import load_role, load_weights, loader_names
from .manifest import EngineFormatError, check_integrity, read_manifest
from .specs import InputSpecError, known_names, known_spec, specs_of

# The token-embedding table [vocab, H]: manifest["embeddings"] = {"file": <a safetensors file of the
# engine>, "tensor": <its key there>}. Format 4 stores it once, in the shared weights file under the
# backbone's own name for it; formats 2 and 3 (and a backend without a shared weights file) in a
# file of its own, EMBEDDINGS_FILE, under "weight" (the default when "tensor" is absent).
EMBEDDINGS_FILE = "embeddings.safetensors"


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [B, vocab]: next-token logits at the last position
    kept_positions: torch.Tensor  # [B, S']: original positions of the tokens that reached the last layer
    cache: list | None = None  # per layer (key, value) [B, heads, S_l, dim]: the tokens that reached layer l
    prompt_length: int | None = None  # S
    next_positions: torch.Tensor | None = None  # [B]: rotary position of each sample's first new token
    # (S, or with multimodal rotary positions their largest + 1); decode continues from here


class Engine:
    def __init__(self, backbone: Callable, info: dict, embeddings: torch.Tensor | None = None,
                 manifest: dict | None = None, path: Path | None = None, *, front_end=None,
                 decode_step: Callable | None = None):
        self.backbone = backbone
        self.front_end = front_end  # runtime.multimodal.FrontEnd of a VLM engine: vision encoder + input processing
        self.decode_step = decode_step  # the one-token decode program (runtime/generate.py), None without one
        self.info = info  # model facts: hidden_size, vocab_size, dtype, ...
        self.embeddings = embeddings
        self.manifest = manifest or {}
        self.path = path
        self.input_specs = specs_of(info)  # the backbone's extra inputs after the vision positions (runtime/specs.py)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.info["dtype"])

    @property
    def device(self) -> torch.device:
        """Where the programs run (manifest["device"]); prefill logits and the KV cache live there."""
        return torch.device(self.manifest.get("device", "cpu"))

    def embed(self, input_ids) -> torch.Tensor:
        """Token ids [B, S] (or [S]) -> their embeddings [B, S, H] (or [S, H])."""
        ids = inputs.token_ids(self, "input_ids", input_ids, "[B, S] (or [S])", (1, 2))
        return torch.nn.functional.embedding(ids, self.embeddings)

    @torch.no_grad()
    def prepare(self, images=None, prompts=None, *, chat: bool = True, max_length: int | None = None):
        """VLM engines: images (paths, PIL images) + prompts (one "<image>" per image) -> a
        runtime.multimodal.Prepared with input_ids, inputs_embeds and vision_positions.
        max_length: the most tokens a prompt may have; a longer one is a
        runtime.inputs.PromptTooLongError raised after tokenizing, before embedding or encoding."""
        if self.front_end is None:
            raise EngineInputError(f"this engine was compiled from a text-only {self.info.get('model_type')} "
                                   f"model ({self.info.get('source')}): it takes input_ids or inputs_embeds, not "
                                   "images and prompts")
        return self.front_end.prepare(self, images, prompts, chat=chat, max_length=max_length)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                vision_mask: torch.Tensor | None = None,
                vision_positions: torch.Tensor | None = None, images=None, prompts=None,
                chat: bool = True, samples: list[Sample] | None = None, **extra_inputs) -> PrefillResult:
        """Run the prompt. Vision tokens are marked by a [B, S] bool mask or given as [B, N] positions.
        Engines whose family declares extra backbone inputs (engine.input_specs, runtime/specs.py)
        take them by name, each of its spec's shape (e.g. Qwen3-VL's 3D rotary positions [3, B, S]),
        or give it its absent value (plain positions 0..S-1, or zeros).
        VLM engines also take prompts= (and images=), see prepare(). samples=: instead, a list of
        runtime.inputs.Sample of one shape (S, N), e.g. engine.prepare(...).samples."""
        if _prompts_given(images, prompts, input_ids, inputs_embeds, vision_mask, vision_positions, samples,
                          *extra_inputs.values()):
            prepared = self.prepare(images, prompts, chat=chat)
            if not prepared.batched:
                raise EngineInputError(f"the prompts tokenize to different shapes (lengths "
                                       f"{[len(x) for x in prepared.input_ids]}): one prefill call takes one "
                                       "shape; use generate_text / engine.generate, which batch them, or prefill "
                                       "them one at a time")
            samples = prepared.samples
        else:
            samples = inputs.parse(self, input_ids, inputs_embeds, vision_mask, vision_positions, extra_inputs,
                                   samples=samples, batched=True)
        inputs_embeds, positions, extras = inputs.stack(self, samples)
        batch, seq = inputs_embeds.shape[:2]
        logits, kept, *cache = self.backbone(inputs_embeds, positions, *extras)
        pairs = [(cache[i], cache[i + 1]) for i in range(0, len(cache), 2)] if cache else None
        # Decode continues at S, or where an input holds the rotary positions after their largest (HF's rope deltas).
        next_positions = next((n for spec, value in zip(self.input_specs, extras)
                               if (n := spec.next_positions(value)) is not None),
                              torch.full((batch,), seq, dtype=torch.long))
        return PrefillResult(logits, kept, pairs, seq, next_positions)

    def no_decode_message(self) -> str:
        where = f"{self.path}" if self.path else "this engine"
        return (f"{where} has no decode program (it was compiled with --no-decode / decode=False, or before "
                "decode existed): recompile it without --no-decode (compile_model(..., decode=True)) to decode or "
                "generate more than one token; prefill still works")

    def start_decode(self, results, max_new_tokens: int):
        """A generate.DecodeState from one or more PrefillResults (their samples in order)."""
        from .generate import DecodeUnavailableError, start_state

        if self.decode_step is None:
            raise DecodeUnavailableError(self.no_decode_message())
        results = inputs.prefill_results(results, PrefillResult)
        return start_state(results, inputs.positive_int("max_new_tokens", max_new_tokens))

    @torch.no_grad()
    def decode(self, state, input_ids: torch.Tensor | None = None, *,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One token per sample ([B, 1] ids or [B, 1, H] embeddings) -> next-token logits [B, V].
        Appends to `state` (from start_decode) in place."""
        from .generate import DecodeState, DecodeUnavailableError, decode_step

        if self.decode_step is None:
            raise DecodeUnavailableError(self.no_decode_message())
        inputs_embeds = inputs.step_inputs(self, state, input_ids, inputs_embeds, DecodeState)
        return decode_step(self.decode_step, state, inputs_embeds.to(self.dtype))

    def generate(self, input_ids=None, *, inputs_embeds=None, vision_positions=None, vision_mask=None,
                 samples: list[Sample] | None = None, max_new_tokens: int = 16, eos_token_id=None,
                 stream: bool = False, images=None, prompts=None, chat: bool = True, sampling=None, **keywords):
        """Greedy generation, or sampling as `sampling` says (a runtime.sampling.SamplingParams:
        temperature > 0, top_p, top_k, seed, stop, presence/frequency penalties; every sample draws
        with the same seed). Its fields also go as keywords, a shorthand: temperature=0.7, seed=1
        (SamplingParams' defaults for the rest); sampling= and these keywords together are an
        EngineInputError. stop: strings that end a prompt's answer (prompts= only: they need the
        tokenizer). Samples: a [B, S] batch or a list of different lengths (ids [S] or
        embeddings [S, H]), each with its own vision tokens ([N] positions or an [S] mask) and, for
        engines that take extra inputs (engine.input_specs), each by name (the other keywords) as a
        batch of its spec's shape or a list of per-sample tensors (the shape without B); or
        samples=, a list of runtime.inputs.Sample (engine.prepare(...).samples). Samples of equal
        shapes share one prefill call; all share each decode step.
        Returns each sample's new tokens (1-D LongTensors, ending at eos), or with stream=True an
        iterator yielding, per step, a list of each sample's new token (None once it has ended).

        VLM engines: prompts= (one "<image>" per image) and images= instead, as prepare() takes
        them; returns each prompt's answer as text (generation stops at the tokenizer's eos), or
        with stream=True yields per step each prompt's new text piece (runtime.multimodal.stream_texts)."""
        from .generate import GenerateParams, generate
        from .sampling import sampling_params

        sampling, extra_inputs = sampling_params(sampling, keywords)
        params = GenerateParams.of(max_new_tokens, eos_token_id, sampling)
        if _prompts_given(images, prompts, input_ids, inputs_embeds, vision_positions, vision_mask, samples,
                          eos_token_id, *extra_inputs.values()):
            from .multimodal import answer_steps, joined

            steps = answer_steps(self, images, prompts, params, chat)
            return steps if stream else joined(steps)
        if params.sampling.stop:
            raise EngineInputError("stop strings need the engine's tokenizer: pass prompts= (VLM engines), or "
                                   "stop on token ids with eos_token_id=")
        samples = inputs.parse(self, input_ids, inputs_embeds, vision_mask, vision_positions, extra_inputs,
                               samples=samples)
        return generate(self, samples, params, stream)


def _prompts_given(images, prompts, *tensor_inputs) -> bool:
    """Whether a call takes prompts= (with images=) rather than tensors; refuses a mix of both."""
    if prompts is None and images is None:
        return False
    if prompts is None or any(x is not None for x in tensor_inputs):
        raise EngineInputError("pass prompts= (with images=) alone, or input_ids/inputs_embeds with vision tokens")
    return True


DTYPES = ("float32", "bfloat16", "float16", "float64")  # the floating dtypes an engine's weights may have


def load_engine(path: str | os.PathLike, verify_hashes: bool = True, device: str | torch.device | None = None
                ) -> Engine:
    """Load an engine directory written by compile_model / `fastmmoe-compile MODEL --out DIR`.
    device: "cpu" or "cuda", which must be the one it was compiled for (None: that one);
    runtime.device.DeviceError otherwise, or where this machine lacks it."""
    from .device import engine_device, on_device
    from .multimodal import load_front_end

    path = Path(path)
    manifest = read_manifest(path, verify_hashes=verify_hashes)
    check_manifest(path, manifest)
    device = engine_device(path, manifest.get("device"), device)  # before loading any program
    if device == "cpu" and manifest["model"]["dtype"] == "bfloat16":
        _warn_if_slow_bf16(path, manifest)
    programs = manifest["programs"]
    weights = load_weights(path, manifest, device)  # once, shared by every program
    embeddings = None
    if manifest.get("embeddings"):
        embeddings = _load_embeddings(path, manifest, weights)
    front_end = load_front_end(path, manifest, weights)
    if front_end is not None:
        front_end.encoder = on_device(front_end.encoder, device, outputs_to_host=True)
    backbone = load_role(path, manifest, "backbone", weights)
    decode = load_role(path, manifest, "decode", weights) if "decode" in programs else None
    # Last: a field the checks above find wrong is named with its legal values first.
    check_integrity(path, manifest)
    return Engine(_as_tuple(on_device(backbone, device)), manifest["model"], embeddings,
                  manifest, path, front_end=front_end, decode_step=on_device(decode, device))


_WARNED_SLOW_BF16: set[str] = set()  # engine dirs warned about in this process


def _warn_if_slow_bf16(path: Path, manifest: dict) -> None:
    """A runtime.cpu.SlowBf16Warning (one line), once per engine directory and process, where a
    bfloat16 CPU engine is loaded on a CPU without native bf16 GEMMs, e.g. one compiled on an AMX
    machine and run on an AVX2 one. (Own bookkeeping: Python's once-per-location registry is reset
    by any warnings.catch_warnings(), which torch and this package use while loading.)"""
    from .cpu import SlowBf16Warning, bf16_speed, slow_bf16_message

    speed = bf16_speed()
    key = str(path.resolve())
    if speed.native or key in _WARNED_SLOW_BF16:
        return
    _WARNED_SLOW_BF16.add(key)
    compiled_on = manifest.get("cpu") if isinstance(manifest.get("cpu"), dict) else {}
    where = f" (compiled on CPU capability {compiled_on['capability']})" \
        if isinstance(compiled_on.get("capability"), str) else ""
    warnings.warn(SlowBf16Warning(slow_bf16_message(
        f"{path} is a bfloat16 engine{where}",
        "it runs its matmuls that much slower than a float32 engine (recompile with --dtype float32)", speed)),
        stacklevel=3)


def _field_error(path: Path, field: str, value, expected: str) -> EngineFormatError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return EngineFormatError(f"{path}: manifest field {field} is {shown}; expected {expected} "
                             "(a corrupt or hand-edited manifest: recompile the model)")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_manifest(path: Path, manifest: dict) -> None:
    """The fields load_engine and the runtime rely on, beyond what read_manifest checks: each one
    wrong (edited, or from an incompatible writer) is one EngineFormatError naming it and its legal values."""
    backend = manifest.get("backend")
    if backend not in loader_names():
        raise _field_error(path, "backend", backend, f"one of {', '.join(loader_names())}")
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise _field_error(path, "model", model, "an object with the model's facts")
    if model.get("dtype") not in DTYPES:
        raise _field_error(path, "model.dtype", model.get("dtype"), f"one of {', '.join(DTYPES)}")
    for name in ("hidden_size", "vocab_size"):
        if not _positive_int(model.get(name)):
            raise _field_error(path, f"model.{name}", model.get(name), "a positive int")
    if not isinstance(model.get("model_type"), str):
        raise _field_error(path, "model.model_type", model.get("model_type"), "a string")
    _check_input_specs(path, model)
    needed = [file for role in _roles(path, manifest) for file in _program_files(path, manifest, role)]
    if manifest.get("vision") is not None:
        from .multimodal import check_vision_facts

        check_vision_facts(path, manifest["vision"], model)
    embeddings = manifest.get("embeddings")
    if embeddings is not None:
        if not isinstance(embeddings, dict) or not isinstance(embeddings.get("file"), str) or \
                not isinstance(embeddings.get("tensor", "weight"), str):
            raise _field_error(path, "embeddings", embeddings,
                               'absent, or {"file": <a file of the engine>, "tensor": <its key there>}')
        needed.append(embeddings["file"])
    weights = manifest.get("weights")
    if weights is not None:
        if not isinstance(weights, dict) or not isinstance(weights.get("file"), str):
            raise _field_error(path, "weights", weights, 'absent, or {"file": <a file of the engine>}')
        needed.append(weights["file"])
    files = manifest["files"]  # read_manifest: a dict of checked entries
    for name in needed:
        if name not in files:
            raise EngineFormatError(f"{path}: {name} is not listed in the manifest's files, so its size and hash "
                                    "cannot be verified (a corrupt or hand-edited manifest: recompile the model)")


def _check_input_specs(path: Path, model: dict) -> None:
    """model.extra_inputs (names, in order) and model.input_specs (their specs, runtime/specs.py;
    absent in an older manifest: the names' known specs), and the model facts their shapes need."""
    extra = model.get("extra_inputs", [])
    if "input_specs" in model:
        try:
            specs = specs_of(model)
        except InputSpecError as e:
            raise _field_error(path, "model.input_specs", model["input_specs"], f"a list of input specs ({e})")
        if not isinstance(extra, list) or extra != [s.name for s in specs]:
            raise _field_error(path, "model.extra_inputs", extra, f"the names of model.input_specs, "
                               f"{[s.name for s in specs]}")
    else:
        if not isinstance(extra, list) or len(set(map(str, extra))) != len(extra) or \
                any(known_spec(x) is None for x in extra if isinstance(x, str)) or \
                not all(isinstance(x, str) for x in extra):
            raise _field_error(path, "model.extra_inputs", extra,
                               f"a list of distinct names from {', '.join(known_names())}")
        specs = specs_of(model)
    if len({s.name for s in specs}) != len(specs):
        raise _field_error(path, "model.extra_inputs", extra, "distinct names")
    for spec in specs:
        for fact in spec.facts():
            if not _positive_int(model.get(fact)):
                raise _field_error(path, f"model.{fact}", model.get(fact), "a positive int")


ROLES = ("backbone", "decode", "vision")  # backbone always; decode and vision where compiled


def _roles(path: Path, manifest: dict) -> list[str]:
    """The roles the manifest's "programs" lists: a backbone, a vision encoder exactly when there are vision facts."""
    programs = manifest.get("programs")
    if not isinstance(programs, dict) or "backbone" not in programs or any(r not in ROLES for r in programs):
        raise _field_error(path, "programs", programs, "an object with a backbone entry and optionally decode "
                           "and vision ones, each {\"file\": ...}")
    if ("vision" in programs) != (manifest.get("vision") is not None):
        raise _field_error(path, "programs.vision", programs.get("vision"),
                           "an entry exactly when the manifest has vision facts")
    return list(programs)


def _program_files(path: Path, manifest: dict, role: str) -> list[str]:
    """The files of the program of `role`: its own, and the external-data file it points into
    ("data", format 4's ONNX programs: lower/onnx.py) where it has one."""
    entry = manifest["programs"][role]
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or \
            entry.get("backend", manifest["backend"]) not in loader_names() or \
            not isinstance(entry.get("weights", {}), dict) or not isinstance(entry.get("data", ""), str):
        raise _field_error(path, f"programs.{role}", entry,
                           f'{{"file": <a file of the engine>}} (and optionally "backend": one of '
                           f'{", ".join(loader_names())}, "weights": an object, and "data": a file of the engine)')
    return [entry["file"], *([entry["data"]] if "data" in entry else [])]


def _load_embeddings(path: Path, manifest: dict, weights: dict | None) -> torch.Tensor:
    """The token-embedding table [vocab, H] (the weights' dtype) on the host, from the file and key
    manifest["embeddings"] names (check_manifest vetted its shape). Where that is the shared weights
    file and the engine runs on the CPU, the very tensor load_weights() read (`weights`): no second
    copy in memory either; for a CUDA engine only this tensor is read again, onto the host.
    EngineFormatError when the file lacks the key or the tensor is not [vocab, model.hidden_size]."""
    from safetensors import safe_open

    entry, hidden = manifest["embeddings"], manifest["model"]["hidden_size"]
    file, key = entry["file"], entry.get("tensor", "weight")
    shared = weights is not None and file == (manifest.get("weights") or {}).get("file")
    try:
        if shared and key in weights and weights[key].device.type == "cpu":
            weight = weights[key]
        else:
            with safe_open(str(path / file), framework="pt", device="cpu") as f:
                weight = f.get_tensor(key)
    except Exception as e:
        raise EngineFormatError(f"{path}: {file} does not hold the token embeddings {key!r} "
                                f"({type(e).__name__}: {str(e).strip()[:200]})") from e
    if weight.dim() != 2 or weight.shape[1] != hidden or not weight.dtype.is_floating_point:
        raise EngineFormatError(f"{path}: {file} holds {inputs.given(weight)} under {key!r}, not the [vocab, "
                                f"{hidden}] token embeddings that manifest field model.hidden_size = {hidden} says")
    return weight


def _as_tuple(fn):
    def call(*args):
        out = fn(*args)
        return tuple(out)

    return call
