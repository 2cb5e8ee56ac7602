"""LETTER's RQ-VAE terms (rqvae.cf_weight, rqvae.diversity_weight) against numpy float64.

References: the collaborative in-batch InfoNCE and the code-cluster diversity cross-entropy
written out in numpy float64 (LETTER, CIKM 2024, RQ-VAE/models/rqvae.py CF_loss and
vq.py diversity_loss); the positive sampler checked by enumeration; the trainer wiring on
a toy RQ-VAE run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lcrec_jax.pipeline import spec
from lcrec_jax.errors import ConfigError
from lcrec_jax.index import rqvae, trainer
from tests.test_index_stage import _config, _embeddings


def _np_logsumexp(a):
  m = a.max(1, keepdims=True)
  return (m + np.log(np.exp(a - m).sum(1, keepdims=True)))[:, 0]


def test_cf_infonce_matches_numpy_float64():
  rng = np.random.default_rng(0)
  zq, cf = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
  logits = zq @ cf.T
  want = np.mean(_np_logsumexp(logits) - np.diag(logits))
  got = float(rqvae.cf_infonce(jnp.asarray(zq, jnp.float32), jnp.asarray(cf, jnp.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # gradient wrt z_q: (softmax(logits) - I) cf / B
  p = np.exp(logits - _np_logsumexp(logits)[:, None])
  want_g = (p - np.eye(7)) @ cf / 7
  got_g = jax.grad(rqvae.cf_infonce)(jnp.asarray(zq, jnp.float32), jnp.asarray(cf, jnp.float32))
  np.testing.assert_allclose(np.asarray(got_g), want_g, rtol=1e-4, atol=1e-6)


def test_diversity_loss_matches_numpy_float64():
  rng = np.random.default_rng(1)
  k, e, b = 9, 4, 6
  cb = rng.normal(size=(k, e))
  codes = rng.integers(0, k, b)
  pos = (codes + 1 + rng.integers(0, k - 1, b)) % k  # never the own code
  valid = np.array([True, True, False, True, True, True])
  logits = cb[codes] @ cb.T
  logits[np.arange(b), codes] = -1e12  # own code excluded
  ce = _np_logsumexp(logits) - logits[np.arange(b), pos]
  want = ce[valid].mean()
  got = float(rqvae.diversity_loss(jnp.asarray(cb, jnp.float32), jnp.asarray(codes),
                                   jnp.asarray(pos), jnp.asarray(valid)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  none = rqvae.diversity_loss(jnp.asarray(cb, jnp.float32), jnp.asarray(codes),
                              jnp.asarray(pos), jnp.zeros(b, bool))
  assert float(none) == 0.0


def test_cluster_positives_are_other_codes_of_the_cluster():
  labels = jnp.asarray([0, 0, 1, 1, 1, 2, 0, 3])  # code 5 and code 7 are alone
  codes = jnp.asarray([0, 2, 5, 7, 6])
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  pos, valid = jax.vmap(lambda k: rqvae.sample_cluster_positives(k, codes, labels))(keys)
  pos, valid = np.asarray(pos), np.asarray(valid)
  assert (valid == [True, True, False, False, True]).all()
  seen = [set(pos[:, i].tolist()) for i in range(5)]
  assert seen[0] == {1, 6} and seen[1] == {3, 4} and seen[4] == {0, 1}  # every one is drawn
  lab = rqvae.cluster_codes(jax.random.PRNGKey(0), jnp.asarray(
      np.r_[np.zeros((4, 2)), np.full((4, 2), 9.0)], jnp.float32), 2, 5)
  assert len(set(np.asarray(lab[:4]).tolist())) == 1 and int(lab[0]) != int(lab[4])


def _letter_config(cf_weight, div_weight):
  c = _config()
  c.rqvae.cf_weight = cf_weight
  c.rqvae.diversity_weight = div_weight
  c.rqvae.diversity_clusters = 3
  c.rqvae.epochs = 4
  c.rqvae.eval_every = 4
  return c


@pytest.mark.slow
def test_trainer_adds_letter_terms(tmp_path):
  x = _embeddings()
  cf = np.random.default_rng(2).normal(size=(x.shape[0], 8)).astype(np.float32)
  c = _letter_config(0.01, 1e-4)
  _, variables, hist = trainer.train_rqvae(c.rqvae, x, str(tmp_path / "l" / "index"), seed=3,
                                           cf_embeddings=cf)
  assert all(np.isfinite(r["cf_loss"]) and np.isfinite(r["diversity_loss"]) for r in hist)
  # the objective is recon + quant + 0.01 cf + 1e-4 diversity (per-item means of an epoch)
  for r in hist:
    np.testing.assert_allclose(r["loss"], r["recon_mse"] + r["quant_loss"] + 0.01 * r["cf_loss"]
                               + 1e-4 * r["diversity_loss"], rtol=1e-5)
  _, _, plain = trainer.train_rqvae(_letter_config(0.0, 0.0).rqvae, x, str(tmp_path / "p"),
                                    seed=3)
  assert "cf_loss" not in plain[0] and "diversity_loss" not in plain[0]


def test_cf_embeddings_checked():
  x = _embeddings()
  c = _letter_config(0.01, 0.0)
  with pytest.raises(ConfigError, match="rqvae.cf_embeddings"):
    trainer.train_rqvae(c.rqvae, x, "/nonexistent-unused", seed=0,
                        cf_embeddings=np.zeros((x.shape[0], 5), np.float32))
  with pytest.raises(ConfigError, match="collaborative"):
    trainer.train_rqvae(c.rqvae, x, "/nonexistent-unused", seed=0)
  s = spec.resolve(ml_collections.ConfigDict())
  s.rqvae.cf_weight = 0.01
  with pytest.raises(ConfigError, match="rqvae.cf_embeddings"):
    spec.validate(s)


@pytest.mark.slow
def test_sasrec_embedding_export_shape(tmp_path):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[1] / "benchmarks" / "export_sasrec_embeddings.py"
  mod_spec = importlib.util.spec_from_file_location("export_sasrec_embeddings", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  from tests.test_seqrec_windows import _dataset
  ds = _dataset(num_users=20, num_items=60)
  emb, info = mod.train_item_embeddings(ds, dim=8, max_len=16, epochs=2, eval_every=1,
                                        batch_size=8)
  assert emb.shape == (60, 8) and emb.dtype == np.float32 and np.isfinite(emb).all()
  assert info["best_epoch"] in (1, 2) and 0.0 <= info["valid"]["NDCG@10"] <= 1.0
  # --sasrec_out: the whole SASRec, read back by the rl stage's collaborative reward.
  from lcrec_jax.rl import collab
  out = str(tmp_path / "s.npz")
  mod.sasrec.save(out, info["model"], info["params"])
  model, params = collab.load_sasrec(out, 60)
  np.testing.assert_array_equal(params["item_emb"]["embedding"][1:], emb)
