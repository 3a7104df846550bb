#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (see the developers' brief): the CUDA tests, then a bf16 discard run of
# ResNet-20 on the embedded data with the cost report (its peak GPU memory per freeze state). Results go to $OUT.
#
# The GPU image has torch, transformers, accelerate, timm and pytest but not datasets, zfpy or zstandard: download
# their wheels here first (ignored folder .whl, carried with the run), e.g.
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl datasets dill multiprocess zfpy zstandard
# then: run(command="bash recipes/gpu_check.sh", carry=[".whl"], timeout_s=540).
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)"
} > "$OUT/machine.txt" 2>&1

python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_mixed_precision.py tests/test_model.py \
    2>&1 | tee "$OUT/cuda_tests.txt"

python3 recipes/train_image_classifier.py --model resnet20 --freeze_policy freezeout --discard true --bf16 true \
    --output_dir /tmp/bf16-discard --save_strategy no --disable_tqdm true 2>&1 | tee "$OUT/bf16_discard.log" | tail -5
cp /tmp/bf16-discard/cost_report.md /tmp/bf16-discard/cost_report.json /tmp/bf16-discard/eval_results.json "$OUT/"
