"""``python -m lcrec_jax.serve --workdir=DIR``: the HTTP server (see lcrec_jax/serve/server.py)."""

from absl import flags

from lcrec_jax import cli
from lcrec_jax.serve import server

flags.adopt_module_key_flags(server)

if __name__ == "__main__":
  cli.run(server.main, "serve")
