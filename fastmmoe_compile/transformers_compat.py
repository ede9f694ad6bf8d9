"""Every place the compiler touches transformers' internals, in one module.

transformers renames internals between minor releases (5.24 passes the KV cache to attention
modules as `cache=`, earlier 5.x as `past_key_values=`). Whatever depends on such a name lives
here, so the next rename is a one-file change; the rest of the package calls these helpers.
The versions the suite has passed on are `TESTED_TRANSFORMERS` (the pin in pyproject.toml
stops below the next untested minor release; `scripts/try_newest_transformers.sh` tries one).

Touch points:
- the keyword an attention module's forward takes its KV cache under (`cache_keyword`), the one a
  model's forward takes it under (`cache_kwargs`) and the field outputs return it in (`output_cache`);
- the attention implementation a model runs (`attention_implementation`, `sdpa_attention`):
  the token-reduction passes find `scaled_dot_product_attention` in the exported graph, so
  export always runs SDPA, whatever the user loaded the model with; and the K/V head repeat of
  its grouped-query attention (`integrations.sdpa_attention.repeat_kv`), replaced inside the
  block by torch_compat.repeat_kv_heads (same values, no guard that torch 2.11's export refuses);
- the experts-implementation switch (`allow_experts_implementation`) for *ForCausalLM classes
  defined outside transformers' modeling files;
- transformers' export patches for packed vision attention (`export_patches`);
- how from_pretrained reads safetensors files (`safetensors_reads`: the `safe_open` that
  modeling_utils imported, and its read-ahead thread pool's switch `SEQUENTIAL_LOAD_ENV`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from .errors import UnsupportedModelError
from .torch_compat import repeat_kv_heads

# The transformers releases the whole suite passed on (README: "Tested versions").
TESTED_TRANSFORMERS = ("5.23.0", "5.24.0")

# The KV-cache keyword of attention modules' forward, newest name first.
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")


@functools.cache
def _cache_keyword_of(forward) -> str:
    params = inspect.signature(forward).parameters
    for name in _CACHE_KEYWORDS:
        if name in params:
            return name
    raise UnsupportedModelError(
        f"{getattr(forward, '__qualname__', forward)} takes no KV cache under any of {_CACHE_KEYWORDS}: "
        "this transformers release is not supported (README: tested versions)")


def cache_keyword(attention: torch.nn.Module) -> str:
    """The keyword `attention.forward` takes its KV cache under ("cache" from transformers 5.24)."""
    return _cache_keyword_of(type(attention).forward)


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """`{keyword: cache}` to call a transformers model (or *ForCausalLM) with a KV cache."""
    return {_cache_keyword_of(type(model).forward): cache}


def output_cache(output):
    """The KV cache a transformers model output returns (`.cache` from 5.24, `.past_key_values` before)."""
    return getattr(output, output_cache_field(type(output)))


def output_cache_field(output_class: type) -> str:
    """The field name an output dataclass holds the KV cache under."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(output_class)}
    return "cache" if "cache" in names else "past_key_values"


def _configs(model: torch.nn.Module) -> list:
    """Every transformers config reachable from the model: each submodule's, and their sub-configs."""
    from transformers import PretrainedConfig

    seen, stack = {}, [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if isinstance(sub, PretrainedConfig):
                stack.append(sub)
    return list(seen.values())


def attention_implementation(model: torch.nn.Module) -> dict[int, str | None]:
    """The attention implementation of every config of the model, by config id (to compare or restore)."""
    return {id(c): c._attn_implementation for c in _configs(model)}


@contextlib.contextmanager
def sdpa_attention(model: torch.nn.Module):
    """Run `model` with SDPA attention inside the block, whatever it was loaded with (eager,
    flash_attention_2, flex_attention, ...); the model's own settings come back afterwards.

    Attention modules read `config._attn_implementation` at call time, so setting it on every
    config (the internal attribute: no re-validation, no sub-config recursion) is enough."""
    configs = _configs(model)
    previous = [c._attn_implementation_internal for c in configs]
    with _sdpa_repeat_kv(repeat_kv_heads):
        try:
            for c in configs:
                c._attn_implementation_internal = "sdpa"
            yield model
        finally:
            for c, value in zip(configs, previous):
                c._attn_implementation_internal = value


@contextlib.contextmanager
def _sdpa_repeat_kv(repeat):
    """transformers' SDPA attention repeats K/V heads with `repeat(hidden_states, n_rep)` inside the
    block (it looks the module-level `repeat_kv` up at call time). Not thread-safe: another thread's
    SDPA attention meanwhile repeats the same way (same values)."""
    import transformers.integrations.sdpa_attention as sdpa

    original = getattr(sdpa, "repeat_kv", None)
    if original is None:  # a transformers without it expands K/V some other way: leave it be
        yield
        return
    sdpa.repeat_kv = repeat
    try:
        yield
    finally:
        sdpa.repeat_kv = original


@contextlib.contextmanager
def frozen_for_export(model: torch.nn.Module):
    """eval() and requires_grad=False inside the block; the model's training flags and
    requires_grad come back afterwards (compiling must not change the user's model object)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def allow_experts_implementation(cls: type) -> type:
    """Let `set_experts_implementation` work on a PreTrainedModel subclass defined outside a
    transformers modeling file (transformers greps the class's module source for the decorator;
    the experts inside are transformers' own decorated modules, so switching works)."""
    cls._can_set_experts_implementation_cached_value = True
    return cls


def export_patches():
    """transformers' export patches: the packed vision attention of Qwen2/2.5/3-VL, GLM-4V and
    others (a cu_seqlens split loop) becomes one reshape-into-batch SDPA (a context manager)."""
    from transformers.exporters.utils import apply_patches

    return apply_patches("dynamo")


# transformers' switch for its thread pool that reads every checkpoint tensor ahead of the conversions.
SEQUENTIAL_LOAD_ENV = "HF_DEACTIVATE_ASYNC_LOAD"


@contextlib.contextmanager
def safetensors_reads(backend: str):
    """Inside, transformers' from_pretrained opens its CPU safetensors reads with safe_open's
    `backend` ("pread", "mmap") instead of the default mmap, and reads one tensor at a time as its
    conversions ask for them (SEQUENTIAL_LOAD_ENV) rather than all ahead; reads onto another device
    keep their backend. Patches the safe_open that transformers.modeling_utils imported and sets the
    environment variable, for the duration (not thread-safe: another thread's from_pretrained
    meanwhile loads the same way). A transformers without that safe_open is left as it is.
    Used by models/loading.one_host_copy (why: its docstring)."""
    import os

    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if original is None:
        yield
        return

    def safe_open(filename, framework, device="cpu", **kwargs):
        if kwargs.get("backend", "mmap") == "mmap" and torch.device(device).type == "cpu":
            kwargs["backend"] = backend
        return original(filename, framework=framework, device=device, **kwargs)

    env = os.environ.get(SEQUENTIAL_LOAD_ENV)
    modeling_utils.safe_open = safe_open
    os.environ[SEQUENTIAL_LOAD_ENV] = "1"
    try:
        yield
    finally:
        modeling_utils.safe_open = original
        if env is None:
            os.environ.pop(SEQUENTIAL_LOAD_ENV, None)
        else:
            os.environ[SEQUENTIAL_LOAD_ENV] = env
