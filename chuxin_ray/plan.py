"""`chuxin-ray plan CONFIG`: what a real-scale run needs before GPUs are booked. Arithmetic only: no
Ray, no storage, no network.

    FLOPs      training 6 N D, inference 2 N D (Kaplan et al. 2020, arXiv:2001.08361 sec. 2.1), where
               D = tokens and N = the weights each token is multiplied by (embedding lookups cost no
               FLOPs; attention scores and their weighted sum, 4 L S H per token forward, add ~8%
               at S = 512 for bge-m3 and are left to the MFU assumption)
    GPU-hours  FLOPs / (peak bf16 dense FLOP/s x MFU) / 3600
    nodes      ceil(GPU-hours / (gpus_per_node x target_hours)); wall hours = GPU-hours / GPUs booked
    bytes      what a stage reads from and writes to object storage; read MB/s over its wall time
    CPU stages (ingest, tokenize): core-hours from the rates bench/ingest.py measured (plan.measured)

Counts come from the `plan` section; steps, lengths, group sizes and negatives from the stage sections
when the config has them (else each training stage is one epoch at the schema defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from chuxin_ray.config import (
    Config,
    ConfigError,
    FinetuneConfig,
    LLMCallConfig,
    MineConfig,
    ModelShape,
    PlanConfig,
    PretrainConfig,
    ScoreConfig,
    SynthesizeConfig,
    UnifiedConfig,
)


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_flops: float  # dense, no 2:4 sparsity
    memory_bytes: float
    source: str


GPUS: dict[str, Gpu] = {
    "h100": Gpu(
        "NVIDIA H100 SXM5 80GB",
        989e12,
        80e9,
        "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOP/s with sparsity = 989 dense",
    ),
    "a100": Gpu(
        "NVIDIA A100 SXM4 80GB",
        312e12,
        80e9,
        "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOP/s dense (624 with sparsity)",
    ),
    "h200": Gpu(
        "NVIDIA H200 SXM 141GB",
        989e12,
        141e9,
        "NVIDIA H200 datasheet: BF16 1,979 TFLOP/s with sparsity = 989 dense (the H100 SXM's compute)",
    ),
}

# config.json of each model on the Hugging Face hub (read by hand; nothing is downloaded here).
BGE_M3 = ModelShape(
    kind="encoder",
    layers=24,
    hidden=1024,
    vocab=250_002,
    intermediate=4096,
    heads=16,
    position_embeddings=8194,
)
XLMR_LARGE = BGE_M3.model_copy(update={"position_embeddings": 514})
QWEN25_72B = ModelShape(
    kind="decoder",
    layers=80,
    hidden=8192,
    vocab=152_064,
    intermediate=29_568,
    heads=64,
    kv_heads=8,
    tied_embeddings=False,
)
KNOWN_SHAPES: dict[str, tuple[ModelShape, str]] = {  # last part of a model id, lower case
    "bge-m3": (BGE_M3, "BAAI/bge-m3"),
    "bge-m3-retromae": (BGE_M3, "BAAI/bge-m3 (RetroMAE checkpoint, same shape)"),
    "bge-m3-unsupervised": (BGE_M3, "BAAI/bge-m3 (same shape)"),
    "bge-reranker-v2-m3": (BGE_M3, "BAAI/bge-reranker-v2-m3 (bge-m3 shape)"),
    "chuxin-embedding": (BGE_M3, "chuxin-llm/Chuxin-Embedding (bge-m3 shape)"),
    "xlm-roberta-large": (XLMR_LARGE, "FacebookAI/xlm-roberta-large"),
    "qwen2.5-72b-instruct": (QWEN25_72B, "Qwen/Qwen2.5-72B-Instruct"),
    "qwen2.5-72b": (QWEN25_72B, "Qwen/Qwen2.5-72B"),
}

CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights + AdamW's two fp32 moments
EMBEDDING_BYTES = 4  # mine writes float32 vectors
TOKEN_ID_BYTES = 4  # tokenize writes int32 ids


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def total_params(m: ModelShape) -> int:
    """Every parameter, biases and norms included (bge-m3: 567,754,752; Qwen2.5-72B: 72.7e9)."""
    h, i, v, layers = m.hidden, m.intermediate, m.vocab, m.layers
    if m.kind == "encoder":
        embeddings = v * h + m.position_embeddings * h + h + 2 * h  # words, positions, 1 segment type, LN
        layer = 4 * h * h + 4 * h + 2 * h + 2 * h * i + i + h + 2 * h  # attention + LN, FFN + LN
        return embeddings + layers * layer + h * h + h  # + pooler
    kv = kv_width(m)
    layer = 2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * i + 2 * h  # q,o + k,v (+ qkv bias), SwiGLU, 2 norms
    return v * h * (1 if m.tied_embeddings else 2) + layers * layer + h


def matmul_params(m: ModelShape) -> int:
    """N of 2 N D: the weight matrices every token passes through (biases and norms: < 0.2%)."""
    h, i = m.hidden, m.intermediate
    if m.kind == "encoder":
        return m.layers * (4 * h * h + 2 * h * i)
    return m.layers * (2 * h * h + 2 * h * kv_width(m) + 3 * h * i) + m.vocab * h  # + the LM head


def kv_width(m: ModelShape) -> int:
    return m.hidden * (m.kv_heads or m.heads) // m.heads


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    stage: str
    formula: str  # what FLOPs (or core-hours) is the product of, with its numbers
    detail: str  # where those numbers came from
    flops: float | None = None
    gpu_hours: float | None = None
    cpu_core_hours: float | None = None
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    llm_tokens: float | None = None
    nodes: int | None = None
    wall_hours: float | None = None

    @property
    def read_mb_s(self) -> float | None:
        return self.bytes_read / (self.wall_hours * 3600) / 1e6 if self.wall_hours else None


@dataclass
class Plan:
    cfg: PlanConfig
    gpu: Gpu
    shapes: dict[str, tuple[ModelShape, str]]  # role -> (shape, where it came from)
    rows: list[Row]
    figures: list[tuple[str, str, str, str]]  # (figure, value, hardware, source)
    notes: list[str] = field(default_factory=list)

    @property
    def total_gpu_hours(self) -> float:
        return sum(r.gpu_hours or 0.0 for r in self.rows)


def shape_for(
    override: ModelShape | None, model: str | None, role: str, default: str
) -> tuple[ModelShape, str]:
    if override is not None:
        return override, f"plan.{role}"
    name = (model or "").rstrip("/").rsplit("/", 1)[-1].lower()
    if name in KNOWN_SHAPES:
        shape, source = KNOWN_SHAPES[name]
        return shape, f"{source}, matched by name from {model}"
    shape, source = KNOWN_SHAPES[default]
    why = f"{model!r} is not a known shape; set plan.{role}" if model else "default"
    return shape, f"{source} ({why})"


def make_plan(cfg: Config) -> Plan:
    p: PlanConfig = cfg.plan
    if p is None:
        raise ConfigError(
            "config has no `plan` section; `chuxin-ray plan` needs one (see jobs/plan-chuxin.yaml)"
        )
    gpu = GPUS[p.gpu]
    encoder_model = next((s.model for s in (cfg.finetune, cfg.pretrain) if s is not None and s.model), None)
    shapes = {
        "encoder": shape_for(
            p.encoder, encoder_model or (cfg.mine.encoder if cfg.mine else None), "encoder", "bge-m3"
        ),
        "reranker": shape_for(p.reranker, cfg.score.reranker if cfg.score else None, "reranker", "bge-m3"),
        "llm": shape_for(p.llm, cfg.serve.model if cfg.serve else None, "llm", "qwen2.5-72b-instruct"),
    }
    measured = {m.name: m for m in p.measured}
    enc, rer, llm = (shapes[k][0] for k in ("encoder", "reranker", "llm"))
    rows = [
        *_corpus_rows(p, measured),
        _pretrain_row(cfg.pretrain, p, enc),
        *_llm_rows(cfg.synthesize, p, llm),
        *_mine_rows(cfg.mine, cfg.score, p, enc, rer),
        _contrastive_row("finetune", cfg.finetune, p.finetune_pairs, "finetune_pairs", p, enc),
        _contrastive_row("unified", cfg.unified, p.refinement_pairs, "refinement_pairs", p, enc),
    ]
    for row in rows:
        _place(row, p, gpu, measured)
        training = getattr(getattr(cfg, row.stage, None), "training", None)
        if training is not None and training.gpus_per_worker > 0:  # what the configured workers take
            gpus = training.workers * training.gpus_per_worker
            row.detail += f"; on the configured {gpus:g} GPUs: {row.gpu_hours / gpus:,.1f} h"
    llm_weights = 2 * total_params(llm)
    notes = [
        "evaluate and export are not planned: minutes on one GPU for C-MTEB-sized sets",
        "bytes are uncompressed text or raw arrays: upper bounds for zstd Parquet outputs",
        f"checkpoints: {CHECKPOINT_BYTES_PER_PARAM} bytes per parameter (fp32 weights + AdamW moments), "
        "one per checkpoint_every steps; storage holds keep_checkpoints of them at a time",
        f"LLM replicas: bf16 weights are {_n(llm_weights, 'B')}: at least "
        f"{math.ceil(llm_weights / (0.9 * gpu.memory_bytes))} x {gpu.name} per replica before the KV cache",
    ]
    return Plan(p, gpu, shapes, rows, _figures(p, gpu, measured), notes)


def _value(section: Any, schema: type[BaseModel], key: str) -> Any:
    """A stage setting: the config's when it has the section, else the schema's default."""
    return getattr(section, key) if section is not None else schema.model_fields[key].default


def _corpus_rows(p: PlanConfig, measured: dict) -> list[Row]:
    """ingest, tokenize: CPU work, core-hours from the measured rates."""
    raw_bytes = p.pretrain_texts * p.text_tokens * p.bytes_per_token
    corpus_tokens = p.pretrain_texts * p.text_tokens
    return [
        _cpu_row(
            "ingest",
            p.pretrain_texts,
            measured.get("ingest_records_per_core_s"),
            f"{_n(p.pretrain_texts)} texts x {_n(p.text_tokens)} tokens x {p.bytes_per_token} bytes read; "
            "written <= read (kept text)",
            raw_bytes,
            raw_bytes,
        ),
        _cpu_row(
            "tokenize",
            p.pretrain_texts,
            measured.get("tokenize_texts_per_core_s"),
            f"reads ingest's output; writes {_n(corpus_tokens)} int32 token ids",
            raw_bytes,
            corpus_tokens * TOKEN_ID_BYTES,
        ),
    ]


def _pretrain_row(section: PretrainConfig | None, p: PlanConfig, enc: ModelShape) -> Row:
    """RetroMAE: the encoder and one decoder layer on every token, the LM head only at masked positions
    (models/retromae.py computes logits at labelled rows only)."""
    r_enc = _value(section, PretrainConfig, "encoder_mask_ratio")
    r_dec = _value(section, PretrainConfig, "decoder_mask_ratio")
    length = _value(section, PretrainConfig, "max_length")
    samples, steps, src = _samples(section, p.pretrain_texts, "pretrain_texts")
    tokens = samples * min(p.text_tokens, length)
    layer = matmul_params(enc) // enc.layers
    n = matmul_params(enc) + layer + (r_enc + r_dec) * enc.hidden * enc.vocab
    return Row(
        "pretrain",
        f"6 x N {_n(n)} x D {_n(tokens)}",
        f"N = encoder {_n(matmul_params(enc))} + decoder layer {_n(layer)} + ({r_enc} + {r_dec}) x H x V; "
        f"D = {src} x min({_n(p.text_tokens)}, max_length {length}) tokens",
        flops=6 * n * tokens,
        bytes_read=tokens * TOKEN_ID_BYTES,
        bytes_written=_checkpoint_bytes(section, steps, enc),
    )


def _llm_rows(section: SynthesizeConfig | None, p: PlanConfig, llm: ModelShape) -> list[Row]:
    """synthesize, judge: prefill and decode both cost 2 N per token."""
    per_passage = _value(section, SynthesizeConfig, "queries_per_passage")
    max_tokens = section.llm.max_tokens if section else LLMCallConfig.model_fields["max_tokens"].default
    passages = p.synthesis_passages
    prompt = passages * (p.prompt_tokens + p.passage_tokens)
    completion = passages * min(max_tokens, per_passage * (p.query_tokens + 1))  # +1: a newline per query
    queries = passages * per_passage
    judged = queries * (p.prompt_tokens + p.query_tokens + p.passage_tokens + p.judge_answer_tokens)
    pair_bytes = queries * (p.query_tokens + p.passage_tokens) * p.bytes_per_token
    n = matmul_params(llm)
    return [
        Row(
            "synthesize",
            f"2 x N {_n(n)} x D {_n(prompt + completion)}",
            f"D = {_n(passages)} passages x ({p.prompt_tokens} prompt + {_n(p.passage_tokens)} passage "
            f"+ min({max_tokens}, {per_passage} x ({_n(p.query_tokens)} + 1)) completion) tokens",
            flops=2 * n * (prompt + completion),
            bytes_read=passages * p.passage_tokens * p.bytes_per_token,
            bytes_written=pair_bytes,
            llm_tokens=prompt + completion,
        ),
        Row(
            "judge",
            f"2 x N {_n(n)} x D {_n(judged)}",
            f"D = {_n(queries)} queries x ({p.prompt_tokens} prompt + {_n(p.query_tokens)} query + "
            f"{_n(p.passage_tokens)} passage + {p.judge_answer_tokens} answer) tokens (before query rules)",
            flops=2 * n * judged,
            bytes_read=pair_bytes,
            bytes_written=pair_bytes,
            llm_tokens=judged,
        ),
    ]


def _mine_rows(
    mine: MineConfig | None, score: ScoreConfig | None, p: PlanConfig, enc: ModelShape, rer: ModelShape
) -> list[Row]:
    """mine: embed corpus and queries, then exact inner-product search with the corpus vectors streamed
    once per query shard; score: the reranker reads every (query, passage) pair."""
    mined = p.mined_pairs if p.mined_pairs is not None else p.finetune_pairs + p.refinement_pairs
    corpus = p.mine_corpus_passages if p.mine_corpus_passages is not None else p.pretrain_texts
    q_len = min(p.query_tokens, _value(mine, MineConfig, "query_max_length"))
    p_len = min(p.passage_tokens, _value(mine, MineConfig, "passage_max_length"))
    negatives = _value(mine, MineConfig, "negative_number")
    shard_rows = _value(mine, MineConfig, "query_shard_rows")
    max_length = _value(score, ScoreConfig, "max_length")
    embed_tokens = corpus * p_len + mined * q_len
    vector = enc.hidden * EMBEDDING_BYTES
    query_shards = math.ceil(mined / shard_rows)
    pairs = mined * (1 + negatives)
    pair_len = min(p.query_tokens + p.passage_tokens, max_length)
    pairs_text = mined * (p.query_tokens + (1 + negatives) * p.passage_tokens) * p.bytes_per_token
    return [
        Row(
            "mine (embed)",
            f"2 x N {_n(matmul_params(enc))} x D {_n(embed_tokens)}",
            f"D = {_n(corpus)} passages x {_n(p_len)} + {_n(mined)} queries x {_n(q_len)} tokens; "
            f"writes float32 vectors of H = {enc.hidden}",
            flops=2 * matmul_params(enc) * embed_tokens,
            bytes_read=(corpus * p.passage_tokens + mined * p.query_tokens) * p.bytes_per_token,
            bytes_written=(corpus + mined) * vector,
        ),
        Row(
            "mine (search)",
            f"2 x H {enc.hidden} x Q {_n(mined)} x C {_n(corpus)}",
            f"every query against every passage; each of {_n(query_shards)} query shards "
            f"({shard_rows} rows) streams the {_n(corpus * vector, 'B')} corpus vectors",
            flops=2 * enc.hidden * mined * corpus,
            bytes_read=query_shards * corpus * vector + mined * vector,
            bytes_written=pairs_text,
        ),
        Row(
            "score",
            f"2 x N {_n(matmul_params(rer))} x D {_n(pairs * pair_len)}",
            f"D = {_n(mined)} queries x (1 + {negatives}) pairs x min({_n(p.query_tokens + p.passage_tokens)}, "
            f"max_length {max_length}) tokens",
            flops=2 * matmul_params(rer) * pairs * pair_len,
            bytes_read=pairs_text,
            bytes_written=pairs_text,
        ),
    ]


def _samples(section, count: int, key: str) -> tuple[float, int | None, str]:
    """Samples a training stage sees: steps x global batch from its section, else one epoch of `count`."""
    if section is None:
        return count, None, f"{key} {_n(count)} (one epoch)"
    t = section.training
    batch = t.workers * t.batch_size * t.grad_accumulation
    epochs = t.steps * batch / count if count else 0.0
    return t.steps * batch, t.steps, f"{t.steps} steps x {batch} ({epochs:.2f} epochs of {key})"


def _checkpoint_bytes(section, steps: int | None, shape: ModelShape) -> float:
    every = section.training.checkpoint_every if section else None
    checkpoints = math.ceil(steps / every) if steps and every else 1
    return checkpoints * CHECKPOINT_BYTES_PER_PARAM * total_params(shape)


def _contrastive_row(
    stage: str,
    section: FinetuneConfig | UnifiedConfig | None,
    count: int,
    key: str,
    p: PlanConfig,
    enc: ModelShape,
) -> Row:
    group = _value(section, FinetuneConfig, "group_size")
    q_max = _value(section, FinetuneConfig, "query_max_length")
    p_max = _value(section, FinetuneConfig, "passage_max_length")
    grad_cache = bool(section and section.grad_cache_chunk)
    samples, steps, src = _samples(section, count, key)
    tokens = samples * (min(p.query_tokens, q_max) + group * min(p.passage_tokens, p_max))
    n = matmul_params(enc)
    heads = ""
    if stage == "unified":  # ColBERT linear H x H and sparse linear H x 1 on every token
        n += enc.hidden * enc.hidden + enc.hidden
        heads = " + colbert H x H + sparse H"
    # GradCache runs the forward twice (once without grad to get the embeddings): 8 N D, not 6 N D
    k = 8 if grad_cache else 6
    return Row(
        stage,
        f"{k} x N {_n(n)} x D {_n(tokens)}",
        f"N = encoder{heads}; D = {src} x (min({_n(p.query_tokens)}, {q_max}) + {group} x "
        f"min({_n(p.passage_tokens)}, {p_max})) tokens" + ("; GradCache: 8 N D" if grad_cache else ""),
        flops=k * n * tokens,
        bytes_read=samples * (p.query_tokens + group * p.passage_tokens) * p.bytes_per_token,
        bytes_written=_checkpoint_bytes(section, steps, enc),
    )


def _cpu_row(stage: str, records: int, figure, detail: str, read: float, written: float) -> Row:
    if figure is None:
        return Row(
            stage,
            f"no measured rate: run bench/ingest.py and set plan.measured ({stage})",
            detail,
            bytes_read=read,
            bytes_written=written,
        )
    hours = records / figure.value / 3600
    return Row(
        stage,
        f"{_n(records)} records / {figure.value:,.0f} per core-s / 3600",
        detail,
        cpu_core_hours=hours,
        bytes_read=read,
        bytes_written=written,
    )


def _place(row: Row, p: PlanConfig, gpu: Gpu, measured: dict) -> None:
    """GPU-hours, nodes for the target wall time, the wall time those nodes give."""
    if row.flops is None:
        row.wall_hours = p.target_hours  # CPU stages: as many cores as the target needs
        return
    mfu = p.llm_mfu if row.llm_tokens is not None else p.mfu
    row.gpu_hours = row.flops / (gpu.bf16_flops * mfu) / 3600
    overhead = measured.get("synthesis_stage_overhead")
    if row.llm_tokens is not None and overhead is not None:
        row.gpu_hours /= 1 - overhead.value  # bench/synthesis.py: 1 - stage rate / plain client rate
    row.nodes = max(1, math.ceil(row.gpu_hours / (p.gpus_per_node * p.target_hours)))
    row.wall_hours = row.gpu_hours / (row.nodes * p.gpus_per_node)


def _figures(p: PlanConfig, gpu: Gpu, measured: dict) -> list[tuple[str, str, str, str]]:
    rows = [
        ("peak bf16 dense FLOP/s", f"{gpu.bf16_flops / 1e12:,.0f} TFLOP/s", gpu.name, gpu.source),
        ("MFU, encoder training and inference", f"{p.mfu}", gpu.name, "assumption: plan.mfu"),
        ("MFU, LLM prefill + decode", f"{p.llm_mfu}", gpu.name, "assumption: plan.llm_mfu"),
    ]
    for name in ("ingest_records_per_core_s", "tokenize_texts_per_core_s", "synthesis_stage_overhead"):
        m = measured.get(name)
        rows.append(
            (name, f"{m.value:,.4g}", m.hardware, m.source) if m else (name, "not measured", "—", "—")
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def _n(value: float, unit: str = "") -> str:
    """3-4 significant digits: 5.205e8, or bytes in SI units."""
    if unit == "B":
        for scale, name in ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.0f} B"
    if value == int(value) and abs(value) < 1e5:
        return f"{int(value)}"
    return f"{value:.4g}".replace("e+0", "e").replace("e+", "e")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _opt(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def render(plan: Plan) -> str:
    p = plan.cfg
    out = [
        f"chuxin-ray plan: {p.gpu} ({plan.gpu.name}), {p.gpus_per_node} GPUs per node, "
        f"target {p.target_hours:g} h per stage",
        "",
    ]
    out.append("Models")
    out.append(
        _table(
            ["role", "shape", "params", "N (matmul)", "from"],
            [
                [
                    role,
                    f"{s.kind} L={s.layers} H={s.hidden} I={s.intermediate} V={s.vocab}",
                    f"{total_params(s):,}",
                    f"{matmul_params(s):,}",
                    source,
                ]
                for role, (s, source) in plan.shapes.items()
            ],
        )
    )
    out += [
        "",
        "Throughput figures",
        _table(["figure", "value", "hardware", "source"], [list(f) for f in plan.figures]),
    ]
    out += ["", "Stages"]
    out.append(
        _table(
            [
                "stage",
                "FLOPs = k x N x D",
                "FLOPs",
                "GPU-h",
                "nodes",
                "wall h",
                "CPU core-h",
                "read",
                "written",
                "read MB/s",
                "LLM tokens",
            ],
            [
                [
                    r.stage,
                    r.formula,
                    _opt(r.flops, ".3e"),
                    _opt(r.gpu_hours, ",.1f"),
                    _opt(r.nodes, "d"),
                    _opt(r.wall_hours, ",.1f"),
                    _opt(r.cpu_core_hours, ",.1f"),
                    _n(r.bytes_read, "B"),
                    _n(r.bytes_written, "B"),
                    _opt(r.read_mb_s, ",.0f"),
                    _opt(r.llm_tokens, ".3e"),
                ]
                for r in plan.rows
            ],
        )
    )
    gpu_hours = plan.total_gpu_hours
    cpu_hours = [r.cpu_core_hours for r in plan.rows if r.flops is None]
    llm_tokens = sum(r.llm_tokens or 0.0 for r in plan.rows)
    out += [
        "",
        "Totals",
        f"  GPU-hours      {gpu_hours:,.1f} ({gpu_hours / 24:,.1f} GPU-days) on {plan.gpu.name}",
        f"  wall time      {sum(r.wall_hours or 0 for r in plan.rows if r.flops):,.1f} h of GPU stages run "
        f"one after another, at most {max((r.nodes or 0) for r in plan.rows)} nodes at once",
        "  CPU core-hours "
        + (f"{sum(cpu_hours):,.1f}" if None not in cpu_hours else "not measured (bench/ingest.py)"),
        f"  storage        {_n(sum(r.bytes_read for r in plan.rows), 'B')} read, "
        f"{_n(sum(r.bytes_written for r in plan.rows), 'B')} written",
        f"  LLM tokens     {llm_tokens:.3e} (prompt + completion, synthesize + judge)",
        "",
        "How each row was computed",
    ]
    out += [f"  {r.stage:<14} {r.detail}" for r in plan.rows]
    out += ["", "Notes", *(f"  - {note}" for note in plan.notes)]
    return "\n".join(out)


def main(cfg: Config) -> Plan:
    plan = make_plan(cfg)
    print(render(plan))
    return plan
