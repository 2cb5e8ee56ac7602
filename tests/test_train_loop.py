"""The training-loop skeleton (`lcrec_jax.runtime.loop`): where periodic actions fire,
one-step-late metrics equal synchronous ones, preemption and early stopping, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcrec_jax.runtime import loop as loop_lib


def batches(epoch, pos, spe=4):
  for p in range(pos, spe):
    yield np.float32(10 * epoch + p)


class Counter:
  """A jitted step over a device state: `x <- x * 0.5 + batch`; metrics read from it."""

  def __init__(self):
    self.calls = 0
    self._step = jax.jit(lambda x, b: (x * 0.5 + b, {"x": x * 0.5 + b, "b": b}))

  def __call__(self, x, batch):
    self.calls += 1
    return self._step(x, batch)


X0 = jnp.float32(1.0)


def _run(fetch="late", num_steps=10, start=loop_lib.Position(), **kw):
  step = Counter()
  seen = []

  def on_step(info):
    seen.append((info.step, info.epoch, info.pos, info.metrics, step.calls))

  loop = loop_lib.Loop(step, batches, X0, num_steps=num_steps, steps_per_epoch=4, start=start,
                       fetch=fetch, on_step=on_step, **kw)
  return loop.run(), seen, loop


def test_periodic_actions_fire_at_their_steps_after_their_metrics():
  fired = {"ckpt": [], "eval": [], "end": [], "epoch": []}
  delivered = []

  def action(name):
    def fn(info):
      assert delivered[-1] == info.step  # its own step's metrics came first
      fired[name].append(info.step if name != "epoch" else info.number)
    return fn

  step = Counter()
  loop = loop_lib.Loop(step, batches, X0, num_steps=10, steps_per_epoch=4,
                       on_step=lambda info: delivered.append(info.step),
                       step_actions=[loop_lib.Periodic(action("ckpt"), every=3, at_end=True),
                                     loop_lib.Periodic(action("eval"), every=4),
                                     loop_lib.Periodic(action("end"), at_end=True)],
                       epoch_actions=[loop_lib.Periodic(action("epoch"), every=2,
                                                        at_end=True)])
  out = loop.run()
  assert fired == {"ckpt": [3, 6, 9, 10], "eval": [4, 8], "end": [10], "epoch": [2, 3]}
  assert delivered == list(range(1, 11))
  assert (out.step, out.epoch, out.steps_run, out.reason) == (10, 2, 10, "done")


def test_late_metrics_equal_sync_and_epoch_metrics():
  runs = {f: _run(f, step_actions=[loop_lib.Periodic(lambda i: None, every=5)])
          for f in loop_lib.FETCH}
  values = {f: [s[:4] for s in seen] for f, (_, seen, _) in runs.items()}
  assert values["late"] == values["sync"] == values["epoch"]
  assert len({float(loop.state) for _, _, loop in runs.values()}) == 1
  assert [v[0] for v in values["late"]] == list(range(1, 11))
  assert [(v[1], v[2]) for v in values["late"][:5]] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1)]
  np.testing.assert_allclose(values["late"][0][3]["x"], 0.5)
  # "late": step N is read once step N+1 was dispatched, except at the sync steps (5, 10)
  calls = {f: [s[0] - s[4] for s in seen] for f, (_, seen, _) in runs.items()}
  assert calls["sync"] == [0] * 10
  assert calls["late"] == [-1, -1, -1, -1, 0, -1, -1, -1, -1, 0]


def test_preemption_delivers_saves_and_stops_and_resume_continues():
  saved = []

  def on_preempt(info):
    saved.append((info.step, info.data_position(), info.metrics["x"]))

  out, seen, _ = _run(preempted=lambda s: s == 4, on_preempt=on_preempt)
  assert out.reason == "preempted" and out.step == 4
  assert [s[0] for s in seen] == [1, 2, 3, 4]  # all read before the save
  assert saved == [(4, {"epoch": 1, "step_in_epoch": 0}, seen[-1][3]["x"])]

  full, full_seen, _ = _run()
  out2, seen2, _ = _run(start=loop_lib.Position(4, 1, 0))
  assert out2.reason == "done" and [s[0] for s in seen2] == list(range(5, 11))
  assert [s[3]["b"] for s in seen2] == [s[3]["b"] for s in full_seen[4:]]


def test_preemption_at_the_last_step_is_a_normal_end():
  out, _, _ = _run(num_steps=6, preempted=lambda s: s >= 6,
                   on_preempt=lambda i: pytest.fail("no preemption save at the end"))
  assert out.reason == "done" and out.step == 6


def test_a_raising_on_step_runs_no_later_action():
  saves = []

  def on_step(info):
    if info.step == 3:
      raise FloatingPointError("step 3")

  step = Counter()
  loop = loop_lib.Loop(step, batches, X0, num_steps=10, steps_per_epoch=4, on_step=on_step,
                       step_actions=[loop_lib.Periodic(lambda i: saves.append(i.step),
                                                       every=2)])
  with pytest.raises(FloatingPointError):
    loop.run()
  assert saves == [2] and step.calls == 4  # step 4 ran, its save did not


def test_stop_from_an_epoch_action_ends_early():
  evals = []

  def validate(info):
    evals.append(info.number)
    return loop_lib.STOP if info.number == 2 else None

  out, seen, _ = _run(num_steps=40, fetch="epoch",
                      epoch_actions=[loop_lib.Periodic(validate, every=1)])
  assert out.reason == "stopped" and out.step == 8 and out.epoch == 1 and evals == [1, 2]
  assert len(seen) == 8


def test_an_empty_epoch_is_an_error():
  loop = loop_lib.Loop(Counter(), lambda e, p: iter(()), X0, num_steps=3, steps_per_epoch=4,
                       name="toy")
  with pytest.raises(ValueError, match=r"toy: batches\(0, 0\) yielded no batch"):
    loop.run()
