#!/usr/bin/env bash
# The command of every device call that benchmarks/device_kit.py plans:
#     bash benchmarks/device_run.sh K N
# Call K of N keeps its part of the bundle on the machine (outside the repository, where the next call finds
# it while the machine stays warm); the last call unpacks the bundle, puts embedded-1024's weights back and runs,
# each stage under its own time limit, writing to $OUT (what comes back):
#   1. `ditplan run` of the experiment (Ray, gpus_per_trial 1): dense, greedy D1–D6, the learned search, the
#      held-out front, report, exports                                   -> run.log, run-err.log, run.tar.gz
#   2. benchmarks/gpu_table.py: dense, every strategy family (block caching every 2nd–6th step), the run's
#      greedy and exported plans, on the held-out seeds interleaved with dense          -> table.txt, table.log
#   stages.txt: the machine, each stage's seconds and exit status. The call exits with the worst status.
# EXPERIMENT (ditplan/experiments/digits-1024.yaml), RUN_LIMIT / TABLE_LIMIT (seconds: 330 / 150), TABLE_ARGS (more
# gpu_table arguments), PYTHON (python3) and DITPLAN_STASH (/tmp/ditplan-bundle) change what it does; the
# README's rehearsal sets them to run the same calls on this machine's CPU.
set -uo pipefail
k=${1:-} n=${2:-}
[[ $k =~ ^[1-9][0-9]*$ && $n =~ ^[1-9][0-9]*$ ]] && ((k <= n)) || { echo "usage: device_run.sh K N, the call K of N (1 ≤ K ≤ N), not '$k' '$n'"; exit 2; }
out=${OUT:?the device tool sets OUT}
py=${PYTHON:-python3}
stash=${DITPLAN_STASH:-/tmp/ditplan-bundle}
[ -f ".gpu/call-$k/bundle.part$k" ] || { echo "no .gpu/call-$k/bundle.part$k: carry .gpu/call-$k"; exit 2; }
built=$(cat ".gpu/call-$k/python-version" 2>/dev/null) have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ -n "$have" ] || { echo "no Python at '$py': set PYTHON"; exit 2; }
[ "$built" = "$have" ] || { echo "the bundle was built for Python '$built', this machine's is $have: build it with --python-version $have"; exit 2; }
mkdir -p "$stash" && cp ".gpu/call-$k/bundle.part$k" "$stash/" || { echo "cannot keep the part in $stash"; exit 1; }
if ((k < n)); then echo "part $k of $n kept in $stash: make call $((k + 1)) at once"; exit 0; fi
parts=()
for i in $(seq 1 "$n"); do
    [ -f "$stash/bundle.part$i" ] || { echo "part $i of $n is not on this machine (it was given back between calls): make calls 1 … $n again, each at once after the one before"; exit 3; }
    parts+=("$stash/bundle.part$i")
done
kit=$stash/kit
unpack='import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="data")'
# NOTE: Python's tarfile, not tar -J: the image need not have xz
rm -rf "$kit" && mkdir -p "$kit" && cat "${parts[@]}" | "$py" -c "$unpack" "$kit" || { echo "the bundle does not unpack: build it again"; exit 1; }
cp -r "$kit/tree/." . || { echo "the bundle holds no weights (built after \`leave\`?): build it again"; exit 1; }
export PYTHONPATH="$kit/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
experiment=${EXPERIMENT:-experiments/digits-1024.yaml}
run_dir=$("$py" -c "import sys; from ditplan.spec import load_spec; print(load_spec(sys.argv[1]).run_dir())" "$experiment") || exit 1

worst=0
note() {  # note NAME SECONDS STATUS [LIMIT]: one line of stages.txt; the worst status is the call's
    echo "$1: $2 s, exit $3$([ "$3" -eq 124 ] && echo " (stopped at its $4 s limit)")" | tee -a "$out/stages.txt"
    (($3 > worst)) && worst=$3
}
stage() {  # stage NAME LIMIT STDOUT STDERR COMMAND…: run under a time limit (killed 20 s after it) into $out
    local name=$1 limit=$2 stdout=$3 stderr=$4 start=$SECONDS status
    shift 4
    timeout -k 20 "$limit" "$@" >"$out/$stdout" 2>"$out/$stderr"
    status=$?
    note "$name" $((SECONDS - start)) "$status" "$limit"
}
{ date -u; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } >"$out/stages.txt" 2>&1
stage "ditplan run" "${RUN_LIMIT:-330}" run.log run-err.log "$py" -m ditplan.cli run --experiment "$experiment"
"$py" -m ray.scripts.scripts stop --force >/dev/null 2>&1  # a run stopped at its limit leaves Ray's workers
start=$SECONDS
tar -czf "$out/run.tar.gz" --exclude=mlartifacts --exclude=mlflow.db -C "$(dirname "$run_dir")" "$(basename "$run_dir")" 2>>"$out/run-err.log"
status=$?
note "run.tar.gz" $((SECONDS - start)) "$status"
shopt -s nullglob
plans=("$run_dir"/greedy/*.yaml "$run_dir"/exported/*.yaml)
stage "gpu_table" "${TABLE_LIMIT:-150}" table.txt table.log "$py" benchmarks/gpu_table.py --experiment "$experiment" \
    --cache-periods 2 3 4 5 6 ${plans[@]:+--plans "${plans[@]}"} ${TABLE_ARGS:-}
exit "$worst"
