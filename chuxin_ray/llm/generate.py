"""Batched chat generation with any transformers causal LM: the engine of the CPU service.

One `generate` call per group of requests that share sampling settings (a synthesis stage sends
identical settings, so a batch is one call); prompts are left-padded, each answer is cut at its own
`max_tokens`, at EOS and at its stop strings. vLLM does this on GPUs; this path exists so the same
service runs on a laptop and in CPU tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class PromptError(ValueError):
    """A request that cannot be served (too long, no chat template); answered with HTTP 400."""


class ChatGenerator:
    def __init__(
        self, model_dir: str, chat_template: str | None = None, dtype: str = "float32", max_model_len=None
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        if chat_template:
            self.tok.chat_template = chat_template
        if self.tok.chat_template is None:
            raise PromptError(
                f"{model_dir}: the tokenizer has no chat template; set serve.chat_template (a Jinja template)"
            )
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.eos_ids = _eos_ids(self.model.generation_config.eos_token_id, self.tok.eos_token_id)
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len, limit) if max_model_len else limit

    def prompt_ids(self, messages: list[dict], max_tokens: int) -> list[int]:
        """Token ids of the chat prompt; PromptError when prompt + max_tokens exceed max_model_len."""
        try:
            ids = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        except Exception as e:  # jinja errors: a bad role, a template raising
            raise PromptError(f"cannot apply the chat template: {e}") from None
        if len(ids) + max_tokens > self.max_model_len:
            raise PromptError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
                f"({self.max_model_len})"
            )
        return list(ids)

    @torch.inference_mode()
    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        results: list[GenResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.temperature, r.top_p, r.seed), []).append(i)
        for (temperature, top_p, seed), members in groups.items():
            for i, res in zip(
                members,
                self._generate_group([requests[i] for i in members], temperature, top_p, seed),
                strict=True,
            ):
                results[i] = res
        return results  # type: ignore[return-value]

    def _generate_group(
        self, group: list[GenRequest], temperature: float, top_p: float, seed
    ) -> list[GenResult]:
        width = max(len(r.prompt_ids) for r in group)
        input_ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(group), width), dtype=torch.long)  # (B, T)
        for row, r in enumerate(group):
            input_ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids) :] = 1
        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if seed is not None:
            torch.manual_seed(seed)  # one stream per group: equal batches give equal answers
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_tokens for r in group),
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            **sampling,
        )  # (B, T + new)
        new = out[:, width:].tolist()
        return [self._finish(r, tokens) for r, tokens in zip(group, new, strict=True)]

    def _finish(self, r: GenRequest, tokens: list[int]) -> GenResult:
        tokens = tokens[: r.max_tokens]
        finish = "length"
        for j, t in enumerate(tokens):
            if t in self.eos_ids:
                tokens, finish = tokens[:j], "stop"
                break
        text = self.tok.decode(tokens, skip_special_tokens=True)
        for s in r.stop:
            at = text.find(s) if s else -1
            if at >= 0:
                text, finish = text[:at], "stop"
        return GenResult(text, finish, len(r.prompt_ids), len(tokens))


def _eos_ids(*candidates) -> set[int]:
    ids: set[int] = set()
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif c:
            ids.update(int(x) for x in c)
    return ids
