#!/usr/bin/env bash
# Two reclight runs on one machine: the main job alone, then two copies at once, under one thread
# setting (docs/reliability.md, "Sharing the machine").
#
#   bash benchmarks/sharing.sh [STEPS] [ENV=VALUE ...]
#   bash benchmarks/sharing.sh 100 OMP_WAIT_POLICY=ACTIVE     # torch's default: idle threads spin
#   bash benchmarks/sharing.sh 100 OMP_WAIT_POLICY=PASSIVE    # reclight's default (reclight.launch)
#   bash benchmarks/sharing.sh 100 OMP_NUM_THREADS=1
#
# Prints the wall time of the run alone and of each run of the pair, in seconds. Each run writes
# its logs under a scratch folder (removed at the end). Run it on an otherwise idle machine.
set -euo pipefail
steps="${1:-100}"
[ "$#" -gt 0 ] && shift
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
run() {  # run NAME: one `reclight fit` of the main job, prints its wall seconds
  local start end
  start=$(date +%s.%N)
  env "$@" reclight fit --trainer.max_steps "$steps" --trainer.val_check_interval "$steps" \
    --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir "$scratch/$name" \
    > "$scratch/$name.log" 2>&1
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.1f}')"
}
name=alone; alone=$(run "$@")
name=pair_a; run "$@" > "$scratch/a.t" &
name=pair_b; run "$@" > "$scratch/b.t" &
wait
echo "setting: ${*:-(environment as is)}; ${steps} RL steps"
echo "alone: ${alone} s; pair: $(cat "$scratch/a.t") s and $(cat "$scratch/b.t") s"
