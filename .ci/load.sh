#!/usr/bin/env bash
# Run a command on a busy machine: two busy loops, one pinned to CPU 0 and one to CPU 1, run beside
# it for as long as it runs, so timing assumptions in the tests show up as failures.
#
#   bash .ci/load.sh [--runs N] COMMAND [ARGS...]
#   bash .ci/load.sh --runs 3 .venv/bin/pytest -q -p no:cacheprovider
#
# With --runs N the command runs up to N times in a row and the first failing run stops the
# series; each run's exit code and duration are printed. The exit code is the last run's.
# The loaders are killed when the script ends, however it ends (exit, failure, Ctrl-C, SIGTERM;
# bash acts on a signal once the running command has returned, so to stop a run at once signal the
# whole process group, as Ctrl-C does); a loader also exits by itself within a second of the
# script's death if the script is killed outright (SIGKILL).
#
# A loader re-pins itself to its CPU once a second: the hotplug tests take CPU 1 offline, and the
# kernel then moves a task pinned there to another CPU and widens its affinity for good, which would
# leave both loaders on CPU 0 for the rest of the run.
set -euo pipefail

usage() {
    echo "usage: $0 [--runs N] COMMAND [ARGS...]" >&2
    exit 2
}

runs=1
if [[ ${1:-} == --runs ]]; then
    [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || usage
    runs=$2
    shift 2
fi
[[ $# -ge 1 ]] || usage

LOAD_PYTHON=${LOAD_PYTHON:-python3}
# argv[1]: the CPU to burn; argv[2]: the pid of this script (the loader exits when it is gone)
loader='
import os, sys, time
cpu, parent = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        pass  # the CPU is offline right now; burn wherever the kernel puts us, re-pin later
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        pass
'

log() { echo "load.sh: $*" >&2; }

loaders=()
stop_loaders() {
    local pid
    for pid in "${loaders[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${loaders[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    loaders=()
}
trap stop_loaders EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for cpu in 0 1; do
    taskset -c "$cpu" "$LOAD_PYTHON" -c "$loader" "$cpu" "$$" &
    loaders+=("$!")
done
log "loaders ${loaders[*]} busy on CPUs 0 and 1"

rc=0
for ((run = 1; run <= runs; run++)); do
    start=$SECONDS
    rc=0
    "$@" || rc=$?
    log "run $run/$runs: exit $rc in $((SECONDS - start)) s"
    if ((rc != 0)); then
        break
    fi
done
exit "$rc"
