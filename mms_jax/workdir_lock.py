"""One run per workdir: a second program started on a workdir in use stops with a message.

Two runs in one workdir would both write checkpoints, logs and (the ablation) runs.jsonl,
and the later one would resume from the earlier one's half-written steps. The lock is an
advisory `flock` on `<workdir>/.mms_jax.lock`, held while the program runs: the kernel
drops it when the process ends, however it ends, so a crashed or preempted run never
leaves a stale lock and re-running the command resumes as before. Where the file system
has no locks (some network mounts) the program warns and runs unguarded.
"""

import contextlib
import fcntl
import os
import socket
import time

from absl import logging

from mms_jax import errors

LOCK_NAME = ".mms_jax.lock"


class WorkdirInUseError(errors.UserError):
  """Another process holds the workdir's lock."""


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
