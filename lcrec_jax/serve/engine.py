"""The model side of the server: a finished run restored once, its beam search compiled.

:class:`Engine` holds what ``lcrec_jax.recommend`` builds per call (the run, the item
matcher, a :class:`lcrec_jax.eval.evaluate.Decoder` with the trie and code tables, on the
mesh the run's params live on: the eval stage's checkpoint restored onto the recipe's
``config.mesh``, each batch split over ``data`` x ``fsdp``; one device for
``--params=export``) and
decodes *batches* of histories in one constrained beam search per prompt bucket, padded
to the nearest of a few fixed batch sizes compiled at start-up (:meth:`Engine.warmup`).

A query is the same search ``recommend`` runs for the same history: the same prompt
(:func:`lcrec_jax.recommend.history_prompt`), the same beam width
(:func:`lcrec_jax.recommend.beam_width`, one width for every ``k`` up to it, so
``k <= max_k``) and, with ``exclude_seen``, the history banned inside the search per row
(rows without it get an empty ban, which bans nothing).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np

from lcrec_jax import recommend as rec
from lcrec_jax.eval import evaluate as ev
from lcrec_jax.errors import UserError


class FieldError(UserError, ValueError):
  """A request field with a bad value; ``field`` names it (``k``, ``history[2]``).

  ``closest`` lists ``{"item_id", "title"}`` suggestions for an unknown history item.
  """

  def __init__(self, field: str, message: str, closest: Sequence[dict[str, str]] = ()):
    super().__init__(f"{field}: {message}")
    self.field = field
    self.closest = list(closest)


@dataclasses.dataclass(frozen=True)
class Query:
  """One checked, encoded request.

  Attributes:
    history: item numbers, oldest first.
    k: answers wanted (``1 <= k <= Engine.max_k``).
    exclude: item numbers banned inside the search (the history, or none).
    template: seqrec template number.
    prompt: ``[len]`` int32 prompt ids.
  """

  history: tuple[int, ...]
  k: int
  exclude: tuple[int, ...]
  template: int
  prompt: np.ndarray


def default_batch_sizes(max_batch: int) -> tuple[int, ...]:
  """Powers of two below ``max_batch``, and ``max_batch``: ``16 -> (1, 2, 4, 8, 16)``."""
  sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) < max_batch]
  return tuple(sizes + [max_batch])


class Engine:
  """A finished run ready to answer batches of queries; see the module docstring.

  Args:
    run: from :func:`lcrec_jax.recommend.load_finished_run`.
    batch_sizes: the compiled batch sizes; a batch of ``n`` queries of one bucket is
      padded to the smallest size ``>= n`` (the largest is the most per call).
  """

  def __init__(self, run: rec.FinishedRun, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16)):
    if not batch_sizes or min(batch_sizes) < 1:
      raise ValueError(f"batch sizes must be >= 1, got {tuple(batch_sizes)}")
    self.run = run
    self.matcher = rec.ItemMatcher(run.dataset)
    self.decoder = ev.Decoder(run.model, run.tokenizer, run.index,
                              run.config.tasks.buckets, mesh=run.mesh)
    # Restored params stay as they are, sharded on run.mesh; host arrays (the export) go
    # to the default device once, not per call.
    self.params = run.params if run.mesh is not None else jax.device_put(run.params)
    self.num_beams = rec.beam_width(run, 1)
    self.max_k = self.num_beams
    self.batch_sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
    self.default_template = rec.check_template(run, None)

  @property
  def max_batch(self) -> int:
    return self.batch_sizes[-1]

  # --- requests -------------------------------------------------------------------------

  def resolve(self, entries: Sequence[str | int], field: str = "history") -> list[int]:
    """Item numbers of history entries (ids or titles, as ``recommend`` matches them).

    Raises:
      FieldError: an empty, ambiguous or unknown entry, named ``history[i]``; unknown
        ones carry the closest titles.
    """
    out = []
    for i, entry in enumerate(entries):
      try:
        out.append(self.matcher.resolve(str(entry)))
      except rec.RecommendError as e:
        near = self.matcher.search(str(entry), limit=5)
        raise FieldError(f"{field}[{i}]", str(e), [self.item_json(j) for j in near]) from None
    return out

  def query(self, history: Sequence[int], k: int = 10, exclude_seen: bool = True,
            template: int | None = None) -> Query:
    """A :class:`Query` for item numbers ``history``; a bad ``k``/``template`` is a
    :class:`FieldError`."""
    if not history:
      raise FieldError("history", "is empty: give item ids or titles, oldest first")
    if not 1 <= int(k) <= self.max_k:
      raise FieldError("k", f"must be between 1 and {self.max_k} (the beam width), got {k}")
    try:
      template = rec.check_template(self.run, template)
    except rec.RecommendError as e:
      raise FieldError("template", str(e).split(": ", 1)[-1]) from None
    hist = tuple(int(i) for i in history)
    exclude = tuple(sorted(set(hist))) if exclude_seen else ()
    return Query(hist, int(k), exclude, template, rec.history_prompt(self.run, hist, template))

  def item_json(self, i: int) -> dict[str, str]:
    return {"item_id": self.run.dataset.items[i].item_id, "title": self.matcher.titles[i]}

  # --- decoding -------------------------------------------------------------------------

  def pad_size(self, n: int) -> int:
    """The compiled batch size a group of ``n`` (``<= max_batch``) queries runs at."""
    for b in self.batch_sizes:
      if n <= b:
        return b
    raise ValueError(f"{n} queries exceed the largest compiled batch size {self.max_batch}")

  def run_batch(self, queries: Sequence[Query]) -> list[list[dict[str, Any]]]:
    """The ranked answers of ``queries`` (``recommend``'s rows), in order.

    Queries are grouped by prompt bucket; each group (split at ``max_batch``) is one
    beam-search call at the nearest compiled batch size.
    """
    groups: dict[int, list[int]] = {}
    for i, q in enumerate(queries):
      groups.setdefault(self.decoder.bucket_of(len(q.prompt)), []).append(i)
    out: list[list[dict[str, Any]]] = [[] for _ in queries]
    for rows in groups.values():
      for s in range(0, len(rows), self.max_batch):
        part = rows[s:s + self.max_batch]
        items, scores = self.decoder.rank(
            self.params, [queries[i].prompt for i in part], num_beams=self.num_beams,
            mode="trie", batch_size=self.pad_size(len(part)),
            exclude=[list(queries[i].exclude) for i in part])
        for r, i in enumerate(part):
          out[i] = rec.ranked_items(self.run, items[r], scores[r], queries[i].k)
    return out

  def warm_buckets(self) -> tuple[int, ...]:
    """Prompt buckets a seqrec prompt can land in (1 to ``tasks.max_history`` items, any
    template)."""
    from lcrec_jax.tasks import prompts  # pylint: disable=g-import-not-at-top
    max_history = int(self.run.config.tasks.max_history)  # resolved: every key is set
    found = set()
    for t in range(len(prompts.templates("seqrec"))):
      for n in (1, max_history):
        found.add(self.decoder.bucket_of(len(rec.history_prompt(self.run, [0] * n, t))))
    lo, hi = min(found), max(found)
    return tuple(b for b in self.decoder.buckets if lo <= b <= hi)

  def warmup(self, buckets: Sequence[int] | None = None) -> list[tuple[int, int, float]]:
    """Compiles the search for every (bucket, batch size); ``[(bucket, size, seconds)]``."""
    done = []
    for b in (self.warm_buckets() if buckets is None else buckets):
      prompt = np.full((b,), self.decoder.pad_id, np.int32)
      for size in self.batch_sizes:
        t0 = time.perf_counter()
        self.decoder.rank(self.params, [prompt] * size, num_beams=self.num_beams, mode="trie",
                          batch_size=size, exclude=[[]] * size)
        done.append((b, size, time.perf_counter() - t0))
    return done
