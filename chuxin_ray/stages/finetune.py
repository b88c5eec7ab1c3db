"""Stage `finetune`: contrastive finetuning of a dense embedder on Ray Train (FlagEmbedding's
encoder_only.base recipe). Stage `unified` (stages/unified.py) runs the same machinery with BGE-M3's
three heads.

    FlagEmbedding jsonl under `input` (many files: datasets)
      -> one Ray task per file: rows checked (data/pairs.py), bad ones to quarantine/ with the reason
         -> pairs/fNNNNN-NNNNN.parquet (+ a `dataset` column), 256-row groups; pairs/index.json
      -> N Ray Train workers, each reading the same seeded plan of same-dataset global batches and
         taking its slice (train/pair_batches.py): exact resume from (epoch, batch)
      -> a positive and group_size-1 negatives per query, instruction + query and passages tokenised
      -> CLS embeddings, L2-normalised; InfoNCE at temperature 0.02 over listed, in-batch and every
         worker's passages (losses/infonce.py), + teacher-score distillation when configured
         (losses/contrastive.py); optionally through GradCache (train/grad_cache.py)
      -> the shared loop (train/loop.py): DDP/FSDP, AdamW, warmup/decay, checkpoints, resume

    <out>/model/          the trained embedder: save_pretrained + tokenizer + sentence-transformers
                          modules (+ the M3 heads for `unified`); FlagModel, BGEM3FlagModel and
                          SentenceTransformer load it
    <out>/pairs/          the checked pairs the workers read; <out>/quarantine/: the rows that were not
    <out>/metrics.jsonl   one line per optimizer step; <out>/train/<name>/: Ray Train checkpoints
    <out>/_manifest.json  written last

The workers read the prepared shards themselves rather than through a Ray Data `streaming_split`: a
same-dataset batch plan needs every rank to see rows of the same dataset at the same step, and an exact
resume needs random access to a position, neither of which a split stream gives.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
import torch
from torch import nn

from chuxin_ray import storage
from chuxin_ray.config import Config, ConfigError, FinetuneConfig, StorageConfig, UnifiedConfig
from chuxin_ray.data.pairs import PairFile, dataset_name, is_pair_file, read_pairs
from chuxin_ray.data.row_ranges import InputFile
from chuxin_ray.data.shards import write_parquet
from chuxin_ray.losses.contrastive import ContrastiveLoss
from chuxin_ray.losses.infonce import InfoNCELoss, upcast
from chuxin_ray.ray_cluster import connect
from chuxin_ray.train import loop
from chuxin_ray.train.checkpoint import absolute, local_copy, upload_dir
from chuxin_ray.train.grad_cache import grad_cache_backward
from chuxin_ray.train.pair_batches import BLOCK_ROWS, PairBatch, PairDataset, PlanSpec, Tokenize, pair_batches

log = logging.getLogger(__name__)

STAGE = "finetune"
SUBDIRS = ("model", "pairs", "quarantine")  # cleared on a failed earlier attempt; train/ is kept to resume
INDEX = "pairs/index.json"
PREFETCH_BATCHES = 2  # micro-batches read and tokenised ahead in the worker, beside the step
LOCAL_PREPARE_BYTES = 64 * 2**20  # inputs up to this size are checked in the driver, larger ones in Ray tasks


@dataclass
class FinetunePlan:
    stage: str
    cfg: FinetuneConfig
    out: storage.Location
    config_hash: str
    manifest: dict | None
    run_name: str
    src: storage.Location | None = None
    files: list[PairFile] = dataclasses.field(default_factory=list)
    model_source: str = ""
    tokenizer_source: str = ""


def config_hash(cfg: Config, stage: str) -> str:
    """The section's hash without the test hooks: a run stopped by a hook and its resumption are one run."""
    section: FinetuneConfig = cfg.require(stage)
    training = section.training.model_copy(
        update={"stop_after_steps": None, "fail_at_step": None, "record_rows": False}
    )
    return cfg.model_copy(update={stage: section.model_copy(update={"training": training})}).hash(stage)


def setup(cfg: Config, force: bool = False, stage: str = STAGE) -> FinetunePlan:
    section: FinetuneConfig = cfg.require(stage)
    out = storage.resolve(cfg.stage_output(stage), cfg.storage)
    digest = config_hash(cfg, stage)
    run_name = section.training.run_name or cfg.run.name
    manifest = storage.begin_stage(stage, out, digest, force, SUBDIRS)
    plan = FinetunePlan(stage, section, out, digest, manifest, run_name)
    if manifest is not None:
        return plan
    if force:
        storage.delete_dir(out.child("train", run_name))  # --force: start over, not resume
    plan.src = storage.resolve(section.input or cfg.stage_output("score"), cfg.storage)
    plan.files = list_pair_files(plan.src, f"{stage}.input")
    plan.model_source = absolute(section.model or cfg.trained_model(stage))
    plan.tokenizer_source = absolute(tokenizer_source(cfg, section, plan.model_source, stage))
    check_model(plan, cfg.storage)
    return plan


def list_pair_files(src: storage.Location, key: str) -> list[PairFile]:
    """Every jsonl file (plain, .gz, .zst) at or below `src`, sorted; a stage output's data/ files only."""
    if storage.exists(src) and src.fs.get_file_info(src.path).type.name == "File":
        infos, root = [src.fs.get_file_info(src.path)], src.path
    else:
        manifest = storage.read_manifest(src)
        root = src.child("data").path if manifest is not None else src.path
        try:
            infos = storage.list_files(storage.Location(src.fs, root, src.uri))
        except storage.StorageError:
            infos = []
    paths = sorted(info.path for info in infos if is_pair_file(info.path))
    if not paths:
        raise ConfigError(f"{key}: no FlagEmbedding jsonl files (.jsonl, .jsonl.gz, .jsonl.zst) at {src.uri}")
    scheme = src.uri.split("://", 1)[0] + "://" if "://" in src.uri else ""
    sizes = {info.path: info.size for info in infos}
    return [
        PairFile(
            src.fs, path, f"{scheme}{path}" if scheme else path, dataset_name(path, root), i, sizes[path]
        )
        for i, path in enumerate(paths)
    ]


def tokenizer_source(cfg: Config, section: FinetuneConfig, model: str, stage: str) -> str:
    if section.tokenizer:
        return section.tokenizer
    if model != "tiny":
        return model
    if cfg.tokenize is not None:
        return cfg.tokenize.tokenizer
    raise ConfigError(f"{stage}.tokenizer: `model: tiny` needs a tokenizer (set {stage}.tokenizer)")


def check_model(plan: FinetunePlan, storage_cfg: StorageConfig) -> None:
    """The tokenizer and the model's config, read on the driver: a wrong path or a short position table
    fails before any Ray work."""
    from chuxin_ray.models.fit import check_fits, read_model_config

    section, stage = plan.cfg, plan.stage
    tokenizer = load_tokenizer(plan.tokenizer_source, storage_cfg, f"{stage}.tokenizer")
    if plan.model_source == "tiny":
        return
    config = read_model_config(plan.model_source, storage_cfg, f"{stage}.model")
    lengths = {f"{stage}.{key}": getattr(section, key) for key in ("query_max_length", "passage_max_length")}
    check_fits(config, plan.model_source, lengths, f"{stage}.tokenizer", len(tokenizer))


def load_tokenizer(source: str, storage_cfg: StorageConfig | None, key: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(local_copy(source, storage_cfg))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {source!r}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Driver: prepare the pairs, fit, write the manifest
# --------------------------------------------------------------------------------------------------


def prepare_file(file: PairFile, out: storage.Location, group_size: int, need_scores: bool) -> dict:
    """Check one file's rows; write the good ones to pairs/ and the bad ones to quarantine/, in line order."""
    written: list[dict] = []
    quarantined: list[str] = []
    counts: Counter = Counter()
    for chunk, (kept, bad) in enumerate(read_pairs(file, group_size, need_scores)):
        name = f"f{file.index:05d}-{chunk:05d}.parquet"
        counts["kept"] += kept.num_rows
        counts.update(bad.column("reason").to_pylist())
        if kept.num_rows:
            kept = kept.add_column(0, "dataset", pa.array([file.dataset] * kept.num_rows, pa.string()))
            written.append({"path": f"pairs/{name}", "rows": kept.num_rows})
            write_parquet(out.child("pairs", name), kept, row_group_size=BLOCK_ROWS)
        if bad.num_rows:
            quarantined.append(f"quarantine/{name}")
            write_parquet(out.child("quarantine", name), bad, row_group_size=BLOCK_ROWS)
    return {
        "dataset": file.dataset,
        "uri": file.uri,
        "files": written,
        "quarantine": quarantined,
        "counts": counts,
    }


def prepare_pairs(plan: FinetunePlan) -> dict:
    """pairs/index.json: the datasets with their shards, and counts by outcome. Reused by a rerun that
    resumes (the same config hash), so a resumed run reads exactly the rows the first one did."""
    index_loc = plan.out.child(INDEX)
    if storage.exists(index_loc):
        index = storage.read_json(index_loc)
        if index.get("config_hash") == plan.config_hash:
            return index
    need_scores = plan.cfg.distill != "off"
    if sum(f.size for f in plan.files) <= LOCAL_PREPARE_BYTES:  # a task's start costs more than the read
        results = [prepare_file(f, plan.out, plan.cfg.group_size, need_scores) for f in plan.files]
    else:
        task = ray.remote(num_cpus=1)(prepare_file)
        results = ray.get([task.remote(f, plan.out, plan.cfg.group_size, need_scores) for f in plan.files])
    datasets: dict[str, list[dict]] = {}
    counts: Counter = Counter()
    for result in results:  # in file order
        datasets.setdefault(result["dataset"], []).extend(result["files"])
        counts.update(result["counts"])
    read = sum(counts.values())
    if counts["kept"] + sum(v for k, v in counts.items() if k != "kept") != read:  # pragma: no cover
        raise RuntimeError("pair accounting does not add up")
    index = {
        "config_hash": plan.config_hash,
        "datasets": [{"name": name, "files": files} for name, files in sorted(datasets.items())],
        "quarantine": sorted(q for r in results for q in r["quarantine"]),
        "counts": {"read": read, **dict(sorted(counts.items()))},
    }
    storage.write_json(index_loc, index)
    return index


def plan_datasets(index: dict, out: storage.Location, same_dataset: bool) -> list[PairDataset]:
    datasets = [
        PairDataset(d["name"], tuple(InputFile(out.child(f["path"]).path, f["rows"]) for f in d["files"]))
        for d in index["datasets"]
        if d["files"]
    ]
    if same_dataset or not datasets:
        return datasets
    return [PairDataset("mixed", tuple(f for d in datasets for f in d.files))]


def run(plan: FinetunePlan, cfg: Config) -> dict:
    if plan.manifest is not None:
        return storage.report_complete(plan.stage, plan.out, plan.manifest)
    started = time.time()
    section, stage = plan.cfg, plan.stage
    training = section.training
    connect(cfg.ray)
    loop.check_resources(training, f"{stage}.training")
    index = prepare_pairs(plan)
    counts = index["counts"]
    log.info(
        "%s: %d pairs read, %d kept, quarantined %s",
        stage,
        counts["read"],
        counts["kept"],
        {k: v for k, v in counts.items() if k not in ("read", "kept")},
    )
    datasets = plan_datasets(index, plan.out, section.same_dataset_batches)
    spec = PlanSpec(
        training.workers, training.batch_size, training.bucket_batches, section.group_size, section.seed
    )
    if not any(d.rows >= spec.global_batch for d in datasets):
        raise ConfigError(
            f"{stage}: {counts['kept']} usable pairs; no dataset has a global batch of {spec.global_batch} "
            f"({stage}.training.workers x batch_size); lower batch_size or add data"
        )
    worker_config = {
        "stage": stage,
        "section": section,
        "datasets": datasets,
        "fs": plan.out.fs,
        "spec": spec,
        "model": plan.model_source,
        "tokenizer": plan.tokenizer_source,
        "storage": cfg.storage,
        "out": plan.out,
        "config_hash": plan.config_hash,
        "model_name": cfg.run.name,
    }
    result = loop.fit(
        train_worker,
        worker_config,
        training,
        key=f"{stage}.training",
        run_storage=plan.out.child("train"),
        name=plan.run_name,
        datasets={},
    )
    summary = result.return_value or {}
    if summary.get("stopped"):
        log.info("%s: stopped after step %d (stop_after_steps); rerun to resume", stage, summary["step"])
        return {"status": "stopped", **summary}

    history = loop.read_metrics(plan.out)
    model_files = sorted(
        posixpath.relpath(f.path, plan.out.child("model").path)
        for f in storage.list_files(plan.out.child("model"))
    )
    manifest = storage.stage_manifest(
        stage,
        plan.config_hash,
        cfg.redacted()[stage],
        inputs=[plan.src.uri, plan.model_source, plan.tokenizer_source],
        counts={
            **{f"pairs_{k}": v for k, v in counts.items()},
            "datasets": len(index["datasets"]),
            "steps": summary.get("step"),
            "sessions": summary.get("session"),
            "samples": sum(r["samples"] for r in history),
            "tokens": sum(r["tokens"] for r in history),
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": loop.tail_mean(history, "loss"),
        },
        files={
            "model": [f"model/{name}" for name in model_files],
            "quarantine": index["quarantine"],
            "metrics": ["metrics.jsonl"],
        },
        started=started,
        run_name=plan.run_name,
        checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
    )
    storage.write_manifest(plan.out, manifest)
    log.info(
        "%s: %d steps, final loss %.4f -> %s",
        stage,
        summary.get("step"),
        manifest["counts"]["final_loss"] or float("nan"),
        plan.out.child("model").uri,
    )
    return manifest


def main(cfg: Config, force: bool = False) -> dict:
    return run(setup(cfg, force, STAGE), cfg)


# --------------------------------------------------------------------------------------------------
# Inside the Ray Train workers
# --------------------------------------------------------------------------------------------------


def instruction_for(section: FinetuneConfig):
    """A query's instruction: the row's own `prompt`, else its dataset's, else the section's."""

    def instruction(group) -> str:
        if group.prompt is not None:
            return group.prompt
        return section.query_instructions.get(group.dataset, section.query_instruction)

    return instruction


def load_encoder(source: str, tokenizer, seed: int, storage_cfg: StorageConfig | None) -> nn.Module:
    """The encoder without a pooler (unused, and DDP refuses parameters without gradients). On a
    machine without CUDA its dropout is the cheap CPU one (models/cpu_dropout.py)."""
    from chuxin_ray.models.cpu_dropout import use_cpu_dropout

    encoder = _load_encoder(source, tokenizer, seed, storage_cfg)
    if not torch.cuda.is_available():
        log.info("CPU dropout in %d attention and dropout modules", use_cpu_dropout(encoder))
    return encoder


def _load_encoder(source: str, tokenizer, seed: int, storage_cfg: StorageConfig | None) -> nn.Module:
    import shutil

    from transformers import AutoModel

    from chuxin_ray.models.tiny import tiny_xlmr_config

    if source == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModel.from_config(
                tiny_xlmr_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id), add_pooling_layer=False
            )
    path = local_copy(source, storage_cfg)
    try:
        return AutoModel.from_pretrained(path, add_pooling_layer=False)
    finally:
        if path != source.removeprefix("file://"):
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class DenseStep:
    """One micro-batch of dense contrastive training: CLS embeddings of queries and passages, their
    scores against this worker's (or every worker's) passages, InfoNCE + optional distillation."""

    scores: InfoNCELoss  # its .scores(): raw similarities and the query offset
    contrastive: ContrastiveLoss
    temperature: float
    group_size: int
    grad_cache_chunk: int | None

    def loss(
        self, queries: torch.Tensor, passages: torch.Tensor, teacher: torch.Tensor | None
    ) -> torch.Tensor:
        scores, offset = self.scores.scores(queries, passages)  # (B, N)
        return self.contrastive(upcast(scores) / self.temperature, self.group_size, teacher, offset)  # ()

    def __call__(self, model: nn.Module, batch: PairBatch, context: loop.StepContext) -> loop.StepOutput:
        def encode(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(**inputs)  # (n, H)

        if self.grad_cache_chunk:
            loss = grad_cache_backward(
                encode,
                [batch.queries, batch.passages],
                lambda q, p: self.loss(q, p, batch.teacher_scores) * context.loss_scale,
                self.grad_cache_chunk,
                context.no_sync,
            )
            return loop.StepOutput(loss / context.loss_scale, {}, backward_done=True)
        loss = self.loss(encode(batch.queries), encode(batch.passages), batch.teacher_scores)
        return loop.StepOutput(loss, {})


def build_dense(config: dict, tokenizer) -> tuple[nn.Module, DenseStep]:
    from chuxin_ray.models.m3_folder import DenseEmbedder

    section: FinetuneConfig = config["section"]
    encoder = load_encoder(config["model"], tokenizer, section.training.seed, config["storage"])
    step = DenseStep(
        scores=InfoNCELoss(
            section.temperature,
            in_batch_negatives=section.in_batch_negatives,
            cross_device=section.cross_device_negatives and section.training.workers > 1,
        ),
        contrastive=ContrastiveLoss(
            "m3_kd" if section.distill == "m3_kd" else "kl", section.teacher_temperature
        ),
        temperature=section.temperature,
        group_size=section.group_size,
        grad_cache_chunk=section.grad_cache_chunk,
    )
    return DenseEmbedder(encoder, section.pooling), step


def export_dense(state: dict[str, torch.Tensor], model: nn.Module, tokenizer, config: dict) -> None:
    """Rank 0, at the end: the trained embedder as a model folder under <out>/model/."""
    from transformers import AutoModel

    from chuxin_ray.models.m3_folder import DenseEmbedder, save_dense_folder

    model = DenseEmbedder(
        AutoModel.from_config(model.encoder.config, add_pooling_layer=False), model.pooling
    )  # on the CPU
    model.load_state_dict(state)
    section: FinetuneConfig = config["section"]
    with tempfile.TemporaryDirectory() as directory:
        save_dense_folder(
            model,
            tokenizer,
            Path(directory),
            query_instruction=section.query_instruction,
            model_name=config["model_name"],
            provenance=provenance(config),
        )
        upload_dir(directory, config["out"].child("model"))


def provenance(config: dict) -> dict:
    section: FinetuneConfig = config["section"]
    return {"stage": config["stage"], "base_model": config["model"], "steps": section.training.steps}


def train_worker(config: dict) -> dict:
    """The Ray Train function: tokenizer, model and step for the stage, the batch plan, the shared loop."""
    section: FinetuneConfig | UnifiedConfig = config["section"]
    training = section.training
    out: storage.Location = config["out"]
    rank = ray.train.get_context().get_world_rank()
    tokenizer = load_tokenizer(config["tokenizer"], config["storage"], f"{config['stage']}.tokenizer")
    if config["stage"] == "unified":
        from chuxin_ray.stages.unified import build_m3, export_m3

        model, step = build_m3(config, tokenizer)
        export = export_m3
    else:
        model, step = build_dense(config, tokenizer)
        export = export_dense
    tokenize = Tokenize(
        tokenizer, section.query_max_length, section.passage_max_length, instruction_for(section)
    )

    def batches(start):
        return pair_batches(
            config["fs"], config["datasets"], config["spec"], rank, tokenize, start, training.record_rows
        )

    task = loop.TrainTask(
        model=model,
        model_step=step,
        batches=batches,
        shard_units=lambda m: encoder_layers(m.encoder),
        export=lambda state: export(state, model, tokenizer, config),
        metrics_dest=out.child("metrics.jsonl"),
        config_hash=config["config_hash"],
        prefetch=PREFETCH_BATCHES,
        sparse_grad_params=token_embedding_names(model),
    )
    return loop.train(training, task)


def token_embedding_names(model: nn.Module) -> tuple[str, ...]:
    """The encoder's token embedding table by its name in `model`: a step touches few of its rows, so
    its gradient is row-sparse (the loop all-reduces only those rows)."""
    table = model.encoder.get_input_embeddings().weight
    return tuple(name for name, param in model.named_parameters() if param is table)


def encoder_layers(encoder: nn.Module) -> list[nn.Module]:
    """FSDP units: the transformer layers (XLM-R, BERT: `encoder.layer`)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []
