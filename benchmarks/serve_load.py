"""Load test of a local ``python -m lcrec_jax.serve``: N concurrent clients for T seconds.

  python -m lcrec_jax.serve --workdir=runs/ml100k --port=8080 &
  python benchmarks/serve_load.py --url=http://127.0.0.1:8080 --clients=32 --seconds=30 --k=10

Each client (one keep-alive HTTP/1.1 connection; a minimal asyncio client, so that it takes
little of the CPU it shares with the server; standard library only, so it runs after the
README's install without the test extras) sends ``POST /v1/recommend`` requests back to
back (a fresh seeded history of 5-20 item ids out of ``--num_items`` each time; MovieLens
ids are 1..1682) and waits for the answer. Reports, as one json line: requests per second answered 200, latency
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
import urllib.request

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


class Connection:
  """One HTTP/1.1 keep-alive connection, as little client CPU per request as possible (the
  client shares the machine with the server it measures).

  A connection idle for longer than ``IDLE_S`` is reopened before it is used: uvicorn
  closes keep-alive connections idle for 5 s (``timeout_keep_alive``), and a request
  written to one of those reads EOF, a failure the server never saw (HTTP clients retry
  such a stale connection; this one does not send on it)."""

  IDLE_S = 4.0

  def __init__(self, host: str, port: int, headers: dict):
    self.host, self.port = host, port
    self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    self.reader = self.writer = None
    self.last_used = 0.0

  async def post(self, path: str, body: bytes) -> int:
    """The response status (the body is read and dropped)."""
    if self.writer is not None and time.monotonic() - self.last_used > self.IDLE_S:
      self.close()
    if self.writer is None:
      self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
    self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {len(body)}\r\n{self.extra}\r\n"
                      .encode() + body)
    await self.writer.drain()
    line = await self.reader.readline()
    if not line:
      raise ConnectionResetError("closed by the server")
    status, length, close = int(line.split()[1]), 0, False
    while (line := await self.reader.readline()) not in (b"\r\n", b""):
      key, _, value = line.decode("latin-1").partition(":")
      key = key.strip().lower()
      if key == "content-length":
        length = int(value)
      elif key == "connection":
        close = value.strip().lower() == "close"
    await self.reader.readexactly(length)
    self.last_used = time.monotonic()
    if close:
      self.close()
    return status

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
    self.reader = self.writer = None


async def one(conn: Connection, body: dict, stats: dict, timeout: float) -> None:
  t0 = time.perf_counter()
  try:
    key = str(await asyncio.wait_for(conn.post("/v1/recommend", json.dumps(body).encode()),
                                     timeout))
  except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
    conn.close()
    key = f"error:{type(e).__name__}"
  dt = time.perf_counter() - t0
  stats["status"][key] += 1
  if key == "200":
    stats["latency"].append(dt)


async def closed_loop(new_conn, args, stats, stop_at: float) -> None:
  async def worker(i: int) -> None:
    rng, conn = random.Random(args.seed * 1000 + i), new_conn()
    while time.perf_counter() < stop_at:
      await one(conn, {"history": history(rng, args.num_items), "k": args.k}, stats,
                args.timeout)
    conn.close()
  await asyncio.gather(*(worker(i) for i in range(args.clients)))


async def open_loop(new_conn, args, stats, stop_at: float) -> None:
  rng, tasks, idle, t0 = random.Random(args.seed), set(), [], time.perf_counter()
  opened = n = 0

  async def send(conn):
    await one(conn, {"history": history(rng, args.num_items), "k": args.k}, stats,
              args.timeout)
    idle.append(conn)

  while time.perf_counter() < stop_at:
    await asyncio.sleep(max(0.0, t0 + n / args.rate - time.perf_counter()))
    n += 1
    if not idle and opened < args.clients:  # at most --clients open requests
      idle.append(new_conn())
      opened += 1
    if not idle:
      stats["status"]["not_sent:client_limit"] += 1
      continue
    t = asyncio.create_task(send(idle.pop()))
    tasks.add(t)
    t.add_done_callback(tasks.discard)
  await asyncio.gather(*tasks)
  for conn in idle:
    conn.close()


def batch_sizes(url: str, headers: dict) -> dict[str, float]:
  """Mean queries per beam-search call and calls, from the server's /metrics."""
  req = urllib.request.Request(url + "/metrics", headers=headers)
  with urllib.request.urlopen(req, timeout=10) as resp:  # loopback only, checked in main
    text = resp.read().decode()
  vals = {}
  for line in text.splitlines():
    for name in ("lcrec_serve_batch_size_sum", "lcrec_serve_batch_size_count"):
      if line.startswith(name + " "):
        vals[name] = float(line.split()[-1])
  return vals


async def run(args) -> dict:
  headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
  try:
    before = batch_sizes(args.url, headers)
  except OSError as e:  # urllib's URLError too: nothing listens, or it is not the server
    raise SystemExit(f"serve_load: error: --url={args.url}: no server answers /metrics "
                     f"({getattr(e, 'reason', e)}); start python -m lcrec_jax.serve first")
  stats = {"status": collections.Counter(), "latency": []}
  parts = urllib.parse.urlsplit(args.url)
  new_conn = lambda: Connection(parts.hostname, parts.port or 80, headers)  # noqa: E731
  warm = new_conn()
  if await warm.post("/v1/recommend", json.dumps({"history": ["1", "2"], "k": args.k})
                     .encode()) != 200:
    raise SystemExit(f"{args.url}/v1/recommend does not answer 200 (is it ready?)")
  warm.close()
  t0 = time.perf_counter()
  stop_at = t0 + args.seconds
  if args.rate:
    await open_loop(new_conn, args, stats, stop_at)
  else:
    await closed_loop(new_conn, args, stats, stop_at)
  wall = time.perf_counter() - t0
  try:
    after = batch_sizes(args.url, headers)
  except OSError:  # the server went away during the run: its counts are still reported
    after = before
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
