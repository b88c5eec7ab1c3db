"""`chuxin-ray plan`: the Chuxin-scale plan (jobs/plan-chuxin.yaml) against a hand computation written out
here from the published model shapes and the datasheet figures, not from chuxin_ray.plan's helpers."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from chuxin_ray import cli, plan
from chuxin_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CHUXIN = ROOT / "jobs" / "plan-chuxin.yaml"

H100_BF16 = 989e12  # NVIDIA H100 SXM datasheet: 1,979 TFLOP/s BF16 with sparsity, half of it dense
A100_BF16 = 312e12
# bge-m3 = XLM-R large: 24 layers, hidden 1024, FFN 4096, vocabulary 250,002
BGE_M3_N = 24 * (4 * 1024 * 1024 + 2 * 1024 * 4096)  # Q, K, V, O and the two FFN matrices per layer
# Qwen2.5-72B: 80 layers, hidden 8192, 64 query / 8 key-value heads of 128, SwiGLU 29,568, vocabulary 152,064
QWEN_N = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 29568) + 152064 * 8192  # + the LM head


def row(p: plan.Plan, stage: str) -> plan.Row:
    return next(r for r in p.rows if r.stage == stage)


def gpu_hours(flops: float, peak: float, mfu: float) -> float:
    return flops / (peak * mfu) / 3600


@pytest.fixture(scope="module")
def chuxin() -> plan.Plan:
    return plan.make_plan(load_config(CHUXIN))


def test_parameter_counts_match_the_published_sizes(chuxin):
    encoder, _ = chuxin.shapes["encoder"]
    llm, _ = chuxin.shapes["llm"]
    assert BGE_M3_N == 301_989_888
    assert plan.matmul_params(encoder) == BGE_M3_N
    assert plan.matmul_params(llm) == QWEN_N
    assert plan.total_params(encoder) == pytest.approx(568e6, rel=2e-3)  # bge-m3's model card: 568M
    assert plan.total_params(llm) == pytest.approx(72.7e9, rel=2e-3)  # Qwen2.5-72B's model card: 72.7B


def test_chuxin_rows_equal_the_hand_computation(chuxin):
    # pretrain: 1e8 texts, one epoch of 48,829 steps x 64 workers x 32, 400 tokens each (< 512);
    # encoder + one decoder layer on every token, the 250k-way LM head at 30% + 50% of tokens.
    n = BGE_M3_N + BGE_M3_N / 24 + (0.3 + 0.5) * 1024 * 250002
    d = 48829 * 64 * 32 * 400
    r = row(chuxin, "pretrain")
    assert r.flops == pytest.approx(6 * n * d, rel=1e-12)
    assert r.gpu_hours == pytest.approx(gpu_hours(6 * n * d, H100_BF16, 0.4), rel=1e-12)
    assert r.gpu_hours == pytest.approx(87.5, abs=0.05)
    assert r.nodes == 1  # 87.5 GPU-h < 8 GPUs x 24 h

    # finetune: 12,208 steps x 64 workers x 128 queries, each 16 query + 8 x 300 passage tokens;
    # GradCache encodes twice: 8 N D
    d = 12208 * 64 * 128 * (16 + 8 * 300)
    r = row(chuxin, "finetune")
    assert r.flops == pytest.approx(8 * BGE_M3_N * d, rel=1e-12)
    assert r.gpu_hours == pytest.approx(gpu_hours(8 * BGE_M3_N * d, H100_BF16, 0.4), rel=1e-12)
    assert r.nodes == math.ceil(r.gpu_hours / (8 * 24)) == 3

    # synthesize: 1e6 passages x (150 prompt + 300 passage + 16 query + 1 newline) tokens on Qwen2.5-72B
    d = 1_000_000 * (150 + 300 + 17)
    r = row(chuxin, "synthesize")
    assert r.llm_tokens == d
    assert r.flops == pytest.approx(2 * QWEN_N * d, rel=1e-12)
    shipped_overhead = {m.name: m.value for m in chuxin.cfg.measured}["synthesis_stage_overhead"]
    assert r.gpu_hours == pytest.approx(
        gpu_hours(2 * QWEN_N * d, H100_BF16, 0.2) / (1 - shipped_overhead), rel=1e-12
    )

    # mine: 1.02e8 queries (finetune + refinement pairs) against 1e8 passages; 510 shards of 200,000 queries
    # each stream the 1e8 x 1024 float32 corpus vectors
    r = row(chuxin, "mine (search)")
    assert r.flops == 2 * 1024 * 102_000_000 * 100_000_000
    assert r.bytes_read == 510 * 100_000_000 * 1024 * 4 + 102_000_000 * 1024 * 4


def test_printed_table_shows_the_computed_numbers(chuxin):
    text = plan.render(chuxin)
    lines = {line.split("  ")[0]: line for line in text.splitlines() if line[:1].isalpha()}
    for stage in ("pretrain", "finetune", "synthesize", "score"):
        r = row(chuxin, stage)
        line = lines[stage]
        assert f"{r.flops:.3e}" in line and f"{r.gpu_hours:,.1f}" in line and f" {r.nodes} " in line
    assert "989 TFLOP/s" in text and "NVIDIA H100 SXM5" in text
    assert "assumption: plan.mfu" in text
    assert f"{chuxin.total_gpu_hours:,.1f}" in text


def test_other_hardware_scales_gpu_hours_by_peak(tmp_path):
    h100 = plan.make_plan(load_config(CHUXIN))
    a100 = plan.make_plan(load_config(CHUXIN, ["plan.gpu=a100", "plan.mfu=0.5"]))
    for stage in ("pretrain", "score", "finetune"):
        assert row(a100, stage).gpu_hours == pytest.approx(
            row(h100, stage).gpu_hours * (H100_BF16 * 0.4) / (A100_BF16 * 0.5), rel=1e-12
        )


def test_measured_figures_give_cpu_hours_and_llm_overhead(tmp_path):
    measured = (
        "plan.measured=[{name: ingest_records_per_core_s, value: 5000, source: 'bench/ingest.py', "
        "hardware: 'CPU, 2 cores'}, {name: synthesis_stage_overhead, value: 0.05, "
        "source: 'bench/synthesis.py', hardware: 'CPU, simulated endpoint'}]"
    )
    base = plan.make_plan(load_config(CHUXIN))
    p = plan.make_plan(load_config(CHUXIN, [measured]))
    assert row(p, "ingest").cpu_core_hours == pytest.approx(1e8 / 5000 / 3600)
    assert row(p, "tokenize").cpu_core_hours is None  # not measured: shown as such
    shipped_overhead = {m.name: m.value for m in base.cfg.measured}["synthesis_stage_overhead"]
    assert row(p, "synthesize").gpu_hours == pytest.approx(
        row(base, "synthesize").gpu_hours * (1 - shipped_overhead) / 0.95
    )
    text = plan.render(p)
    assert "CPU, 2 cores" in text and "bench/ingest.py" in text
    # The shipped plan carries the figures bench/ printed, each with its command and machine.
    shipped = {m.name: m for m in base.cfg.measured}
    assert set(shipped) == {
        "ingest_records_per_core_s",
        "tokenize_texts_per_core_s",
        "synthesis_stage_overhead",
    }
    assert all(m.source.startswith(".venv/bin/python bench/") and m.hardware for m in shipped.values())
    rate = shipped["tokenize_texts_per_core_s"].value
    assert row(base, "tokenize").cpu_core_hours == pytest.approx(1e8 / rate / 3600)


def test_without_stage_sections_each_stage_is_one_epoch_at_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "run: {name: p, output: /tmp/p}\n"
        "plan: {pretrain_texts: 1000, finetune_pairs: 2000, refinement_pairs: 300, synthesis_passages: 40}\n"
    )
    p = plan.make_plan(load_config(path))
    # FinetuneConfig defaults: group 8, query 64, passage 256 tokens; PlanConfig: 16-token queries, 300-token passages
    assert row(p, "finetune").flops == pytest.approx(6 * BGE_M3_N * 2000 * (16 + 8 * 256))
    assert row(p, "unified").flops == pytest.approx(
        6 * (BGE_M3_N + 1024 * 1024 + 1024) * 300 * (16 + 8 * 256)
    )
    assert row(p, "pretrain").flops == pytest.approx(
        6 * (BGE_M3_N + BGE_M3_N / 24 + 0.8 * 1024 * 250002) * 1000 * 400
    )
    assert "default" in p.shapes["encoder"][1] and "Qwen2.5-72B" in p.shapes["llm"][1]
    assert plan.render(p)


def test_model_shape_override_and_unknown_models(tmp_path):
    p = plan.make_plan(
        load_config(
            CHUXIN,
            [
                "plan.encoder={kind: encoder, layers: 12, hidden: 768, vocab: 21128, intermediate: 3072, heads: 12}",
                "serve.model=/models/my-llm",
            ],
        )
    )
    assert plan.matmul_params(p.shapes["encoder"][0]) == 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert p.shapes["encoder"][1] == "plan.encoder"
    assert "'/models/my-llm' is not a known shape; set plan.llm" in p.shapes["llm"][1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("plan.gpu=v100", r"plan\.gpu"),
        ("plan.mfuu=0.3", r"plan\.mfuu: unknown key \(did you mean `mfu`\?\)"),
        ("plan.mfu=1.5", r"plan\.mfu"),
        ("plan.target_hours=soon", r"plan\.target_hours"),
        (
            "plan.measured=[{name: synthesis_stage_overhead, value: 1.2, source: s, hardware: h}]",
            r"plan\.measured\.0: .*share of throughput lost, < 1",
        ),
    ],
)
def test_bad_plan_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CHUXIN, [override])


def test_cli_plan_needs_a_plan_section_and_starts_no_ray(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: p, output: /tmp/p}\n")
    assert cli.main(["plan", str(path)]) == 2
    assert "no `plan` section" in capsys.readouterr().err
    code = (
        "import sys\nfrom chuxin_ray import cli\n"
        f"assert cli.main(['plan', {str(CHUXIN)!r}, 'plan.target_hours=12']) == 0\n"
        "assert 'ray' not in sys.modules, 'plan imported ray'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "target 12 h per stage" in done.stdout
