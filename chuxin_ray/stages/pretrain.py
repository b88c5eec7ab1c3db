"""Stage `pretrain`: RetroMAE continued pretraining of a masked-LM on Ray Train.

    tokenize output {input_ids, length}     read_parquet of the listed shards, in an order shuffled by seed
      -> streaming_split to N workers       deterministic (train/loop.fit), so a resume is exact
      -> length-bucketed micro-batches      train/data.py
      -> masks on the worker's device       models/masking.py: encoder 0.3 (80/10/10), decoder 0.5
      -> RetroMAE forward + backward        models/retromae.py, under the shared loop train/loop.py

    <out>/encoder_model/   save_pretrained + tokenizer: AutoModel loads it; finetuning starts here
    <out>/retromae/        decoder.pt + retromae.json: with encoder_model/, the whole RetroMAE
    <out>/metrics.jsonl    one line per optimizer step (loss parts, lr, grad norm, tokens/s, ...)
    <out>/train/<name>/    Ray Train checkpoints: model, optimizer, scheduler, RNG, data position
    <out>/_manifest.json   written last

A rerun with the same `training.run_name` resumes from the latest checkpoint under train/<name>/; a rerun
on a complete output does nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import ray
import torch
from torch import nn

from chuxin_ray import storage
from chuxin_ray.config import Config, ConfigError, PretrainConfig, StorageConfig
from chuxin_ray.models.masking import TokenizerInfo, mask_retromae_batch, tokenizer_info
from chuxin_ray.models.retromae import RetroMAE
from chuxin_ray.ray_cluster import connect
from chuxin_ray.train import loop
from chuxin_ray.train.checkpoint import absolute, local_copy, upload_dir
from chuxin_ray.train.data import KEY_COLUMNS, ROW_COLUMNS, TokenBatch, length_bucketed_batches, token_shards

log = logging.getLogger(__name__)

STAGE = "pretrain"
SUBDIRS = ("encoder_model", "retromae")  # cleared on a failed earlier attempt; train/ is kept to resume


@dataclass
class PretrainPlan:
    cfg: PretrainConfig
    out: storage.Location
    config_hash: str
    manifest: dict | None
    run_name: str
    src: storage.Location | None = None
    shards: list[str] = dataclasses.field(default_factory=list)
    tokenizer_source: str = ""
    tokenizer: object = None  # a transformers fast tokenizer
    info: TokenizerInfo | None = None


def config_hash(cfg: Config) -> str:
    """The pretrain section's hash without the test hooks (they do not change what a run computes): a
    run stopped by a hook and its resumption are the same run."""
    section: PretrainConfig = cfg.require(STAGE)
    training = section.training.model_copy(
        update={"stop_after_steps": None, "fail_at_step": None, "record_rows": False}
    )
    return cfg.model_copy(update={STAGE: section.model_copy(update={"training": training})}).hash(STAGE)


def setup(cfg: Config, force: bool = False) -> PretrainPlan:
    section: PretrainConfig = cfg.require(STAGE)
    out = storage.resolve(cfg.stage_output(STAGE), cfg.storage)
    digest = config_hash(cfg)
    run_name = section.training.run_name or cfg.run.name
    manifest = storage.begin_stage(STAGE, out, digest, force, SUBDIRS)
    plan = PretrainPlan(section, out, digest, manifest, run_name)
    if manifest is not None:
        return plan
    if force:
        storage.delete_dir(out.child("train", run_name))  # --force: start over, not resume
    plan.src = storage.resolve(section.input or cfg.stage_output("tokenize"), cfg.storage)
    plan.shards = token_shards(plan.src, "pretrain.input")
    plan.tokenizer_source = tokenizer_source(cfg, plan.src)
    plan.tokenizer = load_tokenizer(plan.tokenizer_source, cfg.storage)
    plan.info = tokenizer_info(plan.tokenizer, section.whole_word_mask)
    check_model(section, plan.info, cfg.storage)
    return plan


def check_model(section: PretrainConfig, info: TokenizerInfo, storage_cfg: StorageConfig) -> None:
    """A wrong path, a short position table or a small vocabulary fails before any Ray work."""
    from chuxin_ray.models.fit import check_fits, read_model_config
    from chuxin_ray.models.tiny import tiny_xlmr_config

    if section.model == "tiny":
        config = tiny_xlmr_config(info.vocab_size, pad_token_id=info.pad_id)
    else:
        config = read_model_config(section.model, storage_cfg, "pretrain.model")
    lengths = {"pretrain.max_length": section.max_length}
    check_fits(config, section.model, lengths, "pretrain.tokenizer", info.vocab_size)


def tokenizer_source(cfg: Config, src: storage.Location) -> str:
    """pretrain.tokenizer, else the tokenizer named in the input's manifest, else tokenize.tokenizer."""
    section: PretrainConfig = cfg.require(STAGE)
    if section.tokenizer:
        return section.tokenizer
    manifest = storage.read_manifest(src) or {}
    name = (manifest.get("config") or {}).get("tokenizer") or (cfg.tokenize and cfg.tokenize.tokenizer)
    if not name:
        raise ConfigError(
            f"pretrain.tokenizer: not set, and neither the input {src.uri} nor a `tokenize` section names one"
        )
    return name


def load_tokenizer(source: str, storage_cfg: StorageConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(local_copy(source, storage_cfg))
    except (OSError, ValueError) as e:
        raise ConfigError(f"pretrain.tokenizer: cannot load {source!r}: {e}") from None
    if tok.mask_token_id is None or tok.pad_token_id is None:
        raise ConfigError(f"pretrain.tokenizer: {source!r} has no mask or pad token; RetroMAE needs both")
    return tok


def run(plan: PretrainPlan, cfg: Config) -> dict:
    if plan.manifest is not None:
        return storage.report_complete(STAGE, plan.out, plan.manifest)
    started = time.time()
    section = plan.cfg
    training = section.training
    connect(cfg.ray)
    loop.check_resources(training, f"{STAGE}.training")  # before any Ray Data or Train work
    # Shards in a seeded random order; not ds.randomize_block_order(), which is an all-to-all step that
    # holds the whole corpus in the object store before the first row reaches a worker.
    shards = [plan.shards[i] for i in np.random.default_rng(training.seed).permutation(len(plan.shards))]
    columns = [*ROW_COLUMNS, *(KEY_COLUMNS if training.record_rows else ())]
    ds = ray.data.read_parquet(shards, filesystem=plan.src.fs).select_columns(columns)
    worker_config = {
        "section": section.model_copy(update={"model": absolute(section.model)}),  # workers chdir
        "tokenizer": plan.info,
        "storage": cfg.storage,
        "out": plan.out,
        "config_hash": plan.config_hash,
    }
    result = loop.fit(
        train_worker,
        worker_config,
        training,
        key=f"{STAGE}.training",
        run_storage=plan.out.child("train"),
        name=plan.run_name,
        datasets={"train": ds},
    )
    summary = result.return_value or {}
    if summary.get("stopped"):
        log.info("%s: stopped after step %d (stop_after_steps); rerun to resume", STAGE, summary["step"])
        return {"status": "stopped", **summary}

    encoder_files = _save_tokenizer(plan.tokenizer, plan.out.child("encoder_model"))
    history = loop.read_metrics(plan.out)
    counts = {
        "steps": summary.get("step"),
        "sessions": summary.get("session"),
        "samples": sum(r["samples"] for r in history),
        "tokens": sum(r["tokens"] for r in history),
        "epochs_started": 1 + max((r["epoch"] for r in history), default=0),
        "final_loss": loop.tail_mean(history, "loss"),
        "final_encoder_loss": loop.tail_mean(history, "encoder_loss"),
        "final_decoder_loss": loop.tail_mean(history, "decoder_loss"),
    }
    files = {
        "encoder_model": sorted(f"encoder_model/{name}" for name in encoder_files),
        "retromae": ["retromae/decoder.pt", "retromae/retromae.json"],
        "metrics": ["metrics.jsonl"],
    }
    manifest = storage.stage_manifest(
        STAGE,
        plan.config_hash,
        cfg.redacted()[STAGE],
        inputs=[plan.src.uri, section.model, plan.tokenizer_source],
        counts=counts,
        files=files,
        started=started,
        run_name=plan.run_name,
        checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
    )
    storage.write_manifest(plan.out, manifest)
    log.info(
        "%s: %d steps, %d samples, final loss %.4f -> %s",
        STAGE,
        counts["steps"],
        counts["samples"],
        counts["final_loss"] or float("nan"),
        plan.out.child("encoder_model").uri,
    )
    return manifest


def main(cfg: Config, force: bool = False) -> dict:
    return run(setup(cfg, force), cfg)


def _save_tokenizer(tok, dest: storage.Location) -> list[str]:
    """Add the tokenizer files to encoder_model/ (the model files are there already); returns every
    file name in the folder."""
    with tempfile.TemporaryDirectory() as directory:
        tok.save_pretrained(directory)
        if dest.is_local:
            dest.fs.create_dir(dest.path, recursive=True)
        pafs.copy_files(
            directory, dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs
        )
    return sorted(posixpath.relpath(f.path, dest.path) for f in storage.list_files(dest))


# --------------------------------------------------------------------------------------------------
# Inside the Ray Train workers
# --------------------------------------------------------------------------------------------------


@dataclass
class RetroMAEStep:
    """One micro-batch: masks drawn on the batch's device from the batch's own seed (a resumed run masks
    a batch as the first run did), then the RetroMAE forward."""

    info: TokenizerInfo
    encoder_mask_ratio: float
    decoder_mask_ratio: float
    _word_start: torch.Tensor | None = None  # (V,) bool on the device, built on first use

    def __call__(self, model: nn.Module, batch: TokenBatch, context: loop.StepContext) -> loop.StepOutput:
        ids = batch.input_ids  # (B, L)
        word_start = None
        if self.info.word_start is not None:
            if self._word_start is None or self._word_start.device != ids.device:
                self._word_start = torch.tensor(
                    self.info.word_start, device=ids.device
                )  # (V,) copied: pickled arrays are read-only
            word_start = self._word_start[ids]  # (B, L)
        masked = mask_retromae_batch(
            ids,
            batch.attention_mask,
            special_token_ids=self.info.special_ids,
            mask_token_id=self.info.mask_id,
            vocab_size=self.info.vocab_size,
            encoder_mask_ratio=self.encoder_mask_ratio,
            decoder_mask_ratio=self.decoder_mask_ratio,
            word_start=word_start,
            generator=torch.Generator(device=ids.device).manual_seed(batch.seed),
        )
        out = model(**masked.as_kwargs())
        return loop.StepOutput(out.loss, {"encoder_loss": out.encoder_loss, "decoder_loss": out.decoder_loss})


def load_masked_lm(source: str, info: TokenizerInfo, seed: int, storage_cfg: StorageConfig) -> nn.Module:
    from transformers import AutoModelForMaskedLM

    from chuxin_ray.models.tiny import build_tiny_masked_lm, tiny_xlmr_config

    if source == "tiny":
        return build_tiny_masked_lm(tiny_xlmr_config(info.vocab_size, pad_token_id=info.pad_id), seed=seed)
    path = local_copy(source, storage_cfg)
    try:
        lm = AutoModelForMaskedLM.from_pretrained(path)
    finally:
        if path != source.removeprefix("file://"):  # a temporary download
            shutil.rmtree(path, ignore_errors=True)
    return lm


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """FSDP units: the encoder's transformer layers (XLM-R, BERT: `encoder.layer`)."""
    module = model.lm.base_model
    layers = getattr(getattr(module, "encoder", None), "layer", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def export_model(
    state: dict[str, torch.Tensor], lm_config, section: PretrainConfig, out: storage.Location
) -> None:
    """Rank 0, at the end: encoder_model/ (the masked-LM, save_pretrained) and retromae/ (the decoder)."""
    from transformers import AutoModelForMaskedLM

    lm = AutoModelForMaskedLM.from_config(lm_config)
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")})
    decoder = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        lm.save_pretrained(root / "encoder_model")
        (root / "retromae").mkdir()
        torch.save(decoder, root / "retromae" / "decoder.pt")
        meta = {
            "encoder": "../encoder_model",
            "encoder_weight": section.encoder_weight,
            "decoder_weight": section.decoder_weight,
            "encoder_mask_ratio": section.encoder_mask_ratio,
            "decoder_mask_ratio": section.decoder_mask_ratio,
        }
        (root / "retromae" / "retromae.json").write_text(json.dumps(meta, indent=2))
        upload_dir(root / "encoder_model", out.child("encoder_model"))
        upload_dir(root / "retromae", out.child("retromae"))


def load_output(out_uri: str, storage_cfg: StorageConfig | None = None) -> RetroMAE:
    """The whole RetroMAE (encoder + decoder) from a pretrain output, e.g. to continue pretraining."""
    from transformers import AutoModelForMaskedLM

    out = storage.resolve(out_uri, storage_cfg)
    meta = storage.read_json(out.child("retromae", "retromae.json"))
    path = local_copy(out.child("encoder_model").uri, storage_cfg)
    lm = AutoModelForMaskedLM.from_pretrained(path)
    model = RetroMAE(lm, meta["encoder_weight"], meta["decoder_weight"])
    with out.fs.open_input_file(out.child("retromae", "decoder.pt").path) as f:
        model.decoder.load_state_dict(torch.load(f, map_location="cpu"))
    return model


def train_worker(config: dict) -> dict:
    """The Ray Train function: build the model, the batch stream and the step, then run the shared loop."""
    section: PretrainConfig = config["section"]
    info: TokenizerInfo = config["tokenizer"]
    training = section.training
    out: storage.Location = config["out"]
    rank = ray.train.get_context().get_world_rank()

    lm = load_masked_lm(section.model, info, training.seed, config["storage"])
    model = RetroMAE(
        lm,
        encoder_weight=section.encoder_weight,
        decoder_weight=section.decoder_weight,
        lm_head_chunk_size=section.lm_head_chunk_size,
        decoder_seed=training.seed,  # every rank starts from the same decoder (DDP also broadcasts rank 0's)
    )
    shard = ray.train.get_dataset_shard("train")
    chunk_rows = training.bucket_batches * training.batch_size

    def read_epoch(epoch: int):
        return shard.iter_batches(batch_size=chunk_rows, batch_format="pyarrow", prefetch_batches=1)

    def batches(start):
        return length_bucketed_batches(
            read_epoch,
            batch_size=training.batch_size,
            bucket_batches=training.bucket_batches,
            max_length=section.max_length,
            pad_id=info.pad_id,
            seed=training.seed,
            rank=rank,
            start=start,
            record_rows=training.record_rows,
        )

    task = loop.TrainTask(
        model=model,
        model_step=RetroMAEStep(info, section.encoder_mask_ratio, section.decoder_mask_ratio),
        batches=batches,
        shard_units=encoder_layers,
        export=lambda state: export_model(state, lm.config, section, out),
        metrics_dest=out.child("metrics.jsonl"),
        config_hash=config["config_hash"],
    )
    return loop.train(training, task)
