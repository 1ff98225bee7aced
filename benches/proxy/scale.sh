#!/usr/bin/env bash
# benches/proxy/scale.sh — `claygate serve` with 10, 1,000 and 10,000
# operations: start time, RSS idle and under load, and invoke throughput of
# one operation, to show it does not degrade with the size of the set
# (issue 8, part 3).
#
# Usage: benches/proxy/scale.sh [-d SECONDS] [-r ROUNDS] [SIZES...]
#        (env: DURATION=10 ROUNDS=2 SKIP_BUILD=1 KEEP_TMP=1; SIZES default 10 1000 10000)
#
# What it does, all on 127.0.0.1, in a fresh temp dir, every process it starts
# killed by a trap on exit:
#   0. installs nginx and wrk with apt-get if either is missing (needs root);
#      builds the release binary and writes the generated sets with
#      `cargo bench --bench scale -- --write DIR N` (SKIP_BUILD=1 skips the build).
#   1. upstream: nginx, one worker, keep-alive, answering a 98-byte JSON on
#      every path; every generated upstream (UP0_URL..UP7_URL) points at it,
#      so their probes succeed.
#   2. for each size: the generated set plus `zz-bench.yaml`, one upstream and
#      the operation `lookup` of benches/proxy/run.sh (breaker, bulkhead, retry,
#      attempt timeout + deadline); `claygate serve --no-watch` on it.
#      Measures the time from exec to "listening" (load, validate, compile,
#      store open), RSS before any call and idle after a few calls, then wrk at
#      c=32 on `lookup` (2 s warm-up, DURATION s, ROUNDS rounds, the sizes
#      alternated within a round), RSS max sampled every 0.5 s under load.
#   Results go to stdout (progress to stderr). Default: ~3 minutes.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
WARMUP=${WARMUP:-2}
while getopts "d:r:h" opt; do
  case $opt in
    d) DURATION=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    *) sed -n '7,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(10 1000 10000)

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
log() { printf '[scale] %s\n' "$*" >&2; }

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  log "installing nginx wrk"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get install -y nginx wrk >&2 || { $SUDO apt-get update >&2 && $SUDO apt-get install -y nginx wrk >&2; }
fi
NGINX=$(command -v nginx)
if [ -z "${SKIP_BUILD:-}" ]; then
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release >&2)
fi
CLAYGATE="$ROOT/target/release/claygate"
[ -x "$CLAYGATE" ] || { echo "no $CLAYGATE" >&2; exit 1; }

T=$(mktemp -d /tmp/claygate-scale-bench.XXXXXX)
PIDS=()
SAMPLER=""
cleanup() {
  local p
  if [ -n "$SAMPLER" ]; then kill "$SAMPLER" 2>/dev/null || true; fi
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "${KEEP_TMP:-}" ]; then log "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_http() {
  local i
  for i in $(seq 1 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "not answering: $1" >&2; return 1
}
rss() { ps -o rss= -p "$1" | tr -d ' '; }

UP_PORT=$(free_port)
BODY='{"name":"Acme","domain":"acme.com","industry":"Software","employee_count":250,"country":"US"}'
mkdir -p "$T/upstream-tmp"
cat > "$T/upstream.conf" <<EOF
worker_processes 1;
daemon off;
pid $T/upstream.pid;
error_log $T/upstream-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $T/upstream-tmp/body;
  proxy_temp_path $T/upstream-tmp/proxy;
  fastcgi_temp_path $T/upstream-tmp/fastcgi;
  uwsgi_temp_path $T/upstream-tmp/uwsgi;
  scgi_temp_path $T/upstream-tmp/scgi;
  keepalive_timeout 75s;
  keepalive_requests 10000000;
  server {
    listen 127.0.0.1:$UP_PORT;
    location / { default_type application/json; return 200 '$BODY'; }
  }
}
EOF
"$NGINX" -p "$T" -e "$T/upstream-error.log" -c "$T/upstream.conf" >"$T/upstream.out" 2>&1 &
PIDS+=($!)
UP="http://127.0.0.1:$UP_PORT"
wait_http "$UP/v1/companies/acme.com"
for u in 0 1 2 3 4 5 6 7; do export "UP${u}_URL=$UP"; done

declare -A START_MS RSS_START RSS_IDLE RSS_MAX RPS P50 P99 N2XX URL PID
for n in "${SIZES[@]}"; do
  mkdir -p "$T/pol-$n" "$T/data-$n"
  (cd "$ROOT" && cargo bench --quiet --bench scale -- --write "$T/pol-$n" "$n" >&2)
  cat > "$T/pol-$n/zz-bench.yaml" <<EOF
version: 1
upstreams:
  bench:
    base_url: "$UP"
    max_concurrency: 256
    priorities:
      critical: { concurrency: 64, queue: 256, queue_timeout: 1s }
      normal: { concurrency: 64, queue: 256, queue_timeout: 1s }
      bulk: { concurrency: 8, queue: 64, queue_timeout: 1s }
operations:
  lookup:
    upstream: bench
    request: { method: GET, path: "/v1/companies/{{ params.domain }}" }
    params_schema:
      type: object
      required: [domain]
      additionalProperties: false
      properties: { domain: { type: string, maxLength: 253 } }
    timeout: 1s
    deadline: 2s
    priority: normal
    breaker: { error_threshold_percentage: 50, volume_threshold: 20, window: 10s, buckets: 10, reset_timeout: 30s }
    retry: { max_attempts: 2, backoff: { initial: 20ms, max: 100ms }, on: [connect_error, timeout, 502, 503] }
EOF
  files=$(ls "$T/pol-$n" | wc -l)
  t0=$(date +%s%N)
  "$CLAYGATE" serve --policies "$T/pol-$n" --data "$T/data-$n" --listen 127.0.0.1:0 --no-watch \
    >"$T/cg-$n.out" 2>"$T/cg-$n.err" &
  pid=$!; PIDS+=("$pid"); PID[$n]=$pid
  url=""
  for i in $(seq 1 2000); do
    url=$(sed -n 's/^listening on \(http:[^ ]*\).*/\1/p' "$T/cg-$n.out" | head -1)
    [ -n "$url" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$T/cg-$n.err" >&2; exit 1; }
    sleep 0.005
  done
  [ -n "$url" ] || { echo "claygate with $n operations did not start" >&2; exit 1; }
  START_MS[$n]=$(( ($(date +%s%N) - t0) / 1000000 ))
  RSS_START[$n]=$(rss "$pid")
  count=$(curl -s "$url/v1/operations" | grep -o '"name":' | wc -l)
  for i in 1 2 3; do
    code=$(curl -s -o "$T/b" -w '%{http_code}' -X POST -H 'content-type: application/json' \
      -d '{"domain":"acme.com"}' "$url/v1/operations/lookup/invoke")
    [ "$code" = 200 ] || { echo "lookup with $n operations: $code $(cat "$T/b")" >&2; exit 1; }
  done
  RSS_IDLE[$n]=$(rss "$pid")
  URL[$n]="$url/v1/operations/lookup/invoke"
  log "$n operations ($files files, $count listed): listening after ${START_MS[$n]} ms, RSS ${RSS_START[$n]} KiB, idle ${RSS_IDLE[$n]} KiB"
done

sample_rss() {
  local max=0 r
  while :; do
    r=$(rss "$1" || echo 0)
    if [ "${r:-0}" -gt "$max" ]; then max=$r; echo "$max" > "$2"; fi
    sleep 0.5
  done
}
run_wrk() { # url seconds
  BENCH_METHOD=POST BENCH_BODY='{"domain":"acme.com"}' \
    wrk -t2 -c32 -d"$2s" --latency -s "$HERE/wrk.lua" "$1" | awk '/^BENCH /{print $2, $3, $4, $5}'
}
for r in $(seq 1 "$ROUNDS"); do
  for n in "${SIZES[@]}"; do
    run_wrk "${URL[$n]}" "$WARMUP" >/dev/null
    echo 0 > "$T/rss-$n"; sample_rss "${PID[$n]}" "$T/rss-$n" & SAMPLER=$!
    set -- $(run_wrk "${URL[$n]}" "$DURATION")
    kill "$SAMPLER"; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=""
    m=$(cat "$T/rss-$n"); [ "$m" -gt "${RSS_MAX[$n]:-0}" ] && RSS_MAX[$n]=$m
    RPS[$n]="${RPS[$n]:-} $1"; P50[$n]="${P50[$n]:-} $2"; P99[$n]="${P99[$n]:-} $3"
    N2XX[$n]=$(( ${N2XX[$n]:-0} + $4 ))
    log "round $r  $n operations: $1 req/s  p50 $2 us  p99 $3 us  non-2xx $4"
  done
done

mean() { echo "$@" | awk '{s=0; for(i=1;i<=NF;i++) s+=$i; printf "%.0f", s/NF}'; }
range() { echo "$@" | awk '{mn=$1; mx=$1; for(i=1;i<=NF;i++){if($i<mn)mn=$i; if($i>mx)mx=$i}; printf "%.0f–%.0f", mn, mx}'; }
mib() { awk -v k="$1" 'BEGIN{ printf "%.1f MiB", k/1024 }'; }
first=${SIZES[0]}
echo
echo "### claygate serve at scale — $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; server, nginx upstream and wrk share the cores." \
  "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty') release build." \
  "Throughput of one operation (\`lookup\`) at c=32, ${ROUNDS} round(s) of ${DURATION}s, sizes alternated; mean over rounds, range in brackets."
echo "Command: \`benches/proxy/scale.sh -d $DURATION -r $ROUNDS ${SIZES[*]}\`"
echo
echo "| operations | start to listening | RSS at start | RSS idle | RSS max under load | req/s \`lookup\` c=32 | vs $first | p50 | p99 | non-2xx |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
base=$(mean ${RPS[$first]})
for n in "${SIZES[@]}"; do
  m=$(mean ${RPS[$n]})
  echo "| $n (+1) | ${START_MS[$n]} ms | $(mib "${RSS_START[$n]}") | $(mib "${RSS_IDLE[$n]}") | $(mib "${RSS_MAX[$n]}") | $m ($(range ${RPS[$n]})) | $(awk -v x="$m" -v y="$base" 'BEGIN{printf "%.2f", x/y}') | $(mean ${P50[$n]}) µs | $(mean ${P99[$n]}) µs | ${N2XX[$n]} |"
done
