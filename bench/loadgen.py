"""A small closed-loop HTTP load generator: C connections, each POSTing as fast as answers come.

``python -m bench.loadgen URL --conns 32 --seconds 5 [--header 'Authorization: Bearer …']``
prints ``{"rps": …, "ok": …, "errors": …}`` (requests/s of 2xx answers after a 1 s warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

BODY = json.dumps({"taskType": 1, "payload": {"prompt": "bench"}}).encode()


async def run(url: str, conns: int, seconds: float, headers: dict[str, str]) -> dict[str, float]:
    ok = errors = 0
    counting = False
    stop_at = time.monotonic() + 1.0 + seconds
    headers = {"Content-Type": "application/json", **headers}
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def client() -> None:
            nonlocal ok, errors
            while time.monotonic() < stop_at:
                try:
                    async with session.post(url, data=BODY) as resp:
                        await resp.read()
                        good = 200 <= resp.status < 300
                except aiohttp.ClientError:
                    good = False
                if counting:
                    ok, errors = (ok + 1, errors) if good else (ok, errors + 1)

        tasks = [asyncio.create_task(client()) for _ in range(conns)]
        await asyncio.sleep(1.0)  # warm-up: connections open, caches fill
        counting, t0 = True, time.monotonic()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
    return {"rps": ok / elapsed, "ok": ok, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    print(json.dumps(asyncio.run(run(args.url, args.conns, args.seconds, headers))))


if __name__ == "__main__":
    main()
