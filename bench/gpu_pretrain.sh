#!/usr/bin/env bash
# Issue 3's GPU check, a few minutes on one H100 or H200: tokens/s, peak GPU memory and model FLOPs
# utilisation of our RetroMAE step and of FlagEmbedding's, for an XLM-R-large-shaped model (24 layers,
# hidden 1024, the real 250,002-id vocabulary) at length 512, batch 16, bf16 autocast, collators
# included (bench/retromae.py). Target: ours >= 40% MFU. Three model runs (ours twice), minutes in all.
#
# First, here: bench/gpu_bundle.sh FLAGEMBEDDING (fills .gpu/). Then through the device tool:
#   run(command="bash bench/gpu_pretrain.sh", carry=[".gpu"], timeout_s=540)
# It prints the table and writes it, with the raw figures, to $OUT/gpu_pretrain.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
test -d .gpu/wheels || { echo "no .gpu/: run bench/gpu_bundle.sh here first and carry .gpu" >&2; exit 2; }
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
report=${OUT:-/tmp}/gpu_pretrain.txt
common=(--device cuda --bf16 --preset large --batch 16 --max-length 512 --warmup 3 --steps 10
        --tokenizer .gpu/xlmr-tokenizer --texts .gpu/texts.json)
# Both sides, ours at the config's lm_head_chunk_size (4096 rows, as jobs/chuxin-retromae.yaml: the
# projection's gradients chunk by chunk in the forward pass). A failing upstream still prints ours.
status=0
python3 bench/retromae.py "${common[@]}" --chunk 4096 --upstream .gpu/upstream 2>&1 | tee "$report" || status=$?
# Ours on the plain path (full logits under autograd, which an 80 GB card holds at this size).
echo "ours, --chunk 0 (the plain LM-head path):" | tee -a "$report"
python3 bench/retromae.py "${common[@]}" --chunk 0 --only ours 2>&1 | tee -a "$report" || status=$?
exit "$status"
