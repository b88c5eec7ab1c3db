"""Samples/s and peak memory of our finetune and unified stages against FlagEmbedding's own trainers,
on identical work (issue 4).

    .venv/bin/python bench/finetune.py --procs 1 2 --steps 30               # the issue's comparison
    .venv/bin/python bench/finetune.py --procs 1 --steps 6 --which base     # a quick check
    .venv/bin/python bench/finetune.py --procs 1 2 --which base --rounds 3  # on a noisy host

Sides, each run in its own fresh processes, one after the other:
  FlagEmbedding  `torchrun --standalone --nproc_per_node N -m FlagEmbedding.finetune.embedder.encoder_only.
                 {base,m3}` from the pinned FlagEmbedding, unmodified (m3: `--unified_finetuning True
                 --use_self_distill True`; N > 1: `--negatives_cross_device --use_cpu True --ddp_backend
                 gloo`, see ../shared/ENVIRONMENT.md)
  chuxin_ray     the real stage, `stages.finetune.main` / `stages.unified.main`, on a local Ray with N
                 Ray Train workers (pair preparation, the batch plan, DDP over gloo, metrics, export)

Identical work: one model folder (tiny XLM-R config, seed 0, the real 250,002-id vocabulary of
../shared/xlmr-tokenizer, M3 heads included) that both sides load; one jsonl file of People's Daily
pairs (tests/pairs_data.span_pairs: a clause as the query, its paragraph as the positive, 7 other
paragraphs as negatives); group size 8, batch 16 per process, query/passage max lengths 32/128, padding
to a multiple of 8, temperature 0.02, CLS pooling, normalised, AdamW at lr 1e-4 with weight decay 0.01,
10% warmup, grad-norm clip 1, fp32, `--threads` torch threads per process. Only paragraphs of at least
`--min-passage-tokens` tokens (default 128) are used, so every passage batch is (128, 128) on both
sides: our length-bucketed batches would otherwise pad less than upstream's random ones, and the
ratio would measure the data order, not the step.

Samples/s: global batch / the median step time of the steady state (the first `--warmup` steps left
out); the median, because other users' bursts on a shared machine hit single steps (the mean-based
figure is printed alongside). FlagEmbedding: rank 0's per-step log lines (`--logging_steps 1
--disable_tqdm True`, unbuffered) are time-stamped as they arrive; step k took line k - line k-1.
chuxin_ray: metrics.jsonl's `step_time_s` (batch fetch to the metrics all-reduce); `report_every_s`
is 1e9 and `checkpoint_every` = steps, so no report or checkpoint falls between timed steps. Start-up (Ray,
torchrun, model loading) is outside both. Ray starts its workers at nice 15, torchrun's run at 0:
here both run at 0 (RAY_worker_niceness), else other users' work would slow our side only.

Peak memory, the same method for both: the kernel's per-process high-water mark (VmHWM in
/proc/PID/status, polled every 0.2 s until the process ends) of each training process, the torchrun
workers or the Ray Train worker actors; the table shows the largest over ranks. torchrun's agent and
Ray's driver, GCS and raylet are not counted.

FlagEmbedding's m3 model scatters every passage into a (batch, length, vocab) fp32 tensor, twice:
128 x 128 x 250,002 x 4 bytes x 2 = 33 GB per process here. When that does not fit in 40% of the
machine's memory, upstream's own `--sub_batch_size` flag (the same arithmetic, encoded in chunks) is set
to the largest power of two that fits (`--upstream-sub-batch` overrides; 0: never), and the header says
so: the comparison is then against the closest configuration to upstream's default that runs here,
and its memory ratio depends on that choice (smaller chunks: less upstream memory). Even chunked,
an upstream m3 step takes minutes on 2 cores (~50 GB of fresh, page-faulted tensors per process), so
its runs are `--upstream-m3-steps` long (default 4, the first excluded); its step times are steady.

Targets (issue 4): base >= 1.3x FlagEmbedding's samples/s; unified >= 2x its samples/s at <= 0.5x its
peak memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
XLMR = ROOT.parent / "shared" / "xlmr-tokenizer"
MODULES = {
    "base": "FlagEmbedding.finetune.embedder.encoder_only.base",
    "m3": "FlagEmbedding.finetune.embedder.encoder_only.m3",
}
STAGES = {"base": "finetune", "m3": "unified"}
TARGETS = {"base": (1.3, None), "m3": (2.0, 0.5)}  # (min samples/s ratio, max peak memory ratio)
GROUP_SIZE, BATCH, QUERY_LEN, PASSAGE_LEN, VOCAB = 8, 16, 32, 128, 250_002
LR, WEIGHT_DECAY, WARMUP_RATIO, TEMPERATURE, SEED = 1e-4, 0.01, 0.1, 0.02, 42
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",  # FlagEmbedding's log lines are time-stamped as they arrive
    "RAY_AUTH_MODE": "disabled",  # see ../shared/ENVIRONMENT.md: set explicitly, or auth may switch on
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray starts its workers at nice 15; torchrun's run at 0. On a machine shared with other work that
    # alone would slow our side, so both run at 0.
    "RAY_worker_niceness": "0",
}


# --------------------------------------------------------------------------------------------------
# The shared inputs: one model folder, one data file
# --------------------------------------------------------------------------------------------------


def inputs(work: Path) -> tuple[Path, Path]:
    """The model folder and the pairs file both sides train on."""
    return work / "model", work / "data" / "pairs.jsonl"


def prepare(work: Path, min_passage_tokens: int) -> int:
    """Write the inputs (see `inputs`); returns the number of pairs."""
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    sys.path.insert(0, str(ROOT))  # tests/ is not a package on the path of a script in bench/
    from chuxin_ray.demo import people_daily
    from chuxin_ray.models.m3 import M3Embedder, M3Heads, special_token_ids
    from chuxin_ray.models.m3_folder import save_m3_folder
    from chuxin_ray.models.tiny import tiny_xlmr_config
    from tests.pairs_data import span_pairs

    transformers.logging.set_verbosity_error()  # "sequence length is longer than ... (522 > 512)": counted only
    tok = AutoTokenizer.from_pretrained(str(XLMR))
    model_dir, data = inputs(work)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # with the pooler, which FlagEmbedding's AutoModel expects (unused by both losses; ours drops it)
        encoder = AutoModel.from_config(tiny_xlmr_config(len(tok), pad_token_id=tok.pad_token_id))
        heads = M3Heads(encoder.config.hidden_size, None, special_token_ids(tok))
    save_m3_folder(M3Embedder(encoder, heads), tok, model_dir)

    paragraphs = people_daily()
    lengths = [len(ids) for ids in tok(paragraphs, add_special_tokens=True)["input_ids"]]
    passages = [p for p, n in zip(paragraphs, lengths, strict=True) if n >= min_passage_tokens]
    rows = span_pairs(passages, seed=0, negatives=GROUP_SIZE - 1)
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def upstream_sub_batch(args) -> tuple[int | None, float]:
    """FlagEmbedding m3's --sub_batch_size, and the GB per process its plain run's sparse tensors need.

    The largest power of two whose chunks, in every process of the largest run, fit in 40% of the
    machine's memory (total, not available, so the choice does not move with other users' load)."""
    per_row = 2 * PASSAGE_LEN * VOCAB * 4  # zeros + the scatter's output, (1, L, V) fp32 each
    rows = BATCH * GROUP_SIZE
    if args.upstream_sub_batch is not None:
        return args.upstream_sub_batch or None, rows * per_row / 1e9
    budget = 0.4 * psutil.virtual_memory().total / max(args.procs)
    if rows * per_row <= budget:
        return None, rows * per_row / 1e9
    size = 1
    while size * 2 * per_row <= budget and size * 2 < rows:
        size *= 2
    return size, rows * per_row / 1e9


# --------------------------------------------------------------------------------------------------
# Measuring a run from outside: its log lines and its training processes' peak memory
# --------------------------------------------------------------------------------------------------


def vm_hwm_mb(pid: int) -> float | None:
    """The kernel's peak resident set size of a process (VmHWM), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class PeakWatcher(threading.Thread):
    """Polls the training processes below `root` (those `pick` accepts) and keeps each one's last VmHWM,
    which only grows, so the last reading before a process exits is its peak (to within the interval)."""

    def __init__(self, root: int, pick, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.pick, self.interval = root, pick, interval
        self.peaks: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                children = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                if child.pid not in self.peaks:
                    try:
                        if not self.pick(child, self.root):
                            continue
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                value = vm_hwm_mb(child.pid)
                if value is not None:
                    self.peaks[child.pid] = max(value, self.peaks.get(child.pid, 0.0))
            self.done.wait(self.interval)

    def stop(self) -> dict[int, float]:
        self.done.set()
        self.join()
        return self.peaks


def run_watched(
    argv: list[str], env: dict, log_path: Path, pick, procs: int
) -> tuple[list[tuple[float, str]], float]:
    """Run argv, time-stamping its merged output lines as they arrive; returns them and the largest peak
    RSS (MB) of the `procs` training processes below it that `pick` accepts."""
    lines: list[tuple[float, str]] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        watcher = PeakWatcher(proc.pid, pick)
        watcher.start()
        for line in proc.stdout:
            lines.append((time.perf_counter(), line))
            log.write(line)
        code = proc.wait()
        peaks = watcher.stop()
    if code != 0:
        tail = "".join(line for _, line in lines[-40:])
        raise SystemExit(
            f"{' '.join(argv[:7])} ... failed (exit {code}; -9: out of memory?); {log_path}:\n{tail}"
        )
    if len(peaks) != procs:
        raise SystemExit(f"{log_path.stem}: watched {len(peaks)} training processes, expected {procs}")
    return lines, max(peaks.values())


def threads_for(args, procs: int) -> int:
    return args.threads or max(1, (os.cpu_count() or 1) // procs)


def side_env(threads: int) -> dict:
    return {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads)}


# --------------------------------------------------------------------------------------------------
# FlagEmbedding's trainers
# --------------------------------------------------------------------------------------------------


def flag_embedding(recipe: str, procs: int, args, work: Path) -> dict:
    model_dir, data = inputs(work)
    out = work / f"flag-{recipe}-{procs}"
    steps, warmup = (args.upstream_m3_steps, 1) if recipe == "m3" else (args.steps, args.warmup)
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
        "-m", MODULES[recipe],
        "--model_name_or_path", str(model_dir),
        "--train_data", str(data),
        "--train_group_size", str(GROUP_SIZE),
        "--query_max_len", str(QUERY_LEN),
        "--passage_max_len", str(PASSAGE_LEN),
        "--pad_to_multiple_of", "8",
        "--per_device_train_batch_size", str(BATCH),
        "--temperature", str(TEMPERATURE),
        "--sentence_pooling_method", "cls",
        "--normalize_embeddings", "True",
        "--learning_rate", str(LR),
        "--weight_decay", str(WEIGHT_DECAY),
        "--warmup_ratio", str(WARMUP_RATIO),
        "--max_grad_norm", "1.0",
        "--max_steps", str(steps),
        "--seed", str(SEED),
        "--use_cpu", "True",
        "--ddp_backend", "gloo",
        "--dataloader_num_workers", "0",
        "--dataloader_drop_last", "True",
        "--logging_steps", "1",
        "--disable_tqdm", "True",
        "--save_strategy", "no",
        "--report_to", "none",
        "--output_dir", str(out),
        "--overwrite_output_dir",
    ]  # fmt: skip
    if procs > 1:
        argv.append("--negatives_cross_device")
    sub_batch = None
    if recipe == "m3":
        argv += ["--unified_finetuning", "True", "--use_self_distill", "True"]
        sub_batch, _ = upstream_sub_batch(args)
        if sub_batch:
            argv += ["--sub_batch_size", str(sub_batch)]
    env = {**side_env(threads_for(args, procs)), "HF_DATASETS_CACHE": str(work / "hf-datasets")}

    def worker(child: psutil.Process, root: int) -> bool:
        return child.ppid() == root  # torchrun's agent starts the workers

    lines, peak = run_watched(argv, env, work / f"flag-{recipe}-{procs}.log", worker, procs)
    stamps = [t for t, line in lines if line.startswith("{'loss'")]
    if len(stamps) != steps:
        raise SystemExit(f"FlagEmbedding {recipe}: {len(stamps)} per-step log lines, expected {steps}")
    shutil.rmtree(out, ignore_errors=True)
    # line k is printed at the end of step k: step k took stamps[k-1] - stamps[k-2]
    step_times = [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]
    return {**rates(step_times, procs * BATCH), "peak_rss_mb": peak, "sub_batch": sub_batch}


def rates(step_times: list[float], global_batch: int) -> dict:
    """Samples/s from the median step (robust to other users' bursts on a shared machine) and the mean."""
    return {
        "samples_per_s": global_batch / statistics.median(step_times),
        "mean_samples_per_s": global_batch * len(step_times) / sum(step_times),
        "step_s": (min(step_times), statistics.median(step_times), max(step_times)),
    }


# --------------------------------------------------------------------------------------------------
# Ours: the real stage on a local Ray
# --------------------------------------------------------------------------------------------------


def stage_config(recipe: str, procs: int, threads: int, args, model_dir: Path, data: Path, out: Path):
    from chuxin_ray.config import validate_config

    stage = STAGES[recipe]
    return validate_config(
        {
            "run": {"name": f"bench-{stage}-{procs}", "output": str(out)},
            # one CPU beyond the workers: check_resources keeps it for Ray's own tasks
            "ray": {"num_cpus": procs * threads + 1, "object_store_memory_mb": 256},
            stage: {
                "model": str(model_dir),
                "input": str(data),
                "group_size": GROUP_SIZE,
                "query_max_length": QUERY_LEN,
                "passage_max_length": PASSAGE_LEN,
                "temperature": TEMPERATURE,
                "training": {
                    "workers": procs,
                    "cpus_per_worker": threads,  # torch threads per worker
                    "precision": "fp32",
                    "steps": args.steps,
                    "batch_size": BATCH,
                    "lr": LR,
                    "weight_decay": WEIGHT_DECAY,
                    "warmup_ratio": WARMUP_RATIO,
                    "max_grad_norm": 1.0,
                    "seed": SEED,
                    "checkpoint_every": args.steps,
                    "report_every_s": 1e9,
                    "max_failures": 0,
                },
            },
        }
    )


def ours_inside(args) -> None:
    """`--only ours`: run the stage in this process, print the steady-state figures as one JSON line."""
    import logging

    from chuxin_ray.stages import finetune, unified

    logging.basicConfig(level=logging.INFO)
    recipe, procs, work = args.which[0], args.procs[0], Path(args.workdir)
    out = work / f"ours-{recipe}-{procs}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = stage_config(recipe, procs, args.threads, args, *inputs(work), out)
    (unified.main if recipe == "m3" else finetune.main)(cfg, force=True)
    metrics = out / STAGES[recipe] / "metrics.jsonl"
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    timed = [r for r in history if r["step"] > args.warmup]
    if {r["samples"] for r in timed} != {procs * BATCH}:
        raise SystemExit(f"unexpected samples per step: {sorted({r['samples'] for r in timed})}")
    print("RESULT " + json.dumps(rates([r["step_time_s"] for r in timed], procs * BATCH)))


def chuxin_ray(recipe: str, procs: int, args, work: Path) -> dict:
    """The stage in a fresh process (`--only ours`), so that each run starts its own local Ray."""
    threads = threads_for(args, procs)
    argv = [
        sys.executable, __file__, "--only", "ours", "--workdir", str(work), "--which", recipe,
        "--procs", str(procs), "--threads", str(threads), "--steps", str(args.steps),
        "--warmup", str(args.warmup),
    ]  # fmt: skip

    def worker(child: psutil.Process, root: int) -> bool:
        return "RayTrainWorker" in " ".join(child.cmdline())

    lines, peak = run_watched(argv, side_env(threads), work / f"ours-{recipe}-{procs}.log", worker, procs)
    result = json.loads(next(line for _, line in reversed(lines) if line.startswith("RESULT "))[7:])
    return {**result, "peak_rss_mb": peak}


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="processes per run")
    parser.add_argument("--which", nargs="+", choices=("base", "m3"), default=["base", "m3"])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of samples/s")
    parser.add_argument("--threads", type=int, help="torch threads per process; default: cores / procs")
    parser.add_argument(
        "--min-passage-tokens",
        type=int,
        default=PASSAGE_LEN,
        help="paragraphs shorter than this are left out; 0: all (our length bucketing then pads less)",
    )
    parser.add_argument(
        "--upstream-sub-batch",
        type=int,
        help="FlagEmbedding m3's --sub_batch_size; default: none if its plain run fits in 40%% of memory, "
        "else the largest power of two that does; 0: never",
    )
    parser.add_argument(
        "--upstream-m3-steps",
        type=int,
        default=4,
        help="steps of FlagEmbedding m3 runs, the first excluded: each takes minutes on a small CPU",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each side, alternating (upstream, ours, upstream, ours, ...); the table shows each "
        "side's best samples/s and its largest peak memory: on a shared host other users' bursts only ever "
        "slow a run, and alternating spreads the drift over both sides",
    )
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    parser.add_argument("--only", choices=("ours",), help="internal: run one side in this process")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be >= 1 and < --steps")
    if args.upstream_m3_steps < 2:
        parser.error("--upstream-m3-steps must be >= 2 (its first step is excluded)")

    if args.only:
        ours_inside(args)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = prepare(work, args.min_passage_tokens)
    sub_batch, plain_gb = upstream_sub_batch(args)
    print(
        f"tiny XLM-R (hidden 32, 2 layers, vocab 250,002); {rows} pairs; group {GROUP_SIZE}, batch {BATCH} per "
        f"process, lengths {QUERY_LEN}/{PASSAGE_LEN}; {args.steps} steps, the first {args.warmup} excluded; "
        f"CPU, {os.cpu_count()} cores, torch threads per process: {args.threads or 'cores / procs'}"
    )
    if "m3" in args.which:
        print(
            f"FlagEmbedding m3: {args.upstream_m3_steps} steps, the first excluded"
            + (
                f"; --sub_batch_size {sub_batch}: without it each process would build ~{plain_gb:.0f} GB of "
                f"(batch, length, vocab) tensors ({psutil.virtual_memory().total / 1e9:.0f} GB here)"
                if sub_batch
                else ""
            )
        )
    runs: dict[tuple, list[dict]] = {}
    for recipe in args.which:
        for procs in args.procs:
            for _, (side, measure) in itertools.product(
                range(args.rounds), (("FlagEmbedding", flag_embedding), ("chuxin_ray", chuxin_ray))
            ):
                result = measure(recipe, procs, args, work)
                runs.setdefault((recipe, procs, side), []).append(result)
                low, mid, high = result["step_s"]
                print(
                    f"  {recipe} x{procs} {side}: step {mid:.2f} s median ({low:.2f}-{high:.2f}), "
                    f"{result['samples_per_s']:.1f} samples/s (mean-based {result['mean_samples_per_s']:.1f}), "
                    f"peak {result['peak_rss_mb']:.0f} MB, load {os.getloadavg()[0]:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    load_after = os.getloadavg()
    results = [
        (
            *key,
            {
                "samples_per_s": max(r["samples_per_s"] for r in rs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            },
        )
        for key, rs in runs.items()
    ]

    print(
        f"\n{'recipe':7} {'procs':>5}  {'side':13} {'samples/s':>9} {'peak RSS MB':>11}  "
        f"{'ratio vs FlagEmbedding':22}  {'target':31} result"
    )
    baseline: dict = {}
    for recipe, procs, side, r in results:
        row = f"{recipe:7} {procs:5}  {side:13} {r['samples_per_s']:9.1f} {r['peak_rss_mb']:11.0f}"
        if side == "FlagEmbedding":
            baseline[recipe, procs] = r
            print(row)
            continue
        flag = baseline[recipe, procs]
        speed = r["samples_per_s"] / flag["samples_per_s"]
        memory = r["peak_rss_mb"] / flag["peak_rss_mb"]
        min_speed, max_memory = TARGETS[recipe]
        met = speed >= min_speed and (max_memory is None or memory <= max_memory)
        target = f">= {min_speed:g}x samples/s" + (f", <= {max_memory:g}x memory" if max_memory else "")
        ratio = f"{speed:.2f}x s/s, {memory:.2f}x mem"
        print(f"{row}  {ratio:22}  {target:31} {'met' if met else 'missed'}")
    print(
        "samples/s: global batch / median steady-state step time (the best of "
        f"{args.rounds} alternating run(s) a side); peak RSS: the largest VmHWM over the "
        f"training processes (torchrun workers, Ray Train workers); 1-min load average {load_before[0]:.1f} "
        f"before, {load_after[0]:.1f} after"
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
