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
`--chunk` rows at a time.

Memory: upstream builds full (B, L, V) logits twice (encoder and decoder) plus their log-softmax:
16 x 512 x 250,002 fp32 is 8.2 GB per tensor, ~33 GB at the issue's settings, more than a 24 GB machine
holds. Each implementation runs in a fresh subprocess, because peak RSS (ru_maxrss) cannot be reset.
Target (issue 3): ours >= 2x upstream tokens/s at <= upstream peak memory.
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
    """Returns step(texts) -> (tokens, data seconds) and the model."""
    import numpy as np
    import pyarrow as pa
    import torch

    from chuxin_ray.models.masking import mask_retromae_batch
    from chuxin_ray.models.retromae import RetroMAE
    from chuxin_ray.stages.pretrain import tokenizer_info
    from chuxin_ray.train.data import pad_rows

    model = RetroMAE(build_lm(args, len(tok)), lm_head_chunk_size=args.chunk or None, decoder_seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    info = tokenizer_info(tok, whole_word_mask=True)
    generator = torch.Generator().manual_seed(0)

    def step(batch_texts: list[str]) -> tuple[int, float]:
        started = time.perf_counter()
        ids = tok(batch_texts, truncation=True, max_length=args.max_length)["input_ids"]
        column = pa.array(ids, pa.list_(pa.int32()))
        input_ids, attention_mask = pad_rows(column, np.arange(len(ids)), args.max_length, info.pad_id)
        batch = mask_retromae_batch(
            input_ids,
            attention_mask,
            special_token_ids=info.special_ids,
            mask_token_id=info.mask_id,
            vocab_size=info.vocab_size,
            encoder_mask_ratio=0.3,
            decoder_mask_ratio=0.5,
            generator=generator,
        )
        data_time = time.perf_counter() - started
        model(**batch.as_kwargs()).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(attention_mask.sum()), data_time

    return step


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

    model = RetroMAEForPretraining(build_lm(args, len(tok)), ModelArguments()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collator = RetroMAECollator(
        tokenizer=tok,
        max_seq_length=args.max_length,
        encoder_mlm_probability=0.3,
        decoder_mlm_probability=0.5,
    )

    def step(batch_texts: list[str]) -> tuple[int, float]:
        started = time.perf_counter()
        batch = collator(batch_texts)
        data_time = time.perf_counter() - started
        model(**batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["encoder_attention_mask"].sum()), data_time

    return step


def measure(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    corpus = texts(args.batch * (args.warmup + args.steps), min_chars=int(args.max_length * 1.5))
    step = (ours if args.only == "ours" else upstream)(args, tok)
    baseline = rss_mb()
    tokens = seconds = data_seconds = 0.0
    for i in range(args.warmup + args.steps):
        started = time.perf_counter()
        count, data_time = step(corpus[i * args.batch : (i + 1) * args.batch])
        if i >= args.warmup:
            seconds += time.perf_counter() - started
            tokens += count
            data_seconds += data_time
    return {
        "impl": args.only,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / args.steps,
        "data_share": data_seconds / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_over_model_mb": peak_rss_mb() - baseline,
    }


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
    parser.add_argument("--chunk", type=int, default=2048, help="our LM-head rows per chunk; 0: no chunking")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=64)
    parser.add_argument(
        "--only", choices=("ours", "upstream"), help="run one side in this process (internal)"
    )
    args = parser.parse_args()

    if args.only:
        print(json.dumps(measure(args)))
        return
    if not args.upstream:
        parser.error("--upstream PATH (a FlagEmbedding checkout) is required to compare")
    results = {}
    for impl in ("upstream", "ours"):
        argv = [sys.executable, __file__, *sys.argv[1:], "--only", impl]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{impl} failed (exit {done.returncode}; -9 is usually out of memory)")
        results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"batch {args.batch}, max length {args.max_length}, vocab of {args.tokenizer}, {args.threads} threads"
    )
    print(
        f"{'':10} {'tokens/s':>10} {'step s':>8} {'data share':>11} {'peak RSS MB':>12} {'over model MB':>14}"
    )
    for impl, r in results.items():
        print(
            f"{impl:10} {r['tokens_per_s']:10.0f} {r['step_s']:8.2f} {r['data_share']:11.0%} "
            f"{r['peak_rss_mb']:12.0f} {r['peak_over_model_mb']:14.0f}"
        )
    speedup = results["ours"]["tokens_per_s"] / results["upstream"]["tokens_per_s"]
    memory = results["ours"]["peak_rss_mb"] / results["upstream"]["peak_rss_mb"]
    verdict = "meets" if speedup >= 2 and memory <= 1 else "misses"
    print(f"ours / upstream: {speedup:.2f}x tokens/s at {memory:.2f}x peak memory ({verdict} >= 2x at <= 1x)")


if __name__ == "__main__":
    main()
