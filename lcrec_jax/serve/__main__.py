"""``python -m lcrec_jax.serve --workdir=DIR``: the HTTP server (see lcrec_jax/serve/server.py)."""

from absl import flags

from lcrec_jax import cli
from lcrec_jax.serve import server

if __name__ == "__main__":
  server.define_flags()
  flags.adopt_module_key_flags(server)
  cli.run(server.main, "serve")
