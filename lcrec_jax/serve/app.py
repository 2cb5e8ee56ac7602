"""The HTTP API: FastAPI routes over an :class:`~lcrec_jax.serve.engine.Engine` and a
:class:`~lcrec_jax.serve.batcher.Batcher`.

    app = create_app(engine, Settings(max_batch=16))   # an ASGI app; uvicorn runs it

Routes (JSON; the OpenAPI schema at ``/docs``):

* ``POST /v1/recommend`` ``{"history": [...] | "a; b", "k": 10, "exclude_seen": true,
  "template": null}`` -> ``{"items": [{"rank", "item_id", "title", "score", "prob"}],
  "history": [{"item_id", "title"}], "k", "template", "exclude_seen"}``;
* ``POST /v1/recommend:batch`` ``{"requests": [<as above>, ...]}`` -> ``{"results": [...]}``;
* ``GET /v1/items?q=...&limit=10`` -> ``{"items": [{"item_id", "title"}]}``;
* ``GET /healthz`` (the process answers), ``GET /readyz`` (model compiled: 200, else 503);
* ``GET /metrics``: Prometheus text (``lcrec_serve_*``, see :class:`Metrics`).

Errors are ``{"error": "<one line>", "field": ...}``: 422 for a bad field (``k``,
``history[2]``, ``body``; an unknown title adds ``"closest"``), 401 without the bearer
token when one is set, 503 with ``Retry-After`` when the queue is full, the deadline
passed or the model is not ready yet; never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import threading
import time
from typing import Any, Union

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
import prometheus_client as prom
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from lcrec_jax.serve.batcher import Batcher, DeadlineExceeded, Overloaded
from lcrec_jax.serve.engine import Engine, FieldError

log = logging.getLogger("lcrec_jax.serve")
OPEN_PATHS = ("/healthz", "/readyz")  # answered without the API key (probes)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Server limits (flags of ``python -m lcrec_jax.serve``)."""

  max_batch: int = 16            # queries per beam-search call
  max_wait_ms: float = 5.0       # how long the oldest query waits for company
  queue_size: int = 256          # queries waiting; past it 503
  deadline_ms: float = 10000.0   # per request, queue + compute; past it 503
  max_body_bytes: int = 65536
  max_history: int = 200         # history entries per query
  max_entry_chars: int = 300     # characters per history entry / items query
  max_batch_requests: int = 64   # queries per /v1/recommend:batch
  api_key: str | None = None     # bearer token; None = no authentication
  warmup: bool = True            # compile at start-up (tests may skip)


class RecommendRequest(BaseModel):
  """One history to recommend for."""

  model_config = ConfigDict(extra="forbid")
  history: Union[list[Union[StrictStr, StrictInt]], StrictStr] = Field(
      description="Item ids or titles, oldest first: a list, or one ';'-separated string "
                  "(matched as `python -m lcrec_jax.recommend --history` matches them).")
  k: int = Field(10, description="How many items (1 to the run's eval.num_beams).")
  exclude_seen: bool = Field(True, description="Ban the history's items inside the search.")
  template: int | None = Field(None, description="seqrec template (default "
                                                 "eval.template_ids[0]).")


class BatchRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  requests: list[RecommendRequest]


class Metrics:
  """The Prometheus series, in their own registry (one app, one registry).

  * ``lcrec_serve_requests_total{path, status}``: answered HTTP requests;
  * ``lcrec_serve_request_seconds{path}``: latency histogram, arrival to response;
  * ``lcrec_serve_batch_size``: queries per beam-search call (histogram);
  * ``lcrec_serve_batch_seconds``: time per beam-search call (histogram);
  * ``lcrec_serve_queue_depth``: queries waiting for a batch (gauge);
  * ``lcrec_serve_in_flight``: ``/v1`` requests received and not yet answered (gauge);
  * ``lcrec_serve_ready``: 1 once the model is compiled.
  """

  def __init__(self, max_batch: int):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("lcrec_serve_requests", "HTTP requests answered",
                                 ["path", "status"], registry=r)
    self.latency = prom.Histogram(
        "lcrec_serve_request_seconds", "request latency, arrival to response", ["path"],
        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
    sizes = sorted({1 << i for i in range(max_batch.bit_length() + 1)} | {max_batch})
    self.batch_size = prom.Histogram("lcrec_serve_batch_size", "queries per beam-search call",
                                     buckets=sizes, registry=r)
    self.batch_seconds = prom.Histogram(
        "lcrec_serve_batch_seconds", "seconds per beam-search call",
        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5), registry=r)
    self.queue_depth = prom.Gauge("lcrec_serve_queue_depth", "queries waiting for a batch",
                                  registry=r)
    self.in_flight = prom.Gauge("lcrec_serve_in_flight", "/v1 requests being answered",
                                registry=r)
    self.ready = prom.Gauge("lcrec_serve_ready", "1 once the model is loaded and compiled",
                            registry=r)

  def on_batch(self, size: int, seconds: float) -> None:
    self.batch_size.observe(size)
    self.batch_seconds.observe(seconds)


def _error(status: int, message: str, field: str | None = None, retry_after: int | None = None,
           **extra: Any) -> JSONResponse:
  body = {"error": message, **({"field": field} if field else {}), **extra}
  headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
  return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
  """Pure ASGI middleware (outermost): bearer token, full queue, body size, metrics."""

  def __init__(self, app: Any, settings: Settings, metrics: Metrics, paths: set[str],
               batcher: Batcher):
    self.app, self.settings, self.metrics, self.paths = app, settings, metrics, paths
    self.batcher = batcher
    self._key = settings.api_key.encode() if settings.api_key else None

  def _authorized(self, scope: dict) -> bool:
    if self._key is None or scope["path"] in OPEN_PATHS:
      return True
    auth = dict(scope.get("headers") or []).get(b"authorization", b"")
    scheme, _, token = auth.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    t0 = time.perf_counter()
    path = scope["path"] if scope["path"] in self.paths else "other"
    status = [500]

    async def send_status(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    limit = self.settings.max_body_bytes
    length = dict(scope.get("headers") or []).get(b"content-length")
    seen = [0]

    async def receive_limited():
      message = await receive()
      if message["type"] == "http.request":
        seen[0] += len(message.get("body", b""))
        if seen[0] > limit:
          raise HTTPException(422, f"body: larger than {limit} bytes")
      return message

    counted = path.startswith("/v1/")
    if counted:
      self.metrics.in_flight.inc()
    try:
      if not self._authorized(scope):
        resp = _error(401, "missing or wrong bearer token (Authorization: Bearer <key>)")
        resp.headers["WWW-Authenticate"] = "Bearer"
        await resp(scope, receive, send_status)
      elif counted and scope["method"] == "POST" and self.batcher.full():
        # A full queue refuses before the body is parsed (shedding stays cheap); the body
        # is still read, so the connection stays usable for the client's next request.
        await _drain(receive, limit)
        await _error(503, f"the request queue is full ({self.batcher.depth()} waiting)",
                     retry_after=self.batcher.retry_after())(scope, receive, send_status)
      elif length is not None and (not length.isdigit() or int(length) > limit):
        await _error(422, f"body: larger than {limit} bytes", "body")(scope, receive,
                                                                      send_status)
      else:
        await self.app(scope, receive_limited, send_status)
    finally:
      if counted:
        self.metrics.in_flight.dec()
      self.metrics.requests.labels(path, str(status[0])).inc()
      self.metrics.latency.labels(path).observe(time.perf_counter() - t0)


async def _drain(receive: Any, limit: int) -> None:
  """Reads (and drops) a request body of up to ``limit`` bytes."""
  seen, more = 0, True
  while more and seen <= limit:
    message = await receive()
    if message["type"] != "http.request":
      return
    seen += len(message.get("body", b""))
    more = message.get("more_body", False)


def _field_of(loc: tuple) -> str:
  """``("body", "requests", 0, "history", 2)`` -> ``requests[0].history[2]``."""
  out = ""
  for part in loc[1:] if loc and loc[0] in ("body", "query") else loc:
    out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
  return out or "body"


class _Service:
  """What the routes share: the engine, the batcher, readiness, request parsing."""

  def __init__(self, engine: Engine, settings: Settings):
    self.engine, self.settings = engine, settings
    self.metrics = Metrics(settings.max_batch)
    self.batcher = Batcher(engine.run_batch, max_batch=settings.max_batch,
                           max_wait_s=settings.max_wait_ms / 1000,
                           queue_size=settings.queue_size, on_batch=self.metrics.on_batch)
    self.metrics.queue_depth.set_function(self.batcher.depth)
    self.ready = threading.Event()
    self.compiled: list[tuple[int, int, float]] = []
    self.error: str | None = None

  def warm(self) -> None:
    """Compiles every (bucket, batch size) (``settings.warmup``), then sets ready."""
    try:
      if self.settings.warmup:
        self.compiled = self.engine.warmup()
        log.info("compiled %d (bucket, batch size) shapes in %.1f s", len(self.compiled),
                 sum(s for *_, s in self.compiled))
      self.ready.set()
      self.metrics.ready.set(1)
    except Exception as e:  # pylint: disable=broad-except
      log.exception("warm-up failed")
      self.error = f"{type(e).__name__}: {e}"

  def parse(self, req: RecommendRequest, prefix: str = ""):
    """The engine's Query for a request; a bad field is a FieldError named with ``prefix``."""
    entries, limits = req.history, self.settings
    if isinstance(entries, str):
      entries = entries.split(";")
      while entries and not entries[-1].strip():
        entries.pop()
    if len(entries) > limits.max_history:
      raise FieldError(f"{prefix}history",
                       f"{len(entries)} entries, at most {limits.max_history}")
    for i, e in enumerate(entries):
      if len(str(e)) > limits.max_entry_chars:
        raise FieldError(f"{prefix}history[{i}]",
                         f"longer than {limits.max_entry_chars} characters")
    try:
      return self.engine.query(self.engine.resolve(entries), req.k, req.exclude_seen,
                               req.template)
    except FieldError as e:
      raise FieldError(prefix + e.field, str(e).split(": ", 1)[1], e.closest) from None

  def answer(self, query, items) -> dict[str, Any]:
    return {"items": items, "history": [self.engine.item_json(i) for i in query.history],
            "k": query.k, "template": query.template, "exclude_seen": bool(query.exclude)}

  async def decode(self, queries: list) -> list | JSONResponse:
    """The answers, or the 503 to send (not ready, queue full, deadline passed)."""
    if not self.ready.is_set():
      return _error(503, self.error or "the model is still compiling (see /readyz)",
                    retry_after=5)
    try:
      return await self.batcher.submit(queries, self.settings.deadline_ms / 1000)
    except Overloaded as e:
      return _error(503, str(e), retry_after=e.retry_after)
    except DeadlineExceeded as e:
      return _error(503, str(e), retry_after=self.batcher.retry_after())


def _bad_field(e: FieldError) -> JSONResponse:
  extra = {"closest": e.closest} if e.closest else {}
  return _error(422, str(e), e.field, **extra)


def _install_error_handlers(app: FastAPI) -> None:
  """Every error as ``{"error", "field"}`` JSON; an unexpected one as a bare 500."""

  @app.exception_handler(RequestValidationError)
  async def _invalid(req: Request, exc: RequestValidationError):
    ctype = req.headers.get("content-type", "")
    if req.method == "POST" and "json" not in ctype:
      return _error(422, f"body: send JSON with Content-Type: application/json (got "
                         f"{ctype or 'none'!r})", "body")
    errs = exc.errors()
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
    field = _field_of(tuple(first.get("loc", ("body",))))
    return _error(422, f"{field}: {first.get('msg', 'invalid')}", field,
                  errors=[{"field": _field_of(tuple(e.get("loc", ()))), "message": e.get("msg")}
                          for e in errs[:10]])

  @app.exception_handler(HTTPException)
  async def _http(_req: Request, exc: HTTPException):
    field = "body" if str(exc.detail).startswith("body:") else None
    return _error(exc.status_code, str(exc.detail), field)

  @app.exception_handler(Exception)
  async def _bug(_req: Request, exc: Exception):
    log.error("internal error: %s: %s", type(exc).__name__, exc)
    return _error(500, "internal error (logged by the server)")


def create_app(engine: Engine, settings: Settings = Settings()) -> FastAPI:
  """The ASGI app; the model is compiled (``settings.warmup``) in a thread at start-up,
  and ``/readyz`` answers 200 only after it. Routes: the module docstring."""
  svc = _Service(engine, settings)

  @contextlib.asynccontextmanager
  async def lifespan(_app: FastAPI):
    await svc.batcher.start()
    warm_task = asyncio.create_task(asyncio.to_thread(svc.warm))
    try:
      yield
    finally:
      await svc.batcher.stop()  # every accepted query answered before the process exits
      await warm_task

  app = FastAPI(title="lcrec-jax", lifespan=lifespan,
                description="Top-K items from a finished lcrec-jax run.")
  app.state.service = svc
  _install_error_handlers(app)

  @app.post("/v1/recommend")
  async def recommend(req: RecommendRequest):
    """Top-k items for one history."""
    try:
      query = svc.parse(req)
    except FieldError as e:
      return _bad_field(e)
    out = await svc.decode([query])
    return out if isinstance(out, JSONResponse) else svc.answer(query, out[0])

  @app.post("/v1/recommend:batch")
  async def recommend_batch(req: BatchRequest):
    """Top-k items for several histories (each as ``/v1/recommend``), in order."""
    n = len(req.requests)
    if not 1 <= n <= settings.max_batch_requests:
      return _error(422, f"requests: {n} entries, give 1 to {settings.max_batch_requests}",
                    "requests")
    try:
      queries = [svc.parse(r, f"requests[{i}].") for i, r in enumerate(req.requests)]
    except FieldError as e:
      return _bad_field(e)
    out = await svc.decode(queries)
    if isinstance(out, JSONResponse):
      return out
    return {"results": [svc.answer(q, o) for q, o in zip(queries, out)]}

  @app.get("/v1/items")
  async def items(q: str = Query(..., min_length=1, max_length=settings.max_entry_chars),
                  limit: int = Query(10, ge=1, le=100)):
    """Items whose id or title matches ``q`` (the matcher of ``recommend``)."""
    return {"items": [engine.item_json(i) for i in engine.matcher.search(q, limit)]}

  @app.get("/healthz")
  async def healthz():
    return {"status": "ok"}

  @app.get("/readyz")
  async def readyz():
    body = {"ready": svc.ready.is_set(), "queue_depth": svc.batcher.depth(),
            "batch_sizes": list(engine.batch_sizes), "max_k": engine.max_k,
            "compiled": len(svc.compiled), **({"error": svc.error} if svc.error else {})}
    return JSONResponse(body, status_code=200 if svc.ready.is_set() else 503)

  @app.get("/metrics")
  async def metrics_text():
    return Response(prom.generate_latest(svc.metrics.registry),
                    media_type=prom.CONTENT_TYPE_LATEST)

  app.add_middleware(_Guard, settings=settings, metrics=svc.metrics,
                     paths={r.path for r in app.routes}, batcher=svc.batcher)
  return app
