"""The knobs of FastMMoE (docs/fastmmoe.md sections 1 and 2), validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

STRATEGIES = ("hybrid", "routing", "attention")
MERGE_METHODS = ("mlerp", "mean")


from .errors import ConfigError  # noqa: F401  (re-exported: config.ConfigError is its public name)


@dataclass(frozen=True)
class MergeStage:
    """One token-reduction stage (docs/fastmmoe.md 2.1-2.9): the one description of it that the passes,
    the merge op and the FLOPs count all read."""

    layer: int
    ratio: float  # share of the vision tokens this stage keeps
    merge_ratio: float
    window: int
    alpha: float
    strategy: str
    method: str
    use_router: bool = True  # FastV scores by attention alone
    compat: bool = False  # the authors' released code's counts and padding (docs/fastmmoe.md 2.11)

    def kernel_settings(self) -> dict:
        """The settings of fastmmoe::merge_tokens (algorithm.merge_stage), by name.
        Ratios travel in integer units so stage sizes stay exact symbolic expressions.
        `compat` is passed only when set, so default graphs (and their golden diffs) are unchanged."""
        from .algorithm import ratio_units

        settings = dict(ratio_q=ratio_units(self.ratio), merge_ratio_q=ratio_units(self.merge_ratio),
                        window=self.window, alpha=self.alpha, strategy=self.strategy, method=self.method)
        return settings | ({"compat": True} if self.compat else {})

    def vision_after(self, num_vision):
        """Vision tokens this stage leaves from `num_vision` (ints or SymInts), as the graph computes it."""
        from .algorithm import merge_vision_after, ratio_units

        return merge_vision_after(num_vision, ratio_units(self.ratio), ratio_units(self.merge_ratio), self.window,
                                  self.compat)


@dataclass(frozen=True)
class FastMMoEConfig:
    # Section 1: modality-conditioned expert activation (Top-K -> Top-Kv).
    reduce_from_layer: int = 2
    vision_expert_ratio: float = 0.5
    vision_topk: int | None = None  # explicit Kv; overrides vision_expert_ratio
    # Section 2: routing-aware token merging and pruning.
    merge_layers: tuple[int, ...] = ()
    keep_ratio: float = 1.0
    stage_ratios: tuple[float, ...] | None = None
    merge_ratio: float = 0.025
    window: int = 3
    alpha: float = 0.5
    strategy: str = "hybrid"
    merge_method: str = "mlerp"
    # docs/fastmmoe.md 2.11: the authors' released code where it differs from 2.1-2.9 (skip a stage whose
    # floor(T * merge_ratio) is 0, pad a partial window with the mean routing vector, T - floor(T*mr) + M).
    authors_compat: bool = False

    def __post_init__(self) -> None:
        # Accept lists / comma strings from Python users and the CLI alike.
        object.__setattr__(self, "merge_layers", _int_tuple(self.merge_layers, "merge_layers"))
        if self.stage_ratios is not None:
            object.__setattr__(self, "stage_ratios", _float_tuple(self.stage_ratios, "stage_ratios"))
        _check(self.reduce_from_layer >= 0, f"reduce_from_layer must be >= 0, got {self.reduce_from_layer}")
        _check(0.0 < self.vision_expert_ratio <= 1.0,
               f"vision_expert_ratio must be in (0, 1], got {self.vision_expert_ratio}")
        if self.vision_topk is not None:
            _check(self.vision_topk >= 1, f"vision_topk (Kv) must be >= 1, got {self.vision_topk}")
        _check(list(self.merge_layers) == sorted(set(self.merge_layers)),
               f"merge_layers must be strictly increasing, got {list(self.merge_layers)}")
        _check(all(layer >= 0 for layer in self.merge_layers), "merge_layers must be >= 0")
        _check(0.0 < self.keep_ratio <= 1.0, f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.stage_ratios is not None:
            _check(len(self.stage_ratios) == len(self.merge_layers),
                   f"stage_ratios has {len(self.stage_ratios)} entries for {len(self.merge_layers)} merge layers")
            _check(all(0.0 < r <= 1.0 for r in self.stage_ratios), "every stage ratio must be in (0, 1]")
        _check(0.0 <= self.merge_ratio <= 1.0, f"merge_ratio must be in [0, 1], got {self.merge_ratio}")
        _check(self.window >= 2, f"window must be >= 2, got {self.window}")
        _check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        _check(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        _check(self.merge_method in MERGE_METHODS,
               f"merge_method must be one of {MERGE_METHODS}, got {self.merge_method!r}")

    def kv(self, top_k: int) -> int:
        """Kv for a router that picks `top_k` experts (docs/fastmmoe.md section 1: max(1, floor(K * rho)),
        or vision_topk). ConfigError where vision_topk exceeds top_k: the one place that rule is."""
        from .algorithm import vision_topk

        if self.vision_topk is None:
            return vision_topk(top_k, self.vision_expert_ratio)
        _check(self.vision_topk <= top_k, f"vision_topk={self.vision_topk} exceeds the model's top-k ({top_k})")
        return self.vision_topk

    def vision_experts(self, layer: int, top_k: int) -> int:
        """Experts per vision token at decoder `layer` of a model whose routers pick `top_k`: Kv from
        reduce_from_layer on, K before it (docs/fastmmoe.md section 1). The pass (ModalityTopK) and the
        FLOPs count (methods.FastMMoE.vision_experts) both read this."""
        return self.kv(top_k) if layer >= self.reduce_from_layer else top_k

    def check_model(self, num_layers: int, top_k: int) -> None:
        """Checks that need the model: layer indices in range, Kv <= K."""
        _check(self.reduce_from_layer < num_layers,
               f"reduce_from_layer={self.reduce_from_layer} is out of range: the model has {num_layers} "
               f"decoder layers (0..{num_layers - 1})")
        bad = [layer for layer in self.merge_layers if layer >= num_layers]
        _check(not bad, f"merge_layers {bad} out of range: the model has {num_layers} decoder layers")
        self.kv(top_k)

    def stages(self) -> tuple[MergeStage, ...]:
        """The merge stages, one per merge layer, each keeping r = keep_ratio ** (1/n) (or its stage_ratios entry)."""
        from .algorithm import stage_ratios

        ratios = stage_ratios(self.keep_ratio, len(self.merge_layers), self.stage_ratios)
        return tuple(MergeStage(layer=layer, ratio=r, merge_ratio=self.merge_ratio, window=self.window,
                                alpha=self.alpha, strategy=self.strategy, method=self.merge_method,
                                compat=self.authors_compat)
                     for layer, r in zip(self.merge_layers, ratios))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["merge_layers"] = list(self.merge_layers)
        d["stage_ratios"] = None if self.stage_ratios is None else list(self.stage_ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FastMMoEConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - names
        _check(not unknown, f"unknown FastMMoEConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class FastVConfig:
    """The FastV baseline (docs/fastmmoe.md section 5): at `prune_layer`, keep the `keep_ratio` share of
    vision tokens with the highest last-token attention; original positions kept."""

    prune_layer: int = 2
    keep_ratio: float = 0.5

    def __post_init__(self) -> None:
        _check(self.prune_layer >= 0, f"prune_layer must be >= 0, got {self.prune_layer}")
        _check(0.0 < self.keep_ratio <= 1.0, f"keep_ratio must be in (0, 1], got {self.keep_ratio}")

    def check_model(self, num_layers: int, top_k: int) -> None:
        _check(self.prune_layer < num_layers,
               f"prune_layer={self.prune_layer} is out of range: the model has {num_layers} decoder layers")

    def stages(self) -> tuple[MergeStage, ...]:
        """FastV as one stage: prune by last-token attention only, merging nothing."""
        return (MergeStage(layer=self.prune_layer, ratio=self.keep_ratio, merge_ratio=0.0, window=2, alpha=0.0,
                           strategy="attention", method="mean", use_router=False),)

    def to_dict(self) -> dict:
        return {"method": "fastv", "prune_layer": self.prune_layer, "keep_ratio": self.keep_ratio}


@dataclass(frozen=True)
class SparseVLMStage:
    """One SparseVLM stage (docs/fastmmoe.md 5.2): what its pass, kernel and FLOPs count read."""

    layer: int
    ratio: float  # share of the vision tokens this stage leaves (kept + recycled)
    recycle_ratio: float
    cluster_ratio: float
    first: bool = False  # the first stage also chooses the raters (once, from the input embeddings)
    use_router: bool = False  # rated by attention: no router clone

    def kernel_settings(self) -> dict:
        """The settings of fastmmoe::sparsevlm_tokens (sparsevlm_math.sparsevlm_stage), in integer units."""
        from .algorithm import ratio_units

        return dict(ratio_q=ratio_units(self.ratio), recycle_q=ratio_units(self.recycle_ratio),
                    cluster_q=ratio_units(self.cluster_ratio))

    def vision_after(self, num_vision):
        """Vision tokens this stage leaves: min(N, max(1, floor(N*r))), as the graph computes it."""
        from .algorithm import ratio_units, vision_after_stage

        return vision_after_stage(num_vision, ratio_units(self.ratio))


@dataclass(frozen=True)
class SparseVLMConfig:
    """The SparseVLM baseline (Zhang et al., arXiv 2410.04417; docs/fastmmoe.md 5.2): at each of
    `prune_layers`, text raters rate the vision tokens by attention; the best-rated stay, and the
    `recycle_ratio` best-rated of the deleted ones are clustered into about `cluster_ratio` times as
    many aggregated tokens. Each stage leaves keep_ratio ** (1/n) of the vision tokens it receives
    (kept + recycled), so after the last one about `keep_ratio` remain, as for FastMMoE.

    Defaults are the authors' (Gumpest/SparseVLMs): layers 2, 6, 15 (of LLaVA-1.5-7B's 32), recycle
    the top 30 % of the deleted tokens into int(R / 10) + 1 clusters."""

    prune_layers: tuple[int, ...] = (2, 6, 15)
    keep_ratio: float = 0.5
    recycle_ratio: float = 0.3
    cluster_ratio: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "prune_layers", _int_tuple(self.prune_layers, "prune_layers"))
        _check(len(self.prune_layers) > 0, "prune_layers must name at least one layer")
        _check(list(self.prune_layers) == sorted(set(self.prune_layers)),
               f"prune_layers must be strictly increasing, got {list(self.prune_layers)}")
        _check(all(layer >= 0 for layer in self.prune_layers), "prune_layers must be >= 0")
        _check(0.0 < self.keep_ratio <= 1.0, f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        _check(0.0 < self.recycle_ratio <= 1.0, f"recycle_ratio must be in (0, 1], got {self.recycle_ratio}")
        _check(0.0 < self.cluster_ratio <= 1.0, f"cluster_ratio must be in (0, 1], got {self.cluster_ratio}")

    @classmethod
    def for_model(cls, num_layers: int, **fields) -> "SparseVLMConfig":
        """The paper's layers that a model of `num_layers` decoder layers has (at least layer
        num_layers - 1), e.g. 2 and 6 of a 12-layer model; the benchmark's rows on shortened models."""
        layers = [layer for layer in cls.prune_layers if layer < num_layers] or [num_layers - 1]
        return cls(prune_layers=tuple(layers), **fields)

    def check_model(self, num_layers: int, top_k: int) -> None:
        bad = [layer for layer in self.prune_layers if layer >= num_layers]
        _check(not bad, f"prune_layers {bad} out of range: the model has {num_layers} decoder layers "
                        f"(the paper's 2,6,15 are for 32-layer LLaVA; pass layers that exist)")

    def stages(self) -> tuple[SparseVLMStage, ...]:
        from .algorithm import stage_ratios

        ratios = stage_ratios(self.keep_ratio, len(self.prune_layers))
        return tuple(SparseVLMStage(layer=layer, ratio=r, recycle_ratio=self.recycle_ratio,
                                    cluster_ratio=self.cluster_ratio, first=i == 0)
                     for i, (layer, r) in enumerate(zip(self.prune_layers, ratios)))

    def to_dict(self) -> dict:
        return {"method": "sparsevlm", "prune_layers": list(self.prune_layers), "keep_ratio": self.keep_ratio,
                "recycle_ratio": self.recycle_ratio, "cluster_ratio": self.cluster_ratio}


# The authors' settings (docs/fastmmoe.md section 3, where each number comes from), at 75 / 50 / 25 %
# overall vision-token retention.
CONFIG_PRESETS = {
    "internvl3.5-30b-a3b": dict(reduce_from_layer=2, vision_expert_ratio=0.5, merge_layers=(5, 8, 12),
                                merge_ratio=0.025, window=3, alpha=0.5, strategy="hybrid", merge_method="mlerp"),
    "deepseek-vl2-small": dict(reduce_from_layer=2, vision_expert_ratio=0.5, merge_layers=(2, 5, 8),
                               merge_ratio=0.05, window=3, alpha=0.3, strategy="hybrid", merge_method="mlerp"),
}


# Per-stage ratios the authors write as literals, by overall retention (both presets alike). 75 %: their
# script yifu-ding/Multimodal-MoE-Slimming scripts/run_fastmmoe_maes_calib_and_eval.sh sets
# KEEP_TOKEN_RATIO=0.91,0.91,0.91 for deepseek-vl2-small and internvl3_5-30b-a3b-hf (0.91^3 = 0.7536).
# No literal for 50 % or 25 % was found in any public script or in the paper: those keep
# keep_ratio ** (1/3) (docs/fastmmoe.md section 3 says so).
AUTHORS_STAGE_RATIOS = {0.75: (0.91, 0.91, 0.91)}


def config_preset(name: str, keep_ratio: float = 0.75, **overrides) -> FastMMoEConfig:
    """The authors' configuration for a model, e.g. config_preset("internvl3.5-30b-a3b", keep_ratio=0.5).

    At a retention the authors wrote per-stage literals for (AUTHORS_STAGE_RATIOS: 0.75 -> 0.91 per stage)
    the stages use those literals; any other keep_ratio gives keep_ratio ** (1/3) per stage. An explicit
    stage_ratios override wins. Raises ConfigError for an unknown name."""
    if name not in CONFIG_PRESETS:
        raise ConfigError(f"unknown config preset {name!r}; known: {', '.join(CONFIG_PRESETS)}")
    fields = {**CONFIG_PRESETS[name], "keep_ratio": keep_ratio, **overrides}
    literal = AUTHORS_STAGE_RATIOS.get(keep_ratio)
    if literal is not None and fields.get("stage_ratios") is None \
            and len(literal) == len(FastMMoEConfig(merge_layers=fields["merge_layers"]).merge_layers):
        fields["stage_ratios"] = literal
    return FastMMoEConfig(**fields)


def config_fields() -> list[dataclasses.Field]:
    """The user-facing fields, in declaration order (the CLI makes one flag of each)."""
    return [f for f in dataclasses.fields(FastMMoEConfig) if f.init]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _int_tuple(v, name) -> tuple[int, ...]:
    return _number_tuple(v, name, int, "integers")


def _float_tuple(v, name) -> tuple[float, ...]:
    return _number_tuple(v, name, float, "numbers")


def _number_tuple(v, name, cast, kind) -> tuple:
    """A tuple from a list, a tuple, or a comma-separated string (the CLI's form)."""
    if isinstance(v, str):
        v = [x for x in v.replace(" ", "").split(",") if x]
    try:
        return tuple(cast(x) for x in v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a list of {kind}, got {v!r}") from None
