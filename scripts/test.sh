#!/usr/bin/env bash
# The whole test suite (`make test`): both tiers at once, the engine tier in front.
#
# The engine tier (`-m "vllm or e2e"`: real vLLM engines, the pipeline end to end) runs in the
# foreground at normal priority, one engine at a time: two CPU engines side by side would fight
# over the same cores. Much of its wall time is start-up on one core (each engine process
# imports vLLM), so the fast tier (no engine) runs beside it at the lowest priority and soaks up
# the idle core instead of waiting its turn. The fast tier's output is printed when it ends; if it
# fails, the engine tier is stopped and the suite fails at once (a broken rule fails in minutes).
#
# usage: scripts/test.sh [PYTHON]   (default: .venv/bin/python); extra pytest flags in PYTEST_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"
fast_log="$(mktemp -t stepprobe-fast-tier.XXXXXX)"
trap 'rm -f "$fast_log"' EXIT

# shellcheck disable=SC2086
nice -n 19 "$py" -m pytest -q -p no:cacheprovider -m "not vllm and not e2e" ${PYTEST_ARGS:-} tests \
    >"$fast_log" 2>&1 &
fast=$!
# shellcheck disable=SC2086
"$py" -m pytest -q -p no:cacheprovider -m "vllm or e2e" ${PYTEST_ARGS:-} tests &
engines=$!
trap 'kill "$fast" "$engines" 2>/dev/null; rm -f "$fast_log"' EXIT INT TERM

wait "$fast"
fast_rc=$?
echo "---- fast tier (no engines; ran beside the engine tier) ----"
cat "$fast_log"
if [ "$fast_rc" -ne 0 ]; then
    echo "fast tier failed (exit $fast_rc): stopping the engine tier" >&2
    kill -INT "$engines" 2>/dev/null
    wait "$engines" 2>/dev/null
    exit "$fast_rc"
fi
wait "$engines"
engines_rc=$?
echo "---- engine tier: exit $engines_rc; fast tier: exit $fast_rc ----"
exit "$engines_rc"
