"""The lmms-eval model "fastmmoe": runs a VLM engine directory on lmms-eval's image tasks.

    lmms-eval --model fastmmoe --model_args engine=DIR[,max_new_tokens=128,chat=true] \
        --tasks mmmu_val,ocrbench,scienceqa_img

Greedy decoding (the engine's generate); generate_until cuts the answer at the task's `until`
strings; temperature/top_p requests are answered greedily (with one warning). loglikelihood
scores a continuation with one prefill and the engine's decode step. Multi-round generation is
not supported. Install lmms-eval without its dependencies (see README: a plain install pulls
torchvision and a CUDA torch).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from ..runtime import load_engine
from .requests import answer, continuation_logprob

# lmms-eval passes these to every model (from its own command line); an engine has its own device.
_HARNESS_ARGS = {"batch_size", "max_batch_size", "device"}


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.strip().lower() not in {"true", "false", "1", "0", "yes", "no"}:
            raise ValueError(f"expected true/false, got {value!r}")
        return value.strip().lower() in {"true", "1", "yes"}
    return bool(value)


class FastMMoE(lmms):
    is_simple = True

    def __init__(self, engine: str | None = None, max_new_tokens: int = 128, chat=True, **kwargs) -> None:
        super().__init__()
        unknown = set(kwargs) - _HARNESS_ARGS
        if unknown:
            raise TypeError(f"fastmmoe: unknown model_args {sorted(unknown)}; it takes engine=DIR, "
                            "max_new_tokens=N, chat=true|false")
        if engine is None:
            raise ValueError("fastmmoe needs --model_args engine=DIR (an engine directory from fastmmoe-compile)")
        if not Path(engine).is_dir():
            raise FileNotFoundError(f"fastmmoe: engine directory not found: {engine}")
        self.engine = load_engine(engine)
        if self.engine.front_end is None:
            raise ValueError(f"{engine} is a text-only engine: lmms-eval tasks need a vision-language engine "
                             "(compiled from an InternVL or DeepSeek-VL2 checkpoint)")
        self.max_new_tokens = int(max_new_tokens)
        self.chat = _as_bool(chat)
        self._warned_sampling = False

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        flat = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return [v for v in flat if v is not None]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            if float(gen_kwargs.get("temperature") or 0) > 0 and not self._warned_sampling:
                warnings.warn("fastmmoe engines decode greedily: temperature/top_p are ignored")
                self._warned_sampling = True
            text = answer(self.engine, context, self._visuals(doc_to_visual, doc_id, task, split),
                          int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)), gen_kwargs.get("until"),
                          chat=self.chat)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, doc_id, task, split)
            out.append(continuation_logprob(self.engine, context, continuation, images, chat=self.chat))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("fastmmoe: multi-round generation is not supported; use generate_until tasks")
