"""One run per workdir, and only a run of its own program: both checked before a program
writes anything.

`check(workdir, program)` refuses, with the fix, a workdir that is a file or cannot be
created, one that holds another program's run (a fine-tune pointed at a pretraining
workdir would overwrite its config.json), and a folder of other files. A workdir that
does not exist, is empty, or holds a run of the same program (to resume) passes.

A second program started on a workdir in use stops with a message.

Two runs in one workdir would both write checkpoints, logs and (the ablation) runs.jsonl,
and the later one would resume from the earlier one's half-written steps. The lock is an
advisory `flock` on `<workdir>/.mms_jax.lock`, held while the program runs: the kernel
drops it when the process ends, however it ends, so a crashed or preempted run never
leaves a stale lock and re-running the command resumes as before. Where the file system
has no locks (some network mounts) the program warns and runs unguarded.
"""

import contextlib
import fcntl
import json
import os
import socket
import time

from absl import logging

from mms_jax import errors

LOCK_NAME = ".mms_jax.lock"


class WorkdirInUseError(errors.UserError):
  """Another process holds the workdir's lock."""


# What a run writes before its config.json: a run that stopped that early is resumable.
RUN_FILES = (
  LOCK_NAME,
  "tensorboard",
  "metrics.jsonl",
  "synthetic_fonts.json",
  "checkpoints",
  "checkpoints_corrupt",
)


def check(workdir, program):
  """Raises errors.UserError (module docstring) unless `program` may run in `workdir`."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UserError(f"--workdir={workdir} is a file, not a folder: give a new folder")
  if not os.path.exists(path):
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise errors.UserError(
        f"--workdir={workdir} cannot be created: {parent} is a file. Give a folder path"
      )
    if not os.access(parent, os.W_OK | os.X_OK):
      raise errors.UserError(
        f"--workdir={workdir} cannot be created: {parent} is not writable. Give a "
        "folder you can write"
      )
    return
  config_path = os.path.join(path, "config.json")
  if os.path.isfile(config_path):
    try:
      with open(config_path) as f:
        held = json.load(f).get("program")
    except (OSError, ValueError, AttributeError) as e:
      raise errors.UserError(
        f"--workdir={workdir}: its config.json cannot be read ({e}); give a new --workdir"
      ) from None
    if held and held != program:
      raise errors.UserError(
        f"--workdir={workdir} holds a {held} run, not a {program} one; nothing was "
        f"written to it. To start from it, use --config.init_from={workdir} and a new "
        "--workdir"
      )
    return
  others = sorted(set(os.listdir(path)) - set(RUN_FILES))
  if others:
    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    raise errors.UserError(
      f"--workdir={workdir} holds files of its own ({shown}) and no mms_jax run "
      "(config.json); give a new or empty folder, so that nothing in it is overwritten"
    )


def _acquire(workdir):
  """The open, locked lock file with this process written into it; None (with a warning)
  where the file system cannot lock it. Raises WorkdirInUseError if another holds it."""
  os.makedirs(workdir, exist_ok=True)
  try:
    f = open(os.path.join(workdir, LOCK_NAME), "a+")
  except OSError as e:  # e.g. a read-only workdir that is only evaluated
    logging.warning("no lock on %s (%s): nothing stops a second run on it", workdir, e)
    return None
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise WorkdirInUseError(
      f"workdir {workdir!r} is in use by {holder}: two runs in one workdir would "
      "overwrite each other's checkpoints. Wait for that run to end (re-running this "
      "command then resumes from its last checkpoint) or give another --workdir"
    ) from None
  except OSError as e:
    f.close()
    logging.warning("no lock on %s (%s): nothing stops a second run on it", workdir, e)
    return None
  f.seek(0)
  f.truncate()
  f.write(
    f"process {os.getpid()} on {socket.gethostname()}, started "
    f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
  )
  f.flush()
  return f


@contextlib.contextmanager
def exclusive(workdir):
  """Holds `<workdir>/.mms_jax.lock` (creating the workdir) while the block runs."""
  lock_file = _acquire(workdir)
  try:
    yield
  finally:
    if lock_file is not None:
      lock_file.close()  # closing the only descriptor releases the flock
