"""The config schema: every error names the key and what is allowed, before any Ray work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chuxin_ray.config import Config, ConfigError, apply_override, load_config

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = {
    "run": {"name": "t", "output": "/tmp/x"},
    "ingest": {"inputs": [{"uri": "/data/a.jsonl"}]},
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.ingest.rules.min_cjk_ratio == 0.3
    assert cfg.ingest.dedup.enabled is True
    assert cfg.stage_output("ingest") == "/tmp/x/ingest"


def test_misspelt_key_names_the_key_and_suggests(tmp_path):
    data = {**MINIMAL, "ingest": {"inputs": [{"uri": "a.jsonl"}], "rules": {"min_char": 5}}}
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data))
    msg = str(e.value)
    assert "ingest.rules.min_char: unknown key" in msg
    assert "did you mean `min_chars`?" in msg
    assert "max_markup_ratio" in msg  # lists what is allowed there


def test_misspelt_section(tmp_path):
    with pytest.raises(ConfigError, match=r"ingets: unknown key \(did you mean `ingest`\?\)"):
        load_config(write(tmp_path, {**MINIMAL, "ingets": {}}))


def test_wrong_type_names_key_and_value(tmp_path):
    data = {**MINIMAL, "ingest": {"inputs": [{"uri": "a.jsonl"}], "rules": {"min_chars": "ten"}}}
    with pytest.raises(
        ConfigError, match=r"ingest\.rules\.min_chars: Input should be a valid integer.*'ten'"
    ):
        load_config(write(tmp_path, data))


def test_missing_required_field(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.output: required key is missing"):
        load_config(write(tmp_path, {**MINIMAL, "run": {"name": "t"}}))


def test_unknown_enum_value_lists_allowed(tmp_path):
    data = {**MINIMAL, "ingest": {"inputs": [{"uri": "a.jsonl", "format": "csv"}]}}
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data))
    assert "ingest.inputs.0.format" in str(e.value)
    assert "'auto', 'jsonl' or 'parquet'" in str(e.value)


def test_cross_field_check(tmp_path):
    data = {**MINIMAL, "ingest": {"inputs": [{"uri": "a"}], "rules": {"min_chars": 50, "max_chars": 10}}}
    with pytest.raises(ConfigError, match=r"ingest\.rules.*min_chars \(50\) must be <= max_chars \(10\)"):
        load_config(write(tmp_path, data))


def test_overrides_are_typed_and_dotted(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "ingest.rules.min_chars=20",
            "ingest.dedup.enabled=false",
            "ingest.inputs.0.uri=s3://bkt/x",
            "ray.num_cpus=4",
        ],
    )
    assert cfg.ingest.rules.min_chars == 20
    assert cfg.ingest.dedup.enabled is False
    assert cfg.ingest.inputs[0].uri == "s3://bkt/x"
    assert cfg.ray.num_cpus == 4


def test_override_errors(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, MINIMAL), ["ingest.rules.min_chars"])
    with pytest.raises(ConfigError, match=r"ingest\.inputs\.3.*not an index below 1"):
        load_config(write(tmp_path, MINIMAL), ["ingest.inputs.3.uri=x"])
    with pytest.raises(ConfigError, match=r"ingest\.rules\.bogus: unknown key"):
        load_config(write(tmp_path, MINIMAL), ["ingest.rules.bogus=1"])


def test_apply_override_creates_nested_mappings():
    data: dict = {}
    apply_override(data, "tokenize.max_length=256")
    assert data == {"tokenize": {"max_length": 256}}


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_secrets_are_redacted_and_not_hashed(tmp_path):
    data = {**MINIMAL, "storage": {"secret_access_key": "hunter2-secret", "access_key_id": "AKIAXXXX"}}
    cfg = load_config(write(tmp_path, data))
    dumped = str(cfg.redacted()) + repr(cfg) + str(cfg)
    assert "hunter2-secret" not in dumped and "AKIAXXXX" not in dumped
    other = load_config(write(tmp_path, {**data, "storage": {"secret_access_key": "other"}}))
    assert cfg.hash() == other.hash()
    assert cfg.storage.secret_access_key.get_secret_value() == "hunter2-secret"


def test_hash_changes_with_stage_section_only(tmp_path):
    a = load_config(write(tmp_path, MINIMAL))
    b = load_config(write(tmp_path, MINIMAL), ["ingest.rules.min_chars=99"])
    c = load_config(write(tmp_path, MINIMAL), ["run.name=other"])
    assert a.hash("ingest") != b.hash("ingest")
    assert a.hash("ingest") == c.hash("ingest")


def test_run_name_is_a_dns_label(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.name"):
        load_config(write(tmp_path, {**MINIMAL, "run": {"name": "Not_A_Label", "output": "x"}}))


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """STYLE.md rule 3: every shipped YAML is loaded by a test, and opens with its command."""
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), f"{path} must open with a comment giving the command that runs it"
    assert "chuxin-ray" in path.read_text(encoding="utf-8").split("\n\n")[0] or "make" in first
