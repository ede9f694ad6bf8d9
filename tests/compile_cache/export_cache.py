"""The test process's export cache: a model exported again, unchanged, is not traced again.

Most tests build an engine of one of a few session-wide tiny models (tests/conftest.py tiny_model), and
each build starts with torch.export of the same module: a few seconds each, hundreds of times a run,
a third of the suite's time. `export_backbone`, `export_decode` and `export_vision` (the package's
only torch.export calls of a LoadedModel, fastmmoe_compile/export/) are wrapped: a call with the
same model, unchanged, and the same arguments as an earlier call of this process gets a copy of that
call's program instead of a new trace. What the engine is made of is the same program either way;
what the cache saves is only the trace.

The key is the model as torch.export sees it: the module objects (lm, family, vision model), every
parameter and buffer's storage, version counter (an in-place write bumps it), dtype, shape and
device, each config (all fields, the attention implementation too), the training flag, the
arguments, a replaced forward and the hook counts of every submodule, torch's default dtype. A model
changed in any of these is traced afresh; a trace under an active dispatch mode (fake weights under a
FakeTensorMode) is never cached. The copies share the export's ShapeEnv: copy_program puts its guards
back, and a hit whose ShapeEnv has learnt anything else about the export's own symbols since (ranges,
replacements, axioms, divisibility, runtime asserts: `_shape_facts`) is traced afresh instead. The copy a caller gets has its own
graph, signature, node meta dicts and state_dict/constants dicts (the tensors in them are the
model's own, as a fresh export's are), so a caller that rewrites it leaves the cached one as it was.

Off in a test that takes pytest's monkeypatch (a patched function could change the trace;
tests/conftest.py sets `enabled` per test) and where FASTMMOE_TEST_EXPORT_CACHE=0. Counted in HITS
and MISSES; FASTMMOE_TEST_EXPORT_CACHE_LOG, when set, gets one line per call."""
from __future__ import annotations

import functools
import os
import threading
import time

import torch

ENV = "FASTMMOE_TEST_EXPORT_CACHE"
LOG_ENV = "FASTMMOE_TEST_EXPORT_CACHE_LOG"
HITS = 0
MISSES = 0
enabled = True  # tests/conftest.py: off for a test that takes monkeypatch
_lock = threading.Lock()
_programs: dict = {}  # key -> (the modules, kept alive so that their ids stay theirs; the program)


def _state(module) -> tuple:
    if module is None:
        return ()
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    hooks = tuple((name, "forward" in m.__dict__, len(m._forward_hooks), len(m._forward_pre_hooks))
                  for name, m in module.named_modules())  # a replaced forward or a hook changes the trace
    return (module.training, hooks, tuple((n, t.untyped_storage().data_ptr() if t.device.type != "meta" else 0,
                                     t._version, t.dtype, tuple(t.shape), str(t.device), t.requires_grad)
                                    for n, t in tensors))


def _config_state(config) -> str:
    if config is None:
        return ""
    to_json = getattr(config, "to_json_string", None)  # a model's own config class may not be transformers'
    parts = [to_json(use_diff=False) if to_json else repr(sorted(vars(config).items()))]
    for name in ("", *[k for k, v in vars(config).items() if hasattr(v, "_attn_implementation")]):
        sub = getattr(config, name) if name else config
        parts.append(f"{name}:{getattr(sub, '_attn_implementation', None)}")
    return "|".join(parts)


def _key(loaded, args, kwargs):
    vision = getattr(loaded, "vision", None)
    vision_model = getattr(vision, "model", None)
    modules = (loaded.lm, loaded.family, vision_model)
    key = (tuple(id(m) for m in modules), _state(loaded.lm), _state(vision_model),
           _config_state(loaded.lm.config), _config_state(getattr(vision_model, "config", None)),
           repr(args), repr(sorted(kwargs.items())), torch.get_default_dtype())
    return key, modules


def _shape_facts(program):
    """What later users of the shared ShapeEnv could change and a later trace's passes would see: the
    ranges and replacements of the export's own (backed) symbols, axioms, divisibility facts, deferred
    runtime asserts. torch_compat.copy_program puts the guards back; these it does not."""
    from fastmmoe_compile.torch_compat import _shape_env

    env = _shape_env(program)
    if env is None:
        return None
    backed = set(getattr(env, "backed_var_to_val", None) or env.var_to_val)  # named var_to_val before 2.13
    return (sorted((str(k), str(v)) for k, v in env.var_to_range.items() if k in backed),
            sorted((str(k), str(v)) for k, v in env.replacements.items() if k in backed),
            sorted(map(str, env.axioms)), sorted(map(str, env.divisible)),
            sorted((str(k), len(v)) for k, v in env.deferred_runtime_asserts.items() if k in backed or k is None))


def _under_a_mode() -> bool:
    """A trace under an active dispatch mode (e.g. a FakeTensorMode over a model made of fake weights,
    benchmarks/gpu_check.py's time_plan) belongs to that mode: never cached."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return bool(_get_current_dispatch_mode_stack())


def copy_of(program):
    """A copy of the ExportedProgram `program` that a caller may rewrite in place (torch_compat.copy_program:
    its own graph, signature and node meta, the export's guards; the same weight tensors), with its own
    state_dict and constants dicts too."""
    from fastmmoe_compile.torch_compat import copy_program

    copied = copy_program(program)
    copied._state_dict, copied._constants = dict(program.state_dict), dict(program.constants)
    return copied


def _log(name: str, what: str, seconds: float) -> None:
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a") as f:
            f.write(f"{name}\t{what}\t{seconds:.2f}\t{os.getpid()}\t{os.environ.get('PYTEST_CURRENT_TEST', '')}\n")


def cached(export):
    """`export(loaded, *args, **kwargs)` with this process's cache in front of it."""
    if getattr(export, "_test_cache", False):
        return export

    @functools.wraps(export)
    def wrapper(loaded, *args, **kwargs):
        global HITS, MISSES
        if not enabled or os.environ.get(ENV) == "0" or _under_a_mode():
            return export(loaded, *args, **kwargs)
        start = time.time()
        try:
            key, modules = _key(loaded, args, kwargs)
        except Exception:  # noqa: BLE001 - e.g. fake weights (no storage): traced as without the cache
            return export(loaded, *args, **kwargs)
        key = (export.__name__, *key)
        with _lock:
            hit = _programs.get(key)
        if hit is not None and _shape_facts(hit[1]) != hit[2]:
            hit = None  # an earlier user's passes taught the shared ShapeEnv something: trace afresh
            _log(export.__name__, "stale", 0.0)
        if hit is not None:
            HITS += 1
            program = copy_of(hit[1])
            _log(export.__name__, "hit", time.time() - start)
            return program
        program = export(loaded, *args, **kwargs)
        with _lock:
            _programs[key] = (modules, program, _shape_facts(program))
        MISSES += 1
        _log(export.__name__, "miss", time.time() - start)
        return copy_of(program)

    wrapper._test_cache = True
    return wrapper


def install() -> None:
    """Wrap the package's three exports of a LoadedModel where its callers look them up."""
    from fastmmoe_compile import api, export
    from fastmmoe_compile.export import capture, decode, vision

    capture.export_backbone = export.export_backbone = api.export_backbone = cached(capture.export_backbone)
    decode.export_decode = cached(decode.export_decode)
    vision.export_vision = cached(vision.export_vision)
