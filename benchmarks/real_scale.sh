#!/usr/bin/env bash
# The real-scale check (issue 11): every bksdm command on an SD-v1.4-sized pipeline with random weights, offline,
# with time and peak memory per command against a ceiling. Options are real_scale.py's (--arch, --resolution,
# --only, --workdir, --keep, --lean, --out, --update); see benchmarks/README.md, "real_scale.py".
# Usage, from anywhere with bksdm importable: bash benchmarks/real_scale.sh [--arch sd-v1.4|sdxl|tiny] ...
exec python "$(dirname "$0")/real_scale.py" "$@"
