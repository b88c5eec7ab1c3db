"""RetroMAE model and loss: the optimised path against a plain reference from the paper's definition.

The reference (Xiao et al. 2022, arXiv:2205.12035, section 3) uses full (B, L, V) logits from the
masked-LM's own forward and head, nn.CrossEntropyLoss(ignore_index=-100), decoder masks and labels built
position by position in Python, and attention computed query by query over the visible keys only.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, BertConfig, PreTrainedModel

from chuxin_ray.losses.masked_lm import IGNORE_INDEX, masked_lm_loss
from chuxin_ray.models.masking import mask_retromae_batch
from chuxin_ray.models.retromae import RetroMAE
from chuxin_ray.models.tiny import build_tiny_masked_lm, tiny_xlmr_config

VOCAB = 64
BOS, PAD, EOS, UNK = 0, 1, 2, 3  # XLM-R ids; the BERT config below reuses them
SPECIALS = [BOS, PAD, EOS, UNK]
MASK = VOCAB - 1
DECODER_RATIO = 0.5


def tiny_lm(family: str, seed: int = 0, dropout: float = 0.0, init_std: float = 0.02) -> PreTrainedModel:
    if family == "xlmr":
        config = tiny_xlmr_config(VOCAB, dropout=dropout, initializer_range=init_std)
    else:
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=PAD,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            initializer_range=init_std,
        )
    return build_tiny_masked_lm(config, seed=seed)


def fixed_ids(batch: int = 3, length: int = 12, seed: int = 0, weights: torch.Tensor | None = None):
    """<s> w.. </s> <pad>.. rows, the last one padded: ids and attention mask, (B, L)."""
    g = torch.Generator().manual_seed(seed)
    if weights is None:
        ids = torch.randint(4, MASK, (batch, length), generator=g)  # (B, L)
    else:
        ids = 4 + torch.multinomial(weights, batch * length, replacement=True, generator=g).view(
            batch, length
        )
    lengths = torch.full((batch,), length)  # (B,)
    lengths[-1] = length - 4
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (B, L)
    ids = torch.where(attention_mask.bool(), ids, PAD)  # (B, L)
    ids[:, 0] = BOS
    ids[torch.arange(batch), lengths - 1] = EOS
    return ids, attention_mask


def masked_batch(ids, attention_mask, seed: int) -> dict[str, torch.Tensor]:
    return mask_retromae_batch(
        ids,
        attention_mask,
        special_token_ids=SPECIALS,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        decoder_mask_ratio=DECODER_RATIO,
        generator=torch.Generator().manual_seed(seed),
    ).as_kwargs()


def reference_loss(
    model: RetroMAE, batch: dict[str, torch.Tensor], u: torch.Tensor, mutation: str = ""
) -> torch.Tensor:
    """RetroMAE's loss written from the paper. `u` (B, L, L) is the uniform draw behind the decoder mask.

    `mutation` injects one known mistake, to show this reference notices it: "attend_self" (a query
    sees its own token), "no_sentence_key" (key 0 obeys the random mask), "shift_labels" (position i
    is scored against token i + 1).
    """
    lm = model.lm
    family = "xlmr" if lm.config.model_type == "xlm-roberta" else "bert"
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    batch_size, length = input_ids.shape

    # Encoder: the masked-LM's own forward, full (B, L, V) logits.
    encoder_out = lm(
        input_ids=batch["encoder_input_ids"], attention_mask=attention_mask, output_hidden_states=True
    )
    ce = nn.CrossEntropyLoss(ignore_index=-100)
    encoder_loss = ce(encoder_out.logits.flatten(0, 1), batch["encoder_labels"].flatten())
    sentence = encoder_out.hidden_states[-1][:, 0]  # (B, H) last hidden state of <s>/[CLS]

    # Decoder streams. XLM-R numbers positions from pad_token_id + 1; BERT from 0. Right padding only.
    emb = lm.base_model.embeddings
    positions = torch.arange(length) + (lm.config.pad_token_id + 1 if family == "xlmr" else 0)  # (L,)
    position_vectors = emb.position_embeddings.weight[positions]  # (L, H)
    query = sentence[:, None, :] + position_vectors[None]  # (B, L, H)
    token_vectors = emb.LayerNorm(
        emb.word_embeddings.weight[input_ids] + position_vectors[None] + emb.token_type_embeddings.weight[0]
    )  # (B, L, H)
    context = torch.cat([sentence[:, None, :], token_vectors[:, 1:]], dim=1)  # (B, L, H)

    draws, real = u.tolist(), attention_mask.tolist()  # plain lists: the loops below run B * L * L times
    visible = [[[False] * length for _ in range(length)] for _ in range(batch_size)]  # [b][i][j]
    for b in range(batch_size):
        for i in range(length):
            for j in range(length):
                if j == 0 and mutation != "no_sentence_key":
                    visible[b][i][j] = True  # the sentence vector
                else:
                    not_self = j != i or mutation == "attend_self"
                    visible[b][i][j] = bool(real[b][j]) and not_self and draws[b][i][j] >= DECODER_RATIO
            if not any(visible[b][i]):
                visible[b][i][0] = True  # only under "no_sentence_key": keep the softmax finite

    dec = model.decoder
    heads, head_dim = dec.heads, dec.head_dim
    q, k, v = dec.query(query), dec.key(context), dec.value(context)  # (B, L, H) each
    rows = []
    for b in range(batch_size):
        for i in range(length):
            keys = [j for j in range(length) if visible[b][i][j]]
            per_head = []
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                scores = q[b, i, cols] @ k[b, keys, cols].T / math.sqrt(head_dim)  # (n_keys,)
                per_head.append(torch.softmax(scores, dim=0) @ v[b, keys, cols])  # (d,)
            rows.append(torch.cat(per_head))  # (H,)
    attended = torch.stack(rows).view(batch_size, length, -1)  # (B, L, H)
    hidden = dec.attention_norm(query + dec.attention_output(attended))  # (B, L, H)
    decoded = dec.output_norm(hidden + dec.output(dec.activation(dec.intermediate(hidden))))  # (B, L, H)

    token_ids = input_ids.tolist()
    labels = torch.full_like(input_ids, -100)  # (B, L)
    for b in range(batch_size):
        for i in range(length):
            if real[b][i] and token_ids[b][i] not in SPECIALS:
                source = i + 1 if mutation == "shift_labels" else i
                labels[b, i] = token_ids[b][source]
    head = lm.lm_head if family == "xlmr" else lm.cls
    decoder_logits = head(decoded)  # (B, L, V) at every position
    decoder_loss = ce(decoder_logits.flatten(0, 1), labels.flatten())
    return encoder_loss + decoder_loss


def decoder_draw(batch: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """Replays the decoder mask's uniform draw: masking draws encoder randomness first, then rand(B, L, L)."""
    g = torch.Generator().manual_seed(seed)
    batch_size, length = batch["input_ids"].shape
    torch.rand((batch_size, length), generator=g)
    torch.rand((batch_size, length), generator=g)
    torch.randint(0, 2, (batch_size, length), generator=g)
    return torch.rand((batch_size, length, length), generator=g)  # (B, L, L)


def loss_and_grads(model: RetroMAE, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_loss_and_grads(
    model: RetroMAE, batch: dict[str, torch.Tensor], u: torch.Tensor, mutation: str = ""
):
    fast_loss, fast_grads = loss_and_grads(model, lambda: model(**batch).loss)
    ref_loss, ref_grads = loss_and_grads(model, lambda: reference_loss(model, batch, u, mutation))
    torch.testing.assert_close(fast_loss, ref_loss, atol=1e-5, rtol=0)
    assert fast_grads.keys() == ref_grads.keys()
    assert any(name.startswith("decoder.") for name in fast_grads)
    for name, grad in fast_grads.items():
        # atol: the key bias gets an exactly-zero gradient in theory (softmax ignores a constant shift).
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# init_std 0.1, not BERT's 0.02: at 0.02 attention is nearly uniform and the loss moves by only ~1e-5
# when a query sees itself; gradients catch it either way.
@pytest.mark.parametrize("family", ["xlmr", "bert"])
@pytest.mark.parametrize("chunk_size", [None, 2, 5])  # 2: both heads chunked (LinearCrossEntropy)
def test_loss_and_gradients_match_plain_reference(family: str, chunk_size: int | None):
    model = RetroMAE(tiny_lm(family, init_std=0.1), lm_head_chunk_size=chunk_size, decoder_seed=0).eval()
    ids, attention_mask = fixed_ids()
    batch = masked_batch(ids, attention_mask, seed=1)
    assert batch["encoder_labels"].ne(IGNORE_INDEX).sum() > 3
    assert_same_loss_and_grads(model, batch, decoder_draw(batch, seed=1))


@pytest.mark.parametrize("mutation", ["attend_self", "no_sentence_key", "shift_labels"])
def test_reference_notices_known_mistakes(mutation: str):
    model = RetroMAE(tiny_lm("xlmr", init_std=0.1), decoder_seed=0).eval()
    ids, attention_mask = fixed_ids()
    batch = masked_batch(ids, attention_mask, seed=1)
    with torch.no_grad():
        right = model(**batch).loss
        wrong = reference_loss(model, batch, decoder_draw(batch, seed=1), mutation)
    assert abs(right - wrong) > 1e-3  # 100x the loss tolerance above


def test_decoder_draw_replay_matches_masking():
    ids, attention_mask = fixed_ids()
    batch = masked_batch(ids, attention_mask, seed=7)
    u = decoder_draw(batch, seed=7)
    replayed = (
        (u >= DECODER_RATIO) & attention_mask.bool()[:, None, :] & ~torch.eye(ids.size(1), dtype=torch.bool)
    )
    replayed[:, :, 0] = True
    assert torch.equal(batch["decoder_attention_mask"], replayed)


def test_loss_weights_scale_parts():
    model = RetroMAE(tiny_lm("xlmr"), encoder_weight=0.5, decoder_weight=2.0, decoder_seed=0).eval()
    ids, attention_mask = fixed_ids()
    with torch.no_grad():
        out = model(**masked_batch(ids, attention_mask, seed=2))
    torch.testing.assert_close(out.loss, 0.5 * out.encoder_loss + 2.0 * out.decoder_loss)
    assert out.decoder_tokens.item() == (attention_mask.sum() - 2 * ids.size(0)).item()  # all but <s>, </s>


def test_sparse_loss_equals_full_logits_and_survives_no_labels():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 9, 16, generator=g, requires_grad=True)  # (B, L, H)
    head = nn.Linear(16, 50)
    labels = torch.randint(0, 50, (4, 9), generator=g)  # (B, L)
    labels[torch.rand(4, 9, generator=g) < 0.6] = IGNORE_INDEX
    full = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100)
    for chunk_size in (None, 1, 4, 1000):
        torch.testing.assert_close(masked_lm_loss(hidden, labels, head, chunk_size), full)

    none = masked_lm_loss(hidden, torch.full_like(labels, IGNORE_INDEX), head)
    none.backward()
    assert none.item() == 0.0
    assert head.weight.grad is not None and not head.weight.grad.any()


def test_training_reduces_loss():
    torch.manual_seed(0)  # dropout
    model = RetroMAE(tiny_lm("xlmr", dropout=0.1), decoder_seed=0).train()
    # A Zipf-like unigram distribution, as in text, so there is something to learn in 30 steps.
    weights = 1.0 / torch.arange(1, MASK - 4 + 1, dtype=torch.float)  # (59,)
    ids, attention_mask = fixed_ids(batch=8, length=24, seed=4, weights=weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(30):
        batch = mask_retromae_batch(
            ids,
            attention_mask,
            special_token_ids=SPECIALS,
            mask_token_id=MASK,
            vocab_size=VOCAB,
            generator=generator,
        )  # fresh masks every step, as in training
        out = model(**batch.as_kwargs())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append((out.loss.item(), out.encoder_loss.item(), out.decoder_loss.item()))
    first, last = torch.tensor(losses[:3]).mean(0), torch.tensor(losses[-3:]).mean(0)
    assert torch.isfinite(torch.tensor(losses)).all()
    # Measured: total and both parts fall by 20-25% (the Zipf unigram entropy, ~3.3 nats, bounds early
    # progress from ln 64 = 4.16); the margins leave room for other CPUs' float rounding.
    assert last[0] < 0.85 * first[0], losses
    assert (last[1:] < 0.9 * first[1:]).all(), losses


def test_a_copied_model_chunks_its_own_head():
    """The chunked head is found by layout at each forward, so a deep copy uses the copy's parameters."""
    model = RetroMAE(tiny_lm("xlmr", init_std=0.1), lm_head_chunk_size=2, decoder_seed=0).eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm.lm_head.dense.weight.mul_(3.0)
    batch = masked_batch(*fixed_ids(), seed=1)
    chunked = twin(**batch).loss
    twin.lm_head_chunk_size = None
    torch.testing.assert_close(chunked, twin(**batch).loss)
    assert abs(chunked - model(**batch).loss) > 1e-3


def test_save_encoder_loads_with_automodel(tmp_path):
    model = RetroMAE(tiny_lm("xlmr"), decoder_seed=0).eval()
    ids, attention_mask = fixed_ids()
    model.save_encoder(tmp_path / "encoder_model")
    loaded = AutoModel.from_pretrained(tmp_path / "encoder_model").eval()
    with torch.no_grad():
        expected = model.encoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        got = loaded(input_ids=ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.sentence_embedding(ids, attention_mask), expected[:, 0])


def test_state_dict_round_trips_with_decoder():
    model = RetroMAE(tiny_lm("xlmr", seed=0), decoder_seed=0).eval()
    state = model.state_dict()
    assert any(key.startswith("decoder.") for key in state)
    assert not any(key.startswith(("encoder.", "lm_head.", "embeddings.")) for key in state)  # no aliases
    other = RetroMAE(tiny_lm("xlmr", seed=1), decoder_seed=1).eval()
    other.load_state_dict(state)
    ids, attention_mask = fixed_ids()
    batch = masked_batch(ids, attention_mask, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(other(**batch).loss, model(**batch).loss)


def test_rejects_model_without_lm_head():
    with pytest.raises(ValueError, match="LM head"):
        RetroMAE(AutoModel.from_config(tiny_xlmr_config(VOCAB)))
