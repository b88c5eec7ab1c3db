"""The three retrieval heads of BGE-M3 and their scores: dense, sparse (lexical weights), ColBERT.

Chen et al. 2024, "BGE M3-Embedding: Multi-Lingual, Multi-Functionality, Multi-Granularity Text
Embeddings Through Self-Knowledge Distillation", arXiv:2402.03216 (hybrid retrieval). The head shapes, the
zeroed special tokens and the ensemble weights follow FlagEmbedding 1.4.2
`finetune/embedder/encoder_only/m3/modeling.py` (training) and `inference/embedder/encoder_only/m3.py`
(BGEM3FlagModel), so an exported `colbert_linear.pt` / `sparse_linear.pt` loads in either.

Scores are raw similarities, no temperature: the losses divide by it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# 2**26 elements = 256 MiB of float32 per passage chunk of a score computation.
MAX_CHUNK_ELEMENTS = 2**26


class M3Output(NamedTuple):
    """What the heads make of one batch of B texts of padded length L (a NamedTuple so that GradCache
    can split and concatenate it field by field)."""

    dense: torch.Tensor  # (B, H) L2-normalised CLS state
    token_weights: torch.Tensor  # (B, L) ReLU(sparse_linear(h)), 0 at padding and special tokens
    input_ids: torch.Tensor  # (B, L) the ids the token weights belong to
    colbert: torch.Tensor  # (B, L-1, D) L2-normalised colbert_linear(h) of tokens 1..L-1, 0 at padding
    colbert_mask: torch.Tensor  # (B, L-1) attention mask of tokens 1..L-1


class M3Scores(NamedTuple):
    dense: torch.Tensor  # (B, N)
    sparse: torch.Tensor  # (B, N)
    colbert: torch.Tensor  # (B, N)


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids whose lexical weight BGE-M3 forces to 0: CLS, EOS, PAD, UNK (modeling.py `_sparse_embedding`,
    `unused_tokens`; m3.py `_process_token_weights`). XLM-R: <s>=0, <pad>=1, </s>=2, <unk>=3."""
    ids = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    return sorted(i for i in ids if i is not None)


class M3Heads(nn.Module):
    """Dense, sparse and ColBERT heads on an encoder's last hidden state.

    - dense: the CLS state, L2-normalised (BGE-M3 trains with `sentence_pooling_method="cls"`,
      `normalize_embeddings=True`).
    - sparse: one weight per token, ReLU(Linear(H, 1)); 0 at padding and at `zeroed_token_ids`.
    - colbert: Linear(H, D) (D = H unless colbert_dim is set, as upstream's `colbert_dim=-1`) of
      tokens 1..L-1 (the CLS token is skipped), masked, then L2-normalised.

    The attribute names `colbert_linear` and `sparse_linear` are those of the BGE-M3 release files
    `colbert_linear.pt` and `sparse_linear.pt` (state dicts with `weight` and `bias`).
    """

    def __init__(
        self, hidden_size: int, colbert_dim: int | None = None, zeroed_token_ids: Sequence[int] = ()
    ):
        super().__init__()
        self.colbert_linear = nn.Linear(hidden_size, colbert_dim or hidden_size)
        self.sparse_linear = nn.Linear(hidden_size, 1)
        self.register_buffer(
            "zeroed_token_ids", torch.tensor(list(zeroed_token_ids), dtype=torch.long), persistent=False
        )

    def forward(
        self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> M3Output:
        dense = F.normalize(last_hidden_state[:, 0], dim=-1)  # (B, H)
        keep = attention_mask.bool() & ~torch.isin(input_ids, self.zeroed_token_ids)  # (B, L)
        token_weights = torch.relu(self.sparse_linear(last_hidden_state)).squeeze(-1) * keep  # (B, L)
        colbert_mask = attention_mask[:, 1:]  # (B, L-1)
        colbert = self.colbert_linear(last_hidden_state[:, 1:]) * colbert_mask[..., None]  # (B, L-1, D)
        colbert = F.normalize(colbert, dim=-1)  # (B, L-1, D); padding rows stay 0
        return M3Output(dense, token_weights, input_ids, colbert, colbert_mask)


class M3Embedder(nn.Module):
    """A Hugging Face encoder (anything returning `last_hidden_state`) with the three M3 heads."""

    def __init__(self, encoder: nn.Module, heads: M3Heads) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = heads

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **encoder_kwargs: Any
    ) -> M3Output:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **encoder_kwargs
        ).last_hidden_state  # (B, L, H)
        return self.heads(hidden, input_ids, attention_mask)


def _passage_chunk(num_passages: int, cost: Callable[[int], int], max_elements: int) -> int:
    chunk = max(num_passages, 1)
    while chunk > 1 and cost(chunk) > max_elements:
        chunk = (chunk + 1) // 2
    return chunk


def dense_scores(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """Inner products of normalised embeddings, queries (B, H) x passages (N, H): (B, N)."""
    return queries @ passages.T  # (B, N)


def _sparse_block(
    q_vocab: torch.Tensor,
    q_local: torch.Tensor,
    q_weights: torch.Tensor,
    p_ids: torch.Tensor,
    p_weights: torch.Tensor,
) -> torch.Tensor:
    num_queries, vocab = q_local.size(0), q_vocab.numel()
    # a passage id that no query holds goes to an extra column `vocab`, dropped before the product
    slot = torch.searchsorted(q_vocab, p_ids).clamp(max=vocab - 1)  # (C, Lp)
    p_local = torch.where(q_vocab[slot] == p_ids, slot, vocab)  # (C, Lp)
    # scatter-max dedupes repeated ids within a text: weight of id t = max over its occurrences
    q_vec = q_weights.new_zeros(num_queries, vocab).scatter_reduce(1, q_local, q_weights, "amax")  # (B, U)
    p_vec = p_weights.new_zeros(p_ids.size(0), vocab + 1).scatter_reduce(
        1, p_local, p_weights, "amax"
    )  # (C, U+1)
    return q_vec @ p_vec[:, :vocab].T  # (B, C)


def sparse_scores(
    q_ids: torch.Tensor,
    q_weights: torch.Tensor,
    p_ids: torch.Tensor,
    p_weights: torch.Tensor,
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Lexical matching score sum_{t in q and p} w_q(t) * w_p(t), w(t) = max weight of id t in the text.

    The value of BGE-M3's sparse score (modeling.py builds (B, L, V) with scatter and maxes over L), but
    no (B, L, V) or (B, V) tensor exists: the ids of the batch's queries, at most B*Lq of them (U), form
    a local vocabulary; each text becomes a (U,) vector by scatter-max and the score is one matmul.
    With a 250,002-id vocabulary, B=16 queries of 32 and 128 passages of 128 tokens that is 144 x 512
    floats instead of 128 x 128 x 250,002 (15.3 GiB at float32). Passages are processed in chunks of at
    most `max_chunk_elements` elements of (B + C) x (U + 1).

    Inputs: q_ids (B, Lq), q_weights (B, Lq), p_ids (N, Lp), p_weights (N, Lp): ids and token weights
    from `M3Heads` (already 0 at padding and special tokens). Returns (B, N).
    """
    q_vocab, q_local = torch.unique(q_ids, return_inverse=True)  # (U,), (B, Lq)

    def cost(chunk: int) -> int:
        return (q_ids.size(0) + chunk) * (q_vocab.numel() + 1)

    chunk = _passage_chunk(p_ids.size(0), cost, max_chunk_elements)
    blocks = [
        _sparse_block(q_vocab, q_local, q_weights, ids, weights)  # (B, C)
        for ids, weights in zip(p_ids.split(chunk), p_weights.split(chunk), strict=True)
    ]
    return torch.cat(blocks, dim=1)  # (B, N)


def colbert_scores(
    q_vecs: torch.Tensor,
    q_mask: torch.Tensor,
    p_vecs: torch.Tensor,
    p_mask: torch.Tensor,
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """MaxSim: for each query token the best inner product over the passage's tokens, averaged over the
    query's tokens (modeling.py `compute_colbert_score` divides the sum by `q_mask[:, 1:].sum()`).

    Passage padding is excluded from the max, as BGEM3FlagModel does by cutting padded vectors
    (m3.py `_process_colbert_vecs`). FlagEmbedding's training instead lets the zero vectors of padding
    take part, which floors each MaxSim of a padded passage at 0; the two agree on unpadded passages.

    The (B, Lq, C, Lp) token-score block is built for C passages at a time, at most
    `max_chunk_elements` elements; only the argmax indices (B, Lq, C) are kept for the backward.

    Inputs: q_vecs (B, Lq, D), q_mask (B, Lq), p_vecs (N, Lp, D), p_mask (N, Lp) from `M3Heads`
    (`colbert`, `colbert_mask`). Returns (B, N).
    """
    num_queries, q_len = q_mask.shape
    p_len = p_mask.size(1)
    q_weight = q_mask.to(q_vecs.dtype)  # (B, Lq)
    q_count = q_weight.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)

    def cost(chunk: int) -> int:
        return num_queries * q_len * chunk * p_len

    chunk = _passage_chunk(p_vecs.size(0), cost, max_chunk_elements)
    blocks = []
    for vecs, mask in zip(p_vecs.split(chunk), p_mask.split(chunk), strict=True):
        padding = ~mask.bool()  # (C, Lp)
        token_scores = torch.einsum("bid,njd->binj", q_vecs, vecs)  # (B, Lq, C, Lp)
        # in place: einsum's backward keeps its inputs, not this output
        token_scores.masked_fill_(padding, torch.finfo(token_scores.dtype).min)
        best = token_scores.max(dim=-1).values  # (B, Lq, C)
        best = best.masked_fill(padding.all(-1), 0.0)  # (B, Lq, C); a passage of CLS alone scores 0
        blocks.append((best * q_weight[..., None]).sum(1) / q_count)  # (B, C)
    return torch.cat(blocks, dim=1)  # (B, N)


def ensemble_scores(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    colbert: torch.Tensor,
    dense_weight: float = 1.0,
    sparse_weight: float = 0.3,
    colbert_weight: float = 1.0,
) -> torch.Tensor:
    """BGE-M3's training ensemble s_dense + 0.3 s_sparse + s_colbert (modeling.py `ensemble_score` and
    `compute_score` defaults). All (B, N); returns (B, N).

    BGEM3FlagModel's retrieval-time `compute_score` defaults differ ([0.4, 0.2, 0.4]): those rank,
    these teach.
    """
    return dense_weight * dense + sparse_weight * sparse + colbert_weight * colbert  # (B, N)


def m3_scores(
    queries: M3Output, passages: M3Output, max_chunk_elements: int = MAX_CHUNK_ELEMENTS
) -> M3Scores:
    """Dense, sparse and ColBERT scores of B queries against N passages of the same rank: each (B, N)."""
    return M3Scores(
        dense=dense_scores(queries.dense, passages.dense),
        sparse=sparse_scores(
            queries.input_ids,
            queries.token_weights,
            passages.input_ids,
            passages.token_weights,
            max_chunk_elements,
        ),
        colbert=colbert_scores(
            queries.colbert, queries.colbert_mask, passages.colbert, passages.colbert_mask, max_chunk_elements
        ),
    )
