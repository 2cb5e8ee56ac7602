"""Synthetic LC-Rec json datasets at a chosen scale, with structure a model can learn.

LC-Rec's Amazon data (Instruments: 24,772 users, 9,922 items, 206,153 interactions,
median 6 items per user, no repeats, title + description ~760 characters) cannot be
downloaded here; this writes files of the same shape and size so that scale can be
tested and benchmarked without them::

  python -m lcrec_jax.data.synthetic --out=/tmp/synth --name=Synth --users=24772 \\
      --items=9922 --interactions=206153 --text_chars=760 --seed=0

writes ``/tmp/synth/Synth.inter.json`` and ``/tmp/synth/Synth.item.json`` (the format
:mod:`lcrec_jax.data.lcrec_json` reads; ``data.format='lcrec'``, ``data.path=/tmp/synth``,
``data.name=Synth``).

The generative story (every draw from one ``numpy`` generator seeded by ``seed``):

* **Groups.** Items fall into ``num_groups`` latent groups (default ``items // 100``),
  groups into ``num_groups // 8`` super-groups. Every group has a made-up name, a few
  brands and its own word pool (pseudo-words built from syllables); item popularity is
  Zipf-like within a group, and groups are Zipf-like too.
* **Text reflects the group.** An item's ``title`` is two words of its group's pool, a
  brand and a model number; ``categories`` is ``"<super-group>, <group>"``; ``brand`` is
  one of the group's brands; ``description`` is sentences whose words come mostly
  (``group_word_share``) from the group's pool, the rest from a shared pool. Title +
  description lengths are log-normal with mean ``text_chars`` (a long tail, as real
  descriptions have).
* **Users move between groups.** Each group has ``successors`` (3) successor groups. A
  user starts in a popular group; after each item they stay in the group with
  probability ``p_stay``, move to a successor with ``p_move``, else jump to a random
  group. Items within a group are drawn by popularity, never one the user already has
  (no repeats).
* **Lengths.** At least 5 items per user (LC-Rec's 5-core filtering; 3 when the asked
  average is below 6), log-normal extra items, then adjusted so the total is exactly
  ``interactions``.

So the next item's group is predictable from the last item's group (read off its
``categories``), while overall popularity is flat across groups: a group-transition
predictor beats popularity by a wide margin (``tests/test_synthetic.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
import sys
from typing import Any

from absl import app, flags, logging
import numpy as np

from lcrec_jax.errors import EXIT_USER_ERROR, ConfigError, UserError

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_FILLER = ("with", "and", "for", "the", "a", "its", "built", "made", "to", "in", "every",
           "day", "use", "great", "solid", "light", "easy", "quality", "design", "that")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """What to generate (see the module docstring)."""

  users: int
  items: int
  interactions: int
  text_chars: int = 760
  num_groups: int = 0        # 0 = max(4, items // 100)
  successors: int = 3
  p_stay: float = 0.5
  p_move: float = 0.4
  group_word_share: float = 0.7
  seed: int = 0

  def check(self) -> None:
    """Raises ConfigError naming the flag that cannot work."""
    if self.users < 1 or self.items < 2:
      raise ConfigError(f"--users={self.users} and --items={self.items}: need >= 1 user and "
                        ">= 2 items")
    if self.interactions < 3 * self.users:
      raise ConfigError(f"--interactions={self.interactions}: every user needs >= 3 "
                        f"interactions, so >= {3 * self.users} for {self.users} users")
    if self.interactions > self.users * self.items:
      raise ConfigError(f"--interactions={self.interactions}: more than users x items "
                        f"({self.users * self.items}) is impossible without repeats")
    if self.text_chars < 40:
      raise ConfigError(f"--text_chars={self.text_chars}: need >= 40 (a title alone is ~30)")
    if not (0 <= self.p_stay and 0 <= self.p_move and self.p_stay + self.p_move <= 1):
      raise ConfigError(f"p_stay={self.p_stay}, p_move={self.p_move}: need probabilities "
                        "with p_stay + p_move <= 1")

  @property
  def groups(self) -> int:
    return self.num_groups or max(4, self.items // 100)


def _words(rng: np.random.Generator, n: int, syllables: tuple[int, int]) -> list[str]:
  """``n`` distinct pseudo-words of ``syllables`` (min, max) consonant-vowel syllables."""
  out: set[str] = set()
  words = []
  while len(words) < n:
    k = int(rng.integers(syllables[0], syllables[1] + 1))
    w = "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(k))
    if w not in out:
      out.add(w)
      words.append(w)
  return words


def _zipf(n: int, a: float = 1.0) -> np.ndarray:
  w = 1.0 / np.arange(1, n + 1) ** a
  return w / w.sum()


def _lengths(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
  """``[users]`` sequence lengths summing exactly to ``spec.interactions``."""
  mean = spec.interactions / spec.users
  floor = 5 if mean >= 6 else 3
  cap = spec.items
  extra_mean = max(mean - floor, 1e-3)
  sigma = 1.5
  mu = np.log(extra_mean) - sigma ** 2 / 2
  lengths = floor + np.floor(rng.lognormal(mu, sigma, spec.users)).astype(np.int64)
  lengths = np.clip(lengths, floor, cap)
  while (diff := spec.interactions - int(lengths.sum())) != 0:
    if diff > 0:
      room = np.flatnonzero(lengths < cap)
      pick = rng.choice(room, size=min(diff, len(room)), replace=False)
      lengths[pick] += 1
    else:
      room = np.flatnonzero(lengths > floor if (lengths > floor).any() else lengths > 3)
      pick = rng.choice(room, size=min(-diff, len(room)), replace=False)
      lengths[pick] -= 1
  return lengths


def _description(rng: np.random.Generator, pool: list[str], filler: list[str],
                 chars: int, share: float) -> str:
  words, n = [], 0
  sentence = 0
  while n < chars:
    w = pool[int(rng.integers(len(pool)))] if rng.random() < share else filler[
        int(rng.integers(len(filler)))]
    if sentence == 0:
      w = w.capitalize()
    sentence += 1
    if sentence >= 8 and rng.random() < 0.25:
      w += "."
      sentence = 0
    words.append(w)
    n += len(w) + 1
  text = " ".join(words)
  return text if text.endswith(".") else text + "."


def generate(spec: SyntheticSpec) -> tuple[dict[str, list[int]], dict[str, dict[str, Any]],
                                           np.ndarray]:
  """Generate a dataset.

  Returns:
    ``(inter, items, group)``: ``inter`` user id -> chronological item ids (LC-Rec's
    ``X.inter.json``), ``items`` item id -> ``{"title", "description", "brand",
    "categories"}`` (``X.item.json``), ``group`` ``[items]`` int64 latent group of
    each item.
  """
  spec.check()
  rng = np.random.default_rng(spec.seed)
  g_n = spec.groups
  supers = max(1, g_n // 8)
  names = _words(rng, g_n + supers, (2, 3))
  group_name = [n.capitalize() for n in names[:g_n]]
  super_name = [n.capitalize() for n in names[g_n:]]
  super_of = rng.integers(0, supers, g_n)
  all_words = _words(rng, g_n * 30 + 200, (2, 4))
  pools = [all_words[g * 30:(g + 1) * 30] for g in range(g_n)]
  filler = list(_FILLER) + all_words[g_n * 30:]
  brands = [[b.capitalize() for b in all_words[g * 30:g * 30 + 3]] for g in range(g_n)]

  # items: group, popularity within the group, text
  group = rng.permutation(np.arange(spec.items) % g_n)
  members = [np.flatnonzero(group == g) for g in range(g_n)]
  member_p = [_zipf(len(m), 0.8) for m in members]
  chars = rng.lognormal(0.0, 0.5, spec.items)
  chars = np.maximum(20, chars / chars.mean() * spec.text_chars).astype(np.int64)
  items: dict[str, dict[str, Any]] = {}
  for i in range(spec.items):
    g = int(group[i])
    pool = pools[g]
    brand = brands[g][int(rng.integers(len(brands[g])))]
    title = (f"{brand} {pool[int(rng.integers(len(pool)))].capitalize()} "
             f"{pool[int(rng.integers(len(pool)))].capitalize()} "
             f"{rng.choice(list(string.ascii_uppercase))}-{int(rng.integers(100, 1000))}")
    desc = _description(rng, pool, filler, max(10, int(chars[i]) - len(title)),
                        spec.group_word_share)
    items[str(i)] = {"title": title, "description": desc, "brand": brand,
                     "categories": [super_name[int(super_of[g])], group_name[g]]}

  # users: group walks, popularity within a group, no repeats
  succ = np.stack([rng.choice(np.delete(np.arange(g_n), g), spec.successors, replace=False)
                   for g in range(g_n)]) if g_n > spec.successors else np.tile(
                       np.arange(g_n), (g_n, 1))[:, :spec.successors]
  start_p = _zipf(g_n, 0.5)[rng.permutation(g_n)]
  lengths = _lengths(spec, rng)
  inter: dict[str, list[int]] = {}
  for u, n in enumerate(lengths):
    seen: set[int] = set()
    seq: list[int] = []
    g = int(rng.choice(g_n, p=start_p))
    while len(seq) < n:
      item = -1
      for _ in range(8):  # popular items of the group, not one already seen
        cand = int(members[g][rng.choice(len(members[g]), p=member_p[g])])
        if cand not in seen:
          item = cand
          break
      if item < 0:
        free = [int(i) for i in members[g] if int(i) not in seen]
        item = free[0] if free else int(rng.choice(
            np.setdiff1d(np.arange(spec.items), np.fromiter(seen, np.int64))))
      seq.append(item)
      seen.add(item)
      r = rng.random()
      if r >= spec.p_stay:
        g = (int(succ[g, int(rng.integers(spec.successors))]) if r < spec.p_stay + spec.p_move
             else int(rng.integers(g_n)))
    inter[str(u)] = seq
  return inter, items, group


def write(spec: SyntheticSpec, out: str, name: str) -> dict[str, str]:
  """Generate and write ``out/name.inter.json`` and ``out/name.item.json``; returns paths."""
  inter, items, _ = generate(spec)
  os.makedirs(out, exist_ok=True)
  paths = {"inter": os.path.join(out, f"{name}.inter.json"),
           "item": os.path.join(out, f"{name}.item.json")}
  for key, data in (("inter", inter), ("item", items)):
    tmp = paths[key] + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(data, f, ensure_ascii=False, indent=1 if key == "item" else None)
    os.replace(tmp, paths[key])
  lengths = np.asarray([len(s) for s in inter.values()])
  text = np.asarray([len(v["title"]) + len(v["description"]) for v in items.values()])
  logging.info("synthetic %s: %d users, %d items, %d interactions (median %d per user), "
               "%d groups, title + description %.0f chars on average -> %s", name,
               len(inter), len(items), int(lengths.sum()), int(np.median(lengths)),
               spec.groups, text.mean(), out)
  return paths


_OUT = _NAME = _USERS = _ITEMS = _INTER = _CHARS = _GROUPS = _SEED = None  # set by define_flags


def define_flags(fv: flags.FlagValues = flags.FLAGS,
                 argv: list[str] | None = None) -> flags.FlagValues:
  """Defines the command's flags on ``fv``; importing the module defines none
  (see :func:`lcrec_jax.main.define_flags`)."""
  del argv  # no config flag
  global _OUT, _NAME, _USERS, _ITEMS, _INTER, _CHARS, _GROUPS, _SEED  # pylint: disable=global-statement
  _OUT = flags.DEFINE_string("out", None, "directory to write NAME.inter.json / NAME.item.json",
                             flag_values=fv)
  _NAME = flags.DEFINE_string("name", "Synth", "file stem (data.name)", flag_values=fv)
  _USERS = flags.DEFINE_integer("users", 24772, "users (LC-Rec Instruments: 24,772)",
                                flag_values=fv)
  _ITEMS = flags.DEFINE_integer("items", 9922, "items (Instruments: 9,922)", flag_values=fv)
  _INTER = flags.DEFINE_integer("interactions", 206153, "interactions (Instruments: 206,153)",
                                flag_values=fv)
  _CHARS = flags.DEFINE_integer("text_chars", 760, "mean title + description characters",
                                flag_values=fv)
  _GROUPS = flags.DEFINE_integer("groups", 0, "latent item groups; 0 = items // 100",
                                 flag_values=fv)
  _SEED = flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)
  return fv


def main(argv: list[str]) -> None:
  del argv
  if not _OUT.value:
    raise app.UsageError("--out is required")
  logging.set_verbosity(logging.INFO)
  try:
    write(SyntheticSpec(_USERS.value, _ITEMS.value, _INTER.value, _CHARS.value,
                        num_groups=_GROUPS.value, seed=_SEED.value), _OUT.value, _NAME.value)
  except UserError as e:  # one line, exit 2 (lcrec_jax/errors.py)
    sys.stderr.write(f"error: {e}\n")
    sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
  define_flags()
  app.run(main)
