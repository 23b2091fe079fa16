#!/usr/bin/env bash
# Run the concurrency tests again and again on a busy machine, so that a race shows up on the
# developer's machine before CI: the in-process tests of races (stress, the hypothesis state
# machines of test_model*.py, growth, forward progress, the interruption tests) run N times in a
# row (default 3) beside two busy loops (.ci/load.sh), stopping at the first failing run.
#
#   bash .ci/races.sh [--runs N] [PYTEST ARGS...]
#   bash .ci/races.sh --runs 10 -x -k stress
#
# PYTEST names the pytest to run (default: pytest on PATH; e.g. PYTEST=.venv/bin/pytest). Files of
# the list that do not exist are left out; extra arguments go to every pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
if [[ ${1:-} == --runs ]]; then
    if [[ $# -lt 2 || ! $2 =~ ^[1-9][0-9]*$ ]]; then
        echo "usage: $0 [--runs N] [PYTEST ARGS...]  (N: a positive whole number, got '${2:-}')" >&2
        exit 2
    fi
    runs=$2
    shift 2
fi

files=()
for pattern in tests/test_stress.py tests/test_model*.py tests/test_growth.py \
    tests/test_forward_progress.py tests/test_*interrupt*.py; do
    for file in $pattern; do
        [[ -e $file ]] && files+=("$file")
    done
done
if [[ ${#files[@]} -eq 0 ]]; then
    echo "races.sh: none of the concurrency test files exists under tests/" >&2
    exit 2
fi

PYTEST=${PYTEST:-pytest}
echo "races.sh: $runs run(s) of ${files[*]}" >&2
exec bash .ci/load.sh --runs "$runs" "$PYTEST" -q -p no:cacheprovider -m "not slow" "${files[@]}" "$@"
