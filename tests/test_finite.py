"""The finite-parameter check counts NaN/inf where a (sharded) leaf lives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcrec_jax.errors import UserError
from lcrec_jax.runtime import finite


def test_counts_nan_in_a_sharded_leaf_and_names_it():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  w = np.ones((8, 6), np.float32)
  w[5, 1] = np.nan
  w[0, 0] = np.inf
  tree = {"ok": jnp.zeros((3,)), "layer": {"w": jax.device_put(
      w, NamedSharding(mesh, P("data", "fsdp")))}, "ids": jnp.arange(4)}
  assert finite.first_non_finite(tree) == ("layer/w", 2, 48)
  assert not bool(finite.all_finite(tree))
  with pytest.raises(UserError, match=r"params: layer/w holds 2 NaN/inf values \(of 48\)"):
    finite.check_finite(tree, "params")
  finite.check_finite({"ok": jnp.ones((2, 2)), "np": np.ones(3)}, "params")  # no error
  assert finite.first_non_finite({"np": np.array([1.0, np.nan])}) == ("np", 1, 2)
