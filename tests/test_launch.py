"""The launch scripts: several cooperating JAX processes give the one-process result.

launch/local_processes.sh runs the pretraining program as N processes under JAX's own
multi-controller runtime on 127.0.0.1 (CPU, gloo collectives), the way a pod slice or a
cluster runs it: each process reads its rows of every global batch, all of them write
the checkpoint, and logs and pictures come from process 0. launch/slurm.sbatch's
per-process part runs here with the variables SLURM would set, so JAX's own SLURM
detection (`config.distributed.auto=True`) is exercised too.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import ROOT
from conftest import free_port
from conftest import run_main
from conftest import subprocess_env
import jax
import numpy as np
import pytest

from mms_jax import checkpoints

LAUNCH = ROOT / "launch"
CONFIG = f"--config={ROOT / 'configs' / 'pretrain.py'}:tiny"
# One masking strategy keeps compilation short; the strategy does not change what crosses
# processes (masks are sampled inside the jitted step for the global batch).
FAST = [
  "--config.log_every=1",
  "--config.masking.mode=single",
  "--config.masking.strategies=('random_patch',)",
]
# Cross-process sums round differently from one device (see test_pretrain.py).
TOLERANCE = dict(rtol=1e-4, atol=1e-5)
TIMEOUT = 600


def _env(**extra):
  env = subprocess_env()
  env.update(MMS_PYTHON=sys.executable, MMS_KILL_GRACE="10", **extra)
  return env


def _start(command, log_path, env):
  """Starts `command` in its own session (so a failed test can stop all it started)."""
  with open(log_path, "w") as log:
    return subprocess.Popen(
      command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _finish(processes, timeout=TIMEOUT):
  """Waits for every process; on timeout kills their process groups and fails."""
  deadline = time.time() + timeout
  try:
    for p in processes:
      p.wait(timeout=max(deadline - time.time(), 1))
  except subprocess.TimeoutExpired:
    pytest.fail(f"timed out after {timeout} s")
  finally:
    for p in processes:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  return [p.returncode for p in processes]


def _local(num_processes, workdir, *overrides, log_dir, config=CONFIG):
  return [
    "bash",
    str(LAUNCH / "local_processes.sh"),
    "-n",
    str(num_processes),
    "--port",
    str(free_port()),
    "--log-dir",
    str(log_dir),
    "--",
    config,
    f"--workdir={workdir}",
    *overrides,
  ]


def _text(path):
  return path.read_text() if path.exists() else ""


def _params(workdir):
  return jax.tree.map(np.asarray, checkpoints.load_params(workdir))


def _assert_close(a, b):
  """Equal params up to rounding. The key bias is compared loosely: it has no effect on
  attention, so its gradient is 0 up to rounding, and Adam turns that noise into
  lr-sized steps (see test_pretrain.py); over many steps it drifts by up to ~lr."""
  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    name = jax.tree_util.keystr(path)
    if name.endswith("['qkv']['bias']"):
      q, k, v = np.split(x, 3, axis=-1)
      q_ref, k_ref, v_ref = np.split(y, 3, axis=-1)
      np.testing.assert_allclose(k, k_ref, atol=1e-3, err_msg=name + " (key)")
      x, y = np.concatenate([q, v], -1), np.concatenate([q_ref, v_ref], -1)
    np.testing.assert_allclose(x, y, err_msg=name, **TOLERANCE)


def _metrics(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _assert_same_losses(workdir, reference):
  ours, theirs = _metrics(workdir), _metrics(reference)
  assert [m["step"] for m in ours] == [m["step"] for m in theirs]
  np.testing.assert_allclose([m["loss"] for m in ours], [m["loss"] for m in theirs], rtol=1e-4)


def test_four_local_processes_match_one_process(tmp_path):
  # A decoder wide enough that its MLP kernels (64 x 256) are split over fsdp.
  steps = [*FAST, "--config.total_steps=3", "--config.model.decoder_width=64"]
  run_main("pretrain.py:tiny", tmp_path / "one", *steps, "--config.picture_every=0")
  workdir, logs = tmp_path / "four", tmp_path / "logs"
  launcher = _start(
    # fsdp=2: parameters sharded across processes, so the picture needs them gathered.
    _local(4, workdir, *steps, "--config.picture_every=3", "--config.fsdp=2", log_dir=logs),
    tmp_path / "launcher.log",
    _env(),
  )
  assert _finish([launcher]) == [0], (tmp_path / "launcher.log").read_text()[-6000:]

  log = [(logs / f"process_{i}.log").read_text() for i in range(4)]
  assert "over 4 devices in 4 processes; global batch 8" in log[0]
  _assert_close(_params(workdir), _params(tmp_path / "one"))
  # Metrics and pictures come from process 0 only: one line per step, one picture.
  _assert_same_losses(workdir, tmp_path / "one")
  assert not any("loss=" in text for text in log[1:])
  assert [p.name for p in workdir.glob("*.png")] == ["reconstruction_0000003.png"]
  # The checkpoint was written by all four processes together.
  step_dir = workdir / "checkpoints" / "3"
  assert checkpoints.verify_manifest(step_dir) is None
  assert json.loads((step_dir / "meta" / "metadata").read_text())["process_count"] == 4
  assert all(
    (step_dir / "state" / f"ocdbt.process_{i}" / "manifest.ocdbt").is_file() for i in range(4)
  )
  writers = [
    i for i in range(4) if any((step_dir / "state" / f"ocdbt.process_{i}" / "d").iterdir())
  ]
  assert len(writers) > 1, f"only processes {writers} wrote array data"


def _slurm_task_env(process_id, num_processes, port):
  """What SLURM sets for task `process_id` of a one-node job step (no GPUs here)."""
  return _env(
    SLURM_JOB_ID="4242",
    SLURM_JOB_NODELIST="127.0.0.1",
    SLURM_STEP_NODELIST="127.0.0.1",
    SLURM_JOB_NUM_NODES="1",
    SLURM_STEP_NUM_NODES="1",
    SLURM_NTASKS=str(num_processes),
    SLURM_PROCID=str(process_id),
    SLURM_LOCALID=str(process_id),
    JAX_COORDINATOR_PORT=str(port),
    MMS_REPO=str(ROOT),
  )


def test_preempted_processes_resume_to_the_uninterrupted_result(tmp_path):
  total = 100  # long enough (seconds) for the signal to arrive before the end
  steps = [
    *FAST,
    "--config.picture_every=0",
    f"--config.total_steps={total}",
    "--config.checkpoint.every=25",
  ]
  run_main("pretrain.py:tiny", tmp_path / "one", *steps)

  # Two processes; SIGTERM to the launcher once step 3 is logged (a preemption notice).
  workdir, first = tmp_path / "two", tmp_path / "logs_first"
  launcher = _start(_local(2, workdir, *steps, log_dir=first), tmp_path / "launcher.log", _env())
  deadline = time.time() + TIMEOUT
  while " INFO [3/" not in _text(first / "process_0.log"):
    if launcher.poll() is not None or time.time() > deadline:
      _finish([launcher], timeout=1)
      pytest.fail(
        "the run ended or hung before step 3:\n" + (tmp_path / "launcher.log").read_text()[-6000:]
      )
    time.sleep(0.05)
  launcher.send_signal(signal.SIGTERM)
  assert _finish([launcher]) == [0], (tmp_path / "launcher.log").read_text()[-6000:]
  stopped = [
    re.findall(r"Stopped at step (\d+)", (first / f"process_{i}.log").read_text()) for i in range(2)
  ]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped  # one agreed step
  stop = int(stopped[0][0])
  assert 3 <= stop < total
  assert checkpoints.verify_manifest(workdir / "checkpoints" / str(stop)) is None

  # Resume as a SLURM job step would run it: launch/slurm.sbatch's per-process part,
  # jax.distributed.initialize() finding the job from the SLURM variables.
  port, second = free_port(), tmp_path / "logs_second"
  second.mkdir()
  tasks = [
    _start(
      [
        "bash",
        str(LAUNCH / "slurm.sbatch"),
        "--task",
        "--",
        CONFIG,
        f"--workdir={workdir}",
        *steps,
      ],
      second / f"process_{i}.log",
      _slurm_task_env(i, 2, port),
    )
    for i in range(2)
  ]
  codes = _finish(tasks)
  log = (second / "process_0.log").read_text()
  assert codes == [0, 0], log[-6000:] + (second / "process_1.log").read_text()[-3000:]
  assert "over 2 devices in 2 processes" in log
  assert f"Starting at step {stop} (workdir)" in log
  _assert_close(_params(workdir), _params(tmp_path / "one"))
  _assert_same_losses(workdir, tmp_path / "one")  # every step logged once


def _run(command, env=None):
  return subprocess.run(
    command, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=120
  )


def test_scripts_check_their_arguments():
  for script in ("local_processes.sh", "slurm.sbatch", "tpu_pod.sh"):
    path = str(LAUNCH / script)
    assert _run(["bash", "-n", path]).returncode == 0
    shown = _run(["bash", path, "--help"])
    assert shown.returncode == 0 and "Usage:" in shown.stdout, script
    assert "Environment" in shown.stdout, script
  assert _run(["bash", str(LAUNCH / "local_processes.sh"), "--", CONFIG]).returncode == 2
  assert _run(["bash", str(LAUNCH / "slurm.sbatch")]).returncode == 2
  outside = _run(["bash", str(LAUNCH / "slurm.sbatch"), "--", CONFIG])
  assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr
  assert _run(["bash", str(LAUNCH / "tpu_pod.sh"), "create"]).returncode == 2  # no TPU_NAME


FAKE_GCLOUD = """#!{python}
import json, shutil, sys
with open({calls!r}, "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
for arg in sys.argv[1:]:
  if arg.endswith(".tar.gz") and ":" not in arg:
    shutil.copy(arg, {shipped!r})
"""
FAKE_PYTHON = """#!{python}
import json, sys
json.dump(sys.argv[1:], open({argv!r}, "w"))
"""


def _executable(path, text):
  path.write_text(text)
  path.chmod(0o755)


def test_tpu_pod_script_drives_gcloud(tmp_path):
  """Each step of launch/tpu_pod.sh against a stand-in `gcloud` that records its calls;
  the command `run` sends to the workers is executed by bash as a worker would."""
  calls, shipped = tmp_path / "calls.jsonl", tmp_path / "shipped.tar.gz"
  (tmp_path / "bin").mkdir()
  _executable(
    tmp_path / "bin" / "gcloud",
    FAKE_GCLOUD.format(python=sys.executable, calls=str(calls), shipped=str(shipped)),
  )
  env = _env(
    TPU_NAME="mms-test",
    ZONE="us-central2-b",
    PROJECT="proj",
    NUM_WORKERS="2",
    PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
  )
  tail = ["--zone=us-central2-b", "--project=proj"]

  def gcloud_calls(*args, **extra):
    calls.unlink(missing_ok=True)
    result = _run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], dict(env, **extra))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()]

  tpu_vm = ["compute", "tpus", "tpu-vm"]
  assert gcloud_calls("create") == [
    [
      *tpu_vm,
      "create",
      "mms-test",
      "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base",
      *tail,
    ]
  ]
  [create] = gcloud_calls("create", ACCELERATOR_TYPE="v5litepod-16", SPOT="1")
  assert "--version=v2-alpha-tpuv5-lite" in create and "--spot" in create
  assert gcloud_calls("delete") == [[*tpu_vm, "delete", "mms-test", "--quiet", *tail]]

  scp, ssh = gcloud_calls("install")
  assert scp[3:] == ["scp", scp[4], "mms-test:mms_jax.tar.gz", "--worker=all", *tail]
  members = subprocess.run(
    ["tar", "-tzf", str(shipped)], capture_output=True, text=True, check=True
  ).stdout.split()
  assert "./launch/install.sh" in members and not any(".git/" in m for m in members)
  assert ssh[3:6] == ["ssh", "mms-test", "--worker=all"]
  assert "python3.11 -m venv .venv" in ssh[6] and "bash launch/install.sh tpu" in ssh[6]

  args = [
    "--config=configs/pretrain.py:S4_union14m",
    "--config.masking.strategies=('span', 'blockwise')",
    "--workdir=/mnt/mms/w x",
  ]
  [ssh] = gcloud_calls("run", "--", *args)
  assert ssh[:6] == [*tpu_vm, "ssh", "mms-test", "--worker=all"]
  home, argv = tmp_path / "home", tmp_path / "argv.json"
  (home / "mms_jax" / ".venv" / "bin").mkdir(parents=True)
  _executable(
    home / "mms_jax" / ".venv" / "bin" / "python",
    FAKE_PYTHON.format(python=sys.executable, argv=str(argv)),
  )
  remote = ssh[6].removeprefix("--command=")
  assert _run(["bash", "-c", remote], dict(env, HOME=str(home))).returncode == 0
  deadline = time.time() + 60
  while not argv.exists() and time.time() < deadline:  # it was started in the background
    time.sleep(0.05)
  assert json.loads(argv.read_text()) == [
    "-m",
    "mms_jax.main",
    *args,
    "--config.distributed.auto=True",
  ]
  assert (home / "mms_jax_run.pid").read_text().strip().isdigit()

  [stop] = gcloud_calls("stop")
  assert stop[5] == "--worker=all" and "kill -TERM $(cat ~/mms_jax_run.pid)" in stop[6]
  collected = gcloud_calls("collect", str(tmp_path / "logs"))
  assert collected == [
    [
      *tpu_vm,
      "scp",
      "mms-test:mms_jax_run.log",
      f"{tmp_path / 'logs'}/worker_{i}.log",
      f"--worker={i}",
      *tail,
    ]
    for i in range(2)
  ]


def test_two_process_recognition_scores_the_whole_split_like_one_process(tmp_path):
  config = f"--config={ROOT / 'configs' / 'finetune_recognition.py'}:tiny"
  multi = tmp_path / "multi"
  codes = _finish(
    [
      _start(
        _local(2, multi, log_dir=tmp_path / "logs", config=config),
        tmp_path / "launcher.log",
        _env(),
      )
    ]
  )
  assert codes == [0], _text(tmp_path / "launcher.log")[-3000:]
  run_main(
    "finetune_recognition.py:tiny",
    tmp_path / "single",
    "--config.eval_only=True",
    f"--config.eval_from={multi}",
  )
  for split in ("test_heldout_fonts", "test_hard"):
    table = _text(multi / f"eval_{split}.csv")
    assert table.splitlines()[1].split(",")[:2] == [split, "16"]  # every image, once
    assert table == _text(tmp_path / "single" / f"eval_{split}.csv")
