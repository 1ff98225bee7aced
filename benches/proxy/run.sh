#!/usr/bin/env bash
# benches/proxy/run.sh — end-to-end proxy overhead of `claygate serve` (issue 8, part 1).
#
# Usage: benches/proxy/run.sh [-d SECONDS] [-r ROUNDS]
#        (env: DURATION=10 ROUNDS=2 SKIP_BUILD=1 KEEP_TMP=1)
#
# What it does, all on 127.0.0.1, all in a fresh temp dir, every process it
# starts killed by a trap on exit (it touches no other process):
#   0. installs nginx and wrk with apt-get if either is missing (needs root);
#      runs `cargo build --release` once (SKIP_BUILD=1 skips it).
#   1. upstream: nginx (own nginx.conf, daemon off, one worker, keep-alive)
#      answering a fixed 98-byte JSON at GET /v1/companies/acme.com;
#   2. proxy: nginx, one worker, plain keep-alive reverse proxy to (1)
#      (upstream block with `keepalive 32`, HTTP/1.1, Connection "");
#   3. claygate A: `target/release/claygate serve --no-watch` with operation
#      `lookup` (GET /v1/companies/{{ params.domain }} on (1); breaker,
#      bulkhead, retry, attempt timeout + deadline; no idempotency, no fallback);
#   4. claygate B: a second `claygate serve`, operation `lookup_keyed`: the
#      same plus `idempotency: { key: [domain] }` (a deterministic key: every
#      call after the first is a replay of the stored answer) and a fallback cache.
#   5. the floor: examples/bare_proxy.rs, the same stack as claygate (axum,
#      tokio multi-thread, one reqwest client built as claygate builds it)
#      doing the same lookup with no policy at all (no breaker, bulkhead,
#      retry, timeout, metrics, envelope or params check); and a second
#      floor, the same with hyper-util's pooled client instead of reqwest;
#   6. when node and npm are on the PATH: the Node peer (node-peer/server.mjs,
#      `npm ci` into the temp dir): the same operation hand-rolled with an
#      opossum breaker, a p-queue bulkhead, a Promise.race timeout and one
#      retry — what users write without claygate.
#   Then wrk (benches/proxy/wrk.lua: POST with a JSON body and content-type for
#   the invoke targets; plain GET for the others) measures, alternating the
#   targets within each round, at -t1 -c1 and -t2 -c32 (--latency):
#     (a) upstream direct GET   (b) via the nginx proxy
#     (c) claygate invoke lookup (d) claygate invoke lookup_keyed
#     (e) the Node peer          (h) the floor (axum + reqwest, no policy)
#     (i) the floor with hyper-util's client instead of reqwest
#   and failing fast through the API, at c=1 (the rejection's own latency)
#   and c=32 (rejections per second):
#     (f) breaker `lookup` forced open (POST /v1/breakers/lookup/open): 503s;
#     (g) bulkhead full: the only slot of `lookup_full` held by a call to an
#         upstream that accepts and never answers, queue 0: 429s.
#   RSS of both claygate processes (ps -o rss=) idle, and the max sampled
#   every 0.5 s under the c=32 load.
#   Each (target, concurrency) gets a 2 s warm-up then DURATION seconds,
#   ROUNDS times; the table gives the mean over rounds (req/s range in
#   brackets). Results go to stdout only (progress to stderr).
#   Default run: 2 rounds x 14 x 12 s + 4 x 12 s fail-fast ~ 7 min.
#
# Caveat: servers and wrk share the machine's cores; on a 2-core box the
# load generator competes with what it measures, so read ratios, not
# absolute throughput.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
WARMUP=${WARMUP:-2}
while getopts "d:r:h" opt; do
  case $opt in
    d) DURATION=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    *) sed -n '3,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
log() { printf '[bench] %s\n' "$*" >&2; }

# --- 0. tools and build -------------------------------------------------------
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  log "installing nginx wrk"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get install -y nginx wrk >&2 || { $SUDO apt-get update >&2 && $SUDO apt-get install -y nginx wrk >&2; }
fi
NGINX=$(command -v nginx)
if [ -z "${SKIP_BUILD:-}" ]; then
  log "cargo build --release (claygate and examples/bare_proxy)"
  (cd "$ROOT" && cargo build --release --bin claygate --example bare_proxy >&2)
fi
CLAYGATE="$ROOT/target/release/claygate"
BARE="$ROOT/target/release/examples/bare_proxy"
[ -x "$CLAYGATE" ] || { echo "no $CLAYGATE" >&2; exit 1; }
[ -x "$BARE" ] || { echo "no $BARE (cargo build --release --example bare_proxy)" >&2; exit 1; }

# --- processes ----------------------------------------------------------------
T=$(mktemp -d /tmp/claygate-proxy-bench.XXXXXX)
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
wait_http() { # url
  local i
  for i in $(seq 1 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "not answering: $1" >&2; return 1
}

UP_PORT=$(free_port); PX_PORT=$(free_port); STUCK_PORT=$(free_port); NODE_PORT=$(free_port)
BODY='{"name":"Acme","domain":"acme.com","industry":"Software","employee_count":250,"country":"US"}'

nginx_common() { # name
  cat <<EOF
worker_processes 1;
daemon off;
pid $T/$1.pid;
error_log $T/$1-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $T/$1-tmp/body;
  proxy_temp_path $T/$1-tmp/proxy;
  fastcgi_temp_path $T/$1-tmp/fastcgi;
  uwsgi_temp_path $T/$1-tmp/uwsgi;
  scgi_temp_path $T/$1-tmp/scgi;
  keepalive_timeout 75s;
  keepalive_requests 10000000;
EOF
}
mkdir -p "$T/upstream-tmp" "$T/proxy-tmp"
{ nginx_common upstream; cat <<EOF
  server {
    listen 127.0.0.1:$UP_PORT;
    location = /v1/companies/acme.com {
      default_type application/json;
      return 200 '$BODY';
    }
    location / { return 404; }
  }
}
EOF
} > "$T/upstream.conf"
{ nginx_common proxy; cat <<EOF
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 32; }
  server {
    listen 127.0.0.1:$PX_PORT;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
} > "$T/proxy.conf"

# An upstream that accepts connections and never answers: a call to it holds
# its bulkhead slot for as long as the attempt timeout allows, for (g).
python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(128); held = []
while True: held.append(s.accept()[0])
' "$STUCK_PORT" &
PIDS+=($!)
for n in upstream proxy; do
  "$NGINX" -p "$T" -e "$T/$n-error.log" -c "$T/$n.conf" >"$T/$n.out" 2>&1 &
  PIDS+=($!)
done
UP="http://127.0.0.1:$UP_PORT"; PX="http://127.0.0.1:$PX_PORT"
wait_http "$UP/v1/companies/acme.com"; wait_http "$PX/v1/companies/acme.com"

# claygate policies: one upstream, bulkhead wide enough for c=32, no rate limit.
policy_head() {
  cat <<EOF
version: 1
upstreams:
  bench:
    base_url: "$UP"
    max_concurrency: 256
    priorities:
      critical: { concurrency: 64, queue: 256, queue_timeout: 1s }
      normal: { concurrency: 64, queue: 256, queue_timeout: 1s }
      bulk: { concurrency: 8, queue: 64, queue_timeout: 1s }
  stuck:
    base_url: "http://127.0.0.1:$STUCK_PORT"
    priorities:
      normal: { concurrency: 1, queue: 0, queue_timeout: 1s }
timeouts: { connect: 1s, request: 2s }
operations:
EOF
}
op() { # name
  cat <<EOF
  $1:
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
}
mkdir -p "$T/pol-a" "$T/pol-b" "$T/data-a" "$T/data-b"
{ policy_head; op lookup; cat <<EOF
  lookup_full:
    upstream: stuck
    request: { method: GET, path: "/v1/companies/{{ params.domain }}" }
    params_schema:
      type: object
      required: [domain]
      properties: { domain: { type: string, maxLength: 253 } }
    timeout: 5m
    deadline: 5m
    priority: normal
    retry: { max_attempts: 1 }
EOF
} > "$T/pol-a/bench.yaml"
{ policy_head; op lookup_keyed; cat <<EOF
    idempotency: { key: [domain], ttl: 1h }
    fallback: { cache: { fresh: 10m, stale: 1h, very_stale: 1d } }
EOF
} > "$T/pol-b/bench.yaml"

# Waits for the `listening on http://ADDR` line a server prints on start.
listening() { # pid stdout-file stderr-file name -> prints the URL
  local i url
  for i in $(seq 1 200); do
    url=$(sed -n 's/^listening on \(http:[^ ]*\).*/\1/p' "$2" | head -1)
    [ -n "$url" ] && { echo "$url"; return 0; }
    kill -0 "$1" 2>/dev/null || { cat "$3" >&2; return 1; }
    sleep 0.05
  done
  echo "$4 did not start" >&2; cat "$3" >&2; return 1
}
start_claygate() { # tag -> sets CG_URL, CG_PID
  local tag=$1
  "$CLAYGATE" serve --policies "$T/pol-$tag" --data "$T/data-$tag" \
    --listen 127.0.0.1:0 --no-watch >"$T/cg-$tag.out" 2>"$T/cg-$tag.err" &
  CG_PID=$!; PIDS+=("$CG_PID")
  CG_URL=$(listening "$CG_PID" "$T/cg-$tag.out" "$T/cg-$tag.err" "claygate $tag") || exit 1
}
start_claygate a; CGA=$CG_URL; CGA_PID=$CG_PID
start_claygate b; CGB=$CG_URL; CGB_PID=$CG_PID
"$BARE" 127.0.0.1:0 "http://127.0.0.1:$UP_PORT" >"$T/bare.out" 2>"$T/bare.err" &
BARE_PID=$!; PIDS+=("$BARE_PID")
BARE_URL=$(listening "$BARE_PID" "$T/bare.out" "$T/bare.err" bare_proxy) || exit 1
"$BARE" 127.0.0.1:0 "http://127.0.0.1:$UP_PORT" hyper >"$T/hyper.out" 2>"$T/hyper.err" &
HYPER_PID=$!; PIDS+=("$HYPER_PID")
HYPER_URL=$(listening "$HYPER_PID" "$T/hyper.out" "$T/hyper.err" "bare_proxy hyper") || exit 1
log "upstream $UP  proxy $PX  claygate-a $CGA (pid $CGA_PID)  claygate-b $CGB (pid $CGB_PID)"

PARAMS='{"domain":"acme.com"}'
invoke() { # url operation [curl options…]
  local url=$1 op=$2; shift 2
  curl -sS "$@" -D "$T/h" -o "$T/b" -w '%{http_code}' -X POST -H 'content-type: application/json' -d "$PARAMS" "$url/v1/operations/$op/invoke"
}
# sanity: every target answers 200 with the upstream's body
[ "$(curl -s "$UP/v1/companies/acme.com")" = "$BODY" ] || { echo "upstream body wrong" >&2; exit 1; }
[ "$(curl -s "$PX/v1/companies/acme.com")" = "$BODY" ] || { echo "proxy body wrong" >&2; exit 1; }
for u in "$BARE_URL" "$HYPER_URL"; do
  [ "$(curl -s -X POST -H 'content-type: application/json' -d '{"domain":"acme.com"}' "$u/v1/operations/lookup/invoke")" = "$BODY" ] \
    || { echo "bare_proxy body wrong ($u)" >&2; exit 1; }
done
rss() { ps -o rss= -p "$1" | tr -d ' '; }
RSS_A_START=$(rss "$CGA_PID"); RSS_B_START=$(rss "$CGB_PID")
for t in "$CGA lookup" "$CGB lookup_keyed" "$CGB lookup_keyed"; do
  set -- $t
  code=$(invoke "$1" "$2")
  grep -q '"status":"ok"' "$T/b" && [ "$code" = 200 ] || { echo "invoke $2: $code $(cat "$T/b")" >&2; exit 1; }
done
grep -qi '^idempotent-replayed: true' "$T/h" || log "note: second lookup_keyed call was not marked as replayed"
KEYED_HDRS=$(tr -d '\r' < "$T/h" | grep -i '^idempotent-replayed' || true)
RSS_A_IDLE=$(rss "$CGA_PID"); RSS_B_IDLE=$(rss "$CGB_PID")

# (e) the Node peer, when node and npm are here.
TARGETS="a b i h c d"
if command -v node >/dev/null && command -v npm >/dev/null; then
  cp -r "$HERE/node-peer" "$T/node-peer"; rm -rf "$T/node-peer/node_modules"
  if (cd "$T/node-peer" && npm ci --no-audit --no-fund --silent >&2); then
    node "$T/node-peer/server.mjs" "$NODE_PORT" "$UP" >"$T/node.out" 2>"$T/node.err" &
    NODE_PID=$!; PIDS+=("$NODE_PID")
    NODE="http://127.0.0.1:$NODE_PORT"
    for i in $(seq 1 100); do curl -s -o /dev/null "$NODE/" && break; sleep 0.05; done
    code=$(curl -s -o "$T/b" -w '%{http_code}' -X POST -H 'content-type: application/json' -d "$PARAMS" "$NODE/")
    if [ "$code" = 200 ]; then TARGETS="a b i h c d e"; else log "node peer answered $code: $(cat "$T/b"); skipping (e)"; fi
  else
    log "npm ci failed; skipping the Node peer (e)"
  fi
else
  log "no node/npm on the PATH; skipping the Node peer (e)"
fi

# --- wrk ------------------------------------------------------------------------
LUA="$HERE/wrk.lua"
declare -A RPS P50 P99 N2XX RSSMAX
run_wrk() { # label url method conc seconds -> prints "rps p50us p99us non2xx"
  local url=$2 method=$3 c=$4 s=$5 t=1
  [ "$c" -gt 1 ] && t=2
  BENCH_METHOD=$method BENCH_BODY=$PARAMS wrk -t"$t" -c"$c" -d"${s}s" --latency -s "$LUA" "$url" \
    | awk '/^BENCH /{print $2, $3, $4, $5}'
}
sample_rss() { # pid file: max RSS while running
  local max=0 r
  while :; do
    r=$(rss "$1" || echo 0)
    if [ "${r:-0}" -gt "$max" ]; then max=$r; echo "$max" > "$2"; fi
    sleep 0.5
  done
}

declare -A URL METHOD PIDOF
URL[a]="$UP/v1/companies/acme.com"; METHOD[a]=GET
URL[b]="$PX/v1/companies/acme.com"; METHOD[b]=GET
URL[c]="$CGA/v1/operations/lookup/invoke"; METHOD[c]=POST; PIDOF[c]=$CGA_PID
URL[d]="$CGB/v1/operations/lookup_keyed/invoke"; METHOD[d]=POST; PIDOF[d]=$CGB_PID
URL[e]="${NODE:-}/"; METHOD[e]=POST
URL[h]="$BARE_URL/v1/operations/lookup/invoke"; METHOD[h]=POST
URL[i]="$HYPER_URL/v1/operations/lookup/invoke"; METHOD[i]=POST

measure() { # key conc -> appends to arrays
  local k=$1 c=$2 out sampler=""
  run_wrk "$k" "${URL[$k]}" "${METHOD[$k]}" "$c" "$WARMUP" >/dev/null
  if [ -n "${PIDOF[$k]:-}" ] && [ "$c" -gt 1 ]; then
    echo 0 > "$T/rss-$k"; sample_rss "${PIDOF[$k]}" "$T/rss-$k" & sampler=$!; SAMPLER=$sampler
  fi
  out=$(run_wrk "$k" "${URL[$k]}" "${METHOD[$k]}" "$c" "$DURATION")
  if [ -n "$sampler" ]; then
    kill "$sampler"; wait "$sampler" 2>/dev/null || true; SAMPLER=""
    local m; m=$(cat "$T/rss-$k")
    if [ "$m" -gt "${RSSMAX[$k]:-0}" ]; then RSSMAX[$k]=$m; fi
  fi
  set -- $out
  RPS[$k,$c]="${RPS[$k,$c]:-} $1"; P50[$k,$c]="${P50[$k,$c]:-} $2"; P99[$k,$c]="${P99[$k,$c]:-} $3"
  N2XX[$k,$c]=$(( ${N2XX[$k,$c]:-0} + $4 ))
  log "round $r  ($k) c=$c: $1 req/s  p50 $2 us  p99 $3 us  non-2xx $4"
}

for r in $(seq 1 "$ROUNDS"); do
  for c in 1 32; do
    for k in $TARGETS; do measure "$k" "$c"; done
  done
done

# (f) fail fast: breaker forced open, invoke through the API at c=32
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$CGA/v1/breakers/lookup/open")
[ "$code" = 200 ] || log "note: breaker open answered $code"
code=$(invoke "$CGA" lookup)
[ "$code" = 503 ] || { echo "breaker open but invoke answered $code: $(cat "$T/b")" >&2; exit 1; }
FF_CODE=$(grep -o '"code":"[a-z_]*"' "$T/b" | head -1)
URL[f]=${URL[c]}; METHOD[f]=POST; PIDOF[f]=$CGA_PID
measure f 1; measure f 32
curl -s -o /dev/null -X POST "$CGA/v1/breakers/lookup/reset"

# (g) fail fast: bulkhead full. One call to the silent upstream holds the
# only slot of `lookup_full` (queue 0); every other call is refused at once.
curl -s -o /dev/null -m 600 -X POST -H 'content-type: application/json' -d "$PARAMS" \
  "$CGA/v1/operations/lookup_full/invoke" &
HOLDER=$!; PIDS+=("$HOLDER")
# A probe may win the slot before the holder does: it then holds it itself
# (the call goes on in claygate after curl gives up at 1 s), which serves
# as well; so probes give up quickly instead of waiting with the slot.
for i in $(seq 1 100); do
  code=$(invoke "$CGA" lookup_full -m 1 || true)
  [ "$code" = 429 ] && break
  sleep 0.05
done
[ "$code" = 429 ] || { echo "bulkhead of lookup_full not full: $code $(cat "$T/b")" >&2; exit 1; }
BF_CODE=$(grep -o '"code":"[a-z_]*"' "$T/b" | head -1)
URL[g]="$CGA/v1/operations/lookup_full/invoke"; METHOD[g]=POST; PIDOF[g]=$CGA_PID
measure g 1; measure g 32
kill "$HOLDER" 2>/dev/null || true
sleep 1
RSS_A_END=$(rss "$CGA_PID"); RSS_B_END=$(rss "$CGB_PID")

# --- report -----------------------------------------------------------------------
mean() { echo "$@" | awk '{s=0; for(i=1;i<=NF;i++) s+=$i; printf "%.0f", s/NF}'; }
range() { echo "$@" | awk '{mn=$1; mx=$1; for(i=1;i<=NF;i++){if($i<mn)mn=$i; if($i>mx)mx=$i}; printf "%.0f–%.0f", mn, mx}'; }
us() { awk -v u="$1" 'BEGIN{ if (u>=10000) printf "%.1f ms", u/1000; else printf "%.0f µs", u }'; }
ratio() { awk -v x="$1" -v y="$2" 'BEGIN{ printf "%.2f", x/y }'; }

declare -A NAME
NAME[a]="(a) upstream direct (nginx, GET)"
NAME[b]="(b) nginx keep-alive proxy"
NAME[c]="(c) claygate \`lookup\`"
NAME[d]="(d) claygate \`lookup_keyed\` (idempotent replay + fallback cache)"
NAME[e]="(e) Node peer (opossum + p-queue + Promise.race, hand-rolled)"
NAME[h]="(h) floor: axum + reqwest, no policy (examples/bare_proxy.rs)"
NAME[i]="(i) floor with hyper-util's client instead of reqwest (bare_proxy … hyper)"
NAME[f]="(f) claygate \`lookup\`, breaker forced open (fail fast, all 503)"
NAME[g]="(g) claygate \`lookup_full\`, bulkhead full (fail fast, all 429)"

echo
echo "### claygate proxy overhead — $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/{print $2}') GiB;" \
  "servers and wrk share the cores. nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), one nginx worker each;" \
  "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty') release build." \
  "${ROUNDS} round(s) of ${DURATION}s per cell (after ${WARMUP}s warm-up), targets alternated; mean over rounds, req/s range in brackets."
echo "Command: \`benches/proxy/run.sh -d $DURATION -r $ROUNDS\`"
echo
echo "| target | c | req/s | p50 | p99 | non-2xx | vs (a) req/s | vs (b) req/s | vs (h) req/s | added p50 vs (a) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
declare -A MR MP
for c in 1 32; do
  for k in $TARGETS; do MR[$k]=$(mean ${RPS[$k,$c]}); MP[$k]=$(mean ${P50[$k,$c]}); done
  for k in $TARGETS; do
    vsa="—"; vsb="—"; vsh="—"; add="—"
    if [ "$k" = c ] || [ "$k" = d ] || [ "$k" = e ] || [ "$k" = h ] || [ "$k" = i ]; then
      vsa=$(ratio "${MR[$k]}" "${MR[a]}"); vsb=$(ratio "${MR[$k]}" "${MR[b]}")
      add="+$(us $(( ${MP[$k]} - ${MP[a]} )))"
      if [ "$k" != h ]; then vsh=$(ratio "${MR[$k]}" "${MR[h]}"); fi
    elif [ "$k" = b ]; then
      vsa=$(ratio "${MR[b]}" "${MR[a]}"); add="+$(us $(( ${MP[b]} - ${MP[a]} )))"
    fi
    echo "| ${NAME[$k]} | $c | ${MR[$k]} ($(range ${RPS[$k,$c]})) | $(us "${MP[$k]}") | $(us "$(mean ${P99[$k,$c]})") | ${N2XX[$k,$c]} | $vsa | $vsb | $vsh | $add |"
  done
done
for k in f g; do
  code=$FF_CODE; [ "$k" = g ] && code=$BF_CODE
  for c in 1 32; do
    echo "| ${NAME[$k]} | $c | $(mean ${RPS[$k,$c]}) rejections/s | $(us "$(mean ${P50[$k,$c]})") | $(us "$(mean ${P99[$k,$c]})") | ${N2XX[$k,$c]} ($code) | — | — | — | — |"
  done
done
echo
echo "| claygate RSS (ps -o rss=) | \`lookup\` process | \`lookup_keyed\` process |"
echo "| --- | --- | --- |"
echo "| started, before any call | $RSS_A_START KiB | $RSS_B_START KiB |"
echo "| idle after first calls | $RSS_A_IDLE KiB | $RSS_B_IDLE KiB |"
echo "| max under c=32 load (0.5 s samples) | ${RSSMAX[c]:-?} KiB (fail fast: ${RSSMAX[f]:-?} / ${RSSMAX[g]:-?} KiB) | ${RSSMAX[d]:-?} KiB |"
echo "| idle after the run | $RSS_A_END KiB | $RSS_B_END KiB |"
echo
echo "\"added p50\" subtracts the medians at the same concurrency. The \`lookup_keyed\` key is derived from \`domain\`, identical on every call, so after the first call every answer is a replay from the idempotency store${KEYED_HDRS:+ (\`${KEYED_HDRS}\`)}: it measures the replay path, not an upstream call."
