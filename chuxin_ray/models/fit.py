"""Does a checkpoint fit a stage's settings? Read on the driver before any Ray work, so that a wrong
path, a position table shorter than a configured length or a vocabulary smaller than the tokenizer's
fails at once, naming the config key to change (the workers load the weights later)."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from chuxin_ray import storage
from chuxin_ray.config import ConfigError, StorageConfig
from chuxin_ray.models.tiny import token_positions


def read_model_config(source: str, storage_cfg: StorageConfig, key: str) -> PretrainedConfig:
    """The config.json of a model folder (local path, file:// or object storage) or hub id."""
    try:
        if "://" in source and not source.startswith("file://"):
            loc = storage.resolve(source, storage_cfg)
            return AutoConfig.for_model(**storage.read_json(loc.child("config.json")))
        return AutoConfig.from_pretrained(source.removeprefix("file://"))
    except (OSError, ValueError, KeyError, storage.StorageError) as e:
        raise ConfigError(f"{key}: cannot read the config of {source!r}: {e}") from None


def check_fits(
    config: PretrainedConfig, source: str, lengths: dict[str, int], tokenizer_key: str, tokenizer_ids: int
) -> None:
    """lengths: config key -> tokens it asks the model to embed; tokenizer_ids: the tokenizer's id count."""
    positions = token_positions(config)
    for key, length in lengths.items():
        if length > positions:
            raise ConfigError(f"{key}={length}: {source!r} has {positions} positions")
    if tokenizer_ids > config.vocab_size:
        raise ConfigError(
            f"{tokenizer_key}: {tokenizer_ids} ids, more than the {config.vocab_size} of {source!r}"
        )
