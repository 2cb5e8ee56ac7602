"""Load test of a local ``python -m lcrec_jax.serve``: N concurrent clients for T seconds.

  python -m lcrec_jax.serve --workdir=runs/ml100k --port=8080 &
  python benchmarks/serve_load.py --url=http://127.0.0.1:8080 --clients=32 --seconds=30 --k=10

Each client sends ``POST /v1/recommend`` requests back to back (a fresh seeded history of
5-20 item ids out of ``--num_items`` each time; MovieLens ids are 1..1682) and waits for
the answer. Reports, as one json line: requests per second answered 200, latency
p50/p95/p99 of the 200s (ms), counts by status (and ``error:<kind>`` for connection
errors), the batch sizes the server reports (``/metrics``) and the load average.
``--rate=R`` instead sends R requests per second in total (open loop, e.g. to overload a
server at 4x its throughput); each still counts once, by its status.

Loopback only (the URL's host must be 127.0.0.1 / ::1 / localhost), at most 512 clients
and 600 s: a benchmark, not a load generator for other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import time
import urllib.parse

import httpx

MAX_CLIENTS, MAX_SECONDS = 512, 600
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def percentile(xs: list[float], q: float) -> float:
  """The ``q``-quantile (0..1) of ``xs``, nearest rank; NaN when empty."""
  if not xs:
    return float("nan")
  xs = sorted(xs)
  return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def history(rng: random.Random, num_items: int) -> list[str]:
  return [str(rng.randint(1, num_items)) for _ in range(rng.randint(5, 20))]


async def one(client: httpx.AsyncClient, body: dict, stats: dict) -> None:
  t0 = time.perf_counter()
  try:
    r = await client.post("/v1/recommend", json=body)
    key = str(r.status_code)
  except httpx.HTTPError as e:
    key = f"error:{type(e).__name__}"
  dt = time.perf_counter() - t0
  stats["status"][key] += 1
  if key == "200":
    stats["latency"].append(dt)


async def closed_loop(client, args, stats, stop_at: float) -> None:
  async def worker(i: int) -> None:
    rng = random.Random(args.seed * 1000 + i)
    while time.perf_counter() < stop_at:
      await one(client, {"history": history(rng, args.num_items), "k": args.k}, stats)
  await asyncio.gather(*(worker(i) for i in range(args.clients)))


async def open_loop(client, args, stats, stop_at: float) -> None:
  rng, tasks, t0 = random.Random(args.seed), set(), time.perf_counter()
  n = 0
  while time.perf_counter() < stop_at:
    due = t0 + n / args.rate
    await asyncio.sleep(max(0.0, due - time.perf_counter()))
    if len(tasks) < args.clients:  # at most --clients open requests
      t = asyncio.create_task(one(client, {"history": history(rng, args.num_items),
                                           "k": args.k}, stats))
      tasks.add(t)
      t.add_done_callback(tasks.discard)
    else:
      stats["status"]["not_sent:client_limit"] += 1
    n += 1
  await asyncio.gather(*tasks)


def batch_sizes(url: str, headers: dict) -> dict[str, float]:
  """Mean queries per beam-search call and calls, from the server's /metrics."""
  text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
  vals = {}
  for line in text.splitlines():
    for name in ("lcrec_serve_batch_size_sum", "lcrec_serve_batch_size_count"):
      if line.startswith(name + " "):
        vals[name] = float(line.split()[-1])
  return vals


async def run(args) -> dict:
  headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
  limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
  before = batch_sizes(args.url, headers)
  stats = {"status": collections.Counter(), "latency": []}
  async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                               timeout=args.timeout) as client:
    warm = await client.post("/v1/recommend", json={"history": ["1", "2"], "k": args.k})
    warm.raise_for_status()
    t0 = time.perf_counter()
    stop_at = t0 + args.seconds
    if args.rate:
      await open_loop(client, args, stats, stop_at)
    else:
      await closed_loop(client, args, stats, stop_at)
    wall = time.perf_counter() - t0
  after = batch_sizes(args.url, headers)
  calls = after.get("lcrec_serve_batch_size_count", 0) - before.get(
      "lcrec_serve_batch_size_count", 0)
  queries = after.get("lcrec_serve_batch_size_sum", 0) - before.get(
      "lcrec_serve_batch_size_sum", 0)
  lat = stats["latency"]
  return {"clients": args.clients, "rate": args.rate, "seconds": round(wall, 2), "k": args.k,
          "ok_per_s": round(len(lat) / wall, 2),
          "p50_ms": round(1000 * percentile(lat, 0.50), 1),
          "p95_ms": round(1000 * percentile(lat, 0.95), 1),
          "p99_ms": round(1000 * percentile(lat, 0.99), 1),
          "max_ms": round(1000 * max(lat, default=float("nan")), 1),
          "status": dict(sorted(stats["status"].items())),
          "mean_batch": round(queries / calls, 2) if calls else None,
          "loadavg": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--url", default="http://127.0.0.1:8080")
  p.add_argument("--clients", type=int, default=1)
  p.add_argument("--seconds", type=float, default=10.0)
  p.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s in total")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--num_items", type=int, default=1682)
  p.add_argument("--timeout", type=float, default=30.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--api_key", default="")
  args = p.parse_args()
  host = urllib.parse.urlsplit(args.url).hostname or ""
  if host not in LOOPBACK:
    p.error(f"--url={args.url}: loopback hosts only ({', '.join(LOOPBACK)})")
  if not 1 <= args.clients <= MAX_CLIENTS:
    p.error(f"--clients={args.clients}: 1 to {MAX_CLIENTS}")
  if not 0 < args.seconds <= MAX_SECONDS:
    p.error(f"--seconds={args.seconds}: more than 0, at most {MAX_SECONDS}")
  if args.rate < 0:
    p.error("--rate must be >= 0")
  print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
  main()
