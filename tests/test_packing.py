"""Sequence packing (tasks.pack_length): exact losses, no attention across examples.

References: the same examples unpacked (one per row, today's `collate`), the token-weighted
loss and gradients of which a packed batch must reproduce in float32; a brute-force
first-fit packer; the in-memory batcher for the grain reader.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.errors import ConfigError
from lcrec_jax.llm.config import tiny
from lcrec_jax.llm.model import Llama, init_params
from lcrec_jax.tasks import batching, example_records, grain_batches
from lcrec_jax.train import mesh as mesh_lib
from lcrec_jax.train import state as state_lib
from lcrec_jax.train import step as step_lib
from tests.test_grain_batches import CODE_IDS, WordTokenizer, _examples

VOCAB, PAD = 256, 0


@pytest.fixture(scope="module")
def model_and_params():
  model = Llama(tiny(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64))
  return model, init_params(model.config, jax.random.PRNGKey(0))


def _random_examples(n: int, seed: int):
  """(prompt, response + EOS, label_prompt) triples; some prompts hold code ids."""
  rs = np.random.RandomState(seed)
  out = []
  for k in range(n):
    p = rs.randint(3, 200, rs.randint(3, 14)).astype(np.int32)
    p[rs.rand(len(p)) < 0.3] = rs.choice(CODE_IDS)
    p[0] = 5  # a frame head token, never a code
    r = np.concatenate([rs.randint(3, 200, rs.randint(1, 5)), [1]]).astype(np.int32)
    out.append((p, r, bool(k % 2)))
  return out


def _unpacked(examples, t):
  return batching.collate([e[0] for e in examples], [e[1] for e in examples],
                          [e[2] for e in examples], [True] * len(examples), t, PAD, CODE_IDS)


def _packed(examples, pack_length, num_rows=0):
  """Packed rows, with filler rows (no tokens, no labels) up to `num_rows`."""
  lengths = np.asarray([len(p) + len(r) for p, r, _ in examples])
  rows = batching.pack_examples(lengths, (pack_length,), pack_length, seed=3)
  members = [[examples[i] for i in row] for row in rows.rows]
  fill = max(num_rows - len(members), 0)
  return batching.collate_packed(members + [[]] * fill, [True] * len(members) + [False] * fill,
                                 pack_length, PAD, CODE_IDS), rows


def _mean_loss(model):
  def f(params, batch):
    s, (c, _) = step_lib.label_loss_sums(params, model, batch)
    return s / c, (s, c)
  return jax.jit(jax.value_and_grad(f, has_aux=True))


def test_packed_loss_and_grads_equal_unpacked_float32(model_and_params):
  """Token-weighted mean CE and its gradients: packed rows == one example per row."""
  model, params = model_and_params
  ex = _random_examples(12, seed=0)
  packed, rows = _packed(ex, 40, num_rows=len(ex))  # same [12, 40] shape: one compile
  assert len(rows) < len(ex) and max(len(r) for r in rows.rows) > 1  # really packed
  unpacked = _unpacked(ex, 40)
  fn = _mean_loss(model)
  (lp, (sp, cp)), gp = fn(params, {k: jnp.asarray(v) for k, v in packed.items()})
  (lu, (su, cu)), gu = fn(params, {k: jnp.asarray(v) for k, v in unpacked.items()})
  assert float(cp) == float(cu) == sum(
      len(r) + (int(np.isin(p[1:], CODE_IDS).sum()) if lp_ else 0) for p, r, lp_ in ex)
  np.testing.assert_allclose(float(lp), float(lu), rtol=1e-6)
  np.testing.assert_allclose(float(sp), float(su), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
  # full-logits reference agrees too (segment-aware target shift)
  ref = jax.jit(lambda p, b: step_lib.full_logits_loss(p, model, b))(
      params, {k: jnp.asarray(v) for k, v in packed.items()})
  np.testing.assert_allclose(float(ref), float(lu), rtol=1e-6)


def test_no_attention_across_segments(model_and_params):
  """Changing one example's tokens leaves every other example's logits unchanged."""
  model, params = model_and_params
  ex = _random_examples(3, seed=1)
  packed, rows = _packed(ex, 64)
  assert len(rows) == 1 and len(rows.rows[0]) == 3
  seg = packed["segment_ids"][0]
  first = rows.rows[0][0]
  changed = [list(e) for e in ex]
  prompt = changed[first][0].copy()
  prompt[1:] = (prompt[1:] + 7) % 190 + 3
  changed[first][0] = prompt
  packed2, _ = _packed([tuple(e) for e in changed], 64)
  assert (packed2["tokens"] != packed["tokens"]).any()

  fwd = jax.jit(lambda p, b: model.apply({"params": p}, b["tokens"], positions=b["positions"],
                                         attention_mask=b["attention_mask"],
                                         segment_ids=b.get("segment_ids"))[0])

  def logits(batch, use_segments=True):
    b = {k: jnp.asarray(v) for k, v in batch.items() if use_segments or k != "segment_ids"}
    return np.asarray(fwd(params, b))

  a, b = logits(packed), logits(packed2)
  other = (seg > 1)
  np.testing.assert_array_equal(a[0][other], b[0][other])
  assert not np.allclose(a[0][seg == 1], b[0][seg == 1])
  # the check is sensitive: without segment ids the later examples would see the change
  a0, b0 = logits(packed, False), logits(packed2, False)
  assert not np.allclose(a0[0][other], b0[0][other])
  # positions restart per example
  for k in (1, 2, 3):
    np.testing.assert_array_equal(packed["positions"][0][seg == k], np.arange((seg == k).sum()))


def _first_fit_reference(lengths, order, cap):
  """Rows of example ids; `cap(length)` is the capacity of a row its example opens."""
  rows, room = [], []
  for i in order:
    for r in range(len(rows)):
      if room[r] >= lengths[i]:
        rows[r].append(i)
        room[r] -= lengths[i]
        break
    else:
      rows.append([i])
      room.append(cap(lengths[i]) - lengths[i])
  return rows


def test_pack_examples_is_first_fit_and_buckets_rows():
  rs = np.random.RandomState(0)
  lengths = rs.randint(5, 49, 300)
  buckets = (24, 32, 48)
  packed = batching.pack_examples(lengths, buckets, 64, seed=11)
  order = np.random.default_rng([11, batching.PACK_SALT]).permutation(len(lengths))
  ref = _first_fit_reference(lengths, order, lambda n: 64)
  assert [list(r) for r in packed.rows] == ref
  flat = np.concatenate(packed.rows)
  assert sorted(flat.tolist()) == list(range(len(lengths)))  # each example exactly once
  sizes = np.asarray((24, 32, 48, 64))
  for row, length in zip(packed.rows, packed.bucket):
    used = lengths[row].sum()
    assert used <= length and length == sizes[sizes >= used].min()
  same = batching.pack_examples(lengths, buckets, 64, seed=11)
  assert all((a == b).all() for a, b in zip(packed.rows, same.rows))
  with pytest.raises(ValueError, match="pack_length"):
    batching.pack_examples(lengths, buckets, 32, seed=0)


def test_bucket_rows_never_grow_past_the_opening_bucket():
  rs = np.random.RandomState(1)
  lengths = rs.randint(5, 49, 300)
  sizes = np.asarray((24, 32, 48, 64))
  packed = batching.pack_examples(lengths, (24, 32, 48), 64, seed=4, rows="bucket")
  order = np.random.default_rng([4, batching.PACK_SALT]).permutation(len(lengths))
  ref = _first_fit_reference(lengths, order, lambda n: sizes[sizes >= n].min())
  assert [list(r) for r in packed.rows] == ref
  assert sorted(np.concatenate(packed.rows).tolist()) == list(range(len(lengths)))
  for row, length in zip(packed.rows, packed.bucket):
    opener = sizes[sizes >= lengths[row[0]]].min()
    assert lengths[row].sum() <= length <= opener
  fixed = batching.pack_examples(lengths, (24, 32, 48), 64, seed=4)
  assert len(fixed) < len(packed) < len(lengths)  # bucket rows pack less, but pack


def test_batcher_packed_rows_hold_every_example_once():
  tok = WordTokenizer()
  data = batching.tokenize_examples(_examples(), tok, (24, 32, 48))
  b = batching.Batcher(data, batch_size=4, pack_length=64, seed=2, prompt_label_ids=CODE_IDS,
                       prompt_label_tasks=("seqrec",))
  plain = batching.Batcher(data, batch_size=4)
  assert b.steps_per_epoch < plain.steps_per_epoch
  seen = []
  for planned, batch in zip(b.plan(0, 1), b.batches(0, 1)):
    assert set(batch) == set(step_lib.PACKED_KEYS)
    assert batch["tokens"].shape == (4, planned.length)
    for r, row_id in enumerate(planned.indices[:planned.num_real]):
      seen.extend(b.packed.rows[int(row_id)].tolist())
      seg = batch["segment_ids"][r]
      assert seg.max() == len(b.packed.rows[int(row_id)])
      np.testing.assert_array_equal(batch["attention_mask"][r], seg > 0)
  assert sorted(seen) == list(range(len(data)))
  # a row of one example is today's collate of it, plus its segment ids
  ex = b.packed.rows[0][0]
  single = batching.collate([data.prompts[ex]], [data.responses[ex]], [False], [True], 64,
                            data.pad_id)
  alone = batching.collate_packed([[(data.prompts[ex], data.responses[ex], False)]], [True],
                                  64, data.pad_id)
  for k in single:
    np.testing.assert_array_equal(single[k], alone[k])
  np.testing.assert_array_equal(alone["segment_ids"], single["attention_mask"])


@pytest.mark.parametrize("rows", ["fixed", "bucket"])
def test_grain_packed_batches_equal_batcher(tmp_path, rows):
  tok = WordTokenizer()
  train = batching.tokenize_examples(_examples(), tok, (24, 32, 48))
  valid = batching.tokenize_examples(_examples(9, seed=1), tok, (24, 32, 48))
  builder = example_records.write_examples({"train": train, "validation": valid},
                                           str(tmp_path))
  kw = dict(batch_size=4, pack_length=64, seed=5, prompt_label_ids=CODE_IDS,
            prompt_label_tasks=("seqrec",), pack_rows=rows)
  g = grain_batches.GrainBatcher(str(builder.data_dir), "train", num_threads=0, **kw)
  m = batching.Batcher(train, **kw)
  assert g.steps_per_epoch == m.steps_per_epoch
  for a, b in zip(g.batches(1, 0, start_step=1), m.batches(1, 0, start_step=1)):
    assert set(a) == set(b) == set(step_lib.PACKED_KEYS)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
def test_sharded_packed_train_step_equals_unpacked(model_and_params):
  """make_train_step(packed=True) on an 8-device mesh: the SGD update of the unpacked batch."""
  model, params = model_and_params
  ex = _random_examples(24, seed=4)
  packed, rows = _packed(ex, 48, num_rows=16)
  assert len(rows) <= 16
  unpacked = _unpacked(ex, 24)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  rules = mesh_lib.DEFAULT_AXIS_RULES
  import optax
  tx = optax.sgd(1.0)
  boxed = state_lib.abstract_boxed_params(model, np.zeros((1, 8), np.int32))
  shardings = state_lib.state_shardings(tx, boxed, None, mesh, rules, params)

  def run(batch, packed_flag):
    state = state_lib.create_train_state(jax.tree.map(jnp.copy, params), tx, shardings,
                                         jax.random.PRNGKey(0), None)
    fn = step_lib.make_train_step(model, tx, shardings=shardings, mesh=mesh, rules=rules,
                                  packed=packed_flag)
    dev = mesh_lib.shard_batch_from_host(batch, mesh, step_lib.train_batch_sharding(mesh))
    new, m = fn(state, dev)
    return jax.device_get(new.trainable), jax.device_get(m)

  p_new, p_m = run(packed, True)
  u_new, u_m = run(unpacked, False)
  np.testing.assert_allclose(p_m["loss"], u_m["loss"], rtol=1e-6)
  assert p_m["label_tokens"] == u_m["label_tokens"] and p_m["tokens"] == u_m["tokens"]
  for a, b in zip(jax.tree.leaves(p_new), jax.tree.leaves(u_new)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_spec_rejects_short_pack_length_and_label_slots():
  c = spec.resolve(ml_collections.ConfigDict())
  c.tasks.pack_length = 256
  with pytest.raises(ConfigError, match="tasks.pack_length"):
    spec.validate(c)
  c.tasks.pack_length = 512
  c.train.max_label_tokens = 200
  c.tasks.history_loss_tasks = ()
  with pytest.raises(ConfigError, match="train.max_label_tokens"):
    spec.validate(c)
  c.train.max_label_tokens = 0
  spec.validate(c)
