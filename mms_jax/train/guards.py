"""Run-time guards for training loops: non-finite metrics, preemption signals."""

from collections.abc import Mapping
import logging
import math
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

from mms_jax import errors


class NonFiniteError(errors.UserError, FloatingPointError):
  """A training metric became NaN or Inf.

  Attributes:
    step: the step at which it was detected.
    bad: {metric name: offending value} (the first non-finite element for
      array-valued metrics).
  """

  def __init__(self, message: str, step: int, bad: dict[str, float]):
    super().__init__(message)
    self.step = step
    self.bad = bad


def _first_non_finite(value) -> float | None:
  arr = np.asarray(value)
  if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.integer):
    return None
  bad = arr[~np.isfinite(arr)]
  return float(bad.flat[0]) if bad.size else None


def check_finite(
  metrics: Mapping[str, Any], step: int, *, last_checkpoint: str | None = None
) -> None:
  """Raises NonFiniteError if any float metric is NaN or Inf.

  Call it at log steps (it fetches the values to the host) and before saving
  a checkpoint, so a diverged state is never written.

  Args:
    metrics: name -> scalar or array (jax or numpy), e.g. loss, grad_norm.
    step: the current training step.
    last_checkpoint: optional description of the last good checkpoint, e.g.
      its path, added to the message.

  Raises:
    NonFiniteError: naming the step and each offending metric.
  """
  bad = {}
  for name, value in metrics.items():
    first = _first_non_finite(value)
    if first is not None:
      bad[name] = first
  if not bad:
    return
  listed = ", ".join(f"{k}={'nan' if math.isnan(v) else v}" for k, v in sorted(bad.items()))
  where = f" ({last_checkpoint})" if last_checkpoint else ""
  raise NonFiniteError(
    f"Non-finite training metrics at step {step}: {listed}. Training "
    f"stopped; no checkpoint was written for this state, so the last good "
    f"checkpoint{where} is left intact and a restart resumes from it. Try: "
    "a lower learning rate or longer warmup, enabling gradient clipping "
    "(clip by global norm), and checking the input data (empty, constant "
    "or NaN images; bad labels).",
    step=step,
    bad=bad,
  )


class PreemptionWatcher:
  """Turns SIGTERM into a flag the training loop polls.

  Single process: installs a handler (main thread only) that just records the
  signal; `should_stop()` then returns True, the trainer saves a checkpoint
  and exits. The previous handler is restored by `close()`.

  Multiple processes: a signal reaches only some hosts, and they must agree on
  the step at which all of them save. `jax.distributed.initialize` starts
  JAX's preemption sync service, which catches SIGTERM itself; here
  `should_stop(step)` asks `multihost_utils.reached_preemption_sync_point`,
  which returns True on all hosts at the same step. No Python handler is
  installed then (it would replace JAX's). Call `should_stop` every step.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._signum = None
    self._logged = False
    self._previous = {}
    self._multihost = jax.process_count() > 1
    if not self._multihost:
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self._signum = signum
    self._event.set()

  def should_stop(self, step: int | None = None) -> bool:
    """True once a preemption signal was received (or, multi-host, at the
    agreed sync step). The trainer should then save and exit."""
    if self._multihost:
      if step is None:
        raise ValueError("should_stop(step) needs the step on multi-host.")
      try:
        stop = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # preemption service disabled
        stop = False
    else:
      stop = self._event.is_set()
    if stop and not self._logged:
      self._logged = True
      name = signal.Signals(self._signum).name if self._signum else "signal"
      logging.warning(
        "Preemption (%s) received at step %s: saving a checkpoint and exiting.", name, step
      )
    return stop

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
