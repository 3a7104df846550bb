#!/usr/bin/env bash
# Runs the comparisons of docs/results.md (CPU): CIFAR ResNet-20 from scratch on a 10k CIFAR-10 subset, and the
# shared pretrained ResNet-20 fine-tuned on Fashion-MNIST.
#   bash recipes/run_results.sh scratch|finetune OUT_DIR [RUN ...]
# RUN is one of none, freezeout, fixed, fixed-discard (the fixed schedule with the frozen prefix discarded and its
# activations cached with the default codec); default: none freezeout fixed.
# Each run uses one thread (pin it to a core with taskset for stable wall times).
set -euo pipefail
which=$1; out=$2; shift 2
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(none freezeout fixed)
shared=${SHARED:-../shared}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(--per_device_train_batch_size 128 --per_device_eval_batch_size 500 --optim sgd --optim_args momentum=0.9
        --lr_scheduler_type cosine --eval_strategy no --save_strategy no --logging_steps 20 --seed 0
        --dataloader_num_workers 0 --report_to none --disable_tqdm true)
if [ "$which" = scratch ]; then
  args=(--model resnet20 --dataset_name "$shared/data/cifar10" --max_train_samples 10000
        --num_train_epochs 15 --learning_rate 0.1 --weight_decay 5e-4)
  fixed="5:3,10:6"
else
  args=(--model resnet20 --pretrained_weights "$shared/models/resnet-cifar10/resnet20-12fca82f.th"
        --dataset_name "$shared/data/fashion_mnist" --max_train_samples 10000
        --num_train_epochs 5 --learning_rate 0.01 --weight_decay 5e-4)
  fixed="1:3,3:6"
fi
for run in "${runs[@]}"; do
  case $run in
    none|freezeout) extra=(--freeze_policy "$run") ;;
    fixed) extra=(--freeze_policy fixed --freeze_schedule "$fixed") ;;
    fixed-discard) extra=(--freeze_policy fixed --freeze_schedule "$fixed" --discard true --cache_decode_threads 1) ;;
    *) echo "unknown run $run (none, freezeout, fixed, fixed-discard)" >&2; exit 2 ;;
  esac
  rm -rf "$out/$which-$run"
  python recipes/train_image_classifier.py "${args[@]}" "${common[@]}" "${extra[@]}" \
    --output_dir "$out/$which-$run" > "$out/$which-$run.log" 2>&1
done
