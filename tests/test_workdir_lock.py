"""One run per workdir: a second run on a workdir in use stops and touches nothing."""

import os

from conftest import main_process
from conftest import run_main
import pytest

from mms_jax import workdir_lock


def test_second_holder_is_refused_until_the_first_releases(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lock.exclusive(workdir):
    with pytest.raises(workdir_lock.WorkdirInUseError, match=rf"in use by process {os.getpid()} "):
      with workdir_lock.exclusive(workdir):
        pass
  with workdir_lock.exclusive(workdir):  # released: free again
    pass


def test_lock_is_released_when_the_block_raises(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir_lock.exclusive(str(tmp_path)):
      raise RuntimeError("the run failed")
  with workdir_lock.exclusive(str(tmp_path)):
    pass


def test_main_refuses_a_workdir_in_use_and_writes_nothing_to_it(tmp_path):
  workdir = tmp_path / "pretrain"
  with workdir_lock.exclusive(str(workdir)):
    result = main_process("pretrain.py:tiny", workdir, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"is in use by process {os.getpid()}" in result.stderr
  assert "give another --workdir" in result.stderr
  assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_NAME]
  # Once the first run is gone (here: the lock released), the same command runs.
  run_main("pretrain.py:tiny", workdir, "--config.total_steps=2")
  assert "checkpoints" in os.listdir(workdir)


def test_a_workdir_without_write_access_runs_unguarded(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise PermissionError("read-only file system")

  monkeypatch.setattr("builtins.open", refuse)
  ran = []
  with workdir_lock.exclusive(str(tmp_path)):
    ran.append(True)
  assert ran == [True]
