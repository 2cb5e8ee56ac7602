"""A batched, jitted recommendation server over a finished run.

  python -m lcrec_jax.serve --workdir=runs/ml100k [--host=127.0.0.1 --port=8080]
  curl -s localhost:8080/v1/recommend -d '{"history": ["Toy Story", "Heat", 50], "k": 5}'

* :mod:`lcrec_jax.serve.engine`: the run restored once, the beam search compiled for a
  few batch sizes, batches of queries decoded exactly as ``lcrec_jax.recommend`` does;
* :mod:`lcrec_jax.serve.batcher`: the bounded queue and the dynamic-batching worker;
* :mod:`lcrec_jax.serve.app`: the FastAPI routes, limits, errors, metrics, bearer token;
* :mod:`lcrec_jax.serve.server`: the command (flags, uvicorn, SIGTERM drain).
"""
