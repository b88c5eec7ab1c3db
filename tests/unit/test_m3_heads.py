"""BGE-M3 heads and scores: compact sparse scoring against a naive (B, L, V) implementation, chunked
ColBERT against unchunked, and the whole unified loss against FlagEmbedding's own M3 training model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import XLMRobertaConfig, XLMRobertaModel

from chuxin_ray.losses.unified import UnifiedLoss
from chuxin_ray.models.m3 import (
    M3Embedder,
    M3Heads,
    colbert_scores,
    ensemble_scores,
    m3_scores,
    sparse_scores,
    special_token_ids,
)

VOCAB = 100
SPECIAL = [0, 1, 2, 3]  # XLM-R <s>, <pad>, </s>, <unk>
XLMR_TOKENS = SimpleNamespace(
    cls_token_id=0, pad_token_id=1, eos_token_id=2, unk_token_id=3, padding_side="right"
)


def _ids(
    rows: int, length: int, lengths: list[int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS, tokens drawn from a narrow id range (so repeats and query/passage overlaps are common), EOS,
    then padding: ids (rows, length), attention mask (rows, length)."""
    ids = torch.randint(4, 24, (rows, length), generator=generator)  # (R, L)
    mask = torch.zeros(rows, length, dtype=torch.long)  # (R, L)
    for row, used in enumerate(lengths):
        ids[row, 0], ids[row, used - 1] = 0, 2
        ids[row, used:] = 1
        mask[row, :used] = 1
    ids[0, 2] = 3  # an UNK inside a text
    return ids, mask


def _naive_sparse(q_ids, q_weights, p_ids, p_weights) -> torch.Tensor:
    """FlagEmbedding's training path: scatter into (B, L, V), max over L, zero the special ids, dot."""

    def embed(ids, weights):
        full = torch.zeros(ids.size(0), ids.size(1), VOCAB, dtype=weights.dtype)  # (B, L, V)
        full = torch.scatter(full, -1, ids.unsqueeze(-1), weights.unsqueeze(-1))  # (B, L, V)
        vec = full.max(dim=1).values  # (B, V)
        return vec * torch.isin(torch.arange(VOCAB), torch.tensor(SPECIAL)).logical_not()  # (B, V)

    return embed(q_ids, q_weights) @ embed(p_ids, p_weights).T  # (B, N)


def test_special_token_ids_are_cls_eos_pad_unk():
    assert special_token_ids(XLMR_TOKENS) == SPECIAL


@pytest.mark.parametrize("max_chunk_elements", [2**26, 40])  # one block; many small passage chunks
def test_sparse_scores_equal_the_naive_vocabulary_sized_implementation(max_chunk_elements: int):
    generator = torch.Generator().manual_seed(0)
    q_ids, q_mask = _ids(3, 7, [7, 5, 4], generator)  # (B, Lq)
    p_ids, p_mask = _ids(9, 11, [11, 9, 6, 11, 3, 8, 11, 10, 7], generator)  # (N, Lp)
    keep_q = q_mask.bool() & ~torch.isin(q_ids, torch.tensor(SPECIAL))
    keep_p = p_mask.bool() & ~torch.isin(p_ids, torch.tensor(SPECIAL))
    q_weights = (torch.rand(3, 7, generator=generator) * keep_q).requires_grad_()  # (B, Lq)
    p_weights = (torch.rand(9, 11, generator=generator) * keep_p).requires_grad_()  # (N, Lp)

    fast = sparse_scores(q_ids, q_weights, p_ids, p_weights, max_chunk_elements=max_chunk_elements)  # (B, N)
    fast_grads = torch.autograd.grad(fast.square().sum(), [q_weights, p_weights])
    naive = _naive_sparse(q_ids, q_weights, p_ids, p_weights)  # (B, N)
    naive_grads = torch.autograd.grad(naive.square().sum(), [q_weights, p_weights])

    assert (naive > 0).any() and (naive == 0).any()  # overlaps and misses both exercised
    torch.testing.assert_close(fast, naive)
    for fast_grad, naive_grad in zip(fast_grads, naive_grads, strict=True):
        torch.testing.assert_close(fast_grad, naive_grad)


def _naive_colbert(q_vecs, q_mask, p_vecs, p_mask) -> torch.Tensor:
    scores = torch.zeros(q_vecs.size(0), p_vecs.size(0))  # (B, N)
    for b in range(q_vecs.size(0)):
        q = q_vecs[b][q_mask[b].bool()]  # (lq, D)
        for n in range(p_vecs.size(0)):
            p = p_vecs[n][p_mask[n].bool()]  # (lp, D)
            scores[b, n] = (q @ p.T).max(dim=1).values.mean()
    return scores


def test_colbert_scores_chunked_equal_unchunked_and_a_per_pair_loop():
    torch.manual_seed(1)
    q_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])  # (B, Lq)
    p_mask = (torch.arange(6)[None, :] < torch.tensor([6, 3, 4, 1, 6, 2, 5])[:, None]).long()  # (N, Lp)
    q_vecs = (F.normalize(torch.randn(2, 5, 8), dim=-1) * q_mask[..., None]).requires_grad_()  # (B, Lq, D)
    p_vecs = (F.normalize(torch.randn(7, 6, 8), dim=-1) * p_mask[..., None]).requires_grad_()  # (N, Lp, D)

    whole = colbert_scores(q_vecs, q_mask, p_vecs, p_mask)  # (B, N)
    whole_grads = torch.autograd.grad(whole.square().sum(), [q_vecs, p_vecs])
    chunked = colbert_scores(q_vecs, q_mask, p_vecs, p_mask, max_chunk_elements=2 * 5 * 2 * 6)  # 2 passages
    chunked_grads = torch.autograd.grad(chunked.square().sum(), [q_vecs, p_vecs])

    torch.testing.assert_close(chunked, whole)
    for chunk_grad, whole_grad in zip(chunked_grads, whole_grads, strict=True):
        torch.testing.assert_close(chunk_grad, whole_grad)
    torch.testing.assert_close(whole, _naive_colbert(q_vecs.detach(), q_mask, p_vecs.detach(), p_mask))


def test_colbert_scores_match_flagembedding_training_formula_on_unpadded_passages():
    torch.manual_seed(2)
    q_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # (B, Lq)
    q_vecs = F.normalize(torch.randn(2, 4, 8), dim=-1) * q_mask[..., None]  # (B, Lq, D)
    p_vecs = F.normalize(torch.randn(3, 5, 8), dim=-1)  # (N, Lp, D)
    # modeling.py compute_colbert_score: einsum, max over passage tokens, sum / query token count
    upstream = torch.einsum("qin,pjn->qipj", q_vecs, p_vecs).max(-1).values.sum(1) / q_mask.sum(
        -1, keepdim=True
    )
    ours = colbert_scores(q_vecs, q_mask, p_vecs, torch.ones(3, 5, dtype=torch.long))  # (B, N)
    torch.testing.assert_close(ours, upstream)


def test_ensemble_defaults_are_bge_m3_training_weights():
    dense, sparse, colbert = torch.tensor([[1.0]]), torch.tensor([[10.0]]), torch.tensor([[100.0]])
    assert ensemble_scores(dense, sparse, colbert).item() == pytest.approx(1.0 + 0.3 * 10.0 + 100.0)
    assert ensemble_scores(dense, sparse, colbert, 0.4, 0.2, 0.4).item() == pytest.approx(0.4 + 2.0 + 40.0)


def _tiny_encoder(seed: int = 0) -> XLMRobertaModel:
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return XLMRobertaModel(config, add_pooling_layer=False)


def test_heads_zero_special_and_padding_tokens_and_normalise():
    generator = torch.Generator().manual_seed(3)
    ids, mask = _ids(3, 9, [9, 6, 4], generator)  # (B, L)
    heads = M3Heads(32, zeroed_token_ids=SPECIAL)
    torch.nn.init.zeros_(heads.sparse_linear.weight)
    torch.nn.init.ones_(heads.sparse_linear.bias)  # every token weight is 1 before zeroing
    out = heads(torch.randn(3, 9, 32), ids, mask)
    assert out.colbert.shape == (3, 8, 32) and out.colbert_mask.shape == (3, 8)
    zeroed = torch.isin(ids, torch.tensor(SPECIAL)) | ~mask.bool()  # (B, L)
    assert (out.token_weights[zeroed] == 0).all() and (out.token_weights[~zeroed] > 0).all()
    torch.testing.assert_close(out.dense.norm(dim=-1), torch.ones(3))
    norms = out.colbert.norm(dim=-1)  # (B, L-1)
    torch.testing.assert_close(norms[out.colbert_mask.bool()], torch.ones(int(out.colbert_mask.sum())))
    assert (norms[~out.colbert_mask.bool()] == 0).all()


def _upstream_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1)
    return -(p * logits.log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("teacher_form", [None, "kl", "m3_kd"])
def test_unified_loss_and_gradients_equal_flagembedding_m3_model(teacher_form: str | None):
    """FlagEmbedding 1.4.2 EncoderOnlyEmbedderM3Model (unified_finetuning, use_self_distill, temperature
    0.02, normalised) on the same modules: equal gradients. Its distillation values are cross-entropies,
    ours KLs: the losses differ by the documented teacher entropies. float64, so that summation order
    (~2e-6 on these gradients in float32) does not hide a real difference."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model

    generator = torch.Generator().manual_seed(4)
    queries = dict(zip(("input_ids", "attention_mask"), _ids(2, 7, [7, 5], generator), strict=True))
    # unpadded passages: upstream's training MaxSim lets padding vectors in, ours and BGEM3FlagModel's do not
    passages = dict(zip(("input_ids", "attention_mask"), _ids(6, 9, [9] * 6, generator), strict=True))
    teacher = torch.randn(2, 3, generator=generator, dtype=torch.float64)  # (B, G)
    teacher_scores = None if teacher_form is None else teacher

    embedder = M3Embedder(_tiny_encoder(), M3Heads(32, zeroed_token_ids=SPECIAL)).double().train()
    upstream = EncoderOnlyEmbedderM3Model(
        {
            "model": embedder.encoder,
            "colbert_linear": embedder.heads.colbert_linear,
            "sparse_linear": embedder.heads.sparse_linear,
        },
        tokenizer=XLMR_TOKENS,
        temperature=0.02,
        kd_loss_type="m3_kd_loss" if teacher_form == "m3_kd" else "kl_div",
        normalize_embeddings=True,
        unified_finetuning=True,
        use_self_distill=True,
        self_distill_start_step=-1,
    ).train()
    up_loss = upstream(queries, passages, None if teacher_scores is None else teacher.flatten().tolist()).loss
    up_grads = torch.autograd.grad(up_loss, list(embedder.parameters()))

    scores = m3_scores(embedder(**queries), embedder(**passages))
    unified = UnifiedLoss(kd_loss="m3_kd" if teacher_form == "m3_kd" else "kl")
    loss = unified(
        scores.dense, scores.sparse, scores.colbert, group_size=3, step=0, teacher_scores=teacher_scores
    )
    grads = torch.autograd.grad(loss, list(embedder.parameters()))

    ensemble = ensemble_scores(scores.dense, scores.sparse, scores.colbert).detach() / 0.02  # (B, B*G)
    offset = (
        (1.0 + 0.1 + 1.0) / 3 * _upstream_entropy(ensemble) / 2
    )  # self-distillation: (d + 0.1 s + c) / 3, / 2
    if teacher_form == "kl":
        offset = (
            offset + (1.0 + 1.0 + 0.1 + 1.0) / 4 * _upstream_entropy(teacher) / 2
        )  # every head's KL, / 4, / 2
    # upstream makes teacher targets with torch.tensor(list): float32, ~1e-7 relative off float64
    rtol, atol = (1e-7, 1e-9) if teacher_form is None else (1e-5, 1e-6)
    assert loss.item() == pytest.approx(up_loss.item() - offset.item(), rel=max(rtol, 1e-6))
    for ours, theirs in zip(grads, up_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)


def test_the_row_sparse_table_of_both_embedders_is_the_token_embedding():
    from chuxin_ray.models.m3_folder import DenseEmbedder
    from chuxin_ray.stages.finetune import token_embedding_names

    for embedder in (DenseEmbedder(_tiny_encoder(), "cls"), M3Embedder(_tiny_encoder(), M3Heads(32))):
        (name,) = token_embedding_names(embedder)
        table = dict(embedder.named_parameters())[name]
        assert table is embedder.encoder.embeddings.word_embeddings.weight
