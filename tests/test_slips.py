"""The slips a new user makes cost one line and never data: each one exits non-zero with
one line naming the fix, no traceback, nothing compiled, and leaves every file of the
workdir as it was. Also what a finished run tells its user."""

import hashlib
import json
import os

from conftest import ROOT
from conftest import main_process
from conftest import module_process
from conftest import run_main
import pytest

from mms_jax import show_run


def _tree_hash(folder):
  """A hash of every file's path and bytes below `folder` (what a refused run must keep)."""
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, folder).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def _one_line_error(result, status):
  """The single error line of a refused command (and that nothing else went wrong)."""
  assert result.returncode == status, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "Starting at step" not in result.stderr  # nothing trained, nothing compiled
  errors = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(errors) == 1, result.stderr
  return errors[0]


@pytest.fixture(scope="module")
def pretrain_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain")
  log = run_main(
    "pretrain.py:tiny", workdir, "--config.total_steps=2", "--config.checkpoint.every=2"
  )
  return workdir, log


@pytest.mark.parametrize(
  "args, expected",
  [
    (
      ("--config.totl_steps=5",),
      "--config.totl_steps: the config has no field 'totl_steps'; "
      "did you mean --config.total_steps?",
    ),
    (("--config.data.sorce=folder",), "did you mean --config.data.source?"),
    (("--config.total_steps=five",), "--config.total_steps=five: invalid literal for int()"),
    (("--workdirr=x",), "Unknown command line flag 'workdirr'. Did you mean: workdir ?"),
  ],
)
def test_a_flag_slip_is_one_line_with_the_fix(tmp_path, args, expected):
  result = main_process("pretrain.py:tiny", tmp_path / "w", *args)
  line = _one_line_error(result, 2)
  assert line.startswith("mms_jax.main: error: ") and expected in line
  assert not (tmp_path / "w").exists()


def test_a_misspelled_config_file_or_variant_is_one_line(tmp_path):
  line = _one_line_error(main_process("pretrin.py", tmp_path / "w"), 2)
  assert "no such config file; did you mean --config=" in line and line.endswith("pretrain.py?")
  line = _one_line_error(main_process("pretrain.py:tinyy", tmp_path / "w"), 2)
  assert "unknown variant 'tinyy'" in line
  assert not (tmp_path / "w").exists()


def test_verbose_shows_the_traceback(tmp_path):
  result = main_process("pretrain.py:tiny", tmp_path / "w", "--config.totl_steps=5", "--verbose")
  assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_workdir_that_cannot_be_made_is_one_line(tmp_path):
  (tmp_path / "a_file").write_text("mine")
  result = main_process("pretrain.py:tiny", tmp_path / "a_file" / "w")
  assert "is a file. Give a folder path" in _one_line_error(result, 1)
  assert (tmp_path / "a_file").read_text() == "mine"


def test_a_finetune_pointed_at_a_pretraining_workdir_changes_nothing(pretrain_workdir, tmp_path):
  workdir, _ = pretrain_workdir
  before = _tree_hash(workdir)
  result = main_process(
    "finetune_recognition.py:tiny", workdir, f"--config.init_from={tmp_path / 'elsewhere'}"
  )
  line = _one_line_error(result, 1)
  assert "holds a pretrain run, not a recognition one" in line
  assert f"--config.init_from={workdir} and a new --workdir" in line
  assert _tree_hash(workdir) == before
  assert json.loads((workdir / "config.json").read_text())["program"] == "pretrain"


def test_a_folder_of_other_files_is_not_a_workdir(tmp_path):
  (tmp_path / "crops").mkdir()
  (tmp_path / "crops" / "word.png").write_bytes(b"not really a png")
  before = _tree_hash(tmp_path / "crops")
  result = main_process("pretrain.py:tiny", tmp_path / "crops")
  assert "holds files of its own (word.png)" in _one_line_error(result, 1)
  assert _tree_hash(tmp_path / "crops") == before


def _read(*args):
  return module_process("mms_jax.read", *args)


def test_read_slips_are_one_line_before_any_image_is_read(pretrain_workdir, tmp_path):
  workdir, _ = pretrain_workdir
  line = _one_line_error(_read(f"--workdir={workdir}"), 2)
  assert "name the images to read" in line
  image = ROOT / "docs" / "img" / "masks.png"
  line = _one_line_error(_read(f"--workdir={workdir}", f"--csv={tmp_path}/no/out.csv", image), 2)
  assert f"the folder {tmp_path}/no does not exist" in line
  line = _one_line_error(_read(f"--workdir={workdir}", image), 1)
  assert "'pretrain' workdir, not a recognition one" in line


# ------------------------------------------------------------------------------------
# What a run tells its user.
# ------------------------------------------------------------------------------------
def test_a_run_is_quiet_times_its_compilation_and_ends_with_a_summary(pretrain_workdir):
  workdir, log = pretrain_workdir
  assert "libtpu" not in log and "Unable to initialize backend" not in log
  assert "Metadata file does not exist" not in log
  first = next(line for line in log.splitlines() if "[1/2]" in line)
  assert "eta" not in first  # the first step compiles: no ETA from it
  assert "The first step took" in log
  assert "pretrain finished in" in log
  assert f"Checkpoint: {os.path.abspath(workdir)}/checkpoints/2." in log
  assert f"--config.init_from={workdir} --workdir=<new workdir>" in log
  assert f"python -m mms_jax.show_run {workdir}" in log


def test_show_run_plots_the_loss_and_the_quality_metrics(tmp_path):
  lines = [
    {"step": 1, "loss": 3.0, "lr": 0.0},
    {"step": 2, "loss": 2.0, "lr": 1e-3},
    {"step": 2, "eval/test/test/word_accuracy": 0.25, "eval/test/test/skipped": 0},
  ]
  (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{cut")
  curves = show_run.read_metrics(tmp_path)
  assert curves["loss"] == ([1, 2], [3.0, 2.0])
  assert show_run.choose(curves) == ["loss", "eval/test/test/word_accuracy"]
  assert show_run.choose(curves, ["lr"]) == ["lr"]
  with pytest.raises(show_run.errors.UserError, match="not in metrics.jsonl"):
    show_run.choose(curves, ["iou"])
  out = show_run.plot(curves, show_run.choose(curves), str(tmp_path / "c.png"))
  assert os.path.getsize(out) > 5000


def test_a_run_refused_before_its_config_json_can_be_run_again(tmp_path):
  from mms_jax import workdir_lock

  for name in ("checkpoints", "tensorboard"):  # what a run makes before config.json
    (tmp_path / name).mkdir()
  (tmp_path / "metrics.jsonl").write_text("")
  workdir_lock.check(str(tmp_path), "recognition")  # no error: it is ours, resumable
