"""The shared progress helper: log lines (done/total, rate, time left) without a terminal."""

import pytest

from lcrec_jax import progress


class _Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


@pytest.fixture
def clock(monkeypatch):
  c = _Clock()
  monkeypatch.setattr(progress.time, "perf_counter", c)
  return c


@pytest.fixture
def lines(monkeypatch):
  out = []
  monkeypatch.setattr(progress.logging, "info", lambda fmt, *a: out.append(fmt % a))
  return out


def test_logs_every_interval_with_rate_and_time_left(clock, lines):
  p = progress.Progress(10, "rqvae", "epoch", every_s=30, bar=False)
  clock.t += 50  # the first update compiles: left out of the rate
  p.update(1)
  assert len(lines) == 1 and lines[0].startswith("rqvae: 1/10 epochs (10%)")
  for _ in range(4):
    clock.t += 10
    p.update(1, loss=0.5)
  # next line 30 s after the first, at epoch 4: 3 epochs in 30 s -> 10 s/epoch, 6 left
  assert len(lines) == 2
  assert "4/10 epochs (40%)" in lines[1] and "10 s/epoch" in lines[1]
  assert "60 s left" in lines[1] and "loss 0.5" in lines[1]


def test_quiet_phase_logs_nothing_and_disabled_never_logs(clock, lines):
  with progress.Progress(3, "tasks", every_s=30, bar=False) as p:
    for _ in range(3):
      clock.t += 1
      p.update()
  assert lines == []  # a 3-second phase needs no progress lines
  p = progress.Progress(3, "x", every_s=0, bar=False, enabled=False)
  p.update(3)
  p.close()
  assert lines == []


def test_track_unknown_total_and_final_line(clock, lines):
  def gen():
    for i in range(5):
      clock.t += 20
      yield i
  assert list(progress.track(gen(), "users", "user", every_s=30, bar=False)) == list(range(5))
  assert lines and lines[-1].startswith("users: 5 users") and "left" not in lines[-1]
