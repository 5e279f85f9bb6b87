"""The one base class of the errors a user can fix.

A `UserError` is a bad config field, a missing or unusable data path, a corrupt or
missing checkpoint, a metric that became NaN: its message names the problem and the
fix. `mms_jax.main` prints just that message and exits with status 1 (`--verbose`
re-raises it with its traceback); `mms_jax.read` and the converter CLI also print
theirs as one line (they have no --verbose). Anything else is a bug and keeps its
traceback.
"""

import sys


class UserError(Exception):
  """A problem the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
  """A config field is invalid; the message names the field and the fix."""


def exit_with_message(error: BaseException, program: str = "mms_jax") -> None:
  """Prints `program: error: <message>` to stderr and exits with status 1."""
  print(f"{program}: error: {error}", file=sys.stderr, flush=True)
  print(
    f"({type(error).__name__}; rerun with --verbose for the traceback)", file=sys.stderr, flush=True
  )
  sys.exit(1)
