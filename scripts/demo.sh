#!/usr/bin/env bash
# Builds patient and starts `patient serve` on its embedded defaults (SQLite in
# ./patient-data, the API on 127.0.0.1:8750) beside the bundled test upstream
# (patient-upstream, on a free loopback port, which the egress guard is told to
# allow), submits one request to that upstream, waits for its outcome and
# prints it. The daemon then keeps serving, for `patient submit`/`patient
# tasks` or curl, until Ctrl-C, which stops both. Nothing leaves the machine.
#
#   scripts/demo.sh            # serve until Ctrl-C
#   scripts/demo.sh --once     # stop after printing the outcome
#
# PATIENT_LISTEN and the other PATIENT_* settings apply as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[ "${1:-}" = "--once" ] && once=true

echo "== building (release)" >&2
cargo build --release --quiet -p patient -p patient-testkit --bins
bin=target/release
state=$(mktemp -d)
upstream_pid=""
serve_pid=""
cleanup() {
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
  exec 3>&- 2>/dev/null || true
  [ -n "$upstream_pid" ] && kill "$upstream_pid" 2>/dev/null
  rm -rf "$state"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The upstream serves until its stdin closes: hold a fifo open for it.
mkfifo "$state/hold"
"$bin/patient-upstream" --listen 127.0.0.1:0 <"$state/hold" >"$state/upstream.out" 2>&1 &
upstream_pid=$!
exec 3>"$state/hold"
for _ in $(seq 1 100); do
  grep -q '^listening=' "$state/upstream.out" 2>/dev/null && break
  sleep 0.05
done
upstream=$(sed -n 's/^listening=\([^ ]*\).*/\1/p' "$state/upstream.out")
[ -n "$upstream" ] || { echo "demo: the test upstream did not start" >&2; exit 1; }
echo "== test upstream on http://$upstream" >&2

PATIENT_EGRESS__ALLOW="${PATIENT_EGRESS__ALLOW:-127.0.0.1}" "$bin/patient" serve 2> >(tee "$state/serve.err" >&2) &
serve_pid=$!
for _ in $(seq 1 200); do
  grep -q 'patient: listening on ' "$state/serve.err" 2>/dev/null && break
  kill -0 "$serve_pid" 2>/dev/null || { echo "demo: patient serve did not start" >&2; exit 1; }
  sleep 0.05
done
url=$(sed -n 's/.*patient: listening on \(http[^ ]*\).*/\1/p' "$state/serve.err" | head -1)
export PATIENT_URL="$url"

echo "== patient submit POST http://$upstream/echo --json '{\"hello\":\"patient\"}' --callback Demo --wait" >&2
"$bin/patient" submit POST "http://$upstream/echo" --json '{"hello":"patient"}' --callback Demo --wait -o json
echo "== the task above went: submit -> stored in ./patient-data -> run against the upstream -> outcome stored" >&2

if $once; then
  exit 0
fi
cat >&2 <<TXT
== patient serve keeps running on $url (Ctrl-C stops it and the test upstream). Try:
   PATIENT_URL=$url $bin/patient submit GET http://$upstream/delay?ms=2000 --callback Slow
   PATIENT_URL=$url $bin/patient tasks list
   curl -s $url/v1/tasks/TASK_ID
   curl -s $url/metrics
TXT
wait "$serve_pid"
