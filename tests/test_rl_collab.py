"""The collaborative reward (rl.reward_collab): SASRec's logits of the beams' items,
softmax-normalised within each group, against hand-worked and numpy float64 references;
that it follows its beam by position into the update batch; the saved-SASRec file; and its
config keys, validated before any work."""

import types

import jax
import ml_collections
import numpy as np
import pytest

from configs.ml100k_quick import get_config
from lcrec_jax.pipeline import spec
from lcrec_jax.pipeline import workdir as wl
from lcrec_jax.baselines import sasrec as sasrec_lib
from lcrec_jax.errors import ConfigError
from lcrec_jax.rl import collab, rollout as rollout_lib
from lcrec_jax.rl import trainer as rl_trainer
from lcrec_jax.train import mesh as mesh_lib

NUM_ITEMS, MAX_LEN = 12, 5


@pytest.fixture(scope="module")
def tiny_sasrec():
  model = sasrec_lib.SASRec(NUM_ITEMS, MAX_LEN, dim=8, num_blocks=1, num_heads=2, dropout=0.3)
  params = model.init(jax.random.PRNGKey(3), np.ones((1, 8), np.int32), train=False)["params"]
  return model, params


def _reference_logits(model, params, history):
  """float64 logits of every item after ``history``: one unpadded row of its last MAX_LEN."""
  x = np.asarray(history[-MAX_LEN:], np.int32)[None] + 1
  h = model.apply({"params": params}, x, train=False)[:, -1]
  return np.asarray(model.apply({"params": params}, h, method="scores"), np.float64)[0]


def test_group_softmax_hand_worked():
  s = np.array([[0.0, np.log(2.0), np.log(3.0), 5.0],
                [1.0, 1.0, 1.0, 1.0],
                [7.0, 8.0, 9.0, 10.0]])
  valid = np.array([[True, True, True, False], [True] * 4, [False] * 4])
  got = collab.group_softmax(s, valid)
  np.testing.assert_allclose(got, [[1 / 6, 2 / 6, 3 / 6, 0], [0.25] * 4, [0] * 4], rtol=1e-12)
  big = collab.group_softmax(np.array([[1000.0, 999.0]]), np.ones((1, 2), bool))
  np.testing.assert_allclose(big, [[1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))]])


def test_sasrec_reward_matches_numpy_float64(tiny_sasrec):
  model, params = tiny_sasrec
  rng = np.random.default_rng(0)
  histories = [rng.permutation(NUM_ITEMS)[:n] for n in (1, 3, 5, 9, 2)]  # 9 > MAX_LEN
  rows = np.array([3, 0, 4, 1])
  items = np.array([[0, 5, 7, 11], [2, 2, 9, -1], [10, 1, -1, -1], [4, 6, 8, 3]])
  got = collab.SASRecReward(model, params, histories)(rows, items)
  for p, r in enumerate(rows):
    s = _reference_logits(model, params, histories[r])
    v = items[p] >= 0
    e = np.exp(s[items[p][v]])
    np.testing.assert_allclose(got[p][v], e / e.sum(), rtol=1e-5, atol=1e-7)
    assert (got[p][~v] == 0).all()
  assert got.shape == items.shape and np.allclose(got.sum(1), 1.0)


class _FakeDecoder:
  """Returns fixed beams (``items [P, G]``) in place of the beam search."""

  def __init__(self, items, codes, code_ids):
    self.items, self.code_ids, self.pad_id = items, code_ids, 0
    self.index = types.SimpleNamespace(codes=codes, num_levels=codes.shape[1])

  def rank(self, params, prompts, **kw):
    return self.items, np.zeros(self.items.shape, np.float32)

  def bucket_of(self, n):
    return 8


def _step_batch(tiny_sasrec, prompts, items, codes, code_ids):
  st = rl_trainer.RLSettings.from_config(spec.section_settings(
      "rl", prompts_per_step=2, num_generations=int(items.shape[1]), beta=0.0,
      reward_ranking=0.0, reward_collab=1.0))
  seen: dict = {}

  def update_fn(state, dev):
    seen.update(jax.device_get(dev))
    return state, {"loss": 0.0}

  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 1}),
                            devices=jax.devices()[:2])
  reward = collab.SASRecReward(*tiny_sasrec, prompts.seen)
  step = rl_trainer._Step(st, None, _FakeDecoder(items, codes, code_ids), prompts, None,
                          update_fn, None, mesh, {"collab": reward}, st.reward_weights())
  step(types.SimpleNamespace(params=None), np.array([0, 1]))
  return seen


def test_collab_reward_follows_its_beam_into_the_update(tiny_sasrec):
  rng = np.random.default_rng(1)
  codes = np.stack([np.arange(NUM_ITEMS) // 4, np.arange(NUM_ITEMS) % 4], 1)    # [N, 2]
  code_ids = np.array([[100, 101, 102, 103], [200, 201, 202, 203]])
  prompts = rollout_lib.PromptSet(
      targets=np.array([3, 4]), users=np.array([0, 1]),
      seen=[np.array([1, 2]), np.array([7, 9, 11, 0, 5, 6])],
      encode=lambda r: np.array([5, 6, 7][:r + 2]))
  items = np.stack([rng.permutation(NUM_ITEMS)[:6] for _ in range(2)])          # [2, 6]
  perm = np.array([4, 2, 5, 0, 1, 3])
  a = _step_batch(tiny_sasrec, prompts, items, codes, code_ids)
  b = _step_batch(tiny_sasrec, prompts, items[:, perm], codes, code_ids)
  g = items.shape[1]
  for p in range(2):
    s = _reference_logits(*tiny_sasrec, prompts.seen[p])[items[p]]
    r = np.exp(s) / np.exp(s).sum()
    want = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
    rows = slice(p * g, (p + 1) * g)
    # Row p * G + g of the update batch carries beam g's code tokens and beam g's advantage.
    np.testing.assert_array_equal(a["code_tokens"][rows], code_ids[[0, 1], codes[items[p]]])
    np.testing.assert_allclose(a["advantages"][rows], want, rtol=1e-4, atol=1e-4)
    # Permuting the beams permutes the rewards with them.
    np.testing.assert_array_equal(b["code_tokens"][rows], a["code_tokens"][rows][perm])
    np.testing.assert_allclose(b["advantages"][rows], a["advantages"][rows][perm], atol=1e-6)
  assert (a["weights"] == 1).all()


def test_saved_sasrec_round_trip_and_bad_files(tiny_sasrec, tmp_path):
  model, params = tiny_sasrec
  path = str(tmp_path / "s.npz")
  sasrec_lib.save(path, model, params)
  m2, p2 = collab.load_sasrec(path, NUM_ITEMS)
  assert m2 == model
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(x), y)
  with pytest.raises(ConfigError, match=r"rl.collab_sasrec=.*12 items, the dataset has 13"):
    collab.load_sasrec(path, NUM_ITEMS + 1)
  junk = tmp_path / "junk.npz"
  junk.write_text("not a zip")
  with pytest.raises(ConfigError, match="rl.collab_sasrec.*not a saved SASRec"):
    collab.load_sasrec(str(junk), NUM_ITEMS)
  np.savez(str(tmp_path / "other.npz"), config=np.asarray('{"num_items": 3}'))
  with pytest.raises(ConfigError, match="rl.collab_sasrec.*config fields"):
    collab.load_sasrec(str(tmp_path / "other.npz"), NUM_ITEMS)


def test_collab_keys_are_validated_before_any_work(tmp_path):
  c = get_config()
  c.rl = spec.section("rl")
  spec.validate(c, num_devices=8, stages=("rl",))          # off by default
  c.rl.reward_collab = -0.5
  with pytest.raises(ConfigError, match="rl.reward_collab"):
    spec.validate(c, num_devices=8, stages=("rl",))
  c.rl.reward_collab = 0.5
  with pytest.raises(ConfigError, match="rl.collab_sasrec.*needed when rl.reward_collab > 0"):
    spec.validate(c, num_devices=8, stages=("rl",))
  c.rl.collab_sasrec = str(tmp_path / "missing.npz")
  with pytest.raises(ConfigError, match="rl.collab_sasrec.*no such file"):
    spec.validate(c, num_devices=8, stages=("rl",))
  (tmp_path / "missing.npz").write_bytes(b"x")
  flat = spec.flatten(spec.validate(c, num_devices=8, stages=("rl",)))
  assert str(tmp_path / "missing.npz") in wl.input_files("rl", flat)   # in the manifest
  assert str(tmp_path / "missing.npz") not in wl.input_files("eval", flat)
  # A weight without the reward is refused before the trainer builds anything.
  with pytest.raises(ValueError, match="rl.reward_collab"):
    rl_trainer.train_rl(spec.resolve(c), str(tmp_path / "rl"), None, None, None, None)
