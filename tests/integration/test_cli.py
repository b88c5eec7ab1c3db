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
from tests.integration.report_checks import check_report, check_report_from_object_storage

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


def test_missing_section(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: {name: x, output: /tmp/x}\n")
    for stage in ("ingest", "finetune"):
        out = run_cli(stage, str(cfg), RAY_ADDRESS="127.0.0.1:1")
        assert out.returncode == 2 and f"config has no `{stage}` section" in out.stderr


@pytest.mark.integration
@pytest.mark.timeout(1800)  # three pipeline runs; ~10 minutes on an idle 2-core machine
def test_tiny_pipeline_killed_mid_stage_then_rerun_then_skipped(tmp_path, s3_server, monkeypatch):
    """What `make demo` runs: demo data, then `chuxin-ray pipeline jobs/tiny.yaml`, on its own Ray, from
    the demo folder as the README's command does. Killed (SIGKILL, the whole process group) once the
    finetune stage has a checkpoint; the rerun skips every complete stage and resumes finetune from its
    checkpoint; a third run skips everything and starts no Ray."""
    import signal

    assert run_cli("demo-data", str(tmp_path / "demo")).returncode == 0
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [*CLI, "pipeline", str(ROOT / "jobs" / "tiny.yaml")]
    log = (tmp_path / "first-run.log").open("w")  # a file, not a pipe: nobody reads a pipe while it runs
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
    )
    # Ray Train records a checkpoint in this snapshot once it is whole; the folder appears before that
    recorded = tmp_path / "runs/tiny/finetune/train/tiny/checkpoint_manager_snapshot.json"
    deadline = time.time() + 900
    while not recorded.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert first.poll() is None, (tmp_path / "first-run.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    log.close()
    before = {
        s: json.loads(p.read_text())
        for s in STAGES
        if (p := tmp_path / f"runs/tiny/{s}/_manifest.json").exists()
    }
    assert set(before) == {"ingest", "tokenize", "pretrain", "synthesize", "judge", "mine", "score"}

    second = run_cli("pipeline", str(ROOT / "jobs" / "tiny.yaml"), cwd=tmp_path, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    after = {s: json.loads((tmp_path / f"runs/tiny/{s}/_manifest.json").read_text()) for s in STAGES}
    for stage, manifest in before.items():  # not redone
        assert after[stage]["finished_at"] == manifest["finished_at"], stage
    assert second.stderr.count("nothing to do") == len(before)
    assert after["finetune"]["counts"]["sessions"] == 2  # resumed from the killed run's checkpoint
    ingest, tokens = after["ingest"]["counts"], after["tokenize"]["counts"]
    assert ingest["kept"] > 4000 and tokens["texts"] == ingest["kept"]
    assert after["score"]["counts"]["funnel"]["queries_out"] > 0
    assert (tmp_path / "runs/tiny/export/colbert_linear.pt").exists()
    main = after["evaluate"]["counts"]["main"]["demo"]
    assert set(main["model"]) == {"dense", "sparse", "colbert", "hybrid"} and set(main["baseline"]) == {
        "dense"
    }
    check_report(tmp_path / "runs/tiny")  # the report's numbers against the manifests
    check_report_from_object_storage(tmp_path / "runs/tiny", s3_server, monkeypatch)

    third = run_cli("pipeline", str(ROOT / "jobs" / "tiny.yaml"), cwd=tmp_path, timeout=600)
    assert third.returncode == 0
    assert third.stderr.count("nothing to do") == len(STAGES)
    assert "connected to" not in third.stderr  # complete stages never start Ray
