"""Entry point of every mms_jax program.

  python -m mms_jax.main --config=configs/pretrain.py --workdir=workdirs/pretrain
  python -m mms_jax.main --config=configs/pretrain.py:tiny --config.total_steps=50 ...

The config's `program` field picks the trainer; re-running a workdir resumes it. A
single-process run holds the workdir's lock (mms_jax/workdir_lock.py): a second run
started on the same workdir stops with a message.
A user error (bad config field, data path, checkpoint; errors.UserError) prints its
message and exits with status 1; --verbose shows the traceback.
"""

import importlib
import logging as py_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mms_jax import errors
from mms_jax import workdir_lock
from mms_jax.programs import PROGRAMS

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, pictures.")
_VERBOSE = flags.DEFINE_bool(
  "verbose",
  False,
  "Show the traceback of user errors (a bad "
  "config field, data path or checkpoint), not just the message.",
)


def run(config, workdir):
  program = config.get("program")
  if program not in PROGRAMS:
    raise app.UsageError(
      f"config.program={program!r} is not a program; choose one of {sorted(PROGRAMS)}"
    )
  trainer = importlib.import_module(PROGRAMS[program])
  dist = config.get("distributed") or {}
  if (dist.get("num_processes") or 1) > 1 or dist.get("auto") or config.get("report_only"):
    # Several processes share the workdir by design; a report only reads it.
    return trainer.train_and_evaluate(config, workdir)
  with workdir_lock.exclusive(workdir):
    return trainer.train_and_evaluate(config, workdir)


class _QuietLibraries(py_logging.Filter):
  """Keeps orbax's and grain's INFO chatter out of the training log."""

  def filter(self, record):
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "absl"))
    return record.levelno >= py_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/pretrain.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the directory for checkpoints and logs")
  logging.get_absl_handler().setFormatter(
    py_logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
  )
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.set_verbosity(logging.INFO)
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except errors.UserError as e:
    if _VERBOSE.value:
      raise
    errors.exit_with_message(e, "mms_jax.main")


if __name__ == "__main__":
  app.run(main)
