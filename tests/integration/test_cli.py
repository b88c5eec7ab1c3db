"""The `chuxin-ray` command as a user runs it: help, config errors before Ray, the tiny pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chuxin_ray.config import STAGES

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "chuxin_ray.cli"]


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", **env}
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_stages_and_sections():
    out = run_cli("--help")
    assert out.returncode == 0
    for stage in STAGES:
        assert f"  {stage}" in out.stdout
    assert "config sections and their keys" in out.stdout
    assert "ingest      inputs, output, rules, dedup" in out.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ingest.rules.min_char=3", "ingest.rules.min_char: unknown key (did you mean `min_chars`?)"),
        ("ingest.rules.min_chars=many", "ingest.rules.min_chars: Input should be a valid integer"),
        (
            "ingest.dedup.normalize=fuzzy",
            "ingest.dedup.normalize: Input should be 'nfkc_lower_nospace' or 'exact'",
        ),
        ("run.output=null", "run.output: Input should be a valid string"),
    ],
)
def test_config_errors_fail_before_any_ray_work(override, message):
    # An unreachable RAY_ADDRESS: had the command touched Ray, it would fail differently or hang.
    started = time.time()
    out = run_cli("ingest", "jobs/tiny.yaml", override, timeout=60, RAY_ADDRESS="127.0.0.1:1")
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert time.time() - started < 30


def test_missing_section_and_unbuilt_stage(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: {name: x, output: /tmp/x}\n")
    out = run_cli("ingest", str(cfg), RAY_ADDRESS="127.0.0.1:1")
    assert out.returncode == 2 and "config has no `ingest` section" in out.stderr
    out = run_cli("finetune", str(cfg), RAY_ADDRESS="127.0.0.1:1")
    assert out.returncode == 2 and "stage `finetune` is part of the recipe but not built yet" in out.stderr


@pytest.mark.integration
def test_tiny_pipeline_from_the_readme_then_rerun_skips(tmp_path):
    """What `make demo` runs: demo data, then `chuxin-ray pipeline jobs/tiny.yaml`, on its own Ray."""
    assert run_cli("demo-data", str(tmp_path / "demo")).returncode == 0
    args = [
        f"ingest.inputs.{i}.uri={tmp_path}/demo/raw/{name}"
        for i, name in enumerate(["news.jsonl.gz", "reviews.jsonl", "reviews_more.parquet"])
    ]
    args += [f"tokenize.tokenizer={tmp_path}/demo/tokenizer", f"run.output={tmp_path}/runs"]
    first = run_cli("pipeline", "jobs/tiny.yaml", *args, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ingest = json.loads((tmp_path / "runs/ingest/_manifest.json").read_text())
    tokens = json.loads((tmp_path / "runs/tokenize/_manifest.json").read_text())
    pretrain = json.loads((tmp_path / "runs/pretrain/_manifest.json").read_text())
    assert ingest["counts"]["kept"] > 4000
    assert tokens["counts"]["texts"] == ingest["counts"]["kept"]
    assert pretrain["status"] == "complete"
    assert (tmp_path / "runs/pretrain/encoder_model/config.json").exists()
    second = run_cli("pipeline", "jobs/tiny.yaml", *args, timeout=600)
    assert second.returncode == 0
    assert second.stderr.count("nothing to do") == 3
    assert "connected to" not in second.stderr  # complete stages never start Ray
