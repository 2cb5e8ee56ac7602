"""tpu_scripts/tpu.py: the gcloud command lines it prints, and the bash it runs on workers.

No Cloud access here: commands are checked in --dry-run; the bash that runs on the workers
(launch, logs, stop, exec) is executed for real with a temporary $HOME standing in for a
worker; the tar command is run for real; a recording `gcloud` stub on PATH checks that a
real run executes exactly the commands a dry run prints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tpu_scripts" / "tpu.py"

_spec = importlib.util.spec_from_file_location("lcrec_tpu_cli", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

ENV = {"LCREC_TPU_PROJECT": "my-proj", "LCREC_TPU_ZONE": "us-central2-b",
       "LCREC_TPU_NAME": "lc-pod"}
LOC = ["--project=my-proj", "--zone=us-central2-b"]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
# Arguments a user might pass through to the trainer: spaces, quotes, $, backticks, ;, globs.
TRICKY = ["--config.rqvae.epochs=50", "--config.note=it's a \"test\"", "--x=$HOME `id`; *",
          "two words", ""]


def dry(capsys, *args, env=None) -> list[list[str]]:
  """Runs the CLI in --dry-run and returns the printed commands, each split back to argv."""
  rc = tpu.main([args[0], "--dry-run", *args[1:]], env=ENV if env is None else env)
  assert rc == 0
  lines = capsys.readouterr().out.splitlines()
  return [shlex.split(line) for line in lines]


def usage_error(capsys, *args, env=None) -> str:
  """Runs the CLI expecting a usage error; returns its stderr."""
  with pytest.raises(SystemExit) as e:
    tpu.main([args[0], "--dry-run", *args[1:]], env=ENV if env is None else env)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "usage: tpu.py" in err
  return err


def remote(cmd: list[str]) -> str:
  """The --command= script of a gcloud ssh argv."""
  (script,) = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
  return script


def fake_worker(tmp_path: pathlib.Path, with_venv: bool = True) -> dict:
  """A $HOME laid out like a worker after install; its venv python records its argv."""
  home = tmp_path / "home"
  (home / "lcrec-jax").mkdir(parents=True)
  if with_venv:
    (home / "lcrec-venv" / "bin").mkdir(parents=True)
    py = home / "lcrec-venv" / "bin" / "python"
    py.write_text(f"#!{sys.executable}\n"
                  "import json, os, sys\n"
                  "rec = {'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
                  "       'env': {k: os.environ.get(k) for k in ('A', 'PYTHONUNBUFFERED')}}\n"
                  "open('record.json.tmp', 'w').write(json.dumps(rec))\n"
                  "os.replace('record.json.tmp', 'record.json')\n"
                  "print('training output line')\n")
    py.chmod(0o755)
  env = dict(os.environ, HOME=str(home))
  return {"home": home, "env": env}


def run_bash(script: str, env: dict, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                        timeout=30, **kw)


def wait_for(path: pathlib.Path, timeout: float = 20.0) -> None:
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.05)


# ---------------------------------------------------------------------------- create


@pytest.mark.parametrize("acc,version,chips,workers", [
    ("v4-8", "tpu-ubuntu2204-base", 4, 1),
    ("v4-32", "tpu-ubuntu2204-base", 16, 4),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 8, 1),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", 16, 4),
    ("v5p-8", "v2-alpha-tpuv5", 4, 1),
    ("v5p-128", "v2-alpha-tpuv5", 64, 16),
    ("v6e-4", "v2-alpha-tpuv6e", 4, 1),
    ("v6e-256", "v2-alpha-tpuv6e", 256, 64),
])
def test_create_on_demand_per_generation(capsys, acc, version, chips, workers):
  (cmd,) = dry(capsys, "create", f"--accelerator-type={acc}")
  assert cmd == [*TPU_VM, "create", "lc-pod", *LOC, f"--accelerator-type={acc}",
                 f"--version={version}"]
  parsed = tpu.parse_accelerator(acc)
  assert (parsed.chips, parsed.workers, parsed.runtime_version) == (chips, workers, version)


def test_create_spot_and_options(capsys):
  (cmd,) = dry(capsys, "create", "--accelerator-type=v6e-16", "--spot",
               "--runtime-version=v2-alpha-tpuv6e-custom", "--network=net",
               "--service-account=sa@p.iam.gserviceaccount.com", "--scopes=cloud-platform",
               "--internal-ip")
  assert cmd == [*TPU_VM, "create", "lc-pod", *LOC, "--accelerator-type=v6e-16",
                 "--version=v2-alpha-tpuv6e-custom", "--spot", "--network=net",
                 "--service-account=sa@p.iam.gserviceaccount.com", "--scopes=cloud-platform",
                 "--internal-ips"]


def test_create_queued_spot_with_wait(capsys):
  create, describe = dry(capsys, "create", "--accelerator-type=v5litepod-16", "--queued",
                         "--spot", "--valid-until-duration=6h", "--wait")
  assert create == [*QR, "create", "lc-pod-qr", "--node-id=lc-pod", *LOC,
                    "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                    "--spot", "--valid-until-duration=6h"]
  assert describe == [*QR, "describe", "lc-pod-qr", *LOC, "--format=value(state.state)"]
  (create,) = dry(capsys, "create", "--accelerator-type=v5p-16", "--queued", "--reserved",
                  "--qr-id=my-request")
  assert create == [*QR, "create", "my-request", "--node-id=lc-pod", *LOC,
                    "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5",
                    "--reserved"]


def test_env_defaults_and_flags_override_them(capsys):
  env = dict(ENV, LCREC_TPU_ACCELERATOR_TYPE="v4-16", LCREC_TPU_SPOT="1",
             LCREC_TPU_QUEUED="true", LCREC_TPU_RUNTIME_VERSION="tpu-ubuntu2204-base-x")
  (create,) = dry(capsys, "create", env=env)
  assert create == [*QR, "create", "lc-pod-qr", "--node-id=lc-pod", *LOC,
                    "--accelerator-type=v4-16", "--runtime-version=tpu-ubuntu2204-base-x",
                    "--spot"]
  (create,) = dry(capsys, "create", "--project=other", "--name=n2", "--zone=europe-west4-a",
                  "--accelerator-type=v4-8", env=env)
  assert create[:9] == [*QR, "create", "n2-qr", "--node-id=n2", "--project=other",
                        "--zone=europe-west4-a"]
  assert "--accelerator-type=v4-8" in create
  (delete,) = dry(capsys, "delete", env=env)
  assert delete == [*QR, "delete", "lc-pod-qr", *LOC, "--force"]


@pytest.mark.parametrize("args,env_drop,message", [
    (["create", "--accelerator-type=v4-8"], "LCREC_TPU_PROJECT",
     "--project is required (or set LCREC_TPU_PROJECT)"),
    (["install"], "LCREC_TPU_ZONE", "--zone is required (or set LCREC_TPU_ZONE)"),
    (["delete"], "LCREC_TPU_NAME", "--name is required (or set LCREC_TPU_NAME)"),
    (["create"], None, "--accelerator-type is required (or set LCREC_TPU_ACCELERATOR_TYPE)"),
    (["create", "--accelerator-type=v3-8"], None, "'v3-8': unknown accelerator type"),
    (["create", "--accelerator-type=tpu7x-8"], None, "unknown accelerator type"),
    (["create", "--accelerator-type=v5e-8"], None, "use v5litepod-8"),
    (["create", "--accelerator-type=v4-12"], None, "multiples of 8"),
    (["create", "--accelerator-type=v6e-12"], None, "one of 1, 4, 8, 16"),
    (["create", "--accelerator-type=v4-8", "--spot", "--reserved"], None,
     "--spot and --reserved exclude each other"),
    (["create", "--accelerator-type=v4-8", "--wait"], None, "--wait needs --queued"),
    (["launch", "--config=configs/ml100k_quick.py"], None, "--workdir is required"),
    (["launch", "--workdir=gs://b/r"], None, "--config is required"),
    (["launch", "--config=c.py", "--workdir=gs://b/r", "--env=1BAD=x"], None,
     "--env='1BAD=x': expected NAME=VALUE"),
    (["logs", "--worker=first"], None, "--worker: expected 'all'"),
    (["launch", "--config=c.py", "--workdir=gs://b/r", "--job=a b"], None,
     "--job: expected letters"),
    (["logs", "--worker=all", "--fetch-to=/tmp/x"], None, "needs --num-workers"),
    (["exec"], None, "exec needs a command after '--'"),
    (["delete", "--", "x"], None, "delete takes no arguments after '--'"),
    (["install", "--ref=v1"], None, "--ref needs --repo-url"),
    (["fetch"], None, "--workdir is required"),
    (["reboot"], None, "invalid choice: 'reboot'"),
])
def test_usage_errors_name_the_flag(capsys, args, env_drop, message):
  env = {k: v for k, v in ENV.items() if k != env_drop}
  assert message in usage_error(capsys, *args, env=env)


def test_cli_entry_point_exit_status_and_output():
  """The real script: a usage error exits 2 on stderr; a dry run prints what main() prints."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("LCREC_TPU_")}
  r = subprocess.run([sys.executable, str(SCRIPT), "create", "--zone=z", "--name=n",
                      "--accelerator-type=v4-8", "--dry-run"],
                     env=env, capture_output=True, text=True, timeout=30)
  assert r.returncode == 2 and r.stdout == ""
  assert "--project is required (or set LCREC_TPU_PROJECT)" in r.stderr
  r = subprocess.run([sys.executable, str(SCRIPT), "create", "--accelerator-type=v4-8",
                      "--dry-run"], env=dict(env, **ENV), capture_output=True, text=True,
                     timeout=30)
  assert r.returncode == 0, r.stderr
  assert r.stdout == ("gcloud compute tpus tpu-vm create lc-pod --project=my-proj "
                      "--zone=us-central2-b --accelerator-type=v4-8 "
                      "--version=tpu-ubuntu2204-base\n")
  r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                     text=True, timeout=30)
  assert r.returncode == 0
  for command in ("create", "install", "launch", "logs", "exec", "stop", "fetch", "status",
                  "delete"):
    assert command in r.stdout


# ---------------------------------------------------------------------------- install


def test_install_tarball_commands_and_tar_contents(capsys, tmp_path):
  src = tmp_path / "src"
  for rel in ("requirements.txt", "requirements-assets.txt", "lcrec_jax/main.py",
              "configs/q.py", ".git/HEAD", "lcrec_jax/__pycache__/m.pyc", "runs/a/ckpt",
              "results/r/x", "logs/train-worker0.log", "lcrec_jax/runs_helper.py"):
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_text("x\n")
  (src / "requirements.txt").write_text("numpy==2.0\njax==9.8.7  # pinned\njaxlib==9.8.7\n")
  tarball = tmp_path / "out" / "tree.tar.gz"
  tarball.parent.mkdir()
  tar, scp, ssh = dry(capsys, "install", f"--source-dir={src}", f"--tarball={tarball}")

  assert tar[:3] == ["tar", "-czf", str(tarball)] and tar[-3:] == ["-C", str(src), "."]
  subprocess.run(tar, check=True, timeout=30)
  with tarfile.open(tarball) as t:
    names = {n.lstrip("./") for n in t.getnames()}
  assert {"requirements.txt", "lcrec_jax/main.py", "configs/q.py",
          "lcrec_jax/runs_helper.py"} <= names
  assert not [n for n in names if n.startswith((".git", "runs", "results", "logs"))
              or "__pycache__" in n], names

  assert scp == [*TPU_VM, "scp", str(tarball), "lc-pod:lcrec-jax.tar.gz", *LOC, "--worker=all"]
  assert ssh[:9] == [*TPU_VM, "ssh", "lc-pod", *LOC, "--worker=all"]
  script = remote(ssh)
  statements = script.split("; ")
  pip = '"$HOME"/lcrec-venv/bin/python -m pip install --quiet --disable-pip-version-check'
  assert f"{pip} -r requirements.txt" in statements
  assert f"{pip} --no-deps -r requirements-assets.txt" in statements
  assert f"{pip} 'jax[tpu]==9.8.7'" in statements  # the pin of the tree being installed
  assert statements.index(f"{pip} -r requirements.txt") < statements.index(
      f"{pip} 'jax[tpu]==9.8.7'")
  assert f"{pip} gcsfs" in statements  # gs:// workdirs (lcrec_jax/fs.py)
  assert 'tar -xzf "$HOME"/lcrec-jax.tar.gz -C "$HOME"/lcrec-jax' in statements
  assert subprocess.run(["bash", "-n", "-c", script], timeout=30).returncode == 0


def test_install_jax_version_matches_repo_pin(capsys):
  pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO / "requirements.txt").read_text(),
                         flags=re.M))
  *_, ssh = dry(capsys, "install")
  assert f"'jax[tpu]=={pins['jax']}'" in remote(ssh)


def test_install_clone_from_url(capsys):
  (ssh,) = dry(capsys, "install", "--repo-url=https://github.com/me/lcrec-jax.git",
               "--ref=v0.1", "--worker=2", "--remote-dir=/opt/lc rec", "--venv=~/venvs/lc",
               "--python=python3.12", "--jax-version=1.2.3")
  assert ssh[:9] == [*TPU_VM, "ssh", "lc-pod", *LOC, "--worker=2"]
  statements = remote(ssh).split("; ")
  assert "git clone --quiet https://github.com/me/lcrec-jax.git '/opt/lc rec'" in statements
  assert "git -C '/opt/lc rec' checkout --quiet v0.1" in statements
  assert "PY=python3.12" in statements
  assert ('"$HOME"/venvs/lc/bin/python -m pip install --quiet --disable-pip-version-check '
          "'jax[tpu]==1.2.3'") in statements
  assert not any("tar " in s for s in statements)


# ---------------------------------------------------------------------------- launch


def test_launch_runs_the_exact_training_command(capsys, tmp_path):
  (ssh,) = dry(capsys, "launch", "--config=configs/ml100k_quick.py",
               "--workdir=gs://my-bucket/runs/ml100k", "--env=A=x y 'z'", "--", *TRICKY)
  assert ssh[:9] == [*TPU_VM, "ssh", "lc-pod", *LOC, "--worker=all"]
  worker = fake_worker(tmp_path)
  r = run_bash(remote(ssh), worker["env"])
  assert r.returncode == 0, r.stderr
  assert f"{socket.gethostname()}: started job train, pid" in r.stdout
  proj = worker["home"] / "lcrec-jax"
  wait_for(proj / "record.json")
  rec = json.loads((proj / "record.json").read_text())
  assert rec["argv"] == ["-m", "lcrec_jax.main", "--config=configs/ml100k_quick.py",
                         "--workdir=gs://my-bucket/runs/ml100k", *TRICKY]
  assert rec["cwd"] == str(proj)
  assert rec["env"] == {"A": "x y 'z'", "PYTHONUNBUFFERED": "1"}
  pid = int((proj / "logs" / "train.pid").read_text())
  assert pid > 0
  deadline = time.monotonic() + 20
  while "training output line" not in (proj / "logs" / "train.log").read_text():
    assert time.monotonic() < deadline
    time.sleep(0.05)


def test_launch_refuses_while_running_and_without_venv(capsys, tmp_path):
  (ssh,) = dry(capsys, "launch", "--config=c.py", "--workdir=gs://b/r", "--job=exp1",
               "--worker=0")
  assert "--worker=0" in ssh
  worker = fake_worker(tmp_path)
  logs = worker["home"] / "lcrec-jax" / "logs"
  logs.mkdir()
  (logs / "exp1.pid").write_text(f"{os.getpid()}\n")  # a live process
  r = run_bash(remote(ssh), worker["env"])
  assert r.returncode == 1 and "job exp1 is already running" in r.stderr
  assert not (worker["home"] / "lcrec-jax" / "record.json").exists()

  bare = fake_worker(tmp_path / "bare", with_venv=False)
  r = run_bash(remote(ssh), bare["env"])
  assert r.returncode == 1 and "run tpu.py install first" in r.stderr


def test_launch_keeps_the_previous_log(capsys, tmp_path):
  (ssh,) = dry(capsys, "launch", "--config=c.py", "--workdir=gs://b/r")
  worker = fake_worker(tmp_path)
  logs = worker["home"] / "lcrec-jax" / "logs"
  logs.mkdir()
  (logs / "train.log").write_text("old run\n")
  assert run_bash(remote(ssh), worker["env"]).returncode == 0
  wait_for(worker["home"] / "lcrec-jax" / "record.json")
  old = [p for p in logs.glob("train.*.log")]
  assert len(old) == 1 and old[0].read_text() == "old run\n"


# ---------------------------------------------------------------------------- logs / stop


def test_logs_commands(capsys):
  (ssh,) = dry(capsys, "logs", "--worker=3", "--lines=50")
  assert ssh == [*TPU_VM, "ssh", "lc-pod", *LOC, "--worker=3",
                 '--command=tail -n 50 "$HOME"/lcrec-jax/logs/train.log']
  (ssh,) = dry(capsys, "logs", "--worker=all", "--follow", "--job=exp1")
  assert ssh[-2:] == ["--worker=all", '--command=tail -n 100 -F "$HOME"/lcrec-jax/logs/'
                      'exp1.log | sed -u "s/^/[$(hostname)] /"']
  cmds = dry(capsys, "logs", "--worker=all", "--fetch-to=out", "--accelerator-type=v4-32")
  assert cmds == [[*TPU_VM, "scp", "lc-pod:lcrec-jax/logs/train.log",
                   os.path.join("out", f"train-worker{w}.log"), *LOC, f"--worker={w}"]
                  for w in range(4)]
  assert len(dry(capsys, "logs", "--worker=all", "--fetch-to=o", "--num-workers=2")) == 2
  assert [c[-1] for c in dry(capsys, "logs", "--worker=1,3", "--fetch-to=o")] == [
      "--worker=1", "--worker=3"]


def test_logs_script_prints_prefixed_tail(tmp_path):
  worker = fake_worker(tmp_path)
  logs = worker["home"] / "lcrec-jax" / "logs"
  logs.mkdir()
  (logs / "train.log").write_text("".join(f"line {i}\n" for i in range(10)))
  r = run_bash(tpu.logs_script("lcrec-jax", "train", 3, False, True), worker["env"])
  host = socket.gethostname()
  assert r.stdout.splitlines() == [f"[{host}] line {i}" for i in (7, 8, 9)]


def test_stop_signals_the_running_job(capsys, tmp_path):
  (ssh,) = dry(capsys, "stop")
  assert ssh[:9] == [*TPU_VM, "ssh", "lc-pod", *LOC, "--worker=all"]
  worker = fake_worker(tmp_path)
  logs = worker["home"] / "lcrec-jax" / "logs"
  logs.mkdir()
  job = subprocess.Popen(["sleep", "60"])
  try:
    (logs / "train.pid").write_text(f"{job.pid}\n")
    r = run_bash(remote(ssh), worker["env"])
    assert r.returncode == 0 and "sent SIGTERM to job train" in r.stdout
    assert job.wait(timeout=10) == -signal.SIGTERM
  finally:
    if job.poll() is None:
      job.kill()
  r = run_bash(remote(ssh), worker["env"])
  assert r.returncode == 0 and "job train is not running" in r.stdout


def test_exec_runs_in_project_with_venv_python(capsys, tmp_path):
  (ssh,) = dry(capsys, "exec", "--", "python", "-c", "import jax; print(jax.device_count())")
  assert "--worker=all" in ssh
  worker = fake_worker(tmp_path)
  r = run_bash(remote(ssh), worker["env"])
  assert r.returncode == 0, r.stderr
  rec = json.loads((worker["home"] / "lcrec-jax" / "record.json").read_text())
  assert rec["argv"] == ["-c", "import jax; print(jax.device_count())"]


# ---------------------------------------------------------------------------- fetch / delete


def test_fetch_from_gcs_and_from_worker_disk(capsys):
  no_tpu_env = {}  # a gs:// workdir needs no project, zone or TPU name
  (cmd,) = dry(capsys, "fetch", "--workdir=gs://my-bucket/runs/ml100k/", env=no_tpu_env)
  assert cmd == ["gcloud", "storage", "rsync", "--recursive", "gs://my-bucket/runs/ml100k",
                 os.path.join("results", "ml100k")]
  (cmd,) = dry(capsys, "fetch", "--workdir=gs://b/r", "--dest=here", "--exclude=ckpt/.*")
  assert cmd == ["gcloud", "storage", "rsync", "--recursive", "gs://b/r", "here",
                 "--exclude=ckpt/.*"]
  (cmd,) = dry(capsys, "fetch", "--workdir=runs/ml100k", "--dest=back")
  assert cmd == [*TPU_VM, "scp", "lc-pod:lcrec-jax/runs/ml100k", "back", *LOC, "--worker=0",
                 "--recurse"]


def test_delete_and_status(capsys):
  assert dry(capsys, "delete") == [[*TPU_VM, "delete", "lc-pod", *LOC]]
  assert dry(capsys, "delete", "--yes", "--async") == [
      [*TPU_VM, "delete", "lc-pod", *LOC, "--async", "--quiet"]]
  assert dry(capsys, "delete", "--queued", "--yes") == [
      [*QR, "delete", "lc-pod-qr", *LOC, "--force", "--quiet"]]
  assert dry(capsys, "status", "--queued") == [[*QR, "describe", "lc-pod-qr", *LOC],
                                              [*TPU_VM, "describe", "lc-pod", *LOC]]


# ---------------------------------------------------------------------------- lint / real run


def test_worker_scripts_pass_shellcheck(tmp_path):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed")
  scripts = {
      "install_tar": tpu.install_script("lcrec-jax", "lcrec-venv", "auto", "0.10.2"),
      "install_git": tpu.install_script("/opt/x y", "~/v", "python3.12", "0.10.2",
                                        repo_url="https://github.com/a/b.git", ref="main"),
      "launch": tpu.launch_script("lcrec-jax", "lcrec-venv", "train",
                                  ["-m", "lcrec_jax.main", "--config=c.py", "--workdir=gs://b",
                                   "two words", "it's"], ["A=b c"]),
      "logs": tpu.logs_script("lcrec-jax", "train", 10, False, False),
      "logs_all": tpu.logs_script("lcrec-jax", "train", 10, True, True),
      "stop": tpu.stop_script("lcrec-jax", "train"),
      "exec": tpu.exec_script("lcrec-jax", "lcrec-venv", ["python", "-c", "import jax"]),
  }
  paths = []
  for name, text in scripts.items():
    path = tmp_path / f"{name}.sh"
    path.write_text("#!/usr/bin/env bash\n" + text + "\n")
    paths.append(str(path))
  r = subprocess.run(["shellcheck", "--shell=bash", *paths], capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr
  # User text with a literal `$` is quoted on purpose; only info-level SC2016 may remain.
  tricky = tmp_path / "tricky.sh"
  tricky.write_text("#!/usr/bin/env bash\n" + tpu.launch_script(
      "lcrec-jax", "lcrec-venv", "train", ["-m", "m", *TRICKY]) + "\n")
  r = subprocess.run(["shellcheck", "--shell=bash", "--severity=warning", str(tricky)],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def gcloud_stub(tmp_path, monkeypatch):
  """A `gcloud` on PATH that logs its argv; `describe` answers states from a list."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log, states = tmp_path / "calls.jsonl", tmp_path / "states"
  stub = bin_dir / "gcloud"
  stub.write_text(f"#!{sys.executable}\n"
                  "import json, os, sys\n"
                  f"open({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
                  "if 'describe' in sys.argv:\n"
                  f"  lines = open({str(states)!r}).read().split()\n"
                  f"  open({str(states)!r}, 'w').write('\\n'.join(lines[1:]))\n"
                  "  print(lines[0])\n"
                  "sys.exit(int(os.environ.get('STUB_RC', '0')))\n")
  stub.chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

  def calls():
    if not log.exists():
      return []
    return [json.loads(line) for line in log.read_text().splitlines()]

  return {"calls": calls, "states": states}


def test_real_run_executes_the_dry_run_commands(capsys, gcloud_stub, monkeypatch):
  gcloud_stub["states"].write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
  args = ["create", "--accelerator-type=v5p-32", "--queued", "--spot", "--wait",
          "--poll-seconds=0"]
  expected = dry(capsys, *args)
  assert tpu.main(args, env=ENV) == 0
  calls = gcloud_stub["calls"]()
  assert [c[0] for c in calls] == [shutil.which("gcloud")] * 4
  assert [c[1:] for c in calls] == [expected[0][1:]] + [expected[1][1:]] * 3

  launch = ["launch", "--config=configs/ml100k_quick.py", "--workdir=gs://b/r", "--", *TRICKY]
  expected = dry(capsys, *launch)
  assert tpu.main(launch, env=ENV) == 0
  assert gcloud_stub["calls"]()[-1][1:] == expected[0][1:]

  gcloud_stub["states"].write_text("WAITING_FOR_RESOURCES\nFAILED\n")
  assert tpu.main(args, env=ENV) == 1  # a FAILED request stops the wait

  monkeypatch.setenv("STUB_RC", "3")
  n = len(gcloud_stub["calls"]())
  assert tpu.main(args, env=ENV) == 3  # create failed: its status comes back, no wait
  assert len(gcloud_stub["calls"]()) == n + 1


@pytest.mark.slow
def test_gcloud_parses_every_command_line(capsys, tmp_path):
  """Where the Cloud SDK is installed, its own parser accepts each printed command.

  With an empty config (no account) gcloud parses the flags, then stops at "no active
  account" (exit 1) before any API call; a flag it does not know exits 2.
  """
  if shutil.which("gcloud") is None:
    pytest.skip("gcloud not installed")
  cmds = [
      *dry(capsys, "create", "--accelerator-type=v4-32", "--spot", "--network=n",
           "--service-account=sa@p.iam.gserviceaccount.com", "--scopes=cloud-platform",
           "--labels=team=rec", "--internal-ip"),
      *dry(capsys, "create", "--accelerator-type=v6e-16", "--queued", "--spot",
           "--valid-until-duration=6h", "--wait"),
      *dry(capsys, "create", "--accelerator-type=v5litepod-8", "--queued", "--reserved"),
      *dry(capsys, "install", "--internal-ip")[1:],  # [0] is tar
      *dry(capsys, "launch", "--config=c.py", "--workdir=gs://b/r", "--", *TRICKY),
      *dry(capsys, "logs", "--worker=all", "--follow"),
      *dry(capsys, "logs", "--worker=all", "--fetch-to=o", "--num-workers=1"),
      *dry(capsys, "fetch", "--workdir=gs://b/r", "--exclude=ckpt/.*", f"--dest={tmp_path}"),
      *dry(capsys, "fetch", "--workdir=runs/r", f"--dest={tmp_path}/r"),
      *dry(capsys, "status", "--queued"),
      *dry(capsys, "delete", "--yes", "--async"),
      *dry(capsys, "delete", "--queued", "--yes"),
  ]
  env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path / "gcloud-config"),
             CLOUDSDK_CORE_DISABLE_PROMPTS="1",
             CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="1")
  procs = [(c, subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL)) for c in cmds]
  for cmd, p in procs:
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "do not currently have an active account" in err, (
        shlex.join(cmd), p.returncode, err)
