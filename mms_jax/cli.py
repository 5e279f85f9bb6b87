"""What every mms_jax command does at its edges: one line per user error, a quiet log.

  cli.run(main, "mms_jax.main")      in place of absl's app.run(main)

A slip on the command line (an unknown flag, a config file, variant or field that does
not exist, a value of the wrong type) prints `<command>: error: <what and the fix>` and
exits with status 2; a user error while the command runs (errors.UserError: a bad
config value, data path, checkpoint or workdir, a NaN loss) prints the same one line and
exits with status 1. `--verbose` shows the traceback instead. Anything else is a bug
and keeps its traceback.

The log keeps to what the user ran: the INFO chatter of orbax, grain and absl, JAX's
search for a TPU on machines without one and orbax's "Metadata file does not exist"
(a checkpoint written without optional metadata) are filtered out.
"""

import difflib
import logging as py_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

from mms_jax import errors

USAGE_STATUS = 2
ERROR_STATUS = 1


def _verbose(argv=None):
  argv = sys.argv if argv is None else argv
  if "--verbose" in argv or "--verbose=true" in [a.lower() for a in argv]:
    return True
  return "verbose" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.verbose


def fail(message, program, status=ERROR_STATUS):
  """Prints the one line `program: error: message` on stderr and exits with `status`."""
  print(f"{program}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


# ------------------------------------------------------------------------------------
# Flags and config files.
# ------------------------------------------------------------------------------------
def _config_flag_names():
  return [
    name
    for name, flag in flags.FLAGS._flags().items()
    if type(flag).__name__ == "_ConfigFlag" and name == flag.name
  ]


def _check_config_files(argv):
  """A --config=FILE[:VARIANT] whose FILE does not exist, named with the closest file."""
  for name in _config_flag_names():
    for arg in argv:
      if not arg.startswith(f"--{name}="):
        continue
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if os.path.isfile(path):
        continue
      folder = os.path.dirname(path) or "."
      choices = (
        sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
      )
      close = difflib.get_close_matches(os.path.basename(path), choices, n=1)
      hint = (
        f"did you mean --{name}={os.path.join(os.path.dirname(path), close[0])}?"
        if close
        else f"the config files in {folder}/ are {choices}"
        if choices
        else "give the path of a config file, e.g. configs/pretrain.py"
      )
      raise errors.ConfigError(f"--{name}={path}: no such config file; {hint}")


def _unknown_field_message(error, argv):
  """The line of a `--config.a.b=...` whose field does not exist."""
  text = str(error.args[0] if error.args else error)
  key = re.search(r"'([^'\\]+)", text)
  key = key.group(1) if key else ""
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  for arg in argv:
    name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
    parts = name.split(".")
    if len(parts) > 1 and key in parts[1:]:
      if suggestion:
        fixed = ".".join(parts[: parts.index(key, 1)] + [suggestion.group(1)])
        return f"--{name}: the config has no field {key!r}; did you mean --{fixed}?"
      return f"--{name}: the config has no field {key!r} (the config file lists its fields)"
  return f"the config has no field {key!r}" + (
    f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
  )


def _flag_error_message(error, argv):
  if isinstance(error, (AttributeError, KeyError)):
    return _unknown_field_message(error, argv)
  text = str(error)
  if "Traceback (most recent call last)" in text:  # an exception inside get_config()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    flag = re.match(r"flag (--\S+?):", text)
    last = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    return f"{flag.group(1)}: {last}" if flag else last
  return re.sub(r"^flag ", "", text)


def parse_flags(program):
  """absl's flags_parser that turns every flag or config-loading error into one line."""

  def parse(argv):
    try:
      _check_config_files(argv)
      return flags.FLAGS(argv)
    except Exception as e:  # absl, ml_collections and get_config() raise many kinds
      if _verbose(argv):
        raise
      fail(_flag_error_message(e, argv), program, USAGE_STATUS)

  return parse


# ------------------------------------------------------------------------------------
# Logging.
# ------------------------------------------------------------------------------------
class QuietLibraries(py_logging.Filter):
  """Keeps libraries' chatter out of the log (module docstring)."""

  NOISY_PATHS = ("/orbax/", "/grain/", "/absl/", "/jax/_src/xla_bridge", "/jax2onnx/")
  NOISY_MESSAGES = ("Metadata file does not exist", "Unable to initialize backend")

  def filter(self, record):
    message = record.getMessage() if record.levelno < py_logging.ERROR else ""
    if any(m in message for m in self.NOISY_MESSAGES):
      return False
    noisy = any(path in record.pathname for path in self.NOISY_PATHS)
    return record.levelno >= py_logging.WARNING or not noisy


def quiet_logging(level=logging.INFO):
  """Time-stamped absl log lines at `level`, without the libraries' chatter."""
  handler = logging.get_absl_handler()
  handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())
  logging.set_verbosity(level)
  # JAX logs through Python's logging before absl's handler is installed.
  for name in ("jax._src.xla_bridge", "orbax"):
    py_logging.getLogger(name).addFilter(QuietLibraries())


# ------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------
def run(main, program):
  """absl's app.run(main) with the error handling of the module docstring."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show the traceback of a user error, not just its line.")
  quiet_logging()

  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      if _verbose():
        raise
      fail(str(e), program, USAGE_STATUS)
    except errors.UserError as e:
      if _verbose():
        raise
      fail(str(e), program, ERROR_STATUS)

  app.run(guarded, flags_parser=parse_flags(program))
