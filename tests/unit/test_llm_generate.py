"""The CPU engine behind the Serve app: a tiny random causal LM built from a config answers chat
prompts; left-padded batches give the same greedy answers as one request at a time; max_tokens, EOS
and stop strings end an answer with the right finish reason."""

from __future__ import annotations

import pytest

from chuxin_ray import demo
from chuxin_ray.llm.generate import ChatGenerator, GenRequest, PromptError
from chuxin_ray.llm.tiny import CHAT_TEMPLATE, build_tiny_causal_lm


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    tok = demo.train_tokenizer(demo.people_daily()[:300], root / "tokenizer", vocab_size=600)
    return ChatGenerator(str(build_tiny_causal_lm(tok, root / "model", max_position=128)))


def test_the_chat_template_is_saved_with_the_model(generator):
    assert generator.tok.chat_template == CHAT_TEMPLATE
    ids = generator.prompt_ids([{"role": "user", "content": "你好"}], max_tokens=4)
    text = generator.tok.decode(ids)
    assert text.replace(" ", "") == "<s>用户你好</s><s>助手"
    assert generator.tok.unk_token_id not in ids


def test_batched_greedy_equals_one_at_a_time(generator):
    texts = demo.people_daily()[:6]
    requests = [
        GenRequest(generator.prompt_ids([{"role": "user", "content": t[: 40 + 10 * i]}], 10), 10, 0.0)
        for i, t in enumerate(texts)
    ]  # prompts of different lengths: the batch is left-padded
    batched = generator.generate(requests)
    alone = [generator.generate([r])[0] for r in requests]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert any(r.text for r in batched)
    for r, req in zip(batched, requests, strict=True):
        assert r.prompt_tokens == len(req.prompt_ids) and r.completion_tokens <= 10


def test_max_tokens_stop_strings_and_seeds(generator):
    ids = generator.prompt_ids([{"role": "user", "content": "国务院"}], 16)
    short, long = generator.generate([GenRequest(ids, 3, 0.0), GenRequest(ids, 12, 0.0)])
    assert short.completion_tokens <= 3 and long.text.replace(" ", "").startswith(short.text.replace(" ", ""))
    if long.completion_tokens == 12:
        assert long.finish_reason == "length"
    cut = long.text[2:4]
    if cut.strip():
        stopped = generator.generate([GenRequest(ids, 12, 0.0, stop=[cut])])[0]
        assert stopped.text == long.text[: long.text.find(cut)] and stopped.finish_reason == "stop"
    a = generator.generate([GenRequest(ids, 8, 1.0, seed=7)])[0]
    b = generator.generate([GenRequest(ids, 8, 1.0, seed=7)])[0]
    assert a.text == b.text  # a seeded group samples the same


def test_too_long_prompts_are_refused(generator):
    with pytest.raises(PromptError, match="exceeds max_model_len"):
        generator.prompt_ids([{"role": "user", "content": "长" * 200}], 16)
