#!/usr/bin/env bash
# Issue 32's GPU runs of benchmarks/grouped_step.py, each inside one device call of 10 minutes:
#   bash benchmarks/grouped_step_gpu.sh speed    # 8B shapes, 2,048 tokens, group 4: the default and three
#                                                # PyTorch baselines in 3 interleaved rounds, the profile, MFU (~4-5 min)
#   bash benchmarks/grouped_step_gpu.sh frugal   # 4,096 tokens: frugal vs default (peak, 50-step loss within
#                                                # noise), largest group at 10,240 tokens inside 48 / 60 GB (~5-6 min)
#   bash benchmarks/grouped_step_gpu.sh all      # both, one after the other (two processes: ~10 min, too long for one call)
# JSON and log go to $OUT (the device tool's folder) or benchmarks/results/. Extra arguments are passed
# on to every run (e.g. --expert-path dequant to skip the 70-90 s probe, --steps 5 to go faster).
# The JSON is rewritten after every part, so a run cut short keeps what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-speed}"
shift || true
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
python="${PYTHON:-python3}"
limit="${LIMIT_S:-570}"  # each run stops before the device call's 600 s, leaving time to hand the files back

run() {
    local name="$1"
    shift
    echo "[grouped_step_gpu] $name: $*" | tee -a "$dest/grouped_step-$name.log"
    local start=$SECONDS
    timeout "$limit" "$python" benchmarks/grouped_step.py --preset lfm2.5-8b-a1b --tag "issue32-$name" "$@" \
        2>&1 | tee -a "$dest/grouped_step-$name.log"
    echo "[grouped_step_gpu] $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$dest/grouped_step-$name.log"
}

speed() {
    run speed --seq 2048 --group-size 4 --warmup 3 --steps 10 --repeats 3 \
        --variants default,int8-first-moment,int8-moments,frugal \
        --baselines torch,torch-fused,torch-fp32-master --profile --profile-repeats 5 \
        --loss-steps 0 --long-seq 0 "$@"
}

frugal() {
    run frugal --seq 4096 --group-size 4 --warmup 2 --steps 5 --repeats 0 --variants default,frugal \
        --baselines none --no-profile --no-block-timings \
        --loss-steps 50 --loss-reference default --loss-variants frugal \
        --long-seq 10240 --long-budget-gb 48,60 --long-variants default,frugal "$@"
}

case "$part" in
    speed) speed "$@" ;;
    frugal) frugal "$@" ;;
    all) speed "$@"; frugal "$@" ;;
    *) echo "usage: $0 speed|frugal|all [extra grouped_step.py arguments]" >&2; exit 2 ;;
esac
