#!/usr/bin/env bash
# The checks that need a CUDA GPU, in order of value, each writing under $OUT (default benchmarks/results/gpu):
#   1. the card and the library versions;
#   2. train_throughput.py: one KD step, SD-v1.4 -> bk-small at 512 px, cached vs uncached, fp16;
#   3. generate_throughput.py on the bundled teacher, fp16;
#   4. the GPU tests (tests/use/test_gpu.py): mixed-precision distillation and DreamBooth, batch invariance;
#   4b. bksdm demo --teacher bundled-sd3: the transformer demo (keep-half, 1000 steps) on the GPU, timed;
#   5. bksdm plan score of an SD-v1.4-sized teacher with the default calibration (issue 14: "in minutes on one
#      GPU"), timed; the teacher is real_scale.py's build (random weights, the real architecture);
#   5b. end_to_end.py: SD-v1.4 vs BK-SDM-Base/Small/Tiny per image at 512 px, 25 steps with guidance, fp16, with a
#      stock pipeline call each (the teacher folder is reused from step 5);
#   6. real_scale.py: every bksdm command (lcm and adapt included) on an SD-v1.4-sized pipeline at 512 px, with
#      peak RSS and GPU memory
#      (last: it takes longest; --lean keeps the disk under about 35 GB; set REAL_SCALE=0 to skip it).
# Usage, from the repository root with bksdm importable: bash benchmarks/gpu_checks.sh
set -u
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log="$out/gpu_checks.log"

step() {
  echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$log"
  "$@" 2>&1 | grep -v "should be kept in float32" | tee -a "$log"
}

step nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step python -c "import torch, diffusers, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name(0), '| diffusers', diffusers.__version__, '| transformers', \
transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)"
step python benchmarks/train_throughput.py --arch sd-v1.4 --plan bk-small --resolution 512 --batch 8 --steps 5 \
  --warmup 2 --device cuda --dtype fp16 --out "$out/train_throughput_cuda_fp16.json"
step python benchmarks/generate_throughput.py --device cuda --count 32 --batches 1,8,32 --repeats 3 \
  --out "$out/generate_throughput_cuda.json"
step python -m pytest -m gpu tests/use/test_gpu.py -s -q -p no:cacheprovider --durations=0 \
  -k "${GPU_TESTS:-batch or dreambooth or bf16 or fp16}"
step /usr/bin/time -v bksdm demo --teacher bundled-sd3 --out "$out/demo_sd3" train.mixed_precision=bf16
score_dir=${SCORE_WORKDIR:-/tmp/plan_score_gpu}
step python benchmarks/real_scale.py --build sd-v1.4 --workdir "$score_dir"
step /usr/bin/time -v bksdm plan score --teacher "$score_dir/teacher" --out "$out/plan_score_sd-v1.4" --device cuda
step python benchmarks/end_to_end.py --device cuda --loads 0 --folder "$score_dir/teacher" --out "$out/end_to_end_512px_cuda.json"
if [ "${REAL_SCALE:-1}" != 0 ]; then
  step python benchmarks/real_scale.py --arch sd-v1.4 --resolution 512 --lean --wait-limit 60 \
    --workdir "${REAL_SCALE_WORKDIR:-/tmp/real_scale_gpu}" --out "$out/real_scale_sd-v1.4_512px_cuda.json"
fi
