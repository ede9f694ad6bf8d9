"""DeepSeek-VL2 (`deepseek_vl_v2`, deepseek-ai/deepseek-vl2-*): a SigLIP ViT + a 2x2-downsampling MLP
projector + dynamic tiling in front of a DeepSeek-V2 MoE language model.

transformers has no `deepseek_vl_v2`, and the official code needs trust_remote_code, timm, xformers
and torchvision; so this file reads the official checkpoint layout itself (config.json with
vision_config / projector_config / language_config, weights vision.* / projector.layers.* /
image_newline / view_seperator / language.*) onto transformers modules:
- the timm-style ViT -> SiglipVisionModel (fused qkv split into q/k/v, pos_embed -> an Embedding,
  final norm -> post_layernorm; the unused attention-pool head is dropped: the official
  model runs with ignore_head=True);
- language.* -> the transformers model computing the variant's language model (per-expert weights
  stacked into its fused expert tensors; deepseek_vl2_language.py): DeepseekV2ForCausalLM (Small),
  DeepseekV3ForCausalLM (the flagship: sigmoid + correction-bias routing), DeepseekOcr2Text + lm_head
  (Tiny: multi-head attention).

Input side, as the official DeepseekVLV2Processor (processing_deepseek_vl_v2.py) does it:
- chat: "<|User|>: {prompt}\\n\\n<|Assistant|>:" after BOS (conversation template "deepseek");
- tiles: a global view (the image padded to one tile, colour = mean) then local tiles of the
  candidate resolution select_best_resolution picks (only when the prompt has <= 2 images);
  pixels normalised with mean = std = 0.5;
- tokens per image: h(w+1) global + 1 separator + (th h)(tw w + 1) local, h = w = the projector's
  tokens per side; the features are laid out in that order with image_newline ending every row.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..runtime.frontends.deepseek_vl2 import (  # noqa: F401  (the front end's names, re-exported)
    ASSISTANT, BOS, EOS, GROUNDING, IMAGE, MODEL_TYPE, PAD, PROCESSOR_FILE, USER, DeepseekVL2FrontEnd, ImageProcessor,
    complete_tokenizer, image_tokens, layout_index, select_best_resolution,
)
from .vlm import VLMFamily

WEIGHTS_FILE = "model.safetensors"


class Config:
    """The official config.json, checked and read; `raw` is written back unchanged."""

    def __init__(self, raw: dict, image_token_id: int | None = None):
        from . import deepseek_vl2_language as language

        if raw.get("model_type") != MODEL_TYPE:
            raise UnsupportedModelError(f"not a {MODEL_TYPE} config: model_type {raw.get('model_type')!r}")
        self.raw, self.model_type = raw, MODEL_TYPE
        v, p, lang = raw.get("vision_config", {}), raw.get("projector_config", {}), raw.get("language_config", {})
        # Defaults are the official config classes' (VisionEncoderConfig, MlpProjectorConfig).
        self.image_size, self.patch_size = int(v.get("image_size", 384)), int(v.get("patch_size", 16))
        self.width, self.layers = int(v.get("width", 1024)), int(v.get("layers", 24))
        self.heads, self.mlp_ratio = int(v.get("heads", 16)), float(v.get("mlp_ratio", 4))
        self.projector_type = p.get("projector_type", "downsample_mlp_gelu")
        self.input_dim, self.n_embed = int(p.get("input_dim", 1152)), int(p.get("n_embed", 2048))
        self.depth, self.proj_ratio = int(p.get("depth", 2)), int(p.get("mlp_ratio", 1))
        self.downsample_ratio = int(p.get("downsample_ratio", 2))
        self.tile_tag = raw.get("tile_tag", "tile_tag")
        self.global_view_pos = raw.get("global_view_pos", "head")
        self.candidate_resolutions = [[int(a), int(b)] for a, b in raw.get("candidate_resolutions", [[384, 384]])]
        unsupported = {
            "vision_config.class_token": v.get("class_token", False) is not False,
            "vision_config.ignore_head": v.get("ignore_head", True) is not True,
            "projector_config.token_pooling": bool(p.get("token_pooling", False)),
            f"projector_type {self.projector_type!r} (only downsample_mlp_gelu)": self.projector_type != "downsample_mlp_gelu",
            f"tile_tag {self.tile_tag!r} (only 2D)": self.tile_tag != "2D",
            f"global_view_pos {self.global_view_pos!r}": self.global_view_pos not in ("head", "tail"),
            "vision width != projector input_dim": self.width != self.input_dim,
        }
        bad = [k for k, is_bad in unsupported.items() if is_bad]
        if bad:
            raise UnsupportedModelError(f"unsupported DeepSeek-VL2 config: {', '.join(bad)}")
        # DeepseekV2 (Small), DeepseekV3 (the flagship) or DeepseekOcr2Text (Tiny): deepseek_vl2_language.py
        self.text_config = language.text_config(lang)
        if int(self.text_config.hidden_size) != self.n_embed:
            raise UnsupportedModelError(f"projector n_embed {self.n_embed} != language hidden_size {self.text_config.hidden_size}")
        self.image_token_id = image_token_id

    @property
    def side(self) -> int:
        """Tokens per tile side after the projector's 2x2 (downsample_ratio) pooling."""
        return math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)

    def siglip(self):
        from transformers import SiglipVisionConfig

        # timm's ViT as the official code builds it: LayerNorm eps 1e-6, GELU(tanh), qkv bias, final norm.
        c = SiglipVisionConfig(hidden_size=self.width, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                               intermediate_size=int(self.width * self.mlp_ratio), image_size=self.image_size,
                               patch_size=self.patch_size, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                               vision_use_head=False)
        c._attn_implementation = "sdpa"
        return c


class Projector(nn.Module):
    """downsample_mlp_gelu: pad the token grid to a multiple of r, concatenate each r x r block
    (channel-major, as F.unfold orders it), then Linear (GELU Linear) x depth-1."""

    def __init__(self, c: Config):
        super().__init__()
        self.r = c.downsample_ratio
        hidden = c.n_embed * c.proj_ratio
        layers = [nn.Linear(c.input_dim * self.r * self.r, hidden)]
        for _ in range(1, c.depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        layers += [nn.GELU(), nn.Linear(hidden, c.n_embed)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, hw, dim = x.shape
        side, r = math.isqrt(hw), self.r
        pad = -side % r
        x = nn.functional.pad(x.reshape(b, side, side, dim), (0, 0, 0, pad, 0, pad))
        n = (side + pad) // r
        # reshape/permute form of F.unfold(kernel=stride=r): no im2col in the exported graph
        x = x.reshape(b, n, r, n, r, dim).permute(0, 1, 3, 5, 2, 4).reshape(b, n * n, dim * r * r)
        return self.layers(x)


class DeepseekVL2(nn.Module):
    """The official model's modules, under the official names (vision, projector, image_newline,
    view_seperator, language), so the official weights load by name."""

    def __init__(self, config: Config):
        from transformers import SiglipVisionModel

        from .deepseek_vl2_language import causal_lm_class

        super().__init__()
        self.config = config
        self.vision = SiglipVisionModel(config.siglip())
        self.projector = Projector(config)
        std = config.n_embed ** -0.5
        self.image_newline = nn.Parameter(torch.randn(config.n_embed) * std)
        self.view_seperator = nn.Parameter(torch.randn(config.n_embed) * std)  # sic: the official name
        self.language = causal_lm_class(config.text_config)(config.text_config)

    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors in the official layout and names."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.raw, indent=2))
        state = to_official(self.state_dict())
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


# --- official weight names <-> ours --------------------------------------------------
_VIT = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# Whole-module renames (official prefix -> ours), used in both directions.
_PREFIXES = {"vision.patch_embed.proj.": "vision.embeddings.patch_embedding.", "vision.norm.": "vision.post_layernorm."}


def _rename_prefix(name: str, table: dict) -> str | None:
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old):]
    return None


def from_official(state: dict) -> dict:
    """Official names -> ours (q/k/v split, experts stacked); anything unknown is an error."""
    out, experts, unknown = {}, {}, []
    for name, t in state.items():
        if name.startswith("vision.attn_pool."):
            continue  # the pooling head; the official model runs with ignore_head=True
        if name in ("image_newline", "view_seperator") or name.startswith("projector.layers."):
            out[name] = t
        elif name == "vision.pos_embed":
            out["vision.embeddings.position_embedding.weight"] = t.reshape(t.shape[-2], t.shape[-1])
        elif (ours := _rename_prefix(name, _PREFIXES)) is not None:
            out[ours] = t
        elif name.startswith("vision.blocks."):
            i, rest = name[len("vision.blocks."):].split(".", 1)
            layer = f"vision.encoder.layers.{i}."
            module, kind = rest.rsplit(".", 1)
            if module == "attn.qkv":
                for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{part}_proj.{kind}"] = chunk
            elif module in _VIT:
                out[f"{layer}{_VIT[module]}.{kind}"] = t
            else:
                unknown.append(name)
        elif name.startswith("language."):
            name = name[len("language."):]
            if ".mlp.experts." in name:  # model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight
                prefix, rest = name.split(".mlp.experts.", 1)
                e, proj, _ = rest.split(".")
                experts.setdefault(prefix, {}).setdefault(proj, {})[int(e)] = t
            else:
                out["language." + name] = t
        else:
            unknown.append(name)
    if unknown:
        raise UnsupportedModelError(f"unexpected weights in the checkpoint (not the official DeepSeek-VL2 layout?): {unknown[:5]}")
    for prefix, projs in experts.items():
        stack = {k: torch.stack([v[e] for e in sorted(v)]) for k, v in projs.items()}
        out[f"language.{prefix}.mlp.experts.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)
        out[f"language.{prefix}.mlp.experts.down_proj"] = stack["down_proj"]
    return out


def to_official(state: dict) -> dict:
    """Ours -> official names: what a deepseek-vl2 checkpoint holds."""
    out = {}
    back = {v: k for k, v in _VIT.items()}
    for name, t in state.items():
        if name.startswith("vision.embeddings.position_ids"):
            continue
        if name == "vision.embeddings.position_embedding.weight":
            out["vision.pos_embed"] = t[None]
        elif (official := _rename_prefix(name, {v: k for k, v in _PREFIXES.items()})) is not None:
            out[official] = t
        elif name.startswith("vision.encoder.layers."):
            i, rest = name[len("vision.encoder.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module.endswith("q_proj"):
                    qkv = [state[f"vision.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"vision.blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv)
            else:
                out[f"vision.blocks.{i}.{back[module]}.{kind}"] = t
        elif name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len(".mlp.experts.gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            down = state[prefix + ".mlp.experts.down_proj"]
            for e in range(t.shape[0]):
                for proj, w in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e])):
                    out[f"{prefix}.mlp.experts.{e}.{proj}.weight"] = w
        elif name.endswith(".mlp.experts.down_proj"):
            continue
        else:
            out[name] = t
    return out


# --- the exported vision encoder -------------------------------------------------------
class Encoder(nn.Module):
    """pixel tiles [T, 3, s, s] -> (projected features [T, side*side, H], [image_newline, view_seperator]).
    The tile layout (which needs each image's tile grid) runs on the host: Family.arrange."""

    def __init__(self, model: DeepseekVL2):
        super().__init__()
        self.vision, self.projector = model.vision, model.projector
        self.image_newline, self.view_seperator = model.image_newline, model.view_seperator

    def forward(self, pixel_values: torch.Tensor):
        features = self.projector(self.vision(pixel_values=pixel_values).last_hidden_state)
        return features, torch.stack([self.image_newline, self.view_seperator])


class DeepseekVL2Family(DeepseekVL2FrontEnd, VLMFamily):
    native = False  # not a transformers model type: read with load_checkpoint

    def text_config(self, config):
        return config.text_config

    def causal_lm(self, model) -> nn.Module:
        return model.language.eval()  # already a *ForCausalLM over the checkpoint's weights

    def encoder(self, model) -> nn.Module:
        return Encoder(model).eval()

    def vision_facts(self, config) -> dict:
        return {"image_size": [config.image_size, config.image_size], "tokens_per_tile": config.side ** 2,
                "side": config.side, "global_view_pos": config.global_view_pos,
                "image_token_id": config.image_token_id}

    def random_model(self, config: Config, dtype) -> nn.Module:
        model = DeepseekVL2(config)
        for module in model.modules():  # transformers initialises the correction bias to 0: give it values
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor) and bias.device.type != "meta":
                with torch.no_grad():
                    bias.normal_(0.0, 0.1)
        return model.to(dtype or torch.float32)

    def read_config(self, path: str) -> Config:
        return Config(json.loads((Path(path) / "config.json").read_text()))

    def load_checkpoint(self, path: str, dtype, device=None):
        """Built with its parameters on meta, then the checkpoint's tensors read straight into
        `dtype` on `device` and assigned (models/loading.py): one copy of the weights, no fp32 detour."""
        from .loading import materialize_buffers, parameters_on_meta, read_safetensors, still_on_meta

        path = Path(path)
        config = Config(json.loads((path / "config.json").read_text()))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} has no *.safetensors weights")
        with parameters_on_meta():
            model = DeepseekVL2(config)
        missing, unexpected = model.load_state_dict(from_official(read_safetensors(files, dtype, device)),
                                                    strict=False, assign=True)
        missing = [m for m in missing if not m.endswith("position_ids")]
        unset = [n for n in still_on_meta(model) if n not in missing]
        if missing or unexpected or unset:
            raise UnsupportedModelError(f"{path}: weights do not match the config: missing {(missing + unset)[:5]}, "
                             f"unexpected {unexpected[:5]}")
        materialize_buffers(model, dtype, device)
        try:
            tokenizer, processor = self.load_processing(path)
        except (OSError, ValueError):
            tokenizer = processor = None  # still exports, diffs and counts FLOPs
        if tokenizer is not None:
            config.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE))
        return model.eval(), tokenizer, processor

    def default_processor(self, path: Path):
        """A checkpoint without processor_config.json: its config says the same."""
        c = Config(json.loads((Path(path) / "config.json").read_text()))
        return ImageProcessor(c.candidate_resolutions, c.patch_size, c.downsample_ratio)


FAMILY = DeepseekVL2Family()


# --- built-in models --------------------------------------------------------------
def tiny_raw_config(variant: str = "small") -> dict:
    """An official-layout config.json: 42 px tiles of 14 px patches (3x3, padded to 4x4 by the
    projector as 384/14 = 27 is padded to 28: 2x2 = 4 tokens per tile), a 2-layer ViT, and a tiny
    language model of the variant's form (deepseek_vl2_language.tiny_language: "small", "base", "tiny")."""
    from .deepseek_vl2_language import tiny_language

    language = tiny_language(variant, vocab_size=256 + len(_SPECIALS) + 5, bos=256, eos=257)
    s = 42
    return {
        "model_type": MODEL_TYPE, "architectures": ["DeepseekVLV2ForCausalLM"], "tile_tag": "2D",
        "global_view_pos": "head",
        "candidate_resolutions": [[s, s], [s, 2 * s], [2 * s, s], [s, 3 * s], [3 * s, s], [2 * s, 2 * s]],
        "vision_config": {"model_type": "vision", "model_name": "siglip_so400m_patch14_384", "image_size": s,
                          "patch_size": 14, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2,
                          "global_pool": "map", "ignore_head": True, "class_token": False},
        "projector_config": {"model_type": "mlp_projector", "projector_type": "downsample_mlp_gelu",
                             "input_dim": 32, "n_embed": 64, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2},
        "language_config": language,
        "torch_dtype": "float32",
    }


_SPECIALS = [BOS, EOS, PAD, IMAGE, *GROUNDING, USER, ASSISTANT]


def tiny_config(variant: str = "small") -> Config:
    return Config(tiny_raw_config(variant), image_token_id=256 + _SPECIALS.index(IMAGE))


def tiny_base_config() -> Config:
    """The flagship's (deepseek-vl2) form: MLA, sigmoid + noaux_tc routing, renormalised, x 2.0."""
    return tiny_config("base")


def tiny_tiny_config() -> Config:
    """deepseek-vl2-tiny's form: multi-head attention (use_mla false), softmax greedy routing."""
    return tiny_config("tiny")


def tiny_processing():
    """A byte-level BPE tokenizer (256 byte symbols, no merges) with the official special tokens and
    a BOS post-processor, and the official image processor config."""
    from tokenizers import processors

    from .vlm import byte_level_tokenizer

    tokenizer = byte_level_tokenizer(
        _SPECIALS, post_processor=processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 256)]),
        bos_token=BOS, eos_token=EOS, pad_token=PAD, additional_special_tokens=[IMAGE, *GROUNDING, USER, ASSISTANT])
    c = tiny_config()
    return tokenizer, ImageProcessor(c.candidate_resolutions, c.patch_size, c.downsample_ratio)
