"""Every command the README and docs/ show still parses and passes its program's checks.

`python -m mms_jax.main` commands are parsed in-process with the CLI's own config flag
(the config file, the variant and every `--config.FIELD=VALUE` override must exist and
have the right type), then given to the program's `check_config`. The only error
accepted from that check is a missing data folder or file that the command names (the
data sets in the docs live on the user's machine, not here). Other entry points
(`mms_jax.read`, `mms_jax.convert`, `benchmarks/...`) must exist and define every flag
the command passes. Running the training itself is what the program tests do, with
tiny variants. A block of commands kept as a historical record is marked with
`<!-- as run then -->` on the line before its fence.
"""

import dataclasses
import importlib
import pathlib
import re
import shlex

from absl import flags
from ml_collections import config_flags
import pytest

from mms_jax import errors
from mms_jax.programs import PROGRAMS

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# absl's own flags, accepted by every absl program.
ABSL_FLAGS = {
  "help",
  "helpfull",
  "helpshort",
  "verbosity",
  "v",
  "logtostderr",
  "alsologtostderr",
  "flagfile",
  "verbose",  # mms_jax/cli.py defines it for every command
}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # OTHER_WORKDIR, ARGS, PRETRAIN_DIR ...
# On the line before a fence: a record of a command as it was run, with a variant or
# flag that no longer exists (docs/results.md's history); not checked.
HISTORICAL = "<!-- as run then -->"


@dataclasses.dataclass
class Command:
  where: str  # file:line
  module: str  # mms_jax.main, mms_jax.read, benchmarks.x, ...
  args: list  # the arguments after the module

  def __str__(self):
    return f"{self.where}: {self.module} {' '.join(self.args)}"


def _code_blocks(text):
  """(first line number, block text) of fenced blocks and of inline `python ...` spans."""
  lines = text.splitlines()
  fence = None
  for i, line in enumerate(lines):
    if line.lstrip().startswith("```"):
      if fence is None:
        fence = (i + 2, [])
        if i and HISTORICAL in lines[i - 1]:
          fence = (i + 2, None)
      else:
        if fence[1] is not None:
          yield fence[0], "\n".join(fence[1])
        fence = None
    elif fence is not None and fence[1] is not None:
      fence[1].append(line)
  # Inline spans may wrap across a paragraph's lines.
  for m in re.finditer(r"`([^`]*\bpython[^`]*)`", text):
    if m.group(1).count("\n") <= 3 and not text[: m.start()].endswith("``"):
      yield text.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")


def _logical_lines(block):
  """Joins backslash continuations; a line starting with '...' continues the last one."""
  out = []
  base = None  # the last full command: what a '...' line adds to
  for number, line in enumerate(block.splitlines()):
    line = re.sub(r"^\s*#\s?", "", line) if re.match(r"^\s*#\s+python", line) else line
    if out and out[-1][1].endswith("\\"):
      out[-1] = (out[-1][0], out[-1][1][:-1] + " " + line.strip())
      if base == len(out) - 1 or base is None:
        base = len(out) - 1
    elif line.strip().startswith("...") and base is not None:
      out.append((number, out[base][1] + " " + line.strip()[3:]))
    else:
      out.append((number, line.strip()))
      base = len(out) - 1
  return out


def _parse(where, line):
  """The Command of a shell line that runs python, or None."""
  try:
    tokens = shlex.split(line, comments=True)
  except ValueError:
    return None
  commands = []
  current = []
  for token in tokens:
    if token in ("&&", ";", "|", "||"):
      commands.append(current)
      current = []
    else:
      current.append(token)
  commands.append(current)
  for tokens in commands:
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # VAR=value prefixes
      tokens = tokens[1:]
    if not tokens or not tokens[0].endswith("python"):
      continue
    rest = tokens[1:]
    if rest[:1] == ["-m"] and len(rest) > 1:
      module, args = rest[1], rest[2:]
    elif rest and rest[0].endswith(".py") and "/" in rest[0]:
      module, args = rest[0][:-3].replace("/", "."), rest[1:]
    else:
      continue
    args = [a.strip("[]") for a in args if a not in ("...", "[", "]") and a.strip("[]")]
    return Command(where, module, args)
  return None


def documented_commands():
  found = []
  for path in DOCS:
    text = path.read_text()
    for start, block in _code_blocks(text):
      for offset, line in _logical_lines(block):
        command = _parse(f"{path.relative_to(ROOT)}:{start + offset}", line)
        if command is not None:
          found.append(command)
  return found


COMMANDS = documented_commands()
# A mms_jax.main without --config is a mention (`python -m mms_jax.main ARGS`).
MAIN = [
  c
  for c in COMMANDS
  if c.module == "mms_jax.main" and any(a.startswith("--config=") for a in c.args)
]
OTHERS = [c for c in COMMANDS if c.module not in ("mms_jax.main", "pytest")]


def test_the_docs_show_commands_of_every_program():
  configs = {
    a.split("=", 1)[1].split(":")[0] for c in MAIN for a in c.args if a.startswith("--config=")
  }
  assert {
    f"configs/{p}"
    for p in (
      "pretrain.py",
      "finetune_recognition.py",
      "finetune_segmentation.py",
      "finetune_sr.py",
      "probe.py",
      "ablation.py",
    )
  } <= configs
  assert {"mms_jax.read", "mms_jax.convert"} <= {c.module for c in OTHERS}


def _flag_values(args):
  """The parsed --config of a mms_jax.main command (its other flags checked by name)."""
  argv = ["mms_jax.main", *(a for a in args if not PLACEHOLDER.match(a))]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
  )
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  flags.DEFINE_bool("verbose", False, "", flag_values=values)
  values(argv)
  return values


def _missing_data_paths(command):
  """Paths named in the command that do not exist here (user data in the docs)."""
  paths = []
  for arg in command.args:
    value = arg.split("=", 1)[-1]
    if "/" in value and not (ROOT / value).exists() and not pathlib.Path(value).exists():
      paths.append(value)
  return paths


@pytest.mark.parametrize("command", MAIN, ids=str)
def test_documented_main_command_parses_and_passes_its_checks(command, monkeypatch):
  monkeypatch.chdir(ROOT)
  config = _flag_values(command.args).config
  assert config is not None, f"{command}: no --config"
  trainer = importlib.import_module(PROGRAMS[config.program])
  try:
    trainer.check_config(config)
  except errors.UserError as e:
    missing = _missing_data_paths(command)
    if not any(path.rstrip("/") in str(e) for path in missing):
      raise AssertionError(f"{command}\n  fails its checks: {e}") from e


# Scripts the docs run from an export folder, by the module they are a copy of
# (convert --format=onnx copies mms_jax/onnx_reader.py as read.py).
GENERATED = {"export.rec_onnx.read": "mms_jax.onnx_reader"}


def _defined_flags(module):
  """Flag names the module's source defines (absl DEFINE_* calls or argparse options
  with a literal name)."""
  module = GENERATED.get(module, module)
  path = ROOT / (module.replace(".", "/") + ".py")
  if not path.exists():
    path = ROOT / module.replace(".", "/") / "__main__.py"
  assert path.exists(), f"no module {module} in the tree"
  sources = [path.read_text()]
  if path.name == "__main__.py":
    sources += [p.read_text() for p in path.parent.glob("*.py")]
  names = set()
  for source in sources:
    names |= set(
      re.findall(r"(?:flags|config_flags)\.DEFINE_\w+\(\s*[\"']([A-Za-z_][\w]*)[\"']", source)
    )
    names |= set(re.findall(r"add_argument\(\s*[\"']--([A-Za-z_][\w]*)[\"']", source))
  return names


@pytest.mark.parametrize("command", OTHERS, ids=str)
def test_documented_tool_command_uses_flags_it_defines(command):
  defined = _defined_flags(command.module) | ABSL_FLAGS
  used = set()
  for arg in command.args:
    if arg.startswith("--"):
      name = arg[2:].split("=", 1)[0]
      used.add(name[2:] if name.startswith("no") and name[2:] in defined else name)
  assert used <= defined, f"{command}\n  undefined flags: {sorted(used - defined)}"
