#!/usr/bin/env bash
# Train every defense of engine.objectives on scikit-learn DIGITS (8x8 digits upsampled to
# 32 px — a toy dataset, NOT CIFAR-10) with the tiny CNN on CPU, then evaluate all of them in
# one PAT-table-shaped table (examples/digits/results/). Runs go to var/examples/digits/.
#
#   bash examples/digits/run_all.sh            # from the repository root
#
# Method parameters are the papers' CIFAR-10 defaults (engine.objectives); only the
# optimiser settings are the small "digits" preset (EPOCHS epochs of 22 steps of 64 images).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-6}
RUNS=var/examples/digits
OUT=examples/digits/results
COMMON=(--dataset digits --arch tiny --preset digits --epochs "$EPOCHS" --milestones $((EPOCHS - 1)) --no-progress --device cpu)

declare -A SETTINGS=(
  [standard]=""
  [pgd_linf]=""
  [pgd_l2]=""
  [trades]=""
  [pat_self]=""
  # PAT bounds by its CIFAR AlexNet; here an UNTRAINED one (seed 0) of that layout: training
  # AlexNetCIFAR on CPU is too slow for this demo (use lpips_model=alexnet_cifar:RUN for real)
  [pat_alexnet]="--set lpips_model=alexnet_cifar:untrained"
  [multi_random]=""
  [multi_average]=""
  [multi_max]=""
  [lagrangian]=""
  [perceptual_prior]=""
  [pag]="--set target=class_mean"
  [oaat]=""
)
METHODS=(standard pgd_linf pgd_l2 trades pat_self pat_alexnet multi_random multi_average multi_max lagrangian perceptual_prior pag oaat)
RUN_ARGS=()
for m in "${METHODS[@]}"; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  $PY -m engine train --out "$RUNS/$m" --method "$m" ${SETTINGS[$m]} "${COMMON[@]}"
  echo "$m: $(( $(date +%s) - start )) s" | tee -a "$RUNS/times.txt"
  RUN_ARGS+=(--run "$RUNS/$m")
done

# PAT table 2's CIFAR-10 bounds (named bound "cifar10"); LPA bounded by an UNTRAINED AlexNet
start=$(date +%s)
$PY -m engine evaluate "${RUN_ARGS[@]}" --out "$OUT" --limit 200 --device cpu --no-progress \
  --spec "linf:bound=cifar10,num_iterations=20" \
  --spec "l2:bound=cifar10,num_iterations=20" \
  --spec "stadv:bound=cifar10,num_iterations=20" \
  --spec "recoloradv:bound=cifar10,num_iterations=20" \
  --spec "lpa:bound=cifar10,num_iterations=10,num_lambdas=3,lpips_model=alexnet:untrained" \
  --autoattack linf:8/255 --autoattack-version fast \
  --calibrated examples/digits/placeholder_bounds.json --sanity --logit-distances 0.0314
echo "evaluate: $(( $(date +%s) - start )) s" | tee -a "$RUNS/times.txt"
for m in "${METHODS[@]}"; do
  mkdir -p "$OUT/runs/$m" && cp "$RUNS/$m/config.json" "$RUNS/$m/metrics.csv" "$OUT/runs/$m/"
done
cp "$RUNS/times.txt" "$OUT/times.txt"
