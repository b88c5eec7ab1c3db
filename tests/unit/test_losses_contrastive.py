"""InfoNCE, teacher-score distillation and the unified M3 loss against hand computations; cross-device
InfoNCE on 2 gloo processes against one process holding the whole batch.

No transformers import here: it costs ~15 s, and the spawned ranks import this module too.
"""

from __future__ import annotations

import dataclasses
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from chuxin_ray.losses.gather import all_gather_with_grad
from chuxin_ray.losses.infonce import InfoNCELoss, group_logits, info_nce, positive_columns
from chuxin_ray.losses.kl_distill import KLDistillLoss
from chuxin_ray.losses.m3_kd_distill import M3KDDistillLoss
from chuxin_ray.losses.unified import UnifiedLoss, UnifiedLossWeights
from chuxin_ray.train.grad_cache import grad_cache_backward


def _log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


# ---------------------------------------------------------------- InfoNCE


def test_info_nce_equals_hand_written_cross_entropy():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (B=2, H=2)
    passages = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])  # (B*G=4, H), G=2
    loss = InfoNCELoss(temperature=0.5)(queries, passages)
    # scale 1/0.5 = 2; query 0 -> column 0, query 1 -> column 2
    row0 = [2.0, 1.2, 0.0, 1.6]
    row1 = [0.0, 1.6, 2.0, 1.2]
    expected = ((_log_sum_exp(row0) - row0[0]) + (_log_sum_exp(row1) - row1[2])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_defaults_and_own_group_mode():
    assert InfoNCELoss().temperature == 0.02  # FlagEmbedding AbsArguments.py `temperature`
    torch.manual_seed(0)
    queries = F.normalize(torch.randn(3, 4), dim=-1)  # (B, H)
    passages = F.normalize(torch.randn(3 * 5, 4), dim=-1)  # (B*G, H)
    own = InfoNCELoss(in_batch_negatives=False)(queries, passages)
    logits = torch.stack([passages[i * 5 : (i + 1) * 5] @ queries[i] for i in range(3)]) / 0.02  # (B, G)
    assert own.item() == pytest.approx(
        F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)).item(), rel=1e-6
    )
    # in-batch negatives only add candidates: the loss cannot fall
    assert InfoNCELoss()(queries, passages).item() >= own.item()


def test_positive_columns_and_group_logits():
    assert positive_columns(3, 12, 4).tolist() == [0, 4, 8]
    assert positive_columns(3, 24, 4, query_offset=3).tolist() == [12, 16, 20]
    assert positive_columns(3, 4, 4).tolist() == [0, 0, 0]
    scores = torch.arange(24.0).view(2, 12)  # (B=2, W*B*G=12), G=3, rank 1 of 2
    assert group_logits(scores, 3, query_offset=2).tolist() == [[6.0, 7.0, 8.0], [21.0, 22.0, 23.0]]
    with pytest.raises(ValueError, match="whole number of groups"):
        positive_columns(2, 7, 3)


# ---------------------------------------------------------------- distillation


def test_kl_distill_is_zero_when_student_equals_teacher_and_matches_hand_kl():
    scores = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, -0.4]])  # (B, G)
    assert KLDistillLoss(temperature=0.5, teacher_temperature=0.5)(scores, scores).item() == pytest.approx(
        0.0, abs=1e-7
    )
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 1.0]])  # (B, G)
    loss = KLDistillLoss(temperature=0.5, teacher_temperature=1.0)(scores, teacher)
    expected = 0.0
    for s_row, t_row in zip(scores.tolist(), teacher.tolist(), strict=True):
        s_lse, t_lse = _log_sum_exp([s / 0.5 for s in s_row]), _log_sum_exp(t_row)
        for s, t in zip(s_row, t_row, strict=True):
            p = math.exp(t - t_lse)
            expected += p * ((t - t_lse) - (s / 0.5 - s_lse))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)


def _m3_kd_by_hand(
    logits: list[list[float]], teacher: list[list[float]], group_size: int, offset: int
) -> float:
    total = 0.0
    for i, (row, t_row) in enumerate(zip(logits, teacher, strict=True)):
        weights = [math.exp(t - _log_sum_exp(t_row)) for t in t_row]
        first = 0 if len(row) == group_size else (offset + i) * group_size
        for j in range(group_size):
            removed = {first + k for k in range(j)}
            candidates = [s for c, s in enumerate(row) if c not in removed]
            total += weights[j] * (_log_sum_exp(candidates) - row[first + j])
    return total / len(logits)


@pytest.mark.parametrize(("columns", "offset"), [(12, 0), (24, 3), (4, 0)])
def test_m3_kd_matches_hand_computation(columns: int, offset: int):
    torch.manual_seed(1)
    student = torch.randn(3, columns, requires_grad=True)  # (B=3, N), G=4
    teacher = torch.randn(3, 4)  # (B, G)
    loss = M3KDDistillLoss(temperature=0.5)(student, teacher, query_offset=offset)
    expected = _m3_kd_by_hand((student.detach() / 0.5).tolist(), teacher.tolist(), 4, offset)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_m3_kd_with_one_hot_teacher_is_info_nce_and_is_lowest_for_a_matching_student():
    torch.manual_seed(2)
    student = torch.randn(2, 8)  # (B=2, B*G), G=4
    one_hot = torch.tensor([[60.0, 0.0, 0.0, 0.0]] * 2)  # softmax ~ (1, 0, 0, 0)
    kd = M3KDDistillLoss(temperature=0.5)(student, one_hot)
    assert kd.item() == pytest.approx(info_nce(student / 0.5, 4).item(), rel=1e-5)
    # own group only: a student ranking the group as the teacher does scores better than a reversed one
    teacher = torch.tensor([[3.0, 2.0, 1.0, 0.0]])  # (B=1, G)
    loss = M3KDDistillLoss(temperature=1.0)
    assert loss(teacher, teacher).item() < loss(teacher.flip(-1), teacher).item()


# ---------------------------------------------------------------- unified M3 loss


def test_unified_weights_default_to_flagembedding_constants():
    # FlagEmbedding 1.4.2 finetune/embedder/encoder_only/m3/modeling.py, forward() and ensemble_score()
    assert dataclasses.asdict(UnifiedLossWeights()) == {
        "dense": 1.0,
        "ensemble": 1.0,
        "sparse": 0.1,
        "colbert": 1.0,
        "heads_divisor": 4.0,
        "ensemble_dense": 1.0,
        "ensemble_sparse": 0.3,
        "ensemble_colbert": 1.0,
        "distill_dense": 1.0,
        "distill_sparse": 0.1,
        "distill_colbert": 1.0,
        "distill_divisor": 3.0,
        "total_divisor": 2.0,
    }


def _head_scores(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    dense = torch.rand(2, 6) * 2 - 1  # (B=2, B*G=6), G=3: cosines
    sparse = torch.rand(2, 6) * 0.5  # (B, B*G): lexical products
    colbert = torch.rand(2, 6) * 2 - 1  # (B, B*G)
    return dense, sparse, colbert


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    p = teacher.softmax(-1)
    return (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()


def test_unified_loss_is_the_documented_combination():
    dense, sparse, colbert = _head_scores()
    t = 0.02
    ensemble = dense / t + 0.3 * sparse / t + colbert / t
    l_d, l_s, l_c, l_e = (info_nce(x, 3) for x in (dense / t, sparse / t, colbert / t, ensemble))
    heads = (l_d + l_e + 0.1 * l_s + l_c) / 4

    loss = UnifiedLoss(self_distill_start_step=5)
    before = loss.terms(dense, sparse, colbert, group_size=3, step=5)
    assert "self_distill_dense" not in before
    assert before["loss"].item() == pytest.approx(heads.item(), rel=1e-5)

    after = loss.terms(dense, sparse, colbert, group_size=3, step=6)
    distill = (_kl(dense / t, ensemble) + 0.1 * _kl(sparse / t, ensemble) + _kl(colbert / t, ensemble)) / 3
    assert after["loss"].item() == pytest.approx(((heads + distill) / 2).item(), rel=1e-5)
    assert UnifiedLoss(use_self_distill=False)(dense, sparse, colbert, 3, step=100).item() == pytest.approx(
        heads.item(), rel=1e-5
    )


def test_unified_weights_change_the_loss_as_documented():
    dense, sparse, colbert = _head_scores()
    base = UnifiedLoss(use_self_distill=False).terms(dense, sparse, colbert, group_size=3, step=0)
    heavier = UnifiedLoss(UnifiedLossWeights(sparse=0.5), use_self_distill=False)(
        dense, sparse, colbert, 3, step=0
    )
    assert (heavier - base["loss"]).item() == pytest.approx(0.4 * base["sparse"].item() / 4, rel=1e-5)

    halved = UnifiedLoss(UnifiedLossWeights(heads_divisor=8.0), use_self_distill=False)(
        dense, sparse, colbert, 3, 0
    )
    assert halved.item() == pytest.approx(base["loss"].item() / 2, rel=1e-6)

    # the ensemble weights move only the ensemble term
    other = UnifiedLoss(UnifiedLossWeights(ensemble_sparse=1.0), use_self_distill=False)
    moved = other.terms(dense, sparse, colbert, group_size=3, step=0)
    assert moved["dense"].item() == base["dense"].item()
    assert moved["ensemble"].item() != pytest.approx(base["ensemble"].item(), rel=1e-3)
    ensemble = (dense + sparse + colbert) / 0.02
    assert moved["ensemble"].item() == pytest.approx(info_nce(ensemble, 3).item(), rel=1e-5)

    # the distillation weights move only the distillation part
    on = UnifiedLoss().terms(dense, sparse, colbert, group_size=3, step=0)
    no_sparse = UnifiedLoss(UnifiedLossWeights(distill_sparse=0.0))(dense, sparse, colbert, 3, step=0)
    assert (on["loss"] - no_sparse).item() == pytest.approx(
        0.1 * on["self_distill_sparse"].item() / 3 / 2, rel=1e-5
    )


def test_unified_cross_device_dense_uses_the_local_block_in_the_ensemble():
    dense, sparse, colbert = _head_scores()
    torch.manual_seed(4)
    other_rank = torch.rand(2, 6) * 2 - 1  # (B, B*G) dense scores against rank 0's passages
    cross = torch.cat([other_rank, dense], dim=1)  # (B, W*B*G) as seen by rank 1 of 2
    local = UnifiedLoss().terms(dense, sparse, colbert, group_size=3, step=0)
    spanning = UnifiedLoss().terms(cross, sparse, colbert, group_size=3, step=0, dense_query_offset=2)
    for name in ("ensemble", "sparse", "colbert", "self_distill_dense", "self_distill_colbert"):
        assert spanning[name].item() == pytest.approx(local[name].item(), rel=1e-6)
    assert spanning["dense"].item() == pytest.approx(
        info_nce(cross / 0.02, 3, query_offset=2).item(), rel=1e-6
    )


def test_unified_teacher_scores_select_the_distillation_form():
    dense, sparse, colbert = _head_scores()
    teacher = torch.tensor([[2.0, 0.5, -1.0], [1.0, 1.5, 0.0]])  # (B, G)
    kl = UnifiedLoss(use_self_distill=False).terms(dense, sparse, colbert, 3, 0, teacher_scores=teacher)
    expected = info_nce(dense / 0.02, 3) + KLDistillLoss()(group_logits(dense, 3), teacher)
    assert kl["dense"].item() == pytest.approx(expected.item(), rel=1e-5)
    m3 = UnifiedLoss(use_self_distill=False, kd_loss="m3_kd").terms(
        dense, sparse, colbert, 3, 0, teacher_scores=teacher
    )
    assert m3["colbert"].item() == pytest.approx(M3KDDistillLoss()(colbert, teacher).item(), rel=1e-5)


# ---------------------------------------------------------------- cross-device on 2 processes

WORLD, QUERIES, GROUP, FEATURES, HIDDEN = 2, 3, 4, 8, 16  # per-rank batch of 3 queries, 12 passages
# float64: at scale 1/0.02 the gradients reach ~10 and float32 summation order alone moves them by ~5e-6
CASES = ("info_nce", "info_nce+kl", "m3_kd")


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)  # identical weights on every rank, as DDP broadcasts them
    layers = [torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN)]
    return torch.nn.Sequential(*layers).double()


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(WORLD * QUERIES, FEATURES, generator=generator, dtype=torch.float64)  # (W*B, F)
    passages = torch.randn(
        WORLD * QUERIES * GROUP, FEATURES, generator=generator, dtype=torch.float64
    )  # (W*B*G, F)
    teacher = torch.randn(WORLD * QUERIES, GROUP, generator=generator, dtype=torch.float64)  # (W*B, G)
    return queries, passages, teacher


def _loss(
    case: str, encoder: torch.nn.Module, queries, passages, teacher, cross_device: bool
) -> torch.Tensor:
    q = F.normalize(encoder(queries), dim=-1)  # (B, H)
    p = F.normalize(encoder(passages), dim=-1)  # (B*G, H)
    info = InfoNCELoss(cross_device=cross_device)
    if case == "info_nce":
        return info(q, p)
    scores, offset = info.scores(q, p)  # (B, W*B*G) or (B, B*G)
    if case == "info_nce+kl":
        return info(q, p) + KLDistillLoss()(group_logits(scores, GROUP, offset), teacher)
    return M3KDDistillLoss()(scores, teacher, query_offset=offset)


def _rank_main(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    try:
        queries, passages, teacher = _data()
        rows = slice(rank * QUERIES, (rank + 1) * QUERIES)
        p_rows = slice(rank * QUERIES * GROUP, (rank + 1) * QUERIES * GROUP)
        for case in CASES:
            encoder = _encoder()
            loss = _loss(case, encoder, queries[rows], passages[p_rows], teacher[rows], cross_device=True)
            loss.backward()
            # what DDP does: average the gradients (and, for reporting, the losses) over ranks
            grads = [param.grad for param in encoder.parameters()]
            for grad in grads:
                dist.all_reduce(grad)
                grad /= WORLD
            total = loss.detach().clone()
            dist.all_reduce(total)
            if rank == 0:
                results[case] = (total.item() / WORLD, [grad.clone() for grad in grads])
        # GradCache under DDP: chunks of 2 rows, DDP averages once (no_sync on all but the last replay)
        ddp = torch.nn.parallel.DistributedDataParallel(_encoder())

        def encode(chunk):
            return ddp(chunk["x"])

        def loss_fn(q, p):
            return InfoNCELoss(cross_device=True)(F.normalize(q, dim=-1), F.normalize(p, dim=-1))

        batches = [{"x": queries[rows]}, {"x": passages[p_rows]}]
        loss = grad_cache_backward(encode, batches, loss_fn, chunk_size=2, no_sync=ddp.no_sync)
        dist.all_reduce(loss)
        if rank == 0:
            results["grad_cache+ddp"] = (
                loss.item() / WORLD,
                [p.grad.clone() for p in ddp.module.parameters()],
            )
        # the gather itself: values in rank order, gradient summed over ranks
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = all_gather_with_grad(x)  # (W*2, 3)
        (gathered * torch.arange(1.0, 5.0)[:, None]).sum().backward()
        if rank == 0:
            results["gather"] = (gathered.detach().clone(), x.grad.clone())
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    # Rank 0 saves its results to a file. No mp.Manager: it forks this process, which may hold a Ray
    # driver's threads from an earlier test, and a fork of a threaded process is not safe.
    out = tmp_path_factory.mktemp("two_ranks") / "results.pt"
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out)


def test_all_gather_with_grad_keeps_rank_order_and_sums_gradients(two_rank_results):
    gathered, grad = two_rank_results["gather"]
    assert gathered[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    # loss = sum_k (k+1) * row_k, summed over both ranks' losses: rank 0's rows 0-1 get 2 * (1, 2)
    assert grad[:, 0].tolist() == [2.0, 4.0]


@pytest.mark.parametrize(
    ("case", "reference"), [*((case, case) for case in CASES), ("grad_cache+ddp", "info_nce")]
)
def test_cross_device_equals_one_process_with_the_whole_batch(two_rank_results, case: str, reference: str):
    queries, passages, teacher = _data()
    encoder = _encoder()
    loss = _loss(reference, encoder, queries, passages, teacher, cross_device=False)
    loss.backward()
    rank_loss, rank_grads = two_rank_results[case]
    assert rank_loss == pytest.approx(loss.item(), rel=1e-12)
    for param, grad in zip(encoder.parameters(), rank_grads, strict=True):
        torch.testing.assert_close(grad, param.grad, rtol=1e-10, atol=1e-10)
