"""Turn what the user names (a model object, a checkpoint dir, a hub id, a preset) into a model."""
from __future__ import annotations

import difflib
import os

import torch

from ..errors import UnknownModelError
from .families import (  # noqa: F401  (re-exported: the rest of the package names them from here)
    FAMILIES, VLM_FAMILIES, LoadedModel, UnsupportedModelError, family_for, load_vlm,
)
from .loading import one_host_copy
from .presets import PRESETS
from .vlm import VLMFamily


def load_model(model_or_path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               *, weights: bool = True) -> LoadedModel:
    """A PreTrainedModel, a preset name, a local checkpoint directory, or a hub id, with its
    weights in `dtype` on `device` (None: the checkpoint's dtype, the CPU). Checkpoints load
    straight to the device and dtype (transformers' meta initialisation and device_map; the
    DeepSeek-VL2 adapter likewise): never a full fp32 copy on the host first. Random presets are
    built on the CPU (the same seed gives the same weights on every device) and then moved.
    weights=False: for what needs shapes only (diff, flops), a checkpoint directory holding a
    config.json and no weights is built from that config on the meta device (bfloat16 unless
    `dtype`), for every supported family; with weights=True (compile) it is a FileNotFoundError."""
    from transformers import PreTrainedModel

    device = None if device is None else torch.device(device)
    if isinstance(model_or_path, PreTrainedModel):
        param = next(model_or_path.parameters())
        own = param.dtype
        if dtype is not None and dtype != own:  # .to() would convert the user's object in place
            raise ValueError(f"dtype={dtype} for an in-memory {own} model: convert it first (model.to({dtype})); "
                             "the compiler does not change the model object it is given")
        if device is not None and device.type != param.device.type:
            raise ValueError(f"device={device.type!r} for an in-memory model on {param.device.type}: move it first "
                             f"(model.to({device.type!r})); the compiler does not change the model object it is given")
        if getattr(model_or_path.config, "model_type", None) in VLM_FAMILIES:
            return load_vlm(model_or_path, "<in-memory model>")
        lm = model_or_path
        family = family_for(lm.config)
        _check_causal_lm(lm)
        return LoadedModel(lm, family, "<in-memory model>")
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a PreTrainedModel, a path, a hub id or a preset name, got {type(model_or_path)}")
    name = os.fspath(model_or_path)
    if name in PRESETS:
        loaded = PRESETS[name].build(dtype=dtype)
        if device is not None and not loaded.on_meta:
            (loaded.vision.model if loaded.vision is not None else loaded.lm).to(device)
        return loaded
    if not weights and _config_only(name):
        return _from_config(name, dtype)
    check_model_name(name)
    return _from_pretrained(name, dtype, device)


def _config_only(name: str) -> bool:
    if not os.path.isdir(name):
        return False
    files = os.listdir(name)
    return "config.json" in files and not any(f.endswith(WEIGHT_SUFFIXES) for f in files)


def _from_config(name: str, dtype) -> LoadedModel:
    """A shape-only model (meta device) of a checkpoint directory's config.json, as the real-size
    presets are built (presets.Preset.build)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or torch.bfloat16
    own = _own_format(name)
    if own is not None:  # DeepSeek-VL2: its adapter reads the official config.json
        config = own.read_config(name)
        family_for(own.text_config(config))
        with torch.device("meta"):
            model = own.random_model(config, dtype)
        return load_vlm(model.eval(), name)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnsupportedModelError(f"{name}/config.json cannot be read as a transformers config: {reason}") from e
    if config.model_type in VLM_FAMILIES:
        family = VLM_FAMILIES[config.model_type]
        family_for(family.text_config(config))
        with torch.device("meta"):
            model = family.random_model(config, dtype)
        return load_vlm(model.eval(), name)
    family = family_for(config)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return LoadedModel(lm.eval(), family, name)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_model_name(name: str) -> None:
    """Fail fast (no hub round trip, no config read) on a name that is not a preset, not a
    checkpoint directory and not a hub id (org/name): a mistyped preset, most likely."""
    if name in PRESETS:
        return
    if os.path.isdir(name):
        files = os.listdir(name)
        if "config.json" not in files:
            raise FileNotFoundError(f"{name} is not a checkpoint directory: it has no config.json")
        if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
            raise FileNotFoundError(f"{name} has a config.json but no weights (no *.safetensors or *.bin file)")
        return
    if os.path.exists(name):
        raise FileNotFoundError(f"{name} is a file, not a checkpoint directory")
    if os.path.sep in name.rstrip("/").split("/", 1)[-1] or name.startswith((".", "/")):
        raise FileNotFoundError(f"no checkpoint directory at {name!r}")
    if "/" not in name:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UnknownModelError(f"unknown preset {name!r}; {hint}(fastmmoe-compile presets lists them; "
                         "a hub model is org/name, a checkpoint a directory)")


def _placement(device) -> dict:
    """from_pretrained's keywords for `device`: device_map puts each weight there as it is read."""
    return {} if device is None or device.type == "cpu" else {"device_map": str(device)}


def _from_pretrained(name: str, dtype, device=None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    own = _own_format(name)
    if own is not None:  # a VLM transformers cannot load: its adapter reads the official layout
        model, tokenizer, image_processor = own.load_checkpoint(name, dtype, device=device)
        return load_vlm(model, name, tokenizer, image_processor)
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:  # one line: transformers' message runs over several
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(f"could not load a config for {name!r} from the hub (no such model, or the hub "
                                f"is not reachable): {reason}") from e
    if config.model_type in VLM_FAMILIES:
        return _vlm_from_pretrained(name, config, dtype, device)
    family = family_for(config)  # fail before reading any weights
    with one_host_copy(device):  # models/loading.py: about 1x the checkpoint in peak RSS, not 2x
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", attn_implementation="sdpa",
                                                  **_placement(device))
    _check_causal_lm(lm)
    return LoadedModel(lm, family, name)


def _own_format(name: str) -> VLMFamily | None:
    """The VLM family of a local checkpoint whose model_type transformers does not know, else None."""
    import json

    config = os.path.join(name, "config.json")
    if not os.path.isfile(config):
        return None
    try:
        model_type = json.loads(open(config, encoding="utf-8").read()).get("model_type")
    except (ValueError, AttributeError):
        return None  # AutoConfig gives the error
    family = VLM_FAMILIES.get(model_type)
    return family if family is not None and not family.native else None


def _check_causal_lm(lm) -> None:
    if not (hasattr(lm, "model") and hasattr(lm, "lm_head")):
        raise UnsupportedModelError(
            f"{type(lm).__name__} is not a *ForCausalLM with .model and .lm_head; pass the language model"
        )


def _vlm_from_pretrained(name: str, config, dtype, device=None) -> LoadedModel:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    family_for(VLM_FAMILIES[config.model_type].text_config(config))  # fail before reading any weights
    with one_host_copy(device):
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype or "auto", attn_implementation="sdpa",
                                                            **_placement(device))
    # The engine carries the input side; a checkpoint without it still exports, diffs and counts FLOPs.
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        image_processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        tokenizer = image_processor = None
    return load_vlm(model, name, tokenizer, image_processor)
