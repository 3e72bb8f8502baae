"""Serving load: requests/s and latency of `hsl serve` on loopback at 1, 8 and 32 concurrent clients.

The server is `hsl serve` in its own process, as a user runs it (access log off). The load comes
from this process: one asyncio event loop with N httpx clients on kept-alive connections, each
sending its next request as soon as the previous one is answered (a closed loop). Client and
server share the machine's cores, so on a small machine these are figures for the pair.

Endpoints: `search` (GET /search?q=...&k=10, the 120 attribute queries of
data/queries/fashion_attributes.jsonl in turn), `similar` (GET /products/ID/similar?k=10) and
`image` (GET /images/ID, the photo file). Each (endpoint, clients) level runs until --requests
answers or --seconds, whichever comes first, after a warm-up. Only 127.0.0.1 is ever contacted.

    python bench/serve.py --store /tmp/runs/fashion.h5 [--model DIR] [--clients 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

QUERIES = Path(__file__).resolve().parents[1] / "data" / "queries" / "fashion_attributes.jsonl"


def start_server(store: str, model: str | None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "hsl_cli.main", "serve", "--store", store, "--host", "127.0.0.1", "--port", "0",
               "--quiet", *(["--model", model] if model else [])]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 300  # a first start may build the index cache
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        sys.stderr.write(line)
        if match := re.search(r"listening on (http://127\.0\.0\.1:\d+)", line):
            url = match.group(1)
            for _ in range(200):
                try:
                    httpx.get(f"{url}/health", timeout=5).raise_for_status()
                    return proc, url
                except httpx.TransportError:
                    time.sleep(0.05)
    proc.kill()
    raise SystemExit("hsl serve did not start")


async def level(url: str, paths: list[str], clients: int, max_requests: int, seconds: float) -> dict:
    """N closed-loop clients; latency of every answered request, rate over the level's wall time."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        for path in paths[:clients]:  # warm-up: open every connection once
            await client.get(path)
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors, sent
            while sent < max_requests and time.perf_counter() < deadline:
                path = paths[sent % len(paths)]
                sent += 1
                start = time.perf_counter()
                response = await client.get(path)
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "errors": errors, "seconds": round(wall, 1),
            "rps": round(len(latencies) / wall, 1), "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="fashion.h5")
    parser.add_argument("--model", default=None, help="default: the shipped model")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--endpoints", nargs="+", default=["search", "similar", "image"])
    parser.add_argument("--requests", type=int, default=2000, help="per level, at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="per level, at most")
    args = parser.parse_args()

    queries = [json.loads(line)["query"] for line in QUERIES.read_text().splitlines() if line.strip()]
    busy = subprocess.run(["pgrep", "-f", "bench/results.py"], capture_output=True, text=True).stdout.split()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"other runs of bench/results.py: {len(busy)}", flush=True)
    proc, url = start_server(args.store, args.model)
    try:
        ids = [hit["id"] for q in queries[:20]
               for hit in httpx.get(f"{url}/search", params={"q": q, "k": 10}, timeout=60).json()["results"]]
        paths = {"search": [str(httpx.URL("/search", params={"q": q, "k": 10})) for q in queries],
                 "similar": [f"/products/{i}/similar?k=10" for i in ids],
                 "image": [f"/images/{i}" for i in ids]}
        print("| endpoint | clients | requests | errors | requests/s | p50 | p95 | max |")
        print("|---|---|---|---|---|---|---|---|")
        for endpoint in args.endpoints:
            for clients in args.clients:
                r = asyncio.run(level(url, paths[endpoint], clients, args.requests, args.seconds))
                print(f"| {endpoint} | {clients} | {r['requests']} | {r['errors']} | {r['rps']} | {r['p50_ms']} ms | "
                      f"{r['p95_ms']} ms | {r['max_ms']} ms |", flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
