-- wrk script for benches/proxy/run.sh.
-- BENCH_METHOD=POST sends BENCH_BODY as JSON (claygate invoke); otherwise a plain GET.
-- done() prints one machine-readable line:
--   BENCH <req/s> <p50 µs> <p99 µs> <non-2xx/3xx count>
local method = os.getenv("BENCH_METHOD") or "GET"
if method == "POST" then
  wrk.method = "POST"
  wrk.body = os.getenv("BENCH_BODY") or "{}"
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format("BENCH %.1f %d %d %d\n",
    summary.requests / secs,
    latency:percentile(50), latency:percentile(99),
    e.status))
  if e.connect + e.read + e.write + e.timeout > 0 then
    io.stderr:write(string.format("wrk socket errors: connect %d read %d write %d timeout %d\n",
      e.connect, e.read, e.write, e.timeout))
  end
end
