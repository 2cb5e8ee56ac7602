#!/usr/bin/env python3
"""Run lcrec-jax on a Cloud TPU VM or pod slice: create, install, launch, watch, fetch, delete.

One stdlib-only CLI that builds ``gcloud`` command lines and runs them (or, with ``--dry-run``,
prints them, one shell-quoted command per line, without running anything):

  python tpu_scripts/tpu.py create  --accelerator-type=v5litepod-16 [--spot | --queued --wait]
  python tpu_scripts/tpu.py install [--repo-url=URL --ref=REF]   # default: tarball of this tree
  python tpu_scripts/tpu.py launch  --config=configs/ml100k_quick.py --workdir=gs://B/run -- ARGS
  python tpu_scripts/tpu.py logs    [--worker=N|all] [--follow] [--fetch-to=DIR]
  python tpu_scripts/tpu.py exec    [--worker=N|all] -- COMMAND ARGS...
  python tpu_scripts/tpu.py stop    [--worker=all]
  python tpu_scripts/tpu.py fetch   --workdir=gs://B/run [--dest=DIR]
  python tpu_scripts/tpu.py status
  python tpu_scripts/tpu.py delete  [--yes]

Every command takes --project, --zone and --name (the TPU VM); each flag's default comes from
an environment variable (``LCREC_TPU_<FLAG>``, e.g. LCREC_TPU_PROJECT), named in ``--help``.
Remote commands run in bash on every selected worker; paths on the workers are relative to
the login user's home unless absolute.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Union

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_PREFIX = "LCREC_TPU_"

# TPU generation -> (accelerator-type prefix, unit of the size suffix, default runtime version).
# Runtime versions: Cloud TPU "TPU software versions" page, PyTorch/JAX table.
GENERATIONS = {
    "v4": ("v4", "cores", "tpu-ubuntu2204-base"),
    "v5e": ("v5litepod", "chips", "v2-alpha-tpuv5-lite"),
    "v5p": ("v5p", "cores", "v2-alpha-tpuv5"),
    "v6e": ("v6e", "chips", "v2-alpha-tpuv6e"),
}
# v5e / v6e slice sizes (chips). v4 / v5p sizes are TensorCore counts, 2 per chip, 4 chips
# per host; v5e / v6e multi-host slices have 4 chips per host, single hosts 1, 4 or 8 chips.
_CHIP_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
ACCELERATOR_HELP = ("v4-<cores> (v4-8, v4-32, ...), v5litepod-<chips> (v5e: v5litepod-8, "
                    "v5litepod-16, ...), v5p-<cores> (v5p-8, v5p-32, ...) or v6e-<chips> "
                    "(v6e-8, v6e-16, ...)")

TARBALL_EXCLUDES = (".git", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info",
                    ".ipynb_checkpoints", "./.venv", "./.cache", "./runs", "./workdirs",
                    "./results", "./logs")
REMOTE_TARBALL = "lcrec-jax.tar.gz"


class UsageError(Exception):
  """A flag is missing or has a bad value; reported by argparse with exit status 2."""


class Accelerator:
  """A parsed ``--accelerator-type``.

  Attributes:
    name: the accelerator type as gcloud takes it, e.g. ``v5litepod-16``.
    generation: ``v4``, ``v5e``, ``v5p`` or ``v6e``.
    chips: TPU chips in the slice.
    workers: TPU VM hosts (``--worker`` indices 0 .. workers-1).
  """

  def __init__(self, name: str, generation: str, chips: int, workers: int):
    self.name, self.generation, self.chips, self.workers = name, generation, chips, workers

  @property
  def runtime_version(self) -> str:
    """Default TPU software version for this generation."""
    return GENERATIONS[self.generation][2]


def parse_accelerator(name: str) -> Accelerator:
  """Parses and validates an accelerator type such as ``v4-32`` or ``v6e-8``.

  Raises:
    UsageError: the type names no supported generation or an impossible size.
  """
  flag = f"--accelerator-type={name!r}"
  m = re.fullmatch(r"(v4|v5litepod|v5p|v6e)-(\d+)", name or "")
  if not m:
    hint = ""
    alias = re.fullmatch(r"v5e-(\d+)", name or "")
    if alias:
      hint = f" (v5e slices are named v5litepod-<chips>: use v5litepod-{alias.group(1)})"
    raise UsageError(f"{flag}: unknown accelerator type{hint}; expected {ACCELERATOR_HELP}")
  prefix, size = m.group(1), int(m.group(2))
  generation = next(g for g, (p, _, _) in GENERATIONS.items() if p == prefix)
  if GENERATIONS[generation][1] == "cores":
    if size < 8 or size % 8:
      raise UsageError(f"{flag}: {prefix} sizes count TensorCores and are multiples of 8 "
                       f"({prefix}-8, {prefix}-16, {prefix}-32, ...)")
    chips = size // 2
    workers = chips // 4
  else:
    if size not in _CHIP_SIZES:
      raise UsageError(f"{flag}: {prefix} sizes count chips and are one of "
                       f"{', '.join(map(str, _CHIP_SIZES))}")
    chips = size
    workers = 1 if size <= 8 else size // 4
  return Accelerator(name, generation, chips, workers)


def pinned_jax_version(requirements: str = os.path.join(REPO_ROOT, "requirements.txt")) -> str:
  """The ``jax==X`` pin of requirements.txt (``jax[tpu]`` is installed at the same version)."""
  try:
    with open(requirements, encoding="utf-8") as f:
      for line in f:
        m = re.match(r"\s*jax\s*==\s*([^\s#;]+)", line)
        if m:
          return m.group(1)
  except OSError:
    pass
  return ""


# ----------------------------------------------------------------------------------------
# Remote bash snippets. Each returns one line of bash (statements joined by "; ") that runs
# in the login shell of every selected worker; all user values are shell-quoted.
# ----------------------------------------------------------------------------------------


def _join(statements: Sequence[str]) -> str:
  """Joins bash statements on one line; a statement ending in '&' needs no separator."""
  out = ""
  for s in statements:
    if out:
      out += " " if out.endswith("&") else "; "
    out += s
  return out


def remote_path(path: str) -> str:
  """Shell word for a worker path: absolute as given, otherwise under the user's $HOME."""
  if path.startswith("~/"):
    path = path[2:]
  if os.path.isabs(path):
    return shlex.quote(path)
  return '"$HOME"/' + shlex.quote(path)


def install_script(remote_dir: str, venv: str, python: str, jax_version: str,
                   repo_url: str = "", ref: str = "") -> str:
  """Bash that unpacks or clones the project, makes a venv and installs the pinned packages.

  Without ``repo_url`` it unpacks ``~/lcrec-jax.tar.gz`` (copied there by ``scp``).
  ``python`` is an interpreter name or path; ``auto`` picks the newest python3.13/3.12/3.11
  on the worker and installs python3.11 with apt when none is there (TPU images ship 3.10,
  the pins need >= 3.11).
  """
  d, v = remote_path(remote_dir), remote_path(venv)
  s = ["set -euo pipefail",
       f"rm -rf {d}"]
  if repo_url:
    s.append(f"git clone --quiet {shlex.quote(repo_url)} {d}")
    if ref:
      s.append(f"git -C {d} checkout --quiet {shlex.quote(ref)}")
  else:
    s += [f"mkdir -p {d}",
          f'tar -xzf "$HOME"/{REMOTE_TARBALL} -C {d}',
          f'rm -f "$HOME"/{REMOTE_TARBALL}']
  apt = "sudo apt-get -o DPkg::Lock::Timeout=600 -qq"
  if python == "auto":
    s += ['PY=""',
          "for c in python3.13 python3.12 python3.11; do "
          'if command -v "$c" >/dev/null 2>&1; then PY="$c"; break; fi; done',
          f'if [ -z "$PY" ]; then {apt} update; '
          f'{apt} install -y python3.11 python3.11-venv; PY=python3.11; fi']
  else:
    s.append(f"PY={shlex.quote(python)}")
  pip = f"{v}/bin/python -m pip install --quiet --disable-pip-version-check"
  s += [f'if [ ! -x {v}/bin/python ]; then '
        f'if ! "$PY" -m venv {v}; then rm -rf {v}; '
        f'{apt} install -y "$PY-venv"; "$PY" -m venv {v}; fi; fi',
        f"cd {d}",
        f"{pip} --upgrade pip",
        f"{pip} -r requirements.txt",
        f"{pip} --no-deps -r requirements-assets.txt",
        f"{pip} {shlex.quote(f'jax[tpu]=={jax_version}')}",
        # gs:// workdirs: epath reaches GCS through fsspec + gcsfs (pip picks a gcsfs
        # release that matches the pinned fsspec).
        f"{pip} gcsfs",
        f'echo "$(hostname): installed lcrec-jax in $PWD, venv" {v} '
        f'"$({v}/bin/python -c \'import jax; print("jax", jax.__version__)\')"']
  return _join(s)


def launch_script(remote_dir: str, venv: str, job: str, train_argv: Sequence[str],
                  env: Sequence[str] = ()) -> str:
  """Bash that starts ``python <train_argv>`` with nohup in the background on a worker.

  Output goes to ``<remote_dir>/logs/<job>.log`` (an older log is renamed with a time
  stamp), the pid to ``logs/<job>.pid``; it refuses to start while that pid is alive.
  """
  d, v = remote_path(remote_dir), remote_path(venv)
  log, pid = f"logs/{job}.log", f"logs/{job}.pid"
  qlog, qpid = shlex.quote(log), shlex.quote(pid)
  env_words = " ".join(shlex.quote(e) for e in ["PYTHONUNBUFFERED=1", *env])
  train = " ".join(shlex.quote(a) for a in train_argv)
  return _join([
      "set -euo pipefail",
      f"cd {d}",
      f'if [ ! -x {v}/bin/python ]; then echo "$(hostname): no virtualenv at" '
      f'{v} "- run tpu.py install first" >&2; exit 1; fi',
      "mkdir -p logs",
      f'if [ -f {qpid} ] && kill -0 "$(cat {qpid})" 2>/dev/null; then '
      f'echo "$(hostname): job {job} is already running (pid $(cat {qpid}))" >&2; exit 1; fi',
      f'if [ -f {qlog} ]; then mv {qlog} "logs/{job}.$(date +%Y%m%d-%H%M%S).log"; fi',
      f"nohup env {env_words} {v}/bin/python {train} > {qlog} 2>&1 < /dev/null &",
      f"echo $! > {qpid}",
      f'echo "$(hostname): started job {job}, pid $(cat {qpid}), log $PWD/{log}"',
  ])


def logs_script(remote_dir: str, job: str, lines: int, follow: bool, prefix: bool) -> str:
  """Bash that prints (``follow``: streams) the job's log, lines prefixed by host if asked."""
  log = remote_path(f"{remote_dir.rstrip('/')}/logs/{job}.log")
  cmd = f"tail -n {int(lines)}{' -F' if follow else ''} {log}"
  if prefix:
    cmd += ' | sed -u "s/^/[$(hostname)] /"'
  return cmd


def stop_script(remote_dir: str, job: str, signal: str = "TERM") -> str:
  """Bash that sends ``signal`` to the job started by :func:`launch_script`, if running."""
  qpid = shlex.quote(f"logs/{job}.pid")
  return _join([
      "set -euo pipefail",
      f"cd {remote_path(remote_dir)}",
      f'if [ -f {qpid} ] && kill -0 "$(cat {qpid})" 2>/dev/null; then '
      f'kill -s {shlex.quote(signal)} "$(cat {qpid})"; '
      f'echo "$(hostname): sent SIG{signal} to job {job} (pid $(cat {qpid}))"; '
      f'else echo "$(hostname): job {job} is not running"; fi',
  ])


def exec_script(remote_dir: str, venv: str, argv: Sequence[str]) -> str:
  """Bash that runs ``argv`` in the project directory with the venv first on PATH."""
  return _join([
      "set -euo pipefail",
      f"cd {remote_path(remote_dir)}",
      f'export PATH={remote_path(venv)}/bin:"$PATH"',
      shlex.join(list(argv)),
  ])


# ----------------------------------------------------------------------------------------
# gcloud command lines.
# ----------------------------------------------------------------------------------------


class Wait:
  """A polling step: run ``argv`` until its stdout is ``want`` (fail on a ``bad`` state)."""

  def __init__(self, argv: List[str], want: str, bad: Sequence[str], timeout_s: float,
               poll_s: float):
    self.argv, self.want, self.bad = argv, want, tuple(bad)
    self.timeout_s, self.poll_s = timeout_s, poll_s


Step = Union[List[str], Wait]


def _loc(a: argparse.Namespace) -> List[str]:
  return [f"--project={a.project}", f"--zone={a.zone}"]


def _ssh(a: argparse.Namespace, worker: str, script: str) -> List[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.name, *_loc(a), f"--worker={worker}"]
  if a.internal_ip:
    cmd.append("--internal-ip")
  return cmd + [f"--command={script}"]


def _scp(a: argparse.Namespace, worker: str, src: str, dst: str,
         recurse: bool = False) -> List[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "scp", src, dst, *_loc(a),
         f"--worker={worker}"]
  if recurse:
    cmd.append("--recurse")
  if a.internal_ip:
    cmd.append("--internal-ip")
  return cmd


def create_steps(a: argparse.Namespace) -> List[Step]:
  """``tpu-vm create`` or ``queued-resources create`` (+ a wait until ACTIVE)."""
  acc = parse_accelerator(a.accelerator_type)
  version = a.runtime_version or acc.runtime_version
  if a.spot and a.reserved:
    raise UsageError("--spot and --reserved exclude each other")
  if a.valid_until_duration and not a.queued:
    raise UsageError("--valid-until-duration needs --queued")
  if a.wait and not a.queued:
    raise UsageError("--wait needs --queued (tpu-vm create already waits until READY)")
  if a.queued:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", a.qr_id,
           f"--node-id={a.name}", *_loc(a), f"--accelerator-type={acc.name}",
           f"--runtime-version={version}"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *_loc(a),
           f"--accelerator-type={acc.name}", f"--version={version}"]
  if a.spot:
    cmd.append("--spot")
  if a.reserved:
    cmd.append("--reserved")
  if a.valid_until_duration:
    cmd.append(f"--valid-until-duration={a.valid_until_duration}")
  for flag in ("network", "subnetwork", "service_account", "scopes", "labels"):
    value = getattr(a, flag)
    if value:
      cmd.append(f"--{flag.replace('_', '-')}={value}")
  if a.internal_ip:
    cmd.append("--internal-ips")
  steps: List[Step] = [cmd]
  if a.queued and a.wait:
    steps.append(Wait(["gcloud", "compute", "tpus", "queued-resources", "describe", a.qr_id,
                       *_loc(a), "--format=value(state.state)"],
                      want="ACTIVE", bad=("FAILED", "SUSPENDED", "SUSPENDING"),
                      timeout_s=a.wait_timeout, poll_s=a.poll_seconds))
  return steps


def install_steps(a: argparse.Namespace) -> List[Step]:
  """Tarball of the working tree (or ``git clone``) + venv + pip installs on the workers."""
  jax_version = a.jax_version or pinned_jax_version(
      os.path.join(a.source_dir, "requirements.txt"))
  if not jax_version:
    raise UsageError("--jax-version: no jax==X pin found in "
                     f"{os.path.join(a.source_dir, 'requirements.txt')}; pass --jax-version")
  if a.ref and not a.repo_url:
    raise UsageError("--ref needs --repo-url")
  script = install_script(a.remote_dir, a.venv, a.python, jax_version,
                          repo_url=a.repo_url, ref=a.ref)
  steps: List[Step] = []
  if not a.repo_url:
    tarball = a.tarball or os.path.join(tempfile.gettempdir(), f"lcrec-jax-{a.name}.tar.gz")
    excludes = [f"--exclude={p}" for p in (*TARBALL_EXCLUDES, *a.exclude)]
    steps.append(["tar", "-czf", tarball, *excludes, "-C", a.source_dir, "."])
    steps.append(_scp(a, a.worker, tarball, f"{a.name}:{REMOTE_TARBALL}"))
  steps.append(_ssh(a, a.worker, script))
  return steps


def launch_steps(a: argparse.Namespace, passthrough: Sequence[str]) -> List[Step]:
  """The training command, started in the background on the selected workers."""
  for e in a.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e, flags=re.S):
      raise UsageError(f"--env={e!r}: expected NAME=VALUE")
  train = ["-m", a.module, f"--config={a.config}", f"--workdir={a.workdir}", *passthrough]
  if not a.workdir.startswith("gs://"):
    print(f"tpu.py: note: --workdir={a.workdir} is on each worker's own disk; on a pod use a "
          "gs:// workdir so that every process sees the same files", file=sys.stderr)
  return [_ssh(a, a.worker, launch_script(a.remote_dir, a.venv, a.job, train, a.env))]


def _num_workers(a: argparse.Namespace) -> int:
  if a.num_workers:
    return a.num_workers
  if a.accelerator_type:
    return parse_accelerator(a.accelerator_type).workers
  raise UsageError("--fetch-to with --worker=all needs --num-workers or --accelerator-type "
                   f"(or {ENV_PREFIX}ACCELERATOR_TYPE) to know how many workers to copy from")


def logs_steps(a: argparse.Namespace) -> List[Step]:
  """``tail`` the job log on the workers, or copy each worker's log to ``--fetch-to``."""
  if a.fetch_to:
    workers = (list(range(_num_workers(a))) if a.worker == "all"
               else [int(w) for w in a.worker.split(",")])
    src = f"{a.name}:{a.remote_dir.rstrip('/')}/logs/{a.job}.log"
    a.local_dirs.append(a.fetch_to)
    return [_scp(a, str(w), src, os.path.join(a.fetch_to, f"{a.job}-worker{w}.log"))
            for w in workers]
  prefix = a.worker == "all" or "," in a.worker
  return [_ssh(a, a.worker, logs_script(a.remote_dir, a.job, a.lines, a.follow, prefix))]


def fetch_steps(a: argparse.Namespace) -> List[Step]:
  """Copies the run's workdir back: ``gcloud storage rsync`` for gs://, else scp worker 0."""
  dest = a.dest or os.path.join("results", os.path.basename(a.workdir.rstrip("/")) or "run")
  if a.workdir.startswith("gs://"):
    a.local_dirs.append(dest)
    cmd = ["gcloud", "storage", "rsync", "--recursive", a.workdir.rstrip("/"), dest]
    cmd += [f"--exclude={x}" for x in a.exclude]
    return [cmd]
  if a.exclude:
    raise UsageError("--exclude applies to gs:// workdirs only")
  src = a.workdir if os.path.isabs(a.workdir) else f"{a.remote_dir.rstrip('/')}/{a.workdir}"
  a.local_dirs.append(os.path.dirname(os.path.abspath(dest)))  # scp -r creates dest itself
  return [_scp(a, "0", f"{a.name}:{src}", dest, recurse=True)]


def status_steps(a: argparse.Namespace) -> List[Step]:
  """``describe`` the queued resource (with ``--queued``) and the TPU VM."""
  steps: List[Step] = []
  if a.queued:
    steps.append(["gcloud", "compute", "tpus", "queued-resources", "describe", a.qr_id,
                  *_loc(a)])
  steps.append(["gcloud", "compute", "tpus", "tpu-vm", "describe", a.name, *_loc(a)])
  return steps


def delete_steps(a: argparse.Namespace) -> List[Step]:
  """Deletes the TPU VM, or with ``--queued`` the queued resource and its VM (``--force``)."""
  if a.queued:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "delete", a.qr_id, *_loc(a),
           "--force"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "delete", a.name, *_loc(a)]
  if a.run_async:
    cmd.append("--async")
  if a.yes:
    cmd.append("--quiet")
  return [cmd]


# ----------------------------------------------------------------------------------------
# Flags.
# ----------------------------------------------------------------------------------------


def _env_name(flag: str) -> str:
  return ENV_PREFIX + flag.upper().replace("-", "_")


def _truthy(value: Optional[str]) -> bool:
  return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _add(p: argparse.ArgumentParser, flag: str, env: Dict[str, str], help_: str,
         default: Optional[str] = None, **kw) -> None:
  """Adds ``--flag`` whose default is $LCREC_TPU_FLAG, else ``default``."""
  name = _env_name(flag)
  p.add_argument(f"--{flag}", default=env.get(name, default),
                 help=f"{help_} [env {name}; default: {default!r}]", **kw)


def _add_bool(p: argparse.ArgumentParser, flag: str, env: Dict[str, str], help_: str,
              dest: Optional[str] = None) -> None:
  name = _env_name(flag)
  p.add_argument(f"--{flag}", action="store_true", default=_truthy(env.get(name)),
                 dest=dest, help=f"{help_} [env {name}=1]")


def _worker(value: str) -> str:
  if value == "all" or re.fullmatch(r"\d+(,\d+)*", value):
    return value
  raise argparse.ArgumentTypeError(f"expected 'all', a worker index or a comma list, "
                                   f"got {value!r}")


def _job(value: str) -> str:
  if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
    return value
  raise argparse.ArgumentTypeError(f"expected letters, digits, '_', '.', '-', got {value!r}")


def build_parser(env: Dict[str, str]) -> argparse.ArgumentParser:
  """The CLI: one sub-command per step; defaults are read from ``env``."""
  common = argparse.ArgumentParser(add_help=False)
  g = common.add_argument_group("TPU VM")
  _add(g, "project", env, "Google Cloud project id (required)")
  _add(g, "zone", env, "zone of the TPU, e.g. us-central2-b (required)")
  _add(g, "name", env, "TPU VM (node) name (required)")
  _add_bool(g, "queued", env, "the TPU was (is to be) created as a queued resource")
  _add(g, "qr-id", env, "queued-resource id", default="<name>-qr")
  _add_bool(g, "internal-ip", env, "reach the workers by internal IP (ssh/scp), create "
            "them with --internal-ips")
  g.add_argument("--dry-run", action="store_true",
                 help="print the commands, one shell-quoted line each, and run nothing")

  remote = argparse.ArgumentParser(add_help=False)
  g = remote.add_argument_group("worker layout")
  _add(g, "remote-dir", env, "project checkout on every worker", default="lcrec-jax")
  _add(g, "venv", env, "virtualenv on every worker", default="lcrec-venv")

  job = argparse.ArgumentParser(add_help=False)
  _add(job, "job", env, "job name: log logs/<job>.log, pid logs/<job>.pid", default="train",
       type=_job)

  parser = argparse.ArgumentParser(
      prog="tpu.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Run 'tpu.py <command> --help' for the flags of one command.")
  sub = parser.add_subparsers(dest="command", metavar="command", required=True)

  p = sub.add_parser("create", parents=[common], help="create a TPU VM or pod slice")
  _add(p, "accelerator-type", env, f"accelerator type: {ACCELERATOR_HELP} (required)")
  _add(p, "runtime-version", env, "TPU software version; default per generation: " +
       ", ".join(f"{g} {v[2]}" for g, v in GENERATIONS.items()))
  _add_bool(p, "spot", env, "Spot VMs (preemptible, cheaper)")
  _add_bool(p, "reserved", env, "use reserved capacity")
  _add(p, "valid-until-duration", env, "queued resources: give up if not provisioned "
       "within this duration, e.g. 6h")
  _add(p, "network", env, "VPC network")
  _add(p, "subnetwork", env, "VPC subnetwork")
  _add(p, "service-account", env, "service account of the workers (needs write access to "
       "the gs:// workdir)")
  _add(p, "scopes", env, "access scopes of the workers, e.g. cloud-platform")
  _add(p, "labels", env, "labels, KEY=VALUE,...")
  p.add_argument("--wait", action="store_true",
                 help="queued resources: poll until the request is ACTIVE")
  p.add_argument("--wait-timeout", type=float, default=24 * 3600.0,
                 help="seconds --wait waits before giving up (default 1 day)")
  p.add_argument("--poll-seconds", type=float, default=30.0,
                 help="seconds between --wait polls (default 30)")

  p = sub.add_parser("install", parents=[common, remote],
                     help="install the project, its pins and jax[tpu] on every worker")
  _add(p, "worker", env, "worker(s): all, N or N,M", default="all", type=_worker)
  _add(p, "repo-url", env, "git URL to clone on the workers; default: copy a tarball of "
       "--source-dir")
  _add(p, "ref", env, "branch, tag or commit to check out after cloning --repo-url")
  _add(p, "source-dir", env, "local tree to tar and copy when no --repo-url",
       default=REPO_ROOT)
  _add(p, "tarball", env, "local path of the tarball (default: in the temp directory)")
  p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                 help="extra tar --exclude pattern (repeatable)")
  _add(p, "python", env, "python on the workers that makes the venv; 'auto' = newest of "
       "python3.13/3.12/3.11, apt-installing python3.11 if none", default="auto")
  _add(p, "jax-version", env, "jax[tpu] version; default: the jax== pin of requirements.txt")

  p = sub.add_parser("launch", parents=[common, remote, job],
                     help="start the training command on every worker (nohup, background)",
                     usage="tpu.py launch [flags] --config=RECIPE --workdir=DIR [-- ARGS...]",
                     description="Runs `python -m MODULE --config=RECIPE --workdir=DIR ARGS...` "
                     "in the background on the workers; ARGS after `--` are passed through.")
  _add(p, "worker", env, "worker(s): all, N or N,M", default="all", type=_worker)
  _add(p, "config", env, "recipe file, relative to the project, e.g. "
       "configs/ml100k_quick.py (required)")
  _add(p, "workdir", env, "run directory, e.g. gs://BUCKET/runs/NAME (required)")
  _add(p, "module", env, "python module to run", default="lcrec_jax.main")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment variable for the job (repeatable)")

  p = sub.add_parser("logs", parents=[common, remote, job],
                     help="print or stream the job log of a worker (or all), or copy logs")
  _add(p, "worker", env, "worker(s): all, N or N,M", default="0", type=_worker)
  p.add_argument("-f", "--follow", action="store_true", help="keep streaming (tail -F)")
  p.add_argument("-n", "--lines", type=int, default=100, help="last lines to show (100)")
  p.add_argument("--fetch-to", metavar="DIR",
                 help="copy each selected worker's log to DIR/<job>-worker<N>.log instead")
  p.add_argument("--num-workers", type=int, default=0,
                 help="workers in the slice, for --fetch-to with --worker=all")
  _add(p, "accelerator-type", env, "slice type, to count workers for --fetch-to")

  p = sub.add_parser("exec", parents=[common, remote],
                     help="run a command in the project dir (venv on PATH) on the workers",
                     usage="tpu.py exec [flags] -- COMMAND [ARGS...]")
  _add(p, "worker", env, "worker(s): all, N or N,M", default="all", type=_worker)

  p = sub.add_parser("stop", parents=[common, remote, job],
                     help="signal the job started by launch on the workers")
  _add(p, "worker", env, "worker(s): all, N or N,M", default="all", type=_worker)
  p.add_argument("--signal", default="TERM", help="signal name (TERM)")

  p = sub.add_parser("fetch", parents=[common, remote],
                     help="copy the run's workdir back (gcloud storage rsync from gs://)")
  _add(p, "workdir", env, "the run's --workdir (required)")
  _add(p, "dest", env, "local directory (default: results/<basename of workdir>)")
  p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                 help="skip objects matching REGEX, e.g. 'checkpoints/.*' (repeatable)")

  sub.add_parser("status", parents=[common], help="describe the TPU VM (and queued resource)")

  p = sub.add_parser("delete", parents=[common],
                     help="delete the TPU VM, or the queued resource and its VM")
  p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
  p.add_argument("--async", dest="run_async", action="store_true",
                 help="return without waiting for the deletion")
  for p in sub.choices.values():
    p.set_defaults(parser=p)
  return parser


_REQUIRED = {
    "create": ("accelerator_type",),
    "launch": ("config", "workdir"),
    "fetch": ("workdir",),
}


def _check_required(a: argparse.Namespace) -> None:
  names = ["project", "zone", "name"]
  if a.command == "fetch" and a.workdir and a.workdir.startswith("gs://"):
    names = []  # gcloud storage needs no TPU
  for field in names + list(_REQUIRED.get(a.command, ())):
    if not getattr(a, field):
      flag = field.replace("_", "-")
      raise UsageError(f"--{flag} is required (or set {_env_name(flag)})")
  if getattr(a, "qr_id", None) == "<name>-qr":
    a.qr_id = f"{a.name}-qr"


# ----------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------


def _wait(step: Wait) -> int:
  deadline = time.monotonic() + step.timeout_s
  while True:
    r = subprocess.run(step.argv, capture_output=True, text=True, check=False)
    state = r.stdout.strip()
    if r.returncode == 0 and state == step.want:
      print(f"tpu.py: state {state}", file=sys.stderr)
      return 0
    if r.returncode == 0 and state in step.bad:
      print(f"tpu.py: state {state}; giving up", file=sys.stderr)
      return 1
    if time.monotonic() > deadline:
      print(f"tpu.py: still {state or r.stderr.strip()!r} after {step.timeout_s:.0f}s",
            file=sys.stderr)
      return 1
    print(f"tpu.py: state {state or '?'}; next poll in {step.poll_s:.0f}s", file=sys.stderr)
    time.sleep(step.poll_s)


def run_steps(steps: Sequence[Step], dry_run: bool) -> int:
  """Prints (dry run) or runs each step in order; stops at the first failure."""
  for step in steps:
    argv = step.argv if isinstance(step, Wait) else step
    if dry_run:
      print(shlex.join(argv), flush=True)
      continue
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    rc = _wait(step) if isinstance(step, Wait) else subprocess.run(argv, check=False).returncode
    if rc:
      print(f"tpu.py: exit status {rc}: {shlex.join(argv)}", file=sys.stderr)
      return rc
  return 0


def main(argv: Optional[Sequence[str]] = None, env: Optional[Dict[str, str]] = None) -> int:
  """Parses ``argv`` (default: sys.argv[1:]); returns the exit status.

  Usage errors exit through argparse with status 2 and a message naming the flag.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  env = dict(os.environ if env is None else env)
  passthrough: List[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, passthrough = argv[:i], argv[i + 1:]
  parser = build_parser(env)
  a = parser.parse_args(argv)
  a.local_dirs = []
  try:
    _check_required(a)
    if passthrough and a.command not in ("launch", "exec"):
      raise UsageError(f"{a.command} takes no arguments after '--'")
    if a.command == "create":
      steps = create_steps(a)
    elif a.command == "install":
      steps = install_steps(a)
    elif a.command == "launch":
      steps = launch_steps(a, passthrough)
    elif a.command == "logs":
      steps = logs_steps(a)
    elif a.command == "exec":
      if not passthrough:
        raise UsageError("exec needs a command after '--', e.g. -- python -c 'import jax'")
      steps = [_ssh(a, a.worker, exec_script(a.remote_dir, a.venv, passthrough))]
    elif a.command == "stop":
      steps = [_ssh(a, a.worker, stop_script(a.remote_dir, a.job, a.signal))]
    elif a.command == "fetch":
      steps = fetch_steps(a)
    elif a.command == "status":
      steps = status_steps(a)
    else:
      steps = delete_steps(a)
  except UsageError as e:
    a.parser.error(str(e))
  if not a.dry_run:
    for d in a.local_dirs:
      os.makedirs(d, exist_ok=True)
  return run_steps(steps, a.dry_run)


if __name__ == "__main__":
  sys.exit(main())
