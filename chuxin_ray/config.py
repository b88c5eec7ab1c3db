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
    normalize: Literal["nfkc_casefold_space", "exact"] = Field(
        default="nfkc_casefold_space",
        description="nfkc_casefold_space: NFKC, case-folded, whitespace removed before hashing",
    )
    num_partitions: int | None = Field(
        default=None, ge=1, description="hash partitions; unset: about one per 64 MB of input, >= cores"
    )


class IngestConfig(Section):
    inputs: list[InputSpec] = Field(min_length=1)
    output: str | None = Field(default=None, description="unset: <run.output>/ingest")
    rules: CleaningRules = CleaningRules()
    dedup: DedupConfig = DedupConfig()
    read_batch_rows: int = Field(default=8192, ge=1, description="rows per block while reading")


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
    concurrency: int | None = Field(default=None, ge=1, description="tokenizer actors; unset: Ray's cores")

    @model_validator(mode="after")
    def _stride(self) -> TokenizeConfig:
        if self.long_texts == "window" and self.stride >= self.max_length - 2:
            raise ValueError(f"stride ({self.stride}) must be < max_length - 2 ({self.max_length - 2})")
        return self


# --------------------------------------------------------------------------------------------------
# The whole config
# --------------------------------------------------------------------------------------------------

# The recipe's stages in pipeline order. A stage without a config section here is not built yet.
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

    def stage_output(self, stage: str) -> str:
        """The output URI of a stage: its `output` key, else `<run.output>/<stage>`."""
        section = getattr(self, stage, None)
        explicit = getattr(section, "output", None)
        return explicit or join_uri(self.run.output, stage)

    def require(self, stage: str) -> Any:
        section = getattr(self, stage, None)
        if section is None:
            raise ConfigError(f"config has no `{stage}` section; `chuxin-ray {stage}` needs one")
        return section

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with every secret replaced by '**********'."""
        return self.model_dump(mode="json", exclude_none=False)

    def hash(self, *sections: str) -> str:
        """sha256 of the named sections (all when none), secrets excluded: identifies an output."""
        data = self.redacted()
        if sections:
            data = {k: data[k] for k in sections}
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
