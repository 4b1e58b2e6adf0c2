// BullMQ peer (Node.js). `node bullmq_app.mjs worker` serves the queue; `node bullmq_app.mjs
// MODE COUNT` is a driver with the same modes as the Python peers (see _common.py) and prints
// one JSON line. Finished no-op jobs are counted with ZCARD bull:bench:completed (BullMQ keeps
// completed jobs by default), so the no-op job does nothing.
import { Queue, QueueEvents, Worker } from "bullmq";
import IORedis from "ioredis";
import { createInterface } from "node:readline";

const url = new URL(process.env.BENCH_REDIS_URL);
// BullMQ 6 in native ESM takes a constructed ioredis client (it duplicates it where needed).
const connection = new IORedis({
  host: url.hostname,
  port: Number(url.port),
  password: decodeURIComponent(url.password) || undefined,
  db: Number(url.pathname.slice(1) || 0),
  maxRetriesPerRequest: null,
});
const NAME = "bench";
const CONCURRENCY = Number(process.env.BENCH_BULLMQ_CONCURRENCY || 128);
const DEADLINE_MS = Number(process.env.BENCH_PHASE_TIMEOUT_S || 300) * 1000;

function emit(data) {
  process.stdout.write(JSON.stringify(data) + "\n");
}

function percentiles(samples) {
  const ms = samples.map((s) => s).sort((a, b) => a - b);
  const q = (p) => {
    const pos = (ms.length - 1) * p;
    const lo = Math.floor(pos);
    const hi = Math.ceil(pos);
    return ms[lo] + (ms[hi] - ms[lo]) * (pos - lo);
  };
  return { p50: q(0.5), p99: q(0.99), n: ms.length };
}

async function main() {
  const [mode, countArg] = process.argv.slice(2);
  if (mode === "worker") {
    const worker = new Worker(
      NAME,
      async (job) => (job.name === "echo" ? job.data.i : null),
      { connection, concurrency: CONCURRENCY },
    );
    const stop = async () => {
      await worker.close();
      process.exit(0);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
    return;
  }
  const count = Number(countArg);
  const queue = new Queue(NAME, { connection });
  const t0 = performance.now();
  const start = Date.now();
  if (mode === "single") {
    let i = 0;
    for (; i < count && Date.now() - start < DEADLINE_MS; i++) await queue.add("noop", {});
    emit({ rate: i / ((performance.now() - t0) / 1000) });
  } else if (mode === "batch") {
    for (let c = 0; c < count; c += 1000) {
      const size = Math.min(1000, count - c);
      await queue.addBulk(Array.from({ length: size }, () => ({ name: "noop", data: {} })));
    }
    emit({ rate: count / ((performance.now() - t0) / 1000), how: "Queue.addBulk, 1,000 per call" });
  } else if (mode === "e2e-turns") {
    // The e2e of bench/run.py's duel: warm up with COUNT round trips, then for each line
    // "N" on stdin make N more and print their times (ms) as one JSON line; end at EOF.
    // One process for every turn, so that V8's compiled code stays warm between them.
    const last = await connection.xrevrange(`bull:${NAME}:events`, "+", "-", "COUNT", 1);
    const events = new QueueEvents(NAME, { connection, lastEventId: last.length ? last[0][0] : "0-0" });
    await events.waitUntilReady();
    const one = async (i) => {
      const s = performance.now();
      const job = await queue.add("echo", { i });
      const value = await job.waitUntilFinished(events, 30000);
      if (value !== i) throw new Error(`echo returned ${value}, not ${i}`);
      return performance.now() - s;
    };
    for (let i = 0; i < count; i++) await one(i);
    emit({ ready: true });
    const lines = createInterface({ input: process.stdin });
    for await (const line of lines) {
      const samples = [];
      for (let i = 0; i < Number(line); i++) samples.push(await one(i));
      emit({ samples });
    }
    await events.close();
  } else if (mode === "e2e") {
    // Read events from the stream's current end, not from "$" at the time of the first
    // blocking read: that read may start after the first job already finished, and its
    // completion would never be heard of (waitUntilFinished then times out).
    const last = await connection.xrevrange(`bull:${NAME}:events`, "+", "-", "COUNT", 1);
    const lastEventId = last.length ? last[0][0] : "0-0";
    const events = new QueueEvents(NAME, { connection, lastEventId });
    await events.waitUntilReady();
    const samples = [];
    for (let i = -1; i < count && Date.now() - start < DEADLINE_MS; i++) {
      const s = performance.now();
      const job = await queue.add("echo", { i });
      const value = await job.waitUntilFinished(events, 30000);
      if (value !== i) throw new Error(`echo returned ${value}, not ${i}`);
      if (i >= 0) samples.push(performance.now() - s);
    }
    emit({ ...percentiles(samples), samples });
    await events.close();
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
  await queue.close();
  await connection.quit();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
