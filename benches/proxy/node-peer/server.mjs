// Peer (e) of benches/proxy/run.sh: what a team writes by hand in Node for
// one Clay operation — an opossum circuit breaker, a p-queue bulkhead, a
// Promise.race attempt timeout, one retry on 502/503 or a connection error —
// serving the same invoke contract as claygate (POST JSON params, answer a
// JSON envelope). Usage: node server.mjs PORT UPSTREAM_BASE_URL
import http from "node:http";
import CircuitBreaker from "opossum";
import PQueue from "p-queue";

const [port, base] = [Number(process.argv[2]), new URL(process.argv[3])];
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
const queue = new PQueue({ concurrency: 64 });

function get(path) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: base.hostname, port: base.port, path, method: "GET", agent },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => resolve({ status: res.statusCode, body: Buffer.concat(chunks) }));
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    req.end();
  });
}

function withTimeout(promise, ms) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error("attempt timed out")), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function attempt(path) {
  const reply = await withTimeout(get(path), 1000);
  if (reply.status >= 500) throw Object.assign(new Error(`upstream ${reply.status}`), { reply });
  return reply;
}

const breaker = new CircuitBreaker(attempt, {
  errorThresholdPercentage: 50,
  volumeThreshold: 20,
  rollingCountTimeout: 10000,
  rollingCountBuckets: 10,
  resetTimeout: 30000,
});

async function call(path) {
  for (let n = 1; ; n++) {
    try {
      return await queue.add(() => breaker.fire(path));
    } catch (e) {
      const retryable = e.reply ? [502, 503].includes(e.reply.status) : e.code === "ECONNREFUSED";
      if (n >= 2 || !retryable || breaker.opened) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

http
  .createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", async () => {
      const started = process.hrtime.bigint();
      let params;
      try {
        params = JSON.parse(Buffer.concat(chunks).toString() || "{}");
      } catch {
        res.writeHead(400, { "content-type": "application/json" });
        return res.end('{"code":"bad_json"}');
      }
      if (typeof params.domain !== "string") {
        res.writeHead(422, { "content-type": "application/json" });
        return res.end('{"code":"invalid_params"}');
      }
      try {
        const reply = await call(`/v1/companies/${encodeURIComponent(params.domain)}`);
        const latency_ms = Number(process.hrtime.bigint() - started) / 1e6;
        res.writeHead(200, { "content-type": "application/json" });
        res.end(`{"status":"ok","data":${reply.body},"meta":{"operation":"lookup","latency_ms":${latency_ms},"upstream_status":${reply.status}}}`);
      } catch (e) {
        const open = breaker.opened;
        res.writeHead(open ? 503 : 502, { "content-type": "application/json" });
        res.end(JSON.stringify({ code: open ? "breaker_open" : "upstream_error", message: String(e.message) }));
      }
    });
  })
  .listen(port, "127.0.0.1", () => console.log(`listening on http://127.0.0.1:${port}`));
