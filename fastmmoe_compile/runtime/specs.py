"""Family-specific backbone inputs, declared as data.

Every engine's prefill backbone takes (inputs_embeds [B, S, H], vision_positions [B, N]); some
families take more after them (Qwen3-VL's 3D rotary positions and per-layer visual features, GLM-4.5V's
3D positions). Each such input is one InputSpec, declared by its family (the front end in
runtime/frontends/, which the compile-time adapter in models/ reuses). The spec goes into the
manifest (model.input_specs), so export (example inputs, dynamic axes), lowering and the runtime
(argument checks, defaults, batching, decode continuation) all read it, and none of them names
a family's input.

An input written by an older compiler (a format-2 manifest with model.extra_inputs but no
model.input_specs) is looked up by name among the specs the front ends register (known_spec).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BATCH, SEQUENCE = "B", "S"  # the dynamic dims: samples, and tokens (what a merge or a prune drops)
DTYPES = ("int64", "float")  # float: the engine's floating dtype
ABSENT = ("zeros", "arange")
DECODE = (None, "max+1")
FOLLOWS = ("tokens",)


class InputSpecError(ValueError):
    """A spec that does not describe an input the pipeline can carry (a bad declaration or manifest)."""


@dataclass(frozen=True)
class InputSpec:
    """One extra input of the prefill backbone.

    dims: the shape by name: "B" (batch) and "S" (sequence) are the dynamic dims, an int is a fixed
      size, any other name takes its size from a model fact (`sizes`), e.g. ("D", "B", "S", "H").
    dtype: "int64", or "float" (the engine's floating dtype).
    sizes: (dim name, model fact) pairs, e.g. (("H", "hidden_size"),): the fact is a positive int of
      the manifest's model section (LoadedModel.describe()).
    follows: "tokens": the input is indexed by token along S, so where a merge or FastV stage drops
      tokens it follows the kept ones (the passes gather every sequence-indexed value: a kept token
      keeps its own value, a merged token its window's first token's).
    absent: the value when the caller gives none (a text-only prompt): "zeros", or "arange"
      (0..S-1 along S, the same on every other axis: plain positions).
    decode: None (prefill only), or "max+1": the input holds the prompt's rotary positions, and decode
      continues at their largest (over all but B) + 1, per sample (transformers' rope deltas).
    """

    name: str
    dims: tuple
    dtype: str
    sizes: tuple = ()
    follows: str = "tokens"
    absent: str = "zeros"
    decode: str | None = None
    doc: str = ""

    def __post_init__(self):
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "sizes", tuple(tuple(p) for p in self.sizes))
        problems = []
        if not isinstance(self.name, str) or not self.name.isidentifier() or \
                self.name in ("inputs_embeds", "vision_positions"):
            problems.append(f"name {self.name!r} is not a new identifier")
        if list(self.dims).count(BATCH) != 1 or list(self.dims).count(SEQUENCE) != 1:
            problems.append(f"dims {list(self.dims)} must hold {BATCH!r} and {SEQUENCE!r} once each")
        named = dict(self.sizes)
        for d in self.dims:
            if not (isinstance(d, str) and (d in (BATCH, SEQUENCE) or d in named)) and \
                    not (isinstance(d, int) and not isinstance(d, bool) and d >= 0):
                problems.append(f"dim {d!r} is neither B, S, a size >= 0 nor named in sizes")
        if any(not (isinstance(k, str) and isinstance(v, str)) for k, v in self.sizes):
            problems.append(f"sizes {self.sizes!r} must be (dim, model fact) pairs of strings")
        for field, value, legal in (("dtype", self.dtype, DTYPES), ("follows", self.follows, FOLLOWS),
                                    ("absent", self.absent, ABSENT), ("decode", self.decode, DECODE)):
            if value not in legal:
                problems.append(f"{field} {value!r} is not one of {legal}")
        if self.decode == "max+1" and self.dtype != "int64":
            problems.append("decode 'max+1' needs int64 positions")
        if problems:
            raise InputSpecError(f"input spec {self.name!r}: " + "; ".join(problems))

    # --- the manifest's form ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"name": self.name, "dims": list(self.dims), "dtype": self.dtype, "sizes": dict(self.sizes),
                "follows": self.follows, "absent": self.absent, "decode": self.decode, "doc": self.doc}

    @classmethod
    def from_dict(cls, d) -> InputSpec:
        """The spec of a manifest entry; InputSpecError when it is not one."""
        if not isinstance(d, dict) or not isinstance(d.get("dims"), list) or \
                not isinstance(d.get("sizes", {}), dict):
            raise InputSpecError(f"input spec {d!r} is not an object with name, dims, dtype, sizes, ...")
        fields = {"name", "dims", "dtype", "sizes", "follows", "absent", "decode", "doc"}
        if set(d) - fields:
            raise InputSpecError(f"input spec {d.get('name')!r}: unknown fields {sorted(set(d) - fields)}")
        return cls(**{**d, "dims": tuple(d["dims"]), "sizes": tuple(d.get("sizes", {}).items())})

    # --- shapes ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """runtime.inputs.tensor_arg's dtype kind."""
        return "integer" if self.dtype == "int64" else "floating-point"

    def torch_dtype(self, float_dtype: torch.dtype) -> torch.dtype:
        return torch.long if self.dtype == "int64" else float_dtype

    @property
    def batch_axis(self) -> int:
        return self.dims.index(BATCH)

    @property
    def sequence_axis(self) -> int:
        return self.dims.index(SEQUENCE)

    def facts(self) -> tuple[str, ...]:
        """The model facts the shape needs."""
        return tuple(v for _, v in self.sizes)

    def shape(self, batch: int | None, seq: int, facts: dict) -> tuple[int, ...]:
        """The concrete shape for `batch` samples of `seq` tokens (batch None: one sample's, without
        the B dim); facts: the model's (manifest model section)."""
        named = dict(self.sizes)
        out = []
        for d in self.dims:
            if d == BATCH:
                if batch is not None:
                    out.append(batch)
            elif d == SEQUENCE:
                out.append(seq)
            else:
                out.append(d if isinstance(d, int) else int(facts[named[d]]))
        return tuple(out)

    def names(self, per_sample: bool = False) -> str:
        """The shape by names, for messages: "[3, B, S]" ("[3, S]" per sample)."""
        return "[" + ", ".join(str(d) for d in self.dims if not (per_sample and d == BATCH)) + "]"

    # --- values ----------------------------------------------------------------------------
    def absent_value(self, batch: int | None, seq: int, facts: dict, float_dtype: torch.dtype) -> torch.Tensor:
        """The value when none is given (a text-only prompt)."""
        shape = self.shape(batch, seq, facts)
        if self.absent == "zeros":
            return torch.zeros(shape, dtype=self.torch_dtype(float_dtype))
        axis = self.sequence_axis - (1 if batch is None and self.batch_axis < self.sequence_axis else 0)
        view = [1] * len(shape)
        view[axis] = seq
        return torch.arange(seq).reshape(view).expand(shape)

    def next_positions(self, value: torch.Tensor) -> torch.Tensor | None:
        """decode "max+1": each sample's first decode position, [B] int64, from the batched value; else None."""
        if self.decode != "max+1":
            return None
        return value.amax(dim=tuple(i for i in range(value.dim()) if i != self.batch_axis)) + 1


# Specs the front ends declare, by name: read for a manifest that lists extra_inputs by name only.
_KNOWN: dict[str, InputSpec] = {}


def register_input(spec: InputSpec) -> InputSpec:
    """Make `spec` known by name (for manifests written before input specs); returns it."""
    _KNOWN[spec.name] = spec
    return spec


def known_names() -> tuple[str, ...]:
    return tuple(_KNOWN)


def known_spec(name: str) -> InputSpec | None:
    return _KNOWN.get(name)


def specs_of(model: dict) -> tuple[InputSpec, ...]:
    """The extra backbone inputs of an engine, in order, from its manifest's model section:
    model.input_specs, or for an older manifest the known specs of the names in model.extra_inputs.
    Raises InputSpecError for an entry that is neither (check_manifest says which field)."""
    if model.get("input_specs") is not None:
        entries = model["input_specs"]
        if not isinstance(entries, list):
            raise InputSpecError(f"input_specs {entries!r} is not a list")
        return tuple(InputSpec.from_dict(d) for d in entries)
    out = []
    for name in model.get("extra_inputs", []):
        spec = known_spec(name) if isinstance(name, str) else None
        if spec is None:
            raise InputSpecError(f"unknown input {name!r}")
        out.append(spec)
    return tuple(out)
