#!/usr/bin/env bash
# One-command set-up: bksdm and its dependencies into the active Python environment.
# Installs torch 2.13.0 first: on CPU-only machines that is the CPU build; an unpinned torch would pull the
# multi-GB CUDA build. On a GPU machine, install the torch build you want first and skip this pin with
# BKSDM_SKIP_TORCH=1 ./setup.sh.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet --upgrade pip
if [ "${BKSDM_SKIP_TORCH:-0}" != "1" ]; then
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"
# Test tool: the FID test checks our Inception-v3 against torch-fidelity's, bit for bit. Into its own folder,
# without dependencies: its torchvision cannot be installed beside this torch, the module the test uses does not
# need it, and torch-fidelity in site-packages would break `import torchmetrics` for anyone who has it.
python -m pip install --quiet --no-deps --upgrade --target .test-tools "torch-fidelity==0.4.0"
# The browser test of `bksdm serve` drives Debian's Chromium through Playwright (never `playwright install`).
if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends chromium >/dev/null
    elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
        sudo DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
    else
        echo "note: /usr/bin/chromium is missing and apt-get is not available; the browser test of bksdm serve" \
             "(tests/test_serve.py) needs it: install your system's chromium package" >&2
    fi
fi
python -c "import bksdm, torch, diffusers; print(f'bksdm {bksdm.__version__} ready (torch {torch.__version__}, diffusers {diffusers.__version__})')"
