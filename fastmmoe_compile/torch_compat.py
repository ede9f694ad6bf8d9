"""Every place the compiler depends on torch behaviour that differs between the releases it supports.

The package runs on torch 2.11 through 2.14 (`SUPPORTED_TORCH`; pyproject pins `torch>=2.11,<2.15`).
GPU machines and serving stacks pin their own torch (the GPU loans have 2.11 + CUDA 13; vLLM pins
one exact release per version), so a workaround for one release lives here, named after the upstream
issue or PR it works around and the release that no longer needs it; the rest of the package calls
these helpers and never tests `torch.__version__` itself.

Touch points:
- fake-tensor propagation over an exported graph (`fake_propagation`): torch 2.11 and 2.12 run
  `aten.linear`'s C++ composite kernel on symbolic shapes and fail ("Cannot call numel() on tensor
  with symbolic sizes/strides") unless the Python dispatcher is on, as torch.export itself runs;
- how K/V heads are repeated for grouped-query attention (`repeat_kv_heads`): the expand + reshape
  that transformers (and most GQA code) writes makes torch 2.11 add the guard
  `Min(r*S, 2r*S) == r*S` on the dynamic sequence length, which torch.export refuses as a
  constraint violation (simplified upstream by pytorch PR #185092, "Simplify Min/Max of scaled
  symbolic terms", after 2.11). The engine repeats heads with `index_select`, which every torch
  release and every backend (Inductor, ONNX `Gather`) takes without a guard; it computes exactly
  what the expand + reshape computes, so one graph serves every release.
- a copy of an ExportedProgram whose graph a pass may rewrite while the weights stay shared
  (`copy_program`: `ExportedProgram._update`, the same private constructor in 2.11 - 2.14);
- Inductor's C++ vector-stride analysis (`fast_cpp_stride_analysis`): `stride_at_vec_range`
  (defined in `torch._inductor.codegen.cpp` on 2.11, imported there from `torch._inductor.sizevars`
  on 2.13 - 2.14; replaced where the C++ codegen looks it up) runs `sympy.simplify` over every
  load/store index of every CPU kernel. The engine's token counts after a merge or prune stage are
  floor-division expressions of the vision length (algorithm.vision_after_stage), so these indices
  grow large and the simplify dominated CPU lowering (SparseVLM's tiny-qwen3-moe engine: 134 s to
  compile, 43 s of it here; 81 s and 74 s in two runs with the smaller expression below).
  Upstream's fix for the same cost, pytorch PR #186319 ("Avoid full simplify in vector-range index
  analysis", issue #133734; it skips the simplify), is in no release 2.11 - 2.14;
- the decompositions Inductor's own trace applies (`inductor_decompositions`:
  `torch._inductor.compile_fx.select_decomp_table`), so AOTInductor lowers the routing ops without a
  second trace of the program;
- torch.export.load (`fast_export_load`: `torch._export.serde.serialize`'s `typing` and `sympy`, the
  same module globals on 2.11 - 2.14): the deserializer asks `typing.get_type_hints` again for every
  schema object it rebuilds (pytorch issue #196452, open) and parses every size expression string
  again for every node; both answers are remembered while a program loads. An export-backend engine
  of tiny-qwen3-moe (prefill + decode programs) loads in 4.2 s instead of 7.6 s;
- `torch.__version__` as the rest of the package sees it (`torch_version`, `supported`).
"""
from __future__ import annotations

import contextlib
import functools
import re
import threading

import torch

# The torch releases the suite has passed on (README: "Tested versions"); the pin in pyproject.toml
# stops below the next untested minor release.
SUPPORTED_TORCH = ("2.11", "2.12", "2.13", "2.14")


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch, e.g. (2, 11) for "2.11.0+cu130"."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def supported() -> bool:
    """Whether the running torch is one of SUPPORTED_TORCH."""
    return "%d.%d" % torch_version() in SUPPORTED_TORCH


@contextlib.contextmanager
def fake_propagation():
    """Inside, fake-tensor propagation (FakeTensorProp, an op called on fake values) dispatches as
    torch.export does: through the Python dispatcher, whose decompositions handle symbolic sizes.
    Needed up to torch 2.12 (aten.linear's C++ composite calls numel() on a symbolic-size tensor);
    harmless on newer releases, so it is always on (one code path for every release)."""
    from torch._dispatch.python import enable_python_dispatcher

    with enable_python_dispatcher():
        yield


def repeat_kv_heads(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention's K/V head repeat without a guard on the sequence length.

    hidden_states: [batch, kv_heads, seq, head_dim], any dtype. Returns [batch, kv_heads * n_rep,
    seq, head_dim], head h of the result being head h // n_rep of the input (what
    `torch.repeat_interleave(x, n_rep, dim=1)` and transformers' `repeat_kv` compute), as a new
    contiguous tensor. n_rep == 1 returns the input itself."""
    if n_rep == 1:
        return hidden_states
    heads = hidden_states.shape[1]
    index = torch.arange(heads * n_rep, device=hidden_states.device) // n_rep
    return hidden_states.index_select(1, index)


def copy_program(program):
    """A copy of the ExportedProgram `program` whose graph can be rewritten in place (passes) without
    touching the original: the graph, its signature and each node's meta dict are copied (the fake
    values in them are shared, not copied: passes replace them, never mutate them); the weights
    (state_dict, constants) are the same tensors, so a copy of a 30B program costs no memory.
    Used to export a backbone once and rewrite it for several configurations (api.rewrite_each).

    The copies share the export's ShapeEnv, and a pass's shape reasoning adds guards to it
    (`ShapeEnv.guards`, which an ExportedProgram turns into its `_guards_code` when it is built): without
    care, the second configuration's program carried guards that the first one's passes had added,
    e.g. `4*S*B - 2*B*N >= 2` on an identity program whose own rewrite adds none. So each copy
    first puts the ShapeEnv's guards back to what they were at the first copy of `program` (before
    any pass ran, in rewrite_each); with that, every configuration's program has the guards and
    range constraints its own rewrite() gives (tests/test_torch_compat.py)."""
    import copy

    shape_env = _shape_env(program)
    if shape_env is not None:
        if not hasattr(program, "_fastmmoe_copy_guards"):
            program._fastmmoe_copy_guards = list(shape_env.guards)
        shape_env.guards[:] = program._fastmmoe_copy_guards
    graph_module = torch.fx.GraphModule(program.graph_module, copy.deepcopy(program.graph_module.graph))
    graph_module.meta.update(program.graph_module.meta)
    return program._update(graph_module, copy.deepcopy(program.graph_signature))


def _shape_env(program):
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta["val"] for n in program.graph.nodes if "val" in n.meta])
    return None if mode is None else mode.shape_env


# --- Inductor touch points: the C++ vector-stride analysis, the decomposition table -----------------

_patch_lock = threading.Lock()
_patch_users: dict = {}  # (module, attribute) -> [users, the original]


@contextlib.contextmanager
def _patched(module, attribute: str, replacement):
    """Inside, `module.attribute` is `replacement(original)`: installed by the first of any nested or
    concurrent users, restored by the last (Inductor compiles on whichever thread calls first). Later
    users share the first one's replacement, so every caller of one attribute passes the same one."""
    key = (module.__name__, attribute)
    with _patch_lock:
        if key not in _patch_users:
            original = getattr(module, attribute)
            _patch_users[key] = [0, original]
            setattr(module, attribute, replacement(original))
        _patch_users[key][0] += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_users[key][0] -= 1
            if _patch_users[key][0] == 0:
                setattr(module, attribute, _patch_users.pop(key)[1])


def _opaque_var_free_calls(index, var):
    """`index` with every function application that does not contain `var` (a FloorDiv of sizes, a
    ModularIndexing of an indirect load, ...) replaced by a fresh integer symbol, and the map back."""
    import sympy

    names: dict = {}

    def visit(expr):
        if expr.is_Atom or not expr.args:
            return expr
        if isinstance(expr, sympy.Function) and var not in expr.free_symbols:
            if expr not in names:
                names[expr] = sympy.Symbol(f"{var}_opaque{len(names)}", integer=True)
            return names[expr]
        args = [visit(a) for a in expr.args]
        return expr.func(*args) if any(n is not a for n, a in zip(args, expr.args)) else expr

    return visit(index), {symbol: expr for expr, symbol in names.items()}


def fast_stride_at_vec_range(original):
    """Inductor's `stride_at_vec_range(index, var, vec_length)` (the change in `index` when `var` steps by
    one inside a vector of `vec_length` lanes: a sympy expression), computed by `original` on a smaller
    expression: additive terms without `var` are dropped (they cannot change the stride) and
    var-free function applications become opaque symbols (they are lane-uniform: the analysis never
    looks inside them), mapped back in the result. The codegen takes the same decisions from it as from
    Inductor's own (tests/test_torch_compat.py checks every call of a dynamic compile); on all 766 calls
    of a SparseVLM engine's compile it was the same expression, term for term, in a fraction of the time."""
    import sympy

    @functools.lru_cache
    def stride(index, var, vec_length=None):
        small = index
        if isinstance(index, sympy.Add):
            var_free, with_var = index.as_independent(var, as_Add=True)
            if var_free != 0:
                small = with_var
        small, back = _opaque_var_free_calls(small, var)
        result = original(small, var, vec_length)
        return result.xreplace(back) if back else result

    stride.original = original
    return stride


@contextlib.contextmanager
def fast_cpp_stride_analysis():
    """Inside, Inductor's C++ codegen computes vector strides with fast_stride_at_vec_range (nested
    and thread-safe). lower.inductor holds it around every Inductor compile (AOTInductor packages,
    torch.compile calls)."""
    from torch._inductor.codegen import cpp

    with _patched(cpp, "stride_at_vec_range", fast_stride_at_vec_range):
        yield


@contextlib.contextmanager
def inductor_decompositions(table: dict):
    """Inside, Inductor's own trace (AOT autograd, `torch._inductor.compile_fx.select_decomp_table`,
    looked up at call time on 2.11 - 2.14) also applies the decompositions in `table` (op -> function).
    This lets AOTInductor lower the routing ops in its one trace of the program, where
    `ExportedProgram.run_decompositions` first would trace it a second time (tiny-qwen3-moe's
    Top-Kv + merge backbone: 28.0 s to package before, 24.3 s after, with the same ops left as calls).
    Nested or concurrent users share the first one's table (lower.inductor always passes
    ops.DECOMPOSITIONS)."""
    from torch._inductor import compile_fx

    def with_table(select):
        return lambda: {**select(), **table}

    with _patched(compile_fx, "select_decomp_table", with_table):
        yield


# --- torch.export.load: the deserializer's repeated type-hint and sympy-parse work ---------------------

class _CachedTypeHints:
    """The `typing` module as torch's serde sees it, with `get_type_hints` remembered per class: the
    deserializer asks it again for every object of a schema dataclass it rebuilds (pytorch issue
    #196452, open; in every release 2.11 - 2.14). Schema classes do not change while a program loads."""

    def __init__(self, typing_module):
        self._typing = typing_module
        self._hints: dict = {}

    def __getattr__(self, name):
        return getattr(self._typing, name)

    def get_type_hints(self, obj, globalns=None, localns=None, include_extras=False):
        key = (obj, id(globalns), id(localns), include_extras)
        hit = self._hints.get(key)
        if hit is not None and hit[0] is globalns and hit[1] is localns:
            return dict(hit[2])
        hints = self._typing.get_type_hints(obj, globalns, localns, include_extras)
        self._hints[key] = (globalns, localns, dict(hints))
        return hints


_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")  # a name in a size expression: s59, FloorDiv


class _CachedSympify:
    """The `sympy` module as torch's serde sees it, with `sympify` of a size expression remembered:
    every tensor's sizes and strides are stored as expression strings ("s59*s70", "s70 + 1"), parsed
    again for each node. A parse depends only on the string and what its identifiers name in `locals`
    (the program's symbols, sympy functions), and on sympy's evaluate/distribute flags, so all of these
    are the key; sympy expressions are immutable, so sharing one result is safe."""

    def __init__(self, sympy_module):
        self._sympy = sympy_module
        self._parsed: dict = {}

    def __getattr__(self, name):
        return getattr(self._sympy, name)

    def sympify(self, a, *args, locals=None, **kwargs):  # noqa: A002 - sympy's own parameter name
        if not isinstance(a, str) or args:
            return self._sympy.sympify(a, *args, locals=locals, **kwargs)
        names = dict.fromkeys(_IDENTIFIER.findall(a))
        try:
            flags = self._sympy.core.parameters.global_parameters  # per-thread defaults of evaluate=, distribute
            key = (a, tuple((n, (locals or {}).get(n)) for n in names), tuple(sorted(kwargs.items())),
                   flags.evaluate, flags.distribute)
            hit = self._parsed.get(key)
        except TypeError:  # an unhashable value in locals or kwargs: parse as sympy would
            return self._sympy.sympify(a, locals=locals, **kwargs)
        if hit is None:
            hit = self._parsed[key] = self._sympy.sympify(a, locals=locals, **kwargs)
        return hit


@contextlib.contextmanager
def fast_export_load():
    """Inside, torch.export.load (and anything else that deserializes an ExportedProgram through
    `torch._export.serde.serialize`) remembers the schema classes' type hints and the parses of size
    expressions instead of redoing them for every node. The program it builds is the same; the
    tiny-qwen3-moe export-backend engine (backbone + decode programs) loads in about 2/3 of the time.
    Nested or concurrent users share the first one's caches, dropped when the last one leaves."""
    from torch._export.serde import serialize

    with _patched(serialize, "typing", _CachedTypeHints), _patched(serialize, "sympy", _CachedSympify):
        yield

