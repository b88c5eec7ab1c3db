"""The subset of the OpenAI chat-completions API the CPU service speaks (non-streaming).

Fields a client may send that this service does not use (logprobs, tools, ...) are ignored, as
vLLM's server ignores unknown fields; `stream: true` and `n > 8` are refused with 400.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8  # choices per request: each is one more sequence in the batch


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name for max_tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def completion_body(model: str, results: list, created: float | None = None) -> dict:
    """An OpenAI `chat.completion` object from GenResults (one per choice)."""
    prompt_tokens = results[0].prompt_tokens if results else 0
    completion_tokens = sum(r.completion_tokens for r in results)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(created or time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def models_body(model: str, created: float) -> dict:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": int(created), "owned_by": "chuxin-ray"}],
    }


def error_body(message: str, type_: str = "invalid_request_error", code: int = 400) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}
