"""The one base class of the errors a user can fix.

A `UserError` is a bad config field, a missing or unusable data path, a corrupt or
missing checkpoint or workdir, a metric that became NaN: its message names the problem
and the fix. Every command prints just that message as one line and exits with status 1
(`--verbose` shows the traceback; mms_jax/cli.py). Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
  """A problem the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
  """A config field is invalid; the message names the field and the fix."""
