#!/usr/bin/env bash
# Runs the comparisons of docs/results.md (CPU): CIFAR ResNet-20 from scratch on a 10k CIFAR-10 subset, the shared
# pretrained ResNet-20 fine-tuned on Fashion-MNIST, and a CPU-sized DeiT-Tiny (32x32 input, patch 4, width 192,
# 12 blocks) from scratch on a 3k CIFAR-10 subset; scratch32 / finetune32 are smaller ResNet-32 setups (the first
# SmartFRZ predictor's training runs; today's is fitted on the corpus of recipes/build_smartfrz_corpus.py).
#   bash recipes/run_results.sh scratch|finetune|vit|scratch32|finetune32 OUT_DIR [RUN ...]
# RUN is one of none, freezeout, freezeout-multiply (the per-block cosine on top of the global schedule), fixed,
# fixed-discard (the fixed schedule with the frozen prefix discarded and its activations cached with the default
# codec), fixed-channel-G (fixed-discard plus similarity-aware channel augmentation with gamma G, e.g.
# fixed-channel-0.1; CNNs), fixed-token-A / fixed-token-min-A (fixed-discard plus token replacement with alpha A,
# matching by highest / lowest cosine similarity; ViTs), autofreeze, smartfrz, egeria, cka (reference: the setup's
# `none` run, which must exist), smartfrz-discard / cka-discard (the same, discarding the longest frozen prefix),
# smartfrz-threshold-T (smartfrz freezing at P(freeze) > T), record-S (no freezing, seed S: records the tailored weight
# history and CKA to the `none` run into OUT_DIR/<setup>-record-S.npz for the predictor); default: none freezeout
# fixed.
# SEED (default 0) sets --seed.
# Each run uses one thread (pin it to a core with taskset for stable wall times).
set -euo pipefail
which=$1; out=$2; shift 2
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(none freezeout fixed)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# Each setup is a config file in recipes/configs/cpu (paths relative to the repository root, where this runs), with
# the fixed schedule of its `fixed*` runs.
case $which in
  scratch) config=resnet20_cifar10_scratch; fixed="5:3,10:6" ;;
  finetune) config=resnet20_fashion_mnist_finetune; fixed="1:3,3:6" ;;
  vit) config=deit_tiny_cifar10_scratch; fixed="2:4,4:8" ;;
  scratch32) config=resnet32_cifar10_scratch; fixed="4:5,7:10" ;;
  finetune32) config=resnet32_fashion_mnist_finetune; fixed="1:5,2:10" ;;
  *) echo "unknown setup $which (scratch, finetune, vit, scratch32, finetune32)" >&2; exit 2 ;;
esac
for run in "${runs[@]}"; do
  script=(recipes/train_image_classifier.py)
  case $run in
    none|freezeout|autofreeze|smartfrz|egeria) extra=(--freeze_policy "$run") ;;
    freezeout-multiply) extra=(--freeze_policy freezeout --freezeout_anneal_mode multiply) ;;
    smartfrz-discard) extra=(--freeze_policy smartfrz --discard true --cache_decode_threads 1) ;;
    smartfrz-threshold-*) extra=(--freeze_policy smartfrz --smartfrz_threshold "${run#smartfrz-threshold-}") ;;
    cka) extra=(--freeze_policy cka --cka_reference "$out/$which-none") ;;
    cka-discard) extra=(--freeze_policy cka --cka_reference "$out/$which-none" --discard true
                        --cache_decode_threads 1) ;;
    record-*) script=(recipes/train_smartfrz_predictor.py record --reference "$out/$which-none"
                      --history "$out/$which-$run.npz" --)
              extra=(--seed "${run#record-}") ;;
    fixed) extra=(--freeze_policy fixed --freeze_schedule "$fixed") ;;
    fixed-discard) extra=(--freeze_policy fixed --freeze_schedule "$fixed" --discard true --cache_decode_threads 1) ;;
    fixed-channel-*) extra=(--freeze_policy fixed --freeze_schedule "$fixed" --discard true --cache_decode_threads 1
                            --channel_aug_gamma "${run#fixed-channel-}") ;;
    fixed-token-min-*) extra=(--freeze_policy fixed --freeze_schedule "$fixed" --discard true --cache_decode_threads 1
                              --token_aug_alpha "${run#fixed-token-min-}" --token_aug_matching min) ;;
    fixed-token-*) extra=(--freeze_policy fixed --freeze_schedule "$fixed" --discard true --cache_decode_threads 1
                          --token_aug_alpha "${run#fixed-token-}") ;;
    *) echo "unknown run $run (none, freezeout[-multiply], fixed, fixed-discard, fixed-channel-G," \
            "fixed-token[-min]-A, autofreeze, smartfrz[-discard], smartfrz-threshold-T, egeria, cka[-discard], record-S)" >&2
       exit 2 ;;
  esac
  rm -rf "$out/$which-$run"
  python "${script[@]}" "recipes/configs/cpu/$config.yaml" --seed "${SEED:-0}" "${extra[@]}" \
    --output_dir "$out/$which-$run" > "$out/$which-$run.log" 2>&1
done
