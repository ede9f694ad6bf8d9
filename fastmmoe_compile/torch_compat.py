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
- `torch.__version__` as the rest of the package sees it (`torch_version`, `supported`).
"""
from __future__ import annotations

import contextlib

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
    Used to export a backbone once and rewrite it for several configurations (api.rewrite_each)."""
    import copy

    graph_module = torch.fx.GraphModule(program.graph_module, copy.deepcopy(program.graph_module.graph))
    graph_module.meta.update(program.graph_module.meta)
    return program._update(graph_module, copy.deepcopy(program.graph_signature))
