"""Entry point of every mms_jax program.

  python -m mms_jax.main --config=configs/pretrain.py --workdir=workdirs/pretrain
  python -m mms_jax.main --config=configs/pretrain.py:tiny --config.total_steps=50 ...

The config's `program` field picks the trainer; re-running a workdir resumes it. Before
anything is written, the workdir is checked (workdir_lock.check: new, empty, or a run of
the same program) and, in a single-process run, locked: a second run started on the
same workdir stops with a message. A slip on the command line or a user error while the
program runs prints one line (cli.py; --verbose shows the traceback). A run ends with a
summary: time, final metrics, where the checkpoint is and the next command.
"""

import importlib
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mms_jax import cli
from mms_jax import workdir_lock
from mms_jax.programs import PROGRAMS

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, pictures.")

# The command a user runs next, by program ({workdir} is filled in).
NEXT_COMMAND = {
  "pretrain": "python -m mms_jax.main --config=configs/finetune_recognition.py "
  "--config.init_from={workdir} --workdir=<new workdir>",
  "recognition": "python -m mms_jax.read --workdir={workdir} <images or folders>",
}


def run(config, workdir):
  program = config.get("program")
  if program not in PROGRAMS:
    raise app.UsageError(
      f"config.program={program!r} is not a program; choose one of {sorted(PROGRAMS)}"
    )
  trainer = importlib.import_module(PROGRAMS[program])
  dist = config.get("distributed") or {}
  if not config.get("report_only"):
    workdir_lock.check(workdir, program)
  if (dist.get("num_processes") or 1) > 1 or dist.get("auto") or config.get("report_only"):
    # Several processes share the workdir by design; a report only reads it.
    return trainer.train_and_evaluate(config, workdir)
  with workdir_lock.exclusive(workdir):
    return trainer.train_and_evaluate(config, workdir)


def _metric_summary(metrics):
  """A few words on a run's last evaluation (RunResult.metrics, any program's form)."""
  if not metrics or not isinstance(metrics, dict):
    return ""
  parts = []
  for name, value in metrics.items():
    if isinstance(value, list) and value and isinstance(value[-1], dict):  # recognition
      row = value[-1]
      if "word_accuracy" in row:
        parts.append(
          f"{name} word accuracy {100 * row['word_accuracy']:.1f} %, "
          f"1-NED {100 * row['one_minus_ned']:.1f} %"
        )
    elif isinstance(value, (int, float)) and not name.endswith("/count") and "bicubic" not in name:
      parts.append(f"{name.removeprefix('eval/')} {value:.4g}")
  return "; ".join(parts[:4]) + ("; ..." if len(parts) > 4 else "")


def summary_lines(program, result, workdir, seconds):
  """The lines that close a run (module docstring)."""
  lines = [f"{program} finished in {_duration(seconds)} at step {getattr(result, 'step', '?')}."]
  metrics = _metric_summary(getattr(result, "metrics", None))
  if metrics:
    tables = sorted(f for f in os.listdir(workdir) if f.startswith("eval") and f.endswith(".md"))
    where = f" (tables: {', '.join(tables)})" if tables else ""
    lines.append(f"Last evaluation{where}: {metrics}.")
  ckpt_root = os.path.join(workdir, "checkpoints")
  steps = (
    sorted(int(d) for d in os.listdir(ckpt_root) if d.isdigit()) if os.path.isdir(ckpt_root) else []
  )
  if steps:
    lines.append(f"Checkpoint: {os.path.join(os.path.abspath(ckpt_root), str(steps[-1]))}.")
  lines.append(f"Curves: python -m mms_jax.show_run {workdir} (or tensorboard --logdir {workdir}).")
  if program in NEXT_COMMAND and steps:
    lines.append("Next: " + NEXT_COMMAND[program].format(workdir=workdir))
  return lines


def _duration(seconds):
  from mms_jax.train import common  # imports JAX; only needed once a run has ended

  return common.format_duration(seconds)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/pretrain.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the directory for checkpoints and logs")
  start = time.perf_counter()
  result = run(_CONFIG.value, _WORKDIR.value)
  if not _CONFIG.value.get("report_only"):
    for line in summary_lines(
      _CONFIG.value.program, result, _WORKDIR.value, time.perf_counter() - start
    ):
      logging.info("%s", line)


if __name__ == "__main__":
  cli.run(main, "mms_jax.main")
