"""Run-time guards for training loops."""

import math
from typing import Any
from typing import Mapping
from typing import Optional

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


def _first_non_finite(value) -> Optional[float]:
  arr = np.asarray(value)
  if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.integer):
    return None
  bad = arr[~np.isfinite(arr)]
  return float(bad.flat[0]) if bad.size else None


def check_finite(
  metrics: Mapping[str, Any], step: int, *, last_checkpoint: Optional[str] = None
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
