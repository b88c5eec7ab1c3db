#!/usr/bin/env bash
# Submit a chuxin-ray pipeline run, or one stage of it, to a running Ray cluster through its job API:
#
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/submit.sh CONFIG [key=value ...] [--only STAGE | --from STAGE] [--force]
#
#   jobs/submit.sh jobs/chuxin-retromae.yaml                    every stage of the config, in order
#   jobs/submit.sh jobs/chuxin-retromae.yaml --only pretrain    one stage
#   CHUXIN_SUBMIT_ARGS="--no-wait --submission-id emb-42" jobs/submit.sh ...   extra `ray job submit` options
#
# RAY_ADDRESS: the dashboard of any Ray 2.60 cluster: a local `ray start --head`, or a KubeRay head through
# `kubectl port-forward -n NS svc/<cluster>-head-svc 8265:8265` (`chuxin-ray status RUN` prints that line).
# The config is validated here first (same schema as the job; PYTHON, default python3, must import
# chuxin_ray), then travels alone as the job's working_dir, so every path in it must be readable on the
# cluster: s3:// URIs, or absolute paths on a shared disk.
# The code and the environment: jobs/runtime_env.yml. Without waiting (--no-wait), follow the job with
# `ray job logs --follow ID`; exit status: that of `ray job submit` (1 when the job FAILED).
set -euo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard, e.g. http://127.0.0.1:8265}"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="$1"
shift
[[ -f $config ]] || { echo "jobs/submit.sh: config file not found: $config" >&2; exit 2; }

# key=value overrides first, then flags: `chuxin-ray pipeline` takes its positionals in one run.
overrides=()
flags=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --only | --from) [[ $# -ge 2 ]] || usage; flags+=("$1" "$2"); shift 2 ;;
    --force) flags+=("$1"); shift ;;
    -*) echo "jobs/submit.sh: unknown option $1" >&2; usage ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "jobs/submit.sh: $1 is not key=value" >&2; usage ;;
  esac
done

# Config errors fail here, before anything is uploaded or started.
python="${PYTHON:-python3}"
"$python" - "$config" ${overrides[@]+"${overrides[@]}"} <<'PY'
import sys

from chuxin_ray.config import ConfigError, load_config

try:
    load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    print(f"jobs/submit.sh: {e}", file=sys.stderr)
    sys.exit(2)
PY

workdir="$(mktemp -d "${TMPDIR:-/tmp}/chuxin-submit.XXXXXX")"
trap 'rm -rf "$workdir"' EXIT
cp "$config" "$workdir/config.yaml"

# From the repository root: jobs/runtime_env.yml names the package by a path relative to it.
cd "$repo"
# shellcheck disable=SC2086  # CHUXIN_SUBMIT_ARGS is a list of options
ray job submit --address "$RAY_ADDRESS" \
  --runtime-env "$repo/jobs/runtime_env.yml" --working-dir "$workdir" ${CHUXIN_SUBMIT_ARGS:-} \
  -- chuxin-ray pipeline config.yaml ${overrides[@]+"${overrides[@]}"} ${flags[@]+"${flags[@]}"}
