"""benchmarks/accelerator_check.py, dry run on CPU: every stage runs and reports."""

import json
import subprocess
import sys

from conftest import ROOT
from conftest import subprocess_env

from benchmarks import accelerator_check


def test_dry_run_runs_every_stage_and_writes_one_summary(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.accelerator_check",
      "--dry_run",
      f"--out={out}",
      "--stages=install,env,tests,bench,pretrain",
    ],
    cwd=ROOT,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  results = {r["stage"]: r for r in json.loads((out / "accelerator_check.json").read_text())}
  assert results["install"]["status"] == "skipped (no --wheels)"
  for stage in ("env", "tests", "bench", "pretrain"):
    assert results[stage]["status"] == "ok", (stage, (out / f"{stage}.log").read_text())
  assert "backend cpu" in results["env"]["figures"]
  assert results["tests"]["figures"].startswith("2 passed")
  assert results["bench"]["figures"].startswith("1 rows")
  assert "loss check" in results["bench"]["figures"]  # HF side ran: same loss, same mask
  assert "img/s" in results["pretrain"]["figures"]
  summary = (out / "accelerator_check.md").read_text()
  assert "| bench | ok |" in summary and "| tiny | float32 | 8 |" in summary
  # What comes back from a device machine: at most 8 plain files, no folders.
  assert all(p.is_file() for p in out.iterdir()) and len(list(out.iterdir())) <= 8


def test_device_test_ids_exist():
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "--collect-only",
      "-q",
      "-p",
      "no:cacheprovider",
      *accelerator_check.DEVICE_TESTS,
    ],
    cwd=ROOT,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  collected = [line for line in proc.stdout.splitlines() if "::" in line]
  assert len(collected) >= 20


def test_requirements_and_the_wheel_list_agree():
  names = {
    r.split(">")[0].split("=")[0].strip().lower().replace("_", "-")
    for r in accelerator_check.requirements()
  }
  missing = {n.lower().replace("_", "-") for n in accelerator_check.DEVICE_MISSING}
  # Every direct requirement the device image lacks is in the wheel list.
  assert {
    "ml-collections",
    "grain",
    "tensorflow-datasets",
    "lmdb",
    "rapidfuzz",
    "dm-pix",
    "tensorboardx",
    "importlib-resources",
  } <= names & missing
