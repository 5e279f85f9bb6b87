"""benchmarks/ab_trees.py: two processes, one per tree, alternate steps (tiny model)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_same_tree_twice_gives_the_same_losses():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.ab_trees",
      "--model=tiny",
      "--batch=4",
      "--steps=2",
      f"one={ROOT}:float32",
      f"two={ROOT}:float32",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {
    line.split("|")[1].strip(): line.split("|")[2:-1]
    for line in out.stdout.splitlines()
    if line.startswith("| one") or line.startswith("| two")
  }
  assert set(rows) == {"one", "two"}
  assert rows["one"][-2:] == rows["two"][-2:]  # same first and last loss: same numerics
  assert all(float(t) > 0 for t in rows["one"][:3])
