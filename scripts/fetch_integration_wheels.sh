#!/usr/bin/env bash
# Fetch the peer libraries that benchmarks/bench_integrations.py imports (SAELens `sae_lens`,
# EleutherAI `sparsify`, `dictionary_learning`) as wheels into .whl/ (git-ignored), so that
# they can travel to an offline GPU box (Python 3.12, x86-64 manylinux, no network).
#
# The set is the smallest one that makes these imports work there, on top of the packages that
# box already has (torch 2.11, transformers 5.17, huggingface_hub 1.33, accelerate, pandas,
# pyarrow, scipy, requests, click, protobuf, pyyaml, ...):
#   from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  (+ sae_lens.saes.*)
#   from sparsify import SparseCoder, SparseCoderConfig  (+ sparsify.fused_encoder, .sparse_coder)
#   from dictionary_learning.trainers.top_k import TopKTrainer  (+ .batch_top_k, .jumprelu, .dictionary)
# Only import-time needs are carried: the three libraries, transformer_lens and wandb (sae_lens
# imports both at import time; wandb only needs opentelemetry-api, pydantic and platformdirs to
# import, and its service binary is never started), datasets (+ multiprocess, dill: its
# version is read from metadata), simple_parsing, nnsight 0.3 (+ pydantic, python-socketio).
# Each wheel was checked to be needed by removing it and re-running the imports. Versions are
# those of the local .venv. pydantic-core and multiprocess are the cp312/py312 builds.
# Total: 23 wheels, about 28.7 MiB (30.1 MB), of which wandb is 19.4 MiB.
# wandb 0.31 needs protobuf major 5, 6 or 7 on the GPU box.
#
#   usage: bash scripts/fetch_integration_wheels.sh      (here, with PyPI reachable)
# Then, on the GPU box (name .whl in the run's carry), before running the benchmark:
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site
#   python3 benchmarks/bench_integrations.py --quick
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PIP:-}" ]; then read -r -a pip <<<"$PIP"
elif [ -x .venv/bin/pip ]; then pip=(.venv/bin/pip)
else pip=(python3 -m pip); fi

WHEELS=(
  sae-lens==6.54.12
  transformer-lens==3.9.0
  better-abc==0.0.3
  wandb==0.31.0
  opentelemetry-api==1.45.2
  platformdirs==4.14.9
  pydantic==2.14.4
  pydantic-core==2.50.5
  typing-inspection==0.4.5
  annotated-types==0.8.0
  datasets==5.2.0
  multiprocess==0.70.19
  dill==0.4.1
  simple-parsing==0.1.9
  docstring-parser==0.18.0
  eai-sparsify==1.3.3
  natsort==8.4.0
  schedulefree==1.4.1
  dictionary-learning==0.1.0
  nnsight==0.3.7
  python-socketio==5.18.1
  python-engineio==4.15.1
  bidict==0.24.1
)

mkdir -p .whl
# Two versions of one project in .whl stop the whole install there: drop other versions first.
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; ver=${spec#*==}; stem=${name//-/_}
  for f in .whl/"$stem"-*.whl; do
    [ -e "$f" ] || continue
    case $(basename "$f") in "$stem-$ver-"*) ;; *) echo "removing other version: $f"; rm -f "$f";; esac
  done
done

"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"

files=()
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; ver=${spec#*==}; stem=${name//-/_}
  f=$(ls .whl/"$stem-$ver"-*.whl 2>/dev/null | head -n 1 || true)
  [ -n "$f" ] || { echo "missing wheel for $spec" >&2; exit 1; }
  files+=("$f")
done
bytes=$(du -cb "${files[@]}" | tail -n 1 | cut -f1)
echo "${#files[@]} wheels, $bytes bytes ($(awk "BEGIN {printf \"%.1f\", $bytes / 1048576}") MiB) in .whl/"
