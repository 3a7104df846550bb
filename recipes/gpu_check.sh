#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (see the developers' brief): the CUDA tests, the data-path benchmark
# against its limit (ResNet-32 2x at positions 5 and 10, ResNet-50 and DeiT-S at 224; synthetic images, since ../shared
# is not on that machine), then a bf16 discard run of ResNet-20 on the embedded data with the cost report. Results go
# to $OUT. `SCALE=small bash recipes/gpu_check.sh` runs the same steps at toy sizes (how it is exercised on a CPU).
#
# The GPU image has torch, transformers, accelerate, timm and pytest but not datasets, zfpy or zstandard: download
# their wheels here first (ignored folder .whl, carried with the run), e.g.
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl datasets dill multiprocess zfpy zstandard
# then: run(command="bash recipes/gpu_check.sh", carry=[".whl"], timeout_s=540).
set -uo pipefail
OUT=${OUT:-gpu_check_out}
SCALE=${SCALE:-full}
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
    tests/test_codecs.py tests/test_device_path.py tests/test_pipelined_build.py 2>&1 | tee "$OUT/cuda_tests.txt" | tail -15

if [ "$SCALE" = small ]; then
    CIFAR=(--samples 64 --steps 2 --warmup 1 --repeats 1 --batch_size 16 --build_batch_size 32)
    IMAGENET=(--samples 16 --steps 1 --warmup 1 --repeats 1 --batch_size 8 --build_batch_size 8)
    RUN=(--max_train_samples 256 --max_eval_samples 64 --num_train_epochs 2 --use_cpu true)
else
    CIFAR=(--samples 10000 --steps 60 --warmup 10 --repeats 3 --batch_size 256 --build_batch_size 1000 --threads 8)
    IMAGENET=(--samples 2048 --steps 20 --warmup 5 --repeats 3 --batch_size 128 --build_batch_size 256 --threads 8)
    RUN=()
fi
python3 recipes/benchmark_cache.py data-path --synthetic --bf16 --shapes resnet32x2-p5,resnet32x2-p10 \
    --codecs codebook2,zfp,lowbit4,lowbit2,int8,bf16 --memory device,host,disk "${CIFAR[@]}" --output_dir /tmp/bench-cifar \
    2>&1 | tail -40 > "$OUT/bench_cifar.log"
cp /tmp/bench-cifar/results.md "$OUT/bench_cifar.md"; cp /tmp/bench-cifar/results.json "$OUT/bench_cifar.json"
python3 recipes/benchmark_cache.py data-path --bf16 --shapes resnet50-s1,resnet50-s2,deit-s-b9 \
    --codecs codebook2,zfp,lowbit4,int8 --memory device,host "${IMAGENET[@]}" --output_dir /tmp/bench-imagenet \
    2>&1 | tail -40 > "$OUT/bench_imagenet.log"
cp /tmp/bench-imagenet/results.md "$OUT/bench_imagenet.md"; cp /tmp/bench-imagenet/results.json "$OUT/bench_imagenet.json"

python3 recipes/train_image_classifier.py --model resnet20 --freeze_policy freezeout --discard true --bf16 true \
    --output_dir /tmp/bf16-discard --save_strategy no --disable_tqdm true "${RUN[@]}" 2>&1 | tee "$OUT/bf16_discard.log" | tail -5
cp /tmp/bf16-discard/cost_report.md /tmp/bf16-discard/cost_report.json /tmp/bf16-discard/eval_results.json "$OUT/"
