"""The schema of every stage: one pydantic model per config section.

A config file is YAML with one section per stage (plus `run`, `storage` and `ray`); a stage command
needs only its own section. Values come from the YAML, then dotted `key=value` overrides from the
command line. Everything is validated before any Ray work starts, and every error names the key and
what is allowed there.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what is allowed."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------------


class RunConfig(Section):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", description="run name (a DNS label)")
    output: str = Field(description="URI under which every stage writes `<output>/<stage>/`")


class StorageConfig(Section):
    """Object-storage settings. Anything left unset falls back to the standard AWS environment
    variables (AWS_ENDPOINT_URL[_S3], AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN). Secrets are SecretStr: never printed or hashed."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    anonymous: bool = False


class RayConfig(Section):
    address: str | None = Field(
        default=None, description="Ray cluster to join; unset: RAY_ADDRESS, else a local Ray"
    )
    num_cpus: int | None = Field(default=None, ge=1, description="local Ray only; unset: all cores")
    object_store_memory_mb: int | None = Field(default=None, ge=64, description="local Ray only")


# --------------------------------------------------------------------------------------------------
# Stage: ingest
# --------------------------------------------------------------------------------------------------


class FieldMap(Section):
    """Which source field holds what. `id: null` derives the id from the source name and text hash."""

    text: str = "text"
    id: str | None = None


class InputSpec(Section):
    uri: str = Field(description="a file or a prefix (all matching files below it)")
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    source: str | None = Field(default=None, description="source name; unset: the last path part")
    fields: FieldMap = FieldMap()


class CleaningRules(Section):
    """Rule-based cleaning; a record failing a rule is dropped with the first failing rule as reason."""

    min_chars: int = Field(default=8, ge=0)
    max_chars: int = Field(default=20_000, ge=1)
    min_cjk_ratio: float = Field(default=0.3, ge=0.0, le=1.0, description="CJK share of non-space chars")
    repeat_run: int = Field(default=5, ge=2, description="a character this many times in a row is a run")
    max_repeated_char_ratio: float = Field(default=0.2, ge=0.0, le=1.0, description="share in such runs")
    max_repeated_line_ratio: float = Field(default=0.3, ge=0.0, le=1.0, description="share of repeated lines")
    max_markup_ratio: float = Field(default=0.05, ge=0.0, le=1.0, description="share inside tags/entities")
    blocklist: list[str] = Field(default_factory=list, description="substrings that drop a record")

    @model_validator(mode="after")
    def _bounds(self) -> CleaningRules:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be <= max_chars ({self.max_chars})")
        return self


class DedupConfig(Section):
    enabled: bool = True
    normalize: Literal["nfkc_lower_nospace", "exact"] = Field(
        default="nfkc_lower_nospace",
        description="nfkc_lower_nospace: NFKC, lower-cased, whitespace removed before hashing",
    )
    num_partitions: int | None = Field(
        default=None, ge=1, description="key hash partitions; unset: about one per GB of input, >= cores"
    )


class IngestConfig(Section):
    inputs: list[InputSpec] = Field(min_length=1)
    output: str | None = Field(default=None, description="unset: <run.output>/ingest")
    rules: CleaningRules = CleaningRules()
    dedup: DedupConfig = DedupConfig()
    read_batch_rows: int = Field(
        default=32_768,
        ge=1,
        description="rows per block while reading; each block's kept rows are one data shard "
        "(larger blocks: fewer, larger shards and fewer object-store requests)",
    )


# --------------------------------------------------------------------------------------------------
# Stage: tokenize
# --------------------------------------------------------------------------------------------------


class TokenizeConfig(Section):
    tokenizer: str = Field(description="a Hugging Face fast tokenizer: local path or hub id")
    input: str | None = Field(default=None, description="unset: the ingest stage's output")
    output: str | None = Field(default=None, description="unset: <run.output>/tokenize")
    max_length: int = Field(default=512, ge=8, description="tokens per row, special tokens included")
    long_texts: Literal["truncate", "window"] = Field(
        default="truncate", description="window: split into overlapping windows of max_length"
    )
    stride: int = Field(default=64, ge=0, description="window mode: tokens shared by neighbouring windows")
    batch_size: int = Field(default=1024, ge=1, description="texts per tokenizer call")
    concurrency: int | None = Field(
        default=None, ge=1, description="tokenizer tasks at once; unset: all free cores"
    )

    @model_validator(mode="after")
    def _stride(self) -> TokenizeConfig:
        if self.long_texts == "window" and self.stride >= self.max_length - 2:
            raise ValueError(f"stride ({self.stride}) must be < max_length - 2 ({self.max_length - 2})")
        return self


# --------------------------------------------------------------------------------------------------
# Training (shared by pretrain and the finetuning stages)
# --------------------------------------------------------------------------------------------------


class TrainingConfig(Section):
    """The Ray Train loop: scale, precision, optimiser, schedule, checkpoints. Batch sizes are per worker:
    one optimizer step sees workers x batch_size x grad_accumulation sequences."""

    # -- scale
    workers: int = Field(default=1, ge=1, description="Ray Train workers (one process each)")
    gpus_per_worker: float = Field(default=0.0, ge=0.0, description="0: train on CPU")
    cpus_per_worker: float = Field(default=1.0, gt=0.0, description="fractional values pack workers tighter")
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="fsdp shards parameters, gradients and optimizer state across workers"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    check_resources: bool = Field(
        default=True,
        description="fail before fitting when the cluster cannot place the workers now; "
        "false on an autoscaling cluster that adds nodes on demand",
    )
    # -- optimisation
    steps: int = Field(ge=1, description="optimizer steps the run ends at, resumed runs included")
    batch_size: int = Field(default=32, ge=1, description="sequences per worker per micro-batch")
    grad_accumulation: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(default=1e-4, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0.0)
    warmup_ratio: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="share of steps with linear warmup; then linear decay to 0"
    )
    max_grad_norm: float | None = Field(default=1.0, gt=0.0, description="null: no clipping")
    gradient_checkpointing: bool = Field(
        default=False, description="true cuts encoder activation memory ~L-fold for ~30% more compute"
    )
    seed: int = 42
    # -- data
    bucket_batches: int = Field(
        default=64, ge=1, description="micro-batches sorted by length together; more: less padding"
    )
    # -- checkpoints and metrics
    run_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,127}$",
        description="Ray Train run; a rerun with the same name resumes. Unset: run.name",
    )
    checkpoint_every: int = Field(default=500, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1, description="latest checkpoints kept in storage")
    max_failures: int = Field(
        default=3, ge=0, description="worker-group restarts from the latest checkpoint before giving up"
    )
    report_every_s: float = Field(
        default=2.0,
        ge=0.0,
        description="least seconds between a step's metrics going to Ray Train (checkpoints always do). A "
        "report waits for the controller's poll of the worker (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): "
        "at the default none waits, while 0, every step, would pace the run at one step per poll. "
        "metrics.jsonl has every step regardless",
    )
    # -- test hooks: leave unset in real runs
    stop_after_steps: int | None = Field(
        default=None, ge=1, description="tests: end the run cleanly after this step, as if interrupted"
    )
    fail_at_step: int | None = Field(
        default=None,
        ge=1,
        description="tests: the last worker exits at this step of a run begun from scratch",
    )
    record_rows: bool = Field(default=False, description="tests: metrics lines list the rows they trained on")

    @model_validator(mode="after")
    def _bounds(self) -> TrainingConfig:
        if self.strategy == "fsdp" and self.workers < 2:
            raise ValueError("strategy fsdp needs workers >= 2 (one worker has nothing to shard across)")
        return self


# --------------------------------------------------------------------------------------------------
# Stage: pretrain
# --------------------------------------------------------------------------------------------------


class PretrainConfig(Section):
    """RetroMAE (Xiao et al. 2022): encoder MLM + one-layer enhanced decoder; defaults from the paper."""

    model: str = Field(
        description="masked-LM to continue: local path, s3:// URI or hub id (BAAI/bge-m3-retromae); "
        "`tiny`: a tiny XLM-R from chuxin_ray.models.tiny sized to the tokenizer (demo, tests)"
    )
    tokenizer: str | None = Field(default=None, description="unset: the tokenize stage's tokenizer")
    input: str | None = Field(default=None, description="token ids; unset: the tokenize stage's output")
    output: str | None = Field(default=None, description="unset: <run.output>/pretrain")
    max_length: int = Field(default=512, ge=8, description="longer rows are cut, keeping their last token")
    encoder_mask_ratio: float = Field(default=0.3, ge=0.0, le=1.0)
    decoder_mask_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    whole_word_mask: bool = Field(
        default=True, description="where the vocabulary marks word pieces (`##`); token-level otherwise"
    )
    encoder_weight: float = Field(default=1.0, ge=0.0, description="loss = w_e * encoder MLM + w_d * decoder")
    decoder_weight: float = Field(default=1.0, ge=0.0)
    lm_head_chunk_size: int | None = Field(
        default=4096,
        ge=1,
        description="rows of LM-head logits at a time (rows x vocabulary x 4 bytes alive at once); an "
        "XLM-R/BERT head computes its gradients chunk by chunk in the forward pass; null: the plain path",
    )
    training: TrainingConfig


# --------------------------------------------------------------------------------------------------
# The LLM service (`chuxin-ray serve`) and the data-synthesis stages: synthesize, judge, mine, score
# --------------------------------------------------------------------------------------------------


class AutoscalingConfig(Section):
    """Ray Serve autoscaling: replicas follow the requests in flight per replica."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(
        default=16.0, gt=0.0, description="requests per replica Serve aims for; vLLM batches ~64-256"
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


class ServeConfig(Section):
    """The OpenAI-compatible endpoint (/v1/chat/completions, /v1/models) on Ray Serve. Not a stage:
    `chuxin-ray serve` deploys it, and synthesize/judge call it unless their `llm.base_url` is set."""

    model: str = Field(
        description="causal LM: local path, s3:// or gs:// folder, or hub id (Qwen/Qwen2.5-7B-Instruct)"
    )
    model_id: str | None = Field(
        default=None, description="the name clients send as `model`; unset: the last part of `model`"
    )
    engine: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="vllm: ray.serve.llm on GPUs (needs the GPU image); transformers: any causal LM on CPU",
    )
    # -- scale
    replicas: int = Field(default=1, ge=1, description="fixed replica count when `autoscaling` is unset")
    autoscaling: AutoscalingConfig | None = None
    accelerator_type: str | None = Field(
        default=None, description="vllm: e.g. H100, A100, L4; unset: any GPU"
    )
    # -- vLLM
    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm: GPUs per replica")
    max_model_len: int | None = Field(
        default=None, ge=16, description="prompt + completion tokens; unset: the model's own limit"
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="vllm: share of GPU memory for weights + KV cache"
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vllm: further engine arguments (enable_prefix_caching, ...)"
    )
    # -- transformers (CPU)
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="transformers: bfloat16 halves memory, slower on most CPUs"
    )
    max_batch_size: int = Field(default=8, ge=1, description="transformers: requests per generate call")
    batch_wait_timeout_s: float = Field(
        default=0.02, ge=0.0, description="transformers: how long a batch waits to fill"
    )
    num_cpus: float = Field(default=1.0, gt=0.0, description="transformers: CPUs per replica")
    chat_template: str | None = Field(
        default=None, description="Jinja chat template for models that ship none (base models)"
    )
    default_max_tokens: int = Field(default=256, ge=1, description="when a request sets no max_tokens")
    # -- HTTP
    host: str = Field(default="127.0.0.1", description="0.0.0.0 inside a container")
    port: int = Field(default=8000, ge=1, le=65535)
    route_prefix: str = Field(default="/", pattern=r"^/")
    app_name: str = Field(default="llm", pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")

    @property
    def served_model(self) -> str:
        return self.model_id or self.model.rstrip("/").rsplit("/", 1)[-1]

    @property
    def url(self) -> str:
        """The OpenAI base URL clients use (`.../v1`)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}/v1"


class LLMCallConfig(Section):
    """How a stage calls the LLM: any OpenAI-compatible URL over HTTP, or (GPU) vLLM inside Ray Data."""

    engine: Literal["http", "vllm"] = Field(
        default="http", description="vllm: ray.data.llm's vLLM processor with the `serve` section's model"
    )
    base_url: str | None = Field(default=None, description="e.g. http://host:8000/v1; unset: the serve URL")
    model: str | None = Field(default=None, description="the `model` sent; unset: the serve model's id")
    api_key_env: str | None = Field(
        default=None, description="environment variable holding a bearer token (never the token itself)"
    )
    temperature: float = Field(default=0.7, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=128, ge=1)
    concurrency: int = Field(default=16, ge=1, description="requests in flight per caller actor")
    actors: int = Field(default=1, ge=1, description="caller actors (http) or vLLM engines (vllm)")
    num_cpus: float = Field(default=0.25, gt=0.0, description="per caller actor: they wait on the network")
    batch_size: int = Field(default=64, ge=1, description="rows per Ray Data batch")
    timeout_s: float = Field(default=120.0, gt=0.0, description="per request, connection included")
    max_retries: int = Field(default=4, ge=0, description="retries after the first attempt")
    backoff_s: float = Field(default=0.5, ge=0.0, description="first retry waits up to this; doubles")
    backoff_max_s: float = Field(default=30.0, ge=0.0)


class PromptTemplate(Section):
    """A chat prompt: `system` and `user` are Python format strings over the fields the stage names."""

    name: str = Field(default="default", pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")
    system: str | None = None
    user: str


SYNTHESIS_PROMPT = PromptTemplate(
    name="search_query",
    system="你是一名熟悉中文搜索引擎用户习惯的数据标注员。",
    user=(
        "下面是一段文本。请写出{n}个中文搜索查询，要求：用户在搜索引擎中输入这个查询时，"
        "这段文本正好能回答他的问题；查询要简短自然，不要照抄原文。\n"
        "每行写一个查询，不要编号，不要解释。\n\n文本：{passage}"
    ),
)
JUDGE_PROMPT = PromptTemplate(
    name="plausible_query",
    system="你是一名严格的搜索质量评估员。",
    user=(
        "判断下面的查询是否像真实用户会在搜索引擎中输入的查询，并且这段文本能够回答它。"
        "只回答“是”或“否”。\n\n查询：{query}\n文本：{passage}"
    ),
)


def _check_placeholders(template: PromptTemplate, allowed: set[str], required: set[str], where: str) -> None:
    import string

    for part in ("system", "user"):
        text = getattr(template, part)
        if text is None:
            continue
        try:
            names = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
        except ValueError as e:
            raise ValueError(
                f"{where}.{part}: not a format string ({e}); write literal braces as {{{{ }}}}"
            ) from None
        unknown = names - allowed
        if unknown:
            raise ValueError(
                f"{where}.{part}: unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
    missing = required - {
        f for t in (template.system, template.user) if t for _, f, _, _ in string.Formatter().parse(t) if f
    }
    if missing:
        raise ValueError(f"{where}: the template must use {sorted(missing)}")


class SynthesizeConfig(Section):
    """An LLM writes search queries for passages; shards of `shard_rows` passages are written as they
    finish, and a rerun skips finished shards."""

    input: str | None = Field(default=None, description="{id, text} Parquet; unset: the ingest output")
    output: str | None = Field(default=None, description="unset: <run.output>/synthesize")
    queries_per_passage: int = Field(default=1, ge=1, le=20, description="`{n}` in the prompt")
    prompts: list[PromptTemplate] = Field(
        default_factory=lambda: [SYNTHESIS_PROMPT],
        min_length=1,
        description="placeholders {passage}, {n}; several: each passage gets one, chosen by its id hash",
    )
    max_passage_chars: int = Field(
        default=2000, ge=16, description="passages are cut to this before prompting (~1.3k Qwen tokens)"
    )
    shard_rows: int = Field(default=1000, ge=1, description="passages per resumable output shard")
    max_passages: int | None = Field(
        default=None,
        ge=1,
        description="queries for the input's first N passages only (the recipe: ~1e6 of ~1e8); unset: all",
    )
    llm: LLMCallConfig = LLMCallConfig()

    @model_validator(mode="after")
    def _templates(self) -> SynthesizeConfig:
        for i, t in enumerate(self.prompts):
            _check_placeholders(t, {"passage", "n"}, {"passage"}, f"prompts.{i}")
        if len({t.name for t in self.prompts}) != len(self.prompts):
            raise ValueError("prompts: names must be unique (each query records the prompt it came from)")
        return self


class QueryRules(Section):
    """Rules on generated queries, checked before judging so rejected queries cost no LLM call."""

    min_chars: int = Field(default=4, ge=1, description="non-space characters")
    max_chars: int = Field(default=64, ge=1)
    max_copy_ratio: float | None = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="longest run copied from the passage / query length; 1.0: a verbatim span; null: off",
    )
    min_cjk_ratio: float | None = Field(
        default=0.2, ge=0.0, le=1.0, description="CJK share of non-space chars ('iPhone15价格' is 0.2)"
    )
    dedup: bool = Field(default=True, description="the same normalised query for two passages: keep one")

    @model_validator(mode="after")
    def _bounds(self) -> QueryRules:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be <= max_chars ({self.max_chars})")
        return self


class JudgeConfig(Section):
    """Query rules, then the LLM judges whether each query is a plausible search query for its passage."""

    input: str | None = Field(default=None, description="unset: the synthesize output")
    output: str | None = Field(default=None, description="unset: <run.output>/judge")
    prompt: PromptTemplate = Field(default=JUDGE_PROMPT, description="placeholders {query}, {passage}")
    keep: Literal["yes", "not_no", "all"] = Field(
        default="yes",
        description="yes: only clear yes; not_no: yes or an unparseable answer; all: annotate, drop nothing",
    )
    rules: QueryRules = QueryRules()
    max_passage_chars: int = Field(default=2000, ge=16)
    num_partitions: int | None = Field(default=None, ge=1, description="dedup hash partitions; unset: cores")
    llm: LLMCallConfig = LLMCallConfig(temperature=0.0, max_tokens=16)

    @model_validator(mode="after")
    def _template(self) -> JudgeConfig:
        _check_placeholders(self.prompt, {"query", "passage"}, {"query"}, "prompt")
        return self


class EncoderRuntime(Section):
    """Where an encoder or reranker runs: Ray Data actors, batched."""

    actors: int | None = Field(default=None, ge=1, description="unset: one per GPU when num_gpus > 0, else 1")
    num_gpus: float = Field(default=0.0, ge=0.0, description="per actor; 0: CPU")
    num_cpus: float = Field(default=1.0, gt=0.0, description="per actor")
    batch_size: int = Field(default=64, ge=1, description="texts or pairs per forward pass")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        default="auto", description="auto: fp16 on GPU, fp32 on CPU"
    )


class MineConfig(Section):
    """Hard negatives: embed queries and corpus, exact top-k, sample from a rank range (FlagEmbedding
    scripts/hn_mine.py: range_for_sampling 10-210, negative_number 15), positives excluded by id."""

    encoder: str | None = Field(
        default=None,
        description="an HF encoder folder, s3:// URI or hub id; CLS pooling, normalised. Unset: the finetune "
        "stage's model when its output is complete, else the pretrain stage's encoder_model",
    )
    input: str | None = Field(default=None, description="queries; unset: the judge output")
    corpus: str | None = Field(default=None, description="{id, text} Parquet; unset: the ingest output")
    output: str | None = Field(default=None, description="unset: <run.output>/mine")
    query_instruction: str = Field(
        default="", description="prefix for queries (bge-*-zh-v1.5: 为这个句子生成表示以用于检索相关文章：)"
    )
    query_max_length: int = Field(default=64, ge=4)
    passage_max_length: int = Field(default=512, ge=4)
    range_start: int = Field(default=10, ge=0, description="first rank sampled (0-based)")
    range_end: int = Field(default=210, ge=1, description="ranks [range_start, range_end) are sampled")
    negative_number: int = Field(default=15, ge=1)
    fill_random: bool = Field(
        default=True, description="too few candidates left: fill from random passages, as hn_mine does"
    )
    seed: int = 42
    corpus_shard_rows: int = Field(default=50_000, ge=1, description="passages per embedding shard")
    query_shard_rows: int = Field(
        default=10_000, ge=1, description="queries per search task; ~200 MB of candidate ids at range_end 210"
    )
    query_chunk: int = Field(default=1024, ge=1, description="queries scored against a shard at once")
    search: Literal["exact", "faiss"] = Field(
        default="exact",
        description="exact: sharded matrix product + top-k merge; faiss: a faiss index per corpus shard "
        "(needs faiss installed: the `faiss` extra)",
    )
    faiss_index: str = Field(
        default="Flat", description="faiss index_factory string, e.g. Flat (exact), IVF1024,Flat, HNSW32"
    )
    faiss_nprobe: int | None = Field(default=None, ge=1, description="IVF lists searched; unset: faiss's 1")
    runtime: EncoderRuntime = EncoderRuntime()

    @model_validator(mode="after")
    def _range(self) -> MineConfig:
        if self.range_start >= self.range_end:
            raise ValueError(f"range_start ({self.range_start}) must be < range_end ({self.range_end})")
        return self


class ScoreConfig(Section):
    """A cross-encoder scores every (query, pos) and (query, neg), scored as FlagReranker does; drops
    false positives and false negatives, and records the raw scores for distillation."""

    reranker: str = Field(description="any sequence-classification folder, s3:// URI or hub id")
    input: str | None = Field(default=None, description="FlagEmbedding jsonl; unset: the mine output")
    output: str | None = Field(default=None, description="unset: <run.output>/score")
    max_length: int = Field(default=512, ge=8, description="tokens per pair (FlagReranker max_length)")
    query_max_length: int | None = Field(default=None, ge=4, description="unset: 3/4 of max_length")
    mode: Literal["absolute", "relative"] = Field(
        default="absolute",
        description="absolute: raw scores against the thresholds; relative: sigmoid scores against a "
        "share of the query's best other side (best negative for positives, best positive for negatives)",
    )
    pos_threshold: float | None = Field(
        default=None, description="drop positives below (absolute) or below this x best negative (relative)"
    )
    neg_threshold: float | None = Field(
        default=None,
        description="drop negatives above (absolute) or above this x best positive (relative; 0.95 is "
        "NV-Retriever's TopK-PercPos)",
    )
    min_negatives: int = Field(default=1, ge=0, description="queries left with fewer are dropped")
    runtime: EncoderRuntime = EncoderRuntime(batch_size=32)


# --------------------------------------------------------------------------------------------------
# Stages: finetune and unified (contrastive training of an embedder), evaluate, export
# --------------------------------------------------------------------------------------------------


class FinetuneConfig(Section):
    """Contrastive finetuning of an embedder on FlagEmbedding-format jsonl (`query`, `pos`, `neg`, optional
    `pos_scores`, `neg_scores`, `prompt`, `type`), as FlagEmbedding's encoder_only.base trainer: CLS
    pooling, L2-normalised, InfoNCE at temperature 0.02 over listed, in-batch and cross-device negatives.

    A dataset is one input file; a stage's sharded output (`part-NNNNN.jsonl` files) is one dataset per
    folder. With `same_dataset_batches` every global batch comes from one dataset."""

    model: str | None = Field(
        default=None,
        description="encoder to start from: local path, s3:// URI or hub id; unset: the previous training "
        "stage's model (finetune: pretrain's encoder_model; unified: finetune's model)",
    )
    tokenizer: str | None = Field(default=None, description="unset: the model folder's own tokenizer")
    input: str | None = Field(
        default=None, description="a jsonl file or a prefix of them (.gz/.zst too); unset: the score output"
    )
    output: str | None = Field(default=None, description="unset: <run.output>/<stage>")
    group_size: int = Field(
        default=8, ge=1, description="passages per query: 1 positive + group_size-1 negatives"
    )
    query_max_length: int = Field(default=64, ge=4)
    passage_max_length: int = Field(default=256, ge=4)
    pooling: Literal["cls", "mean"] = Field(
        default="cls",
        description="the sentence vector (FlagEmbedding's sentence_pooling_method); unified: cls",
    )
    query_instruction: str = Field(
        default="",
        description="prefix of every query (bge-*-zh-v1.5: 为这个句子生成表示以用于检索相关文章：)",
    )
    query_instructions: dict[str, str] = Field(
        default_factory=dict, description="per dataset name: a prefix replacing query_instruction"
    )
    same_dataset_batches: bool = Field(default=True, description="every global batch from one dataset")
    temperature: float = Field(default=0.02, gt=0.0)
    in_batch_negatives: bool = Field(default=True, description="other queries' passages are negatives too")
    cross_device_negatives: bool = Field(
        default=True, description="every worker's passages are negatives (dense scores only)"
    )
    distill: Literal["off", "kl", "m3_kd"] = Field(
        default="off",
        description="learn from pos_scores/neg_scores too (rows without them are quarantined): kl = "
        "FlagEmbedding's kl_div, m3_kd = BGE-M3's m3_kd_loss",
    )
    teacher_temperature: float = Field(default=1.0, gt=0.0, description="teacher scores are divided by it")
    grad_cache_chunk: int | None = Field(
        default=None,
        ge=1,
        description="GradCache: encode this many texts at a time, so a step's batch can exceed memory",
    )
    seed: int = Field(default=42, description="negative sampling and the batch plan")
    training: TrainingConfig

    @model_validator(mode="after")
    def _negatives(self) -> FinetuneConfig:
        if self.cross_device_negatives and not self.in_batch_negatives:
            raise ValueError(
                "cross_device_negatives needs in_batch_negatives (other workers' passages are in-batch)"
            )
        return self


class UnifiedWeights(Section):
    """BGE-M3's constants (FlagEmbedding m3 modeling.py); see chuxin_ray/losses/unified.py."""

    dense: float = Field(default=1.0, ge=0.0)
    ensemble: float = Field(default=1.0, ge=0.0)
    sparse: float = Field(default=0.1, ge=0.0)
    colbert: float = Field(default=1.0, ge=0.0)
    heads_divisor: float = Field(default=4.0, gt=0.0)
    ensemble_dense: float = Field(default=1.0, ge=0.0)
    ensemble_sparse: float = Field(default=0.3, ge=0.0)
    ensemble_colbert: float = Field(default=1.0, ge=0.0)
    distill_dense: float = Field(default=1.0, ge=0.0)
    distill_sparse: float = Field(default=0.1, ge=0.0)
    distill_colbert: float = Field(default=1.0, ge=0.0)
    distill_divisor: float = Field(default=3.0, gt=0.0)
    total_divisor: float = Field(default=2.0, gt=0.0)


class UnifiedConfig(FinetuneConfig):
    """BGE-M3's unified finetuning: dense + sparse + ColBERT heads, their ensemble, and self-knowledge
    distillation from the ensemble; `distill` here picks the teacher-score loss (BGE-M3: m3_kd)."""

    colbert_dim: int | None = Field(default=None, ge=1, description="unset: the hidden size, as BGE-M3")
    self_distill: bool = Field(default=True, description="distill the ensemble into each head")
    self_distill_start_step: int = Field(
        default=-1, description="self-distillation after this optimizer step"
    )
    weights: UnifiedWeights = UnifiedWeights()

    @model_validator(mode="after")
    def _cls(self) -> UnifiedConfig:
        if self.pooling != "cls":
            raise ValueError("pooling: the M3 dense head is the CLS state (BGE-M3); only cls is allowed here")
        return self


class EvalSet(Section):
    """A retrieval set in the BEIR / C-MTEB layout: a folder with corpus.*, queries.*, qrels(/test).*"""

    name: str = Field(pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")
    uri: str = Field(description="folder: local path or s3:// prefix")
    query_instruction: str | None = Field(default=None, description="unset: evaluate.query_instruction")


class EvaluateConfig(Section):
    """nDCG@{1,3,5,10} (main: nDCG@10, as C-MTEB), recall@{10,100}, MRR@10, MAP@10 by exact top-k."""

    model: str | None = Field(
        default=None, description="model folder; unset: the last training stage's (unified, finetune)"
    )
    baseline: str | None = Field(
        default=None, description="a second model scored alongside: the starting one"
    )
    sets: list[EvalSet] = Field(min_length=1)
    output: str | None = Field(default=None, description="unset: <run.output>/evaluate")
    methods: list[Literal["dense", "sparse", "colbert", "hybrid"]] = Field(
        default_factory=lambda: ["dense"], min_length=1, description="sparse/colbert/hybrid need M3 heads"
    )
    hybrid_weights: tuple[float, float, float] = Field(
        default=(0.4, 0.2, 0.4), description="dense, sparse, colbert: BGEM3FlagModel.compute_score's"
    )
    query_instruction: str = ""
    query_max_length: int = Field(default=64, ge=4)
    passage_max_length: int = Field(default=512, ge=4)
    top_k: int = Field(default=100, ge=10, description="ranked passages kept per query")
    corpus_shard_rows: int = Field(default=50_000, ge=1, description="passages per embedding shard")
    runtime: EncoderRuntime = EncoderRuntime()

    @model_validator(mode="after")
    def _unique(self) -> EvaluateConfig:
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"sets: names must be unique, got {names}")
        return self


class ExportConfig(Section):
    """The release folder: the BGE-M3 layout that BGEM3FlagModel, FlagModel and SentenceTransformer load."""

    model: str | None = Field(default=None, description="unset: the last training stage's model")
    output: str | None = Field(default=None, description="unset: <run.output>/export")
    model_name: str | None = Field(default=None, description="in the model card; unset: run.name")
    query_instruction: str | None = Field(
        default=None, description="recorded for users; unset: the training stage's query_instruction"
    )
    verify: bool = Field(default=True, description="load the folder back and compare its embeddings")


# --------------------------------------------------------------------------------------------------
# `chuxin-ray plan`: what a real-scale run needs before GPUs are booked (chuxin_ray/plan.py). Not a stage.
# --------------------------------------------------------------------------------------------------


class ModelShape(Section):
    """A transformer's shape; chuxin_ray/plan.py counts its parameters and FLOPs from it.
    encoder: BERT/XLM-R layout (learned positions, biases, LayerNorm, pooler);
    decoder: Qwen2/Llama layout (rotary, RMSNorm, grouped-query attention, SwiGLU)."""

    kind: Literal["encoder", "decoder"]
    layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    vocab: int = Field(ge=1)
    intermediate: int = Field(ge=1, description="FFN width (XLM-R large: 4096)")
    heads: int = Field(ge=1)
    kv_heads: int | None = Field(default=None, ge=1, description="decoder: key/value heads; unset: heads")
    position_embeddings: int = Field(default=0, ge=0, description="encoder: learned rows (bge-m3: 8194)")
    tied_embeddings: bool = Field(default=True, description="decoder: the LM head reuses the input table")


class MeasuredFigure(Section):
    """A throughput one of the bench/ scripts printed, with the command and the machine it came from."""

    name: Literal["ingest_records_per_core_s", "tokenize_texts_per_core_s", "synthesis_stage_overhead"]
    value: float = Field(ge=0.0)
    source: str = Field(min_length=1, description="the command that printed it")
    hardware: str = Field(min_length=1, description="where it ran; say CPU when it ran on CPU")

    @model_validator(mode="after")
    def _share(self) -> MeasuredFigure:
        if self.name == "synthesis_stage_overhead" and self.value >= 1.0:
            raise ValueError(
                f"synthesis_stage_overhead is a share of throughput lost, < 1 (got {self.value})"
            )
        return self


class PlanConfig(Section):
    """Counts of a real-scale run and the hardware it is planned on. Steps, lengths and group sizes come
    from the pretrain/synthesize/mine/score/finetune/unified sections when the config has them."""

    # -- data
    pretrain_texts: int = Field(ge=0, description="texts in the corpus: ingest, tokenize, pretrain")
    finetune_pairs: int = Field(ge=0, description="(query, positive) pairs of the finetune stage")
    refinement_pairs: int = Field(ge=0, description="pairs of the unified stage")
    synthesis_passages: int = Field(ge=0, description="passages the LLM writes queries for")
    mined_pairs: int | None = Field(
        default=None, ge=0, description="queries mined and scored; unset: finetune + refinement pairs"
    )
    mine_corpus_passages: int | None = Field(
        default=None, ge=0, description="passages mine searches; unset: pretrain_texts"
    )
    text_tokens: float = Field(default=400.0, gt=0.0, description="mean tokens per pretraining text")
    query_tokens: float = Field(default=16.0, gt=0.0, description="mean tokens per query")
    passage_tokens: float = Field(default=300.0, gt=0.0, description="mean tokens per passage")
    prompt_tokens: int = Field(default=150, ge=0, description="LLM instructions + chat template per request")
    judge_answer_tokens: int = Field(default=4, ge=1, description="tokens of a judge verdict")
    bytes_per_token: float = Field(
        default=4.0, gt=0.0, description="text bytes per token: Chinese UTF-8 3 bytes/char x ~1.3 chars"
    )
    # -- hardware
    gpu: Literal["h100", "a100", "h200"] = "h100"
    gpus_per_node: int = Field(default=8, ge=1)
    mfu: float = Field(
        default=0.4, gt=0.0, le=1.0, description="model FLOPs utilisation of encoder training and inference"
    )
    llm_mfu: float = Field(
        default=0.2, gt=0.0, le=1.0, description="of LLM prefill + decode; decode is memory-bound"
    )
    target_hours: float = Field(default=24.0, gt=0.0, description="wall time per stage: sets the node count")
    # -- models: unset = bge-m3 (XLM-R large) for encoder and reranker, Qwen2.5-72B-Instruct for the LLM
    encoder: ModelShape | None = None
    reranker: ModelShape | None = None
    llm: ModelShape | None = None
    measured: list[MeasuredFigure] = Field(default_factory=list, description="bench/ figures, with source")


# --------------------------------------------------------------------------------------------------
# The whole config
# --------------------------------------------------------------------------------------------------

# The recipe's stages in pipeline order; each has a config section below and a module in stages/
STAGES: tuple[str, ...] = (
    "ingest",
    "tokenize",
    "pretrain",
    "synthesize",
    "judge",
    "mine",
    "score",
    "finetune",
    "unified",
    "evaluate",
    "export",
)


class Config(Section):
    run: RunConfig
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    ingest: IngestConfig | None = None
    tokenize: TokenizeConfig | None = None
    pretrain: PretrainConfig | None = None
    serve: ServeConfig | None = None
    synthesize: SynthesizeConfig | None = None
    judge: JudgeConfig | None = None
    mine: MineConfig | None = None
    score: ScoreConfig | None = None
    finetune: FinetuneConfig | None = None
    unified: UnifiedConfig | None = None
    evaluate: EvaluateConfig | None = None
    export: ExportConfig | None = None
    plan: PlanConfig | None = None

    def stage_output(self, stage: str) -> str:
        """The output URI of a stage: its `output` key, else `<run.output>/<stage>`."""
        section = getattr(self, stage, None)
        explicit = getattr(section, "output", None)
        return explicit or join_uri(self.run.output, stage)

    def trained_model(self, before: str) -> str:
        """The model folder of the last training stage before `before` in pipeline order that this config
        has: <unified>/model, <finetune>/model or <pretrain>/encoder_model. ConfigError when none."""
        folders = {"unified": "model", "finetune": "model", "pretrain": "encoder_model"}
        for stage in reversed(STAGES[: STAGES.index(before)]):
            if stage in folders and getattr(self, stage, None) is not None:
                return join_uri(self.stage_output(stage), folders[stage])
        raise ConfigError(
            f"{before}.model: not set, and the config has no training stage before `{before}` "
            "(pretrain, finetune, unified) whose model it could use"
        )

    def require(self, stage: str) -> Any:
        section = getattr(self, stage, None)
        if section is None:
            raise ConfigError(f"config has no `{stage}` section; `chuxin-ray {stage}` needs one")
        return section

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with every secret replaced by '**********'."""
        return self.model_dump(mode="json", exclude_none=False)

    def hash(self, *sections: str) -> str:
        """sha256 of the named sections (all but `storage` when none): identifies what an output
        was made from. Storage settings say where bytes live, not what they are, and hold secrets."""
        data = self.redacted()
        data = (
            {k: data[k] for k in sections} if sections else {k: v for k, v in data.items() if k != "storage"}
        )
        blob = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


# --------------------------------------------------------------------------------------------------
# Loading: YAML + key=value overrides -> Config, with errors a person can act on
# --------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply dotted `key=value` overrides, validate. Raises ConfigError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return validate_config(data, origin=str(path))


def apply_override(data: dict[str, Any], item: str) -> None:
    """`a.b.c=value`: value parsed as YAML (numbers, booleans, null, lists); list items by index."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. ingest.rules.min_chars=10)")
    value = yaml.safe_load(raw) if raw.strip() else ""
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
            continue
        if not isinstance(node.get(part), dict | list):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key {'.'.join(parts)}: {part!r} is not an index below {len(node)}")
    return int(part)


def validate_config(data: dict[str, Any], origin: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None


def format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {error.error_count()} invalid value(s)"]
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            maybe = f" (did you mean `{hint[0]}`?)" if hint else ""
            lines.append(f"  {key}: unknown key{maybe}; allowed here: {', '.join(allowed)}")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {err['msg']} (got {_short(err.get('input'))})")
    return "\n".join(lines)


def _allowed_keys(loc: list[str]) -> list[str]:
    """The field names of the model found at `loc` (list indices skipped)."""
    model: type[BaseModel] = Config
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        nested = _model_of(field.annotation)
        if nested is None:
            return []
        model = nested
    return sorted(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_sections() -> str:
    """One line per config section with its keys: what `--help` shows."""
    lines = []
    for name, field in Config.model_fields.items():
        model = _model_of(field.annotation)
        keys = ", ".join(model.model_fields) if model else ""
        lines.append(f"  {name:<11} {keys}")
    return "\n".join(lines)
