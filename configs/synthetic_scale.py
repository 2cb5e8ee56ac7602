"""LC-Rec json data at the paper's scale (Amazon Instruments' size) with the quick model.

Generate the synthetic stand-in (lcrec_jax/data/synthetic.py; or point data.path at the real
LC-Rec files, e.g. --config.data.path=data --config.data.name=Instruments), then run:

  python -m lcrec_jax.data.synthetic --out=runs/synth_data --name=Synth
  python -m lcrec_jax.main --config=configs/synthetic_scale.py --workdir=runs/synth \
      --stages=index,train,eval,baseline

The quick recipe otherwise, evaluated on the test split with one template (every user:
24,772 beam searches instead of 4 x that); benchmarks/scale_pipeline.py times it stage by
stage.
"""

from lcrec_jax.recipes import sibling


def get_config():
  c = sibling(__file__, "ml100k_quick.py").get_config()
  c.data.format = "lcrec"
  c.data.path = "runs/synth_data"
  c.data.name = "Synth"
  c.eval.splits = ("test",)
  c.eval.template_ids = (0,)
  return c
