"""The results of one run, the targets' PASS / FAIL, and ``docs/benchmarks.md``."""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

PYTHON_PEERS = ("celery", "rq", "arq", "dramatiq", "saq")
#: The row of bench/e2e_floor.py (gpuflow's chain with no work): shown, never a peer.
FLOOR = "e2e floor (no work)"
DRAIN_FACTOR = 1.5  # gpuflow's drain ≥ 1.5 × the fastest Python peer
HTTP_SHARE = 0.5  # POST /api/v2/tasks ≥ 50 % of the bare FastAPI + XADD ceiling


@dataclass
class Results:
    machine: dict[str, str] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)
    http: dict[str, dict[str, Any]] = field(default_factory=dict)
    scale: list[dict[str, str]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    #: (systems, http) of each round, when the systems ran round-robin several times.
    rounds: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def end_round(self) -> None:
        """Keep this round's numbers; the tables then show each number's median."""
        self.rounds.append((copy.deepcopy(self.systems), copy.deepcopy(self.http)))
        self.systems = _median([s for s, _ in self.rounds])
        self.http = _median([h for _, h in self.rounds])

    def system(self, name: str, version: str, setup: str) -> dict[str, Any]:
        self.systems[name] = {"version": version, "setup": setup}
        return self.systems[name]

    def targets(self) -> list[tuple[str, str, str]]:
        """(target, measured, PASS / FAIL / n/a) rows. After several rounds each comparison
        is the median round's for that target (its ratio measured within one round, on the
        same machine minutes apart, never across rounds)."""
        rows = self._targets()
        per_round = [Results(systems=s, http=h)._targets() for s, h in self.rounds]
        if len(per_round) > 1:
            for i in range(len(rows)):
                margins = [m for r in per_round if i < len(r) and (m := r[i][3]) is not None]
                if margins:
                    mid = statistics.median_low(margins)
                    rows[i] = next(r[i] for r in per_round if i < len(r) and r[i][3] == mid)
        out = [(t, v, verdict) for t, v, verdict, _ in rows]
        for row in self.scale:
            out.append((row.get("target") or row["metric"], row["value"], row.get("result", "n/a")))
        return out

    def round_targets(self) -> list[list[tuple[str, str, str]]]:
        """The targets of each round alone (no scale rows)."""
        return [
            [(t, v, verdict) for t, v, verdict, _ in Results(systems=s, http=h)._targets()]
            for s, h in self.rounds
        ]

    def _targets(self) -> list[tuple[str, str, str, float | None]]:
        """(target, measured, verdict, margin: higher is better, ≥ 1 passes) of these
        numbers, without the scale rows."""
        rows: list[tuple[str, str, str, float | None]] = []
        gf = self.systems.get("gpuflow", {})
        peers = {p: self.systems[p] for p in PYTHON_PEERS if "rate" in self.systems.get(p, {})}
        if "rate" in gf and peers:
            best = max(peers, key=lambda p: peers[p]["rate"])
            ratio = gf["rate"] / peers[best]["rate"]
            rows.append(
                (
                    f"drain ≥ {DRAIN_FACTOR} × fastest Python peer ({best})",
                    f"{gf['rate']:,.0f} vs {peers[best]['rate']:,.0f} tasks/s = {ratio:.2f}×",
                    _verdict(ratio >= DRAIN_FACTOR),
                    ratio / DRAIN_FACTOR,
                )
            )
        else:
            rows.append(
                (f"drain ≥ {DRAIN_FACTOR} × fastest Python peer", "not measured", "n/a", None)
            )
        bull = self.systems.get("bullmq", {})
        if "rate" in gf and "rate" in bull:
            ratio = gf["rate"] / bull["rate"]
            rows.append(
                (
                    "drain ≥ BullMQ",
                    f"{gf['rate']:,.0f} vs {bull['rate']:,.0f} tasks/s = {ratio:.2f}×",
                    _verdict(ratio >= 1.0),
                    ratio,
                )
            )
        http = self.systems.get("gpuflow (HTTP API)", {}).get("e2e")
        lat = {
            n: s["e2e"]
            for n, s in self.systems.items()
            if n in (*PYTHON_PEERS, "bullmq") and "e2e" in s
        }
        for q in ("p50", "p99"):
            if http and lat:
                best = min(lat, key=lambda n: lat[n][q])
                rows.append(
                    (
                        f"e2e {q} over HTTP < best peer's ({best})",
                        f"{http[q]:.2f} vs {lat[best][q]:.2f} ms",
                        _verdict(http[q] < lat[best][q]),
                        lat[best][q] / http[q],
                    )
                )
            else:
                rows.append((f"e2e {q} over HTTP < best peer's", "not measured", "n/a", None))
        gh, bare = self.http.get("gpuflow"), self.http.get("bare")
        if gh and bare and bare["rps"] > 0:
            share = gh["rps"] / bare["rps"]
            rows.append(
                (
                    f"POST /api/v2/tasks ≥ {HTTP_SHARE:.0%} of bare FastAPI + XADD",
                    f"{gh['rps']:,.0f} vs {bare['rps']:,.0f} req/s = {share:.0%}",
                    _verdict(share >= HTTP_SHARE),
                    share / HTTP_SHARE,
                )
            )
        else:
            rows.append(
                (f"POST /api/v2/tasks ≥ {HTTP_SHARE:.0%} of bare", "not measured", "n/a", None)
            )
        return rows


def _median(values: list[Any]) -> Any:
    """Numbers: their median; dicts: key by key (over the rounds that have the key); anything
    else: the last round's."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return statistics.median(values)
    if all(isinstance(v, dict) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: _median([v[k] for v in values if k in v]) for k in keys}
    return values[-1]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _num(v: Any, fmt: str = ",.0f") -> str:
    return "—" if v is None else format(v, fmt)


def rounds_note(results: Results) -> str:
    """With several rounds: each round's measured values and verdicts, target by target."""
    per_round = results.round_targets()
    if len(per_round) < 2:
        return ""
    lines = [
        "",
        "",
        f"The systems ran round-robin {len(per_round)} times: each target above is its median "
        "round's comparison, the tables below show each number's median. Each round alone:",
        "",
        "| Target | " + " | ".join(f"round {i + 1}" for i in range(len(per_round))) + " |",
        "|---|" + "---|" * len(per_round),
    ]
    for i, (name, _, _) in enumerate(per_round[0]):
        cells = [f"{r[i][1]} {r[i][2]}" if i < len(r) else "—" for r in per_round]
        lines.append(f"| {name.split(' (')[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: Results) -> str:
    n = results.args.get("n", 0)
    lines = [
        f"| System | Version | Drain {n:,} no-ops (tasks/s) "
        "| CPU per drained task, Redis / workers (µs) | Enqueue 1 at a time (tasks/s) "
        "| Enqueue batch (tasks/s) | E2E p50 (ms) | E2E p99 (ms) | Setup |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, s in results.systems.items():
        e2e = s.get("e2e") or {}
        batch = _num(s.get("batch"))
        if s.get("batch_how"):
            batch += f" ({s['batch_how']})"
        cpu = f"{_num(s.get('redis_us'))} / {_num(s.get('worker_us'))}" if "rate" in s else "—"
        lines.append(
            f"| {name} | {s['version']} | {_num(s.get('rate'))} | {cpu} | {_num(s.get('single'))} "
            f"| {batch} | {_num(e2e.get('p50'), '.2f')} | {_num(e2e.get('p99'), '.2f')} "
            f"| {s['setup']} |"
        )
    return "\n".join(lines)


def http_table(results: Results) -> str:
    if not results.http:
        return "_not run (`--skip-http`)_"
    conns = results.args.get("conns")
    lines = ["| Server | req/s | errors |", "|---|--:|--:|"]
    names = {
        "gpuflow": "`gpuflow api`: POST /api/v2/tasks (auth, validation, create script)",
        "bare": "bare FastAPI + one XADD (bench/bare_app.py)",
    }
    for key, r in results.http.items():
        lines.append(f"| {names.get(key, key)} | {r['rps']:,.0f} | {r['errors']} |")
    lines.append(
        f"\n{conns} concurrent keep-alive connections from `bench/loadgen.py` "
        "(aiohttp, one process), "
        f"{results.args.get('http_seconds')} s after a 1 s warm-up; both servers are one uvicorn "
        "process with the same settings (uvloop, httptools, no access log)."
    )
    return "\n".join(lines)


def e2e_note(results: Results) -> str:
    e2e = results.systems.get("gpuflow (HTTP API)", {}).get("e2e") or {}
    if "in_redis_ms" not in e2e:
        return ""
    floor = results.systems.get(FLOOR, {}).get("e2e") or {}
    versus = (
        f" The same six hops with no work in them took {floor['p50']:.2f} ms p50 "
        f"(the e2e floor row)."
        if "p50" in floor
        else ""
    )
    return (
        f"\ngpuflow's end-to-end time, from its task records (medians, ms resolution): "
        f"created → started {e2e['dispatch_ms']} ms, started → completed "
        f"{e2e['run_report_ms']} ms; the rest of the {e2e['p50']:.1f} ms p50 is HTTP "
        f"and the api's wake-up. Wait mode: {e2e.get('how', '?')}.{versus}\n"
    )


def render(results: Results) -> str:
    m = results.machine
    targets = "\n".join(f"| {t} | {v} | **{r}** |" for t, v, r in results.targets())
    targets += rounds_note(results)
    errors = "".join(
        f"\n- **{k}** did not finish: {_relative(v)}" for k, v in results.errors.items()
    )
    return f"""# Benchmarks

_Written by `bench/run.py`; do not edit by hand (rerun it)._

- **Command**: `{results.command}`
- **Date**: {m.get("date")}
- **Machine**: {m.get("cores")} cores, {m.get("cpu")}; {m.get("os")}; Python {m.get("python")};
  load average at the start {m.get("load")} (other work on the machine skews every number)
- **Redis**: {m.get("redis")}, one server for every system, 127.0.0.1 only

## Targets

| Target | Measured | Result |
|---|---|---|
{targets}
{errors}

## Throughput and latency

{table(results)}
{e2e_note(results)}
## HTTP ceiling

{http_table(results)}

## Method

- **Drain**: N no-op tasks are queued first (with the batch path of the table), then the
  workers start; the rate is timed from the first finished task to the N-th, so interpreter
  and framework start-up are not counted. gpuflow counts `ZCARD gf:idx:status:COMPLETED`;
  BullMQ `ZCARD bull:bench:completed`; the Python peers' no-op task does `INCR bench:done`
  (Celery with `ignore_result` stores nothing else to count), one Redis round trip per task
  that gpuflow's no-op handler does not make. gpuflow and BullMQ run the same shape: 2
  processes with 128 tasks in flight each (gpuflow measured ~10-20 % faster at 128 than at
  64, BullMQ ~5 % faster at 128 than at 50; 256 was not faster for gpuflow).
- **CPU per drained task**: CPU seconds (user + system) of the Redis server and of the worker
  processes with their children, over the same span as the rate, divided by the tasks
  finished in it: what one task costs each side, whatever else the machine runs.
- **Enqueue**: 1 at a time = sequential calls of the normal API (gpuflow: `Tasks.create`, the
  direct Redis path the API itself calls; over HTTP: `AsyncClient.create_task`, with
  `transport="aiohttp"`). Batch = the
  peer's bulk call where it has one, else 64 concurrent calls (async peers) or a loop; over
  HTTP 32 concurrent `create_task`, as the HTTP ceiling's load generator.
- **E2E**: submit one task, wait for its result, {results.args.get("e2e")} times, with the
  workers of the drain setup idle, after an AOF rewrite (`BGREWRITEAOF`, waited for) so that
  no system's run shares the cores with a rewrite of what its drain left behind. gpuflow and
  BullMQ, the two a target compares, are measured together at the end of each round: both
  systems' workers up, each side warmed up with 100 round trips, then 10 turns each of a
  tenth of the round trips, taking turns (who goes first alternates), each side's p50 / p99
  over all its samples, so that a drift of the machine's speed weighs on both alike
  (measured one after the other, minutes apart, their ratio ranged 0.80-1.26 over the five
  rounds of one run). BullMQ's driver is one Node.js process for all its turns
  (`bullmq_app.mjs e2e-turns`). The other peers: in a row, in their own step.
  gpuflow over HTTP uses `AsyncClient.run_task`: one `POST /api/v2/tasks?wait=30` that
  creates the task and answers when it is final. arq's
  `Job.result(poll_delay=0.005)` and saq's `Queue.apply(poll_interval=0.005)` poll
  (defaults 0.5 s); Celery (Redis result backend, pub/sub), RQ (`latest_result(timeout)`,
  blocking stream read), dramatiq (`Results` middleware, blocking) and BullMQ
  (`waitUntilFinished`, stream events) are notified. The "e2e floor" row is gpuflow's chain
  of six hops with no work in them (`bench/e2e_floor.py`: a raw ASGI app on uvicorn, two
  two-command scripts, a `BLPOP` loop, one pattern subscription, the aiohttp client): no
  system built this way answers faster here; it is not a peer.
- **Heartbeats** (`--scale`): 10,000 registered GPUs beat every 5 s (2,000 beats/s) for 30 s:
  straight to Redis as the Python agent does; over HTTP as `gpuflow worker --api-url` sends
  them, one `POST /api/v2/gpus/heartbeats` per 8-GPU box (250 requests/s, the target row);
  and one `POST /api/v2/gpus/{id}/heartbeat` per GPU (2,000 requests/s, the seed's endpoint
  for other clients, shown); up to 64 in flight on 64 keep-alive connections; the api
  process's CPU. The floor
  rows are the same loads against uvicorn serving a raw ASGI app that does nothing
  (`bench/floor_app.py`): no route of any ASGI app costs less here.
- **Order**: each round runs BullMQ, gpuflow, the bare FastAPI app, the e2e floor, then the
  Python peers, every other round in reverse order, then gpuflow's and BullMQ's e2e turns.
  The systems a target compares run next to each other, and a drift of the machine's speed
  within a round weighs on them alike.
- Every peer is installed in its own virtual environment under `bench/.work/venvs/` (BullMQ with
  npm under `bench/.work/node/`), each starts from an empty Redis (`FLUSHALL`). Logs of every
  process are in `bench/.work/logs/`.
"""


def write_report(results: Results, out: Path) -> str:
    text = render(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def _relative(text: str) -> str:
    """An error as the report shows it: paths under the repository made relative."""
    return text.replace(str(ROOT) + "/", "")
