#!/usr/bin/env bash
# The SmartFRZ predictor pipeline at the CPU scale of docs/results.md.
#   bash recipes/train_smartfrz_predictor.sh OUT_DIR [STAGE ...]
# Stages (default: all, in this order):
#   scratch32, finetune32  ResNet-32 from scratch on 5k CIFAR-10 (10 epochs) and fine-tuned from the shared CIFAR-10
#                          weights on 5k Fashion-MNIST (4 epochs): a reference run (seed 0), then recorded runs with
#                          seeds 1 (training) and 2 (validation). About 25 CPU-minutes with one thread per run.
#   scratch, finetune      ResNet-20 setups of the policy comparison: reference (its `none` run) and a recorded run
#                          with seed 1, the test set of a model the predictor never saw. About 25 CPU-minutes.
#   fit                    Fits the predictor and writes OUT_DIR/predictor.safetensors and OUT_DIR/predictor.json.
# Stages are independent until `fit`: run two at a time on two cores. Ship the result with
#   cp OUT_DIR/predictor.safetensors hf_freezecache/policies/smartfrz/predictor.safetensors
set -euo pipefail
out=$1; shift
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(scratch32 finetune32 scratch finetune fit)
mkdir -p "$out"
for stage in "${stages[@]}"; do
  case $stage in
    scratch32|finetune32) bash recipes/run_results.sh "$stage" "$out" none record-1 record-2 ;;
    scratch|finetune) bash recipes/run_results.sh "$stage" "$out" none record-1 ;;
    fit) OMP_NUM_THREADS=2 python recipes/train_smartfrz_predictor.py fit \
           --train "$out/scratch32-record-1.npz" "$out/finetune32-record-1.npz" \
           --validation "$out/scratch32-record-2.npz" "$out/finetune32-record-2.npz" \
           --test "$out/scratch-record-1.npz" "$out/finetune-record-1.npz" \
           --output "$out/predictor.safetensors" --report "$out/predictor.json" | tee "$out/fit.log" ;;
    *) echo "unknown stage $stage (scratch32, finetune32, scratch, finetune, fit)" >&2; exit 2 ;;
  esac
done
