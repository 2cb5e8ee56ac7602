"""Metric code against hand-computed cases."""

import math

import numpy as np
import pytest

from lcrec_jax.eval import metrics


def test_hand_computed_hr_ndcg():
  ranked = np.array([
      [7, 3, 9, 1, 2, 4, 5, 6, 8, 0],      # target 7 at rank 0
      [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],     # target 5 at rank 4
      [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],     # target 10 at rank 9
      [-1, -1, 1, 2, 3, 4, 6, 7, 8, 9],    # target 5 absent
  ])
  targets = np.array([7, 5, 10, 5])
  m = metrics.topk_metrics(ranked, targets)
  assert m["HR@1"] == pytest.approx(1 / 4)
  assert m["HR@5"] == pytest.approx(2 / 4)
  assert m["HR@10"] == pytest.approx(3 / 4)
  assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(6)) / 4)
  assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(11)) / 4)


def test_invalid_beams_never_hit():
  ranked = np.full((2, 10), -1)
  assert metrics.topk_metrics(ranked, np.array([-1, 3]))["HR@10"] == 0.0


def test_too_few_beams_is_an_error():
  with pytest.raises(ValueError, match="largest K=10"):
    metrics.topk_metrics(np.zeros((1, 5), int), np.zeros(1, int))


def test_template_summary():
  s = metrics.summarize_templates([{"HR@1": 0.1}, {"HR@1": 0.3}])
  assert s["mean"]["HR@1"] == pytest.approx(0.2)
  assert (s["min"]["HR@1"], s["max"]["HR@1"]) == (0.1, 0.3)
