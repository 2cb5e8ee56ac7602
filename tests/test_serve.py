"""`lcrec_jax.serve`: the batcher (fake batch functions), the engine against `recommend`, the
HTTP app in process (TestClient), and one real server process (SIGTERM drain).

The model tests use the finished-run layout of tests/test_recommend.py (MovieLens-100K
titles, a random tiny LLaMA) and compile the beam search for two batch sizes."""

import asyncio
import collections
import concurrent.futures
import copy
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from lcrec_jax.serve.batcher import Batcher, DeadlineExceeded, Overloaded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- batcher (no model) --------------------------------------------------------------------


class _Recorder:
  """A batch function that records every call and answers ``query * 10``."""

  def __init__(self, delay_s=0.0):
    self.delay_s, self.calls, self.lock = delay_s, [], threading.Lock()

  def __call__(self, queries):
    time.sleep(self.delay_s)
    with self.lock:
      self.calls.append(list(queries))
    return [q * 10 for q in queries]

  def computed(self):
    return [q for call in self.calls for q in call]


def test_batcher_packs_concurrent_queries_and_answers_each_once():
  fn = _Recorder(delay_s=0.05)

  async def go():
    b = Batcher(fn, max_batch=4, max_wait_s=0.05, queue_size=64)
    await b.start()
    outs = await asyncio.gather(*(b.submit([i], 5.0) for i in range(10)),
                                b.submit([100, 101, 102], 5.0))
    await b.stop()
    return outs

  outs = asyncio.run(go())
  assert outs[:10] == [[i * 10] for i in range(10)] and outs[10] == [1000, 1010, 1020]
  assert sorted(fn.computed()) == list(range(10)) + [100, 101, 102]  # each exactly once
  assert max(len(c) for c in fn.calls) == 4 and len(fn.calls) <= 5   # packed, <= max_batch


def test_batcher_waits_at_most_max_wait_for_company():
  fn = _Recorder()

  async def go():
    b = Batcher(fn, max_batch=8, max_wait_s=0.02, queue_size=8)
    await b.start()
    t0 = time.perf_counter()
    out = await b.submit([7], 5.0)
    dt = time.perf_counter() - t0
    await b.stop()
    return out, dt

  out, dt = asyncio.run(go())
  assert out == [70] and 0.015 <= dt < 1.0 and fn.calls == [[7]]


def test_batcher_overload_refuses_at_once_and_answers_every_accepted_query():
  fn = _Recorder(delay_s=0.1)

  async def go():
    b = Batcher(fn, max_batch=2, max_wait_s=0.0, queue_size=4)
    await b.start()
    tasks = [asyncio.create_task(b.submit([i], 10.0)) for i in range(40)]
    res = await asyncio.gather(*tasks, return_exceptions=True)
    await b.stop()
    return res

  res = asyncio.run(go())
  accepted = [i for i, r in enumerate(res) if not isinstance(r, Exception)]
  refused = [r for r in res if isinstance(r, Exception)]
  assert refused and all(isinstance(r, Overloaded) and r.retry_after >= 1 for r in refused)
  assert len(accepted) <= 4 + 2 + 1  # the queue, one batch in flight, one being collected
  assert all(res[i] == [i * 10] for i in accepted)
  assert sorted(fn.computed()) == accepted  # computed once each, refused ones never


def test_batcher_deadline_drops_queued_queries_unstarted():
  fn = _Recorder(delay_s=0.3)

  async def go():
    b = Batcher(fn, max_batch=1, max_wait_s=0.0, queue_size=8)
    await b.start()
    first = asyncio.create_task(b.submit([1], 5.0))
    await asyncio.sleep(0.05)  # [1] is being computed
    with pytest.raises(DeadlineExceeded):
      await b.submit([2], 0.05)
    assert await first == [10]
    await b.stop()

  asyncio.run(go())
  assert fn.computed() == [1]  # [2] gave up while queued: never computed


def test_batcher_batch_error_reaches_each_caller_and_worker_survives():
  calls = []

  def fn(queries):
    calls.append(queries)
    if 13 in queries:
      raise RuntimeError("boom")
    return queries

  async def go():
    b = Batcher(fn, max_batch=1, max_wait_s=0.0, queue_size=8)
    await b.start()
    with pytest.raises(RuntimeError, match="boom"):
      await b.submit([13], 5.0)
    out = await b.submit([5], 5.0)
    await b.stop()
    return out

  assert asyncio.run(go()) == [5]


def test_batcher_stop_drains_accepted_queries():
  fn = _Recorder(delay_s=0.05)

  async def go():
    b = Batcher(fn, max_batch=2, max_wait_s=0.0, queue_size=16)
    await b.start()
    tasks = [asyncio.create_task(b.submit([i], 10.0)) for i in range(6)]
    await asyncio.sleep(0)
    await b.stop()
    assert all(t.done() for t in tasks)
    with pytest.raises(Overloaded):
      await b.submit([9], 1.0)
    return [t.result() for t in tasks]

  assert asyncio.run(go()) == [[i * 10] for i in range(6)]


# --- engine and app (a real finished run) --------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  from tests.test_recommend import _write_run
  from lcrec_jax import recommend as rec
  from lcrec_jax.serve.engine import Engine
  workdir = str(tmp_path_factory.mktemp("run"))
  _write_run(workdir)
  run = rec.load_finished_run(workdir, "export")
  return workdir, run, Engine(run, (1, 4))


@pytest.fixture(scope="module")
def client(served):
  from fastapi.testclient import TestClient
  from lcrec_jax.serve.app import Settings, create_app
  app = create_app(served[2], Settings(max_batch=4, max_wait_ms=20, warmup=False,
                                       max_history=30, max_body_bytes=4096))
  with TestClient(app) as c:
    _wait_ready(c)
    yield c


def _wait_ready(c, timeout_s=60):
  t0 = time.time()
  while c.get("/readyz").status_code != 200:
    assert time.time() - t0 < timeout_s, "not ready"
    time.sleep(0.05)


# Histories (item ids / titles), a k, exclude_seen and template each; the 20-item one
# lands in the larger prompt bucket.
CASES = [(["Toy Story", "Heat", "50"], 5, True, None),
         (["50"], 3, True, None),
         (["1", "2", "3", "4", "5", "6", "7", "8"], 10, False, None),
         (["Star Wars", "Fargo", "Contact"], 20, True, 1),
         (["Heat", "Toy Story"], 7, True, None),
         ([str(i) for i in range(100, 120)], 4, True, 2)]


@pytest.mark.slow
def test_engine_batches_equal_recommend_row_by_row(served):
  """A batch with both prompt buckets, mixed k / exclude_seen / template, padded to a
  compiled size, gives each history exactly recommend's answer."""
  _, run, engine = served
  queries = [engine.query(engine.resolve(h), k, ex, t) for h, k, ex, t in CASES]
  assert len({engine.decoder.bucket_of(len(q.prompt)) for q in queries}) == 2
  got = engine.run_batch(queries)
  for (h, k, ex, t), q, answer in zip(CASES, queries, got):
    want = rec_answer(run, q.history, k, ex, t)
    assert [r["item_id"] for r in answer] == [r["item_id"] for r in want]
    assert [r["score"] for r in answer] == pytest.approx([r["score"] for r in want], abs=1e-5)
    assert len(answer) == k
    if ex:
      assert not {r["item_id"] for r in answer} & {run.dataset.items[i].item_id
                                                    for i in q.history}


def rec_answer(run, history, k, exclude_seen, template):
  from lcrec_jax import recommend as rec
  return rec.recommend(run, list(history), k, template_id=template,
                       include_history=not exclude_seen)


@pytest.mark.slow
def test_http_concurrent_requests_equal_sequential_ones(client):
  bodies = [{"history": h, "k": k, "exclude_seen": ex, "template": t} for h, k, ex, t in CASES]
  seq = [client.post("/v1/recommend", json=b) for b in bodies]
  assert [r.status_code for r in seq] == [200] * len(bodies)
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    conc = list(pool.map(lambda b: client.post("/v1/recommend", json=b), bodies * 2))
  for r, s in zip(conc, seq * 2):
    assert r.status_code == 200
    assert [x["item_id"] for x in r.json()["items"]] == [x["item_id"] for x in s.json()["items"]]
  batch = client.post("/v1/recommend:batch", json={"requests": bodies})
  assert batch.status_code == 200
  assert [[x["item_id"] for x in res["items"]] for res in batch.json()["results"]] == [
      [x["item_id"] for x in s.json()["items"]] for s in seq]
  body = seq[0].json()
  assert [h["title"] for h in body["history"]] == ["Toy Story (1995)", "Heat (1995)",
                                                   "Star Wars (1977)"]
  assert body["k"] == 5 and body["exclude_seen"] and len(body["items"]) == 5
  sizes = [line for line in client.get("/metrics").text.splitlines()
           if line.startswith("lcrec_serve_batch_size_count")]
  assert sizes and float(sizes[0].split()[-1]) < len(bodies) * 3 + 1  # some were packed


@pytest.mark.slow
@pytest.mark.parametrize("body,field,status", [
    ({"history": ["Toy Story"], "k": 0}, "k", 422),
    ({"history": ["Toy Story"], "k": 21}, "k", 422),
    ({"history": ["Toy Story"], "k": "ten"}, "k", 422),
    ({"history": []}, "history", 422),
    ({"history": " ; "}, "history", 422),
    ({"history": ["50"] * 31}, "history", 422),
    ({"history": ["x" * 301]}, "history[0]", 422),
    ({"history": ["Toy Story", "Godfathr Part"]}, "history[1]", 422),
    ({"history": ["cape fear"]}, "history[0]", 422),
    ({"history": ["50"], "template": 99}, "template", 422),
    ({"history": ["50"], "color": "red"}, "color", 422),
    ({"k": 3}, "history", 422),
    ({"requests": [{"history": ["50"]}, {"history": ["50"], "k": 99}]}, "requests[1].k", 422),
])
def test_http_invalid_requests_name_the_field(client, body, field, status):
  path = "/v1/recommend:batch" if "requests" in body else "/v1/recommend"
  r = client.post(path, json=body)
  assert r.status_code == status, r.text
  out = r.json()
  assert out["field"] == field and out["error"].startswith(field)
  assert "Traceback" not in r.text
  if body.get("history") == ["Toy Story", "Godfathr Part"]:
    assert [c["title"] for c in out["closest"]][:2] == ["Godfather, The (1972)",
                                                        "Godfather: Part II, The (1974)"]


@pytest.mark.slow
def test_http_oversized_bad_json_items_and_probes(client):
  big = client.post("/v1/recommend", content=b'{"history": ["' + b"1" * 5000 + b'"]}',
                    headers={"content-type": "application/json"})
  assert big.status_code == 422 and big.json()["field"] == "body"
  def chunks():  # no Content-Length: counted as it arrives
    yield b'{"history": ["'
    for _ in range(100):
      yield b"1" * 50
    yield b'"]}'
  chunked = client.post("/v1/recommend", content=chunks(),
                        headers={"content-type": "application/json"})
  assert chunked.status_code == 422 and chunked.json()["field"] == "body"
  form = client.post("/v1/recommend", content=b'{"history": ["50"]}')
  assert form.status_code == 422 and "Content-Type: application/json" in form.json()["error"]
  bad = client.post("/v1/recommend", content=b"{not json",
                    headers={"content-type": "application/json"})
  assert bad.status_code == 422 and "Traceback" not in bad.text
  assert client.get("/v1/nope").status_code == 404
  found = client.get("/v1/items", params={"q": "batman", "limit": 3}).json()["items"]
  assert [f["title"] for f in found] == ["Batman (1989)", "Batman Forever (1995)",
                                         "Batman Returns (1992)"]
  assert client.get("/v1/items", params={"q": "50"}).json()["items"] == [
      {"item_id": "50", "title": "Star Wars (1977)"}]
  assert client.get("/v1/items").status_code == 422
  assert client.get("/healthz").json() == {"status": "ok"}
  assert client.get("/readyz").json()["ready"] is True
  text = client.get("/metrics").text
  assert 'lcrec_serve_requests_total{path="/v1/recommend",status="422"}' in text
  assert "lcrec_serve_request_seconds_bucket" in text and "lcrec_serve_queue_depth" in text


@pytest.mark.slow
def test_http_overload_gives_503_and_answers_every_accepted_request(served):
  """A slow engine, a queue of 2: a burst of 24 gets 200s and 503s (Retry-After), no other
  status, and every 200 is computed exactly once."""
  from fastapi.testclient import TestClient
  from lcrec_jax.serve.app import Settings, create_app
  engine = copy.copy(served[2])
  computed, lock = [], threading.Lock()

  def slow(queries):
    time.sleep(0.2)
    with lock:
      computed.extend(q.history for q in queries)
    return served[2].run_batch(queries)

  engine.run_batch = slow
  app = create_app(engine, Settings(max_batch=1, queue_size=2, warmup=False, max_wait_ms=0))
  bodies = [{"history": [str(i + 1)], "k": 3} for i in range(24)]
  with TestClient(app) as c:
    _wait_ready(c)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
      res = list(pool.map(lambda b: c.post("/v1/recommend", json=b), bodies))
    metrics = c.get("/metrics").text
  codes = [r.status_code for r in res]
  assert set(codes) == {200, 503}, codes
  assert all(r.headers["retry-after"].isdigit() for r in res if r.status_code == 503)
  ok = [b["history"][0] for b, r in zip(bodies, res) if r.status_code == 200]
  by_number = {it.item_id: i for i, it in enumerate(served[1].dataset.items)}
  assert sorted(h for (h,) in computed) == sorted(by_number[i] for i in ok)
  assert f'status="503"}} {float(codes.count(503))}' in metrics


@pytest.mark.slow
def test_http_engine_failure_is_a_bare_500_and_the_server_goes_on(served):
  from fastapi.testclient import TestClient
  from lcrec_jax.serve.app import Settings, create_app
  engine = copy.copy(served[2])

  def flaky(queries):
    if any(q.history == (0,) for q in queries):
      raise RuntimeError("device lost")
    return served[2].run_batch(queries)

  engine.run_batch = flaky
  app = create_app(engine, Settings(max_batch=1, warmup=False))
  with TestClient(app, raise_server_exceptions=False) as c:
    _wait_ready(c)
    r = c.post("/v1/recommend", json={"history": ["1"], "k": 2})
    assert r.status_code == 500 and r.json() == {"error": "internal error (logged by the server)"}
    assert "Traceback" not in r.text and "device lost" not in r.text
    assert c.post("/v1/recommend", json={"history": ["2"], "k": 2}).status_code == 200


@pytest.mark.slow
def test_http_bearer_token(served):
  from fastapi.testclient import TestClient
  from lcrec_jax.serve.app import Settings, create_app
  app = create_app(served[2], Settings(api_key="s3cret", warmup=False))
  with TestClient(app) as c:
    assert c.get("/healthz").status_code == 200
    assert c.get("/v1/items", params={"q": "heat"}).status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = c.get("/v1/items", params={"q": "heat"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["items"]


# --- the command ---------------------------------------------------------------------------


def _gauge(url, name):
  import httpx
  for line in httpx.get(url + "/metrics").text.splitlines():
    if line.startswith(name + " "):
      return float(line.split()[-1])
  raise AssertionError(f"{name} not in /metrics")


def _env():
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return env


def test_non_loopback_host_needs_an_api_key(tmp_path):
  out = subprocess.run([sys.executable, "-m", "lcrec_jax.serve", f"--workdir={tmp_path}",
                        "--host=0.0.0.0"], capture_output=True, text=True, cwd=REPO,
                       env=_env(), timeout=120)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.startswith("serve: error: --host=0.0.0.0 is not a loopback address")


@pytest.mark.slow
def test_server_process_answers_then_drains_on_sigterm(served):
  """The real command on an ephemeral port: ready after compiling, requests equal
  `recommend`, and a SIGTERM with requests in flight answers them all and exits 0."""
  import httpx
  workdir, run, _ = served
  proc = subprocess.Popen(
      [sys.executable, "-m", "lcrec_jax.serve", f"--workdir={workdir}", "--port=0",
       "--max_batch=16", "--batch_sizes=1,16", "--max_wait_ms=3000", "--params=export"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())
  try:
    line = proc.stdout.readline()
    assert line.startswith("serve: listening on http://127.0.0.1:"), (line, proc.stderr.read())
    url = line.split()[3]
    with httpx.Client(base_url=url, timeout=120) as c:
      assert c.get("/healthz").status_code == 200
      t0 = time.time()
      while c.get("/readyz").status_code != 200:
        assert time.time() - t0 < 240 and proc.poll() is None
        time.sleep(0.2)
      r = c.post("/v1/recommend", json={"history": "Toy Story; Heat; 50", "k": 5})
      assert r.status_code == 200
      ids = run.dataset.item_number()
      want = rec_answer(run, [ids[i] for i in ("1", "273", "50")], 5, True, None)
      assert [x["item_id"] for x in r.json()["items"]] == [x["item_id"] for x in want]
    bodies = [{"history": [str(i + 1), str(i + 2)], "k": 4} for i in range(12)]

    def post(b):
      with httpx.Client(base_url=url, timeout=120) as c:
        return c.post("/v1/recommend", json=b).status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
      futs = [pool.submit(post, b) for b in bodies]
      t0 = time.time()  # the worker waits --max_wait_ms for company: all 12 are in flight
      while _gauge(url, "lcrec_serve_in_flight") < len(bodies):
        assert time.time() - t0 < 30
        time.sleep(0.05)
      proc.send_signal(signal.SIGTERM)
      codes = [f.result() for f in futs]
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
    assert codes == [200] * len(bodies)
    assert "Traceback" not in proc.stderr.read()
  finally:
    if proc.poll() is None:
      proc.kill()


# --- the load benchmark --------------------------------------------------------------------


def _serve_load():
  """benchmarks/serve_load.py as a module (benchmarks/ is not a package)."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import serve_load  # pylint: disable=g-import-not-at-top
  return serve_load


def test_serve_load_percentile_and_loopback_only():
  import math
  serve_load = _serve_load()
  xs = [float(x) for x in range(1, 101)]  # nearest rank: the ceil(q * n)-th smallest
  for q in (0.5, 0.95, 0.99, 1.0):
    assert serve_load.percentile(xs[::-1], q) == xs[math.ceil(q * len(xs)) - 1]
  assert math.isnan(serve_load.percentile([], 0.5))
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "serve_load.py"),
                        "--url=http://10.1.2.3:8080"], capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 2 and "loopback hosts only" in out.stderr


def test_serve_load_reopens_a_connection_the_server_closed_while_idle():
  """A server that closes keep-alive connections idle for 0.2 s (as uvicorn does after 5 s):
  a request after 0.35 s idle must go out on a fresh connection and get its 200, where
  writing it on the closed one reads EOF (the resets the overload benchmark once counted)."""
  serve_load = _serve_load()

  async def scenario(idle_s: float) -> list[str]:
    accepted = []

    async def handle(reader, writer):
      accepted.append(1)
      while True:
        try:
          head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.2)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
          break
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
      writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = serve_load.Connection("127.0.0.1", port, {})
    conn.IDLE_S = idle_s
    stats = {"status": collections.Counter(), "latency": []}
    await serve_load.one(conn, {"history": ["1"]}, stats, 5.0)
    await asyncio.sleep(0.35)
    await serve_load.one(conn, {"history": ["1"]}, stats, 5.0)
    conn.close()
    server.close()
    await server.wait_closed()
    return sorted(stats["status"].elements()) + [f"accepted:{len(accepted)}"]

  assert asyncio.run(scenario(0.1)) == ["200", "200", "accepted:2"]
  # the same client without the reopen (idle limit above the server's) fails as it did
  assert asyncio.run(scenario(60.0)) == ["200", "error:ConnectionResetError", "accepted:1"]


def test_serve_load_without_a_server_is_one_line_naming_the_url():
  import socket
  with socket.socket() as sock:  # a loopback port nothing listens on once closed
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "serve_load.py"),
                        f"--url=http://127.0.0.1:{port}", "--seconds=1"],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  err = out.stderr.strip()
  assert err.startswith(f"serve_load: error: --url=http://127.0.0.1:{port}: no server answers "
                        "/metrics (") and err.endswith("start python -m lcrec_jax.serve first")
  assert "\n" not in err
