r"""The prepared check for a short window on an accelerator (docs/benchmarks.md).

On a fresh CUDA machine (jax with CUDA, flax, optax, orbax, torch, transformers; no
network), from the repository root:

  python3 -m benchmarks.accelerator_check --wheels=.wheels --out=$OUT

Here, beforehand (needs the package index), the few pure-Python / binary packages that
machine lacks, for its Python (3.12, x86-64):

  python -m benchmarks.accelerator_check --prepare_wheels=.wheels
  echo /.wheels/ >> .git/info/exclude          # carried, not committed

and on CPU, what the test suite runs so the script cannot rot:

  python -m benchmarks.accelerator_check --dry_run --out=/tmp/accel

Stages, each a child process with its own time limit, its output in OUT/<stage>.log:
  install   pip install --no-index --no-deps --find-links=WHEELS the packages the
            image lacks (DEVICE_MISSING; skipped without --wheels).
  env       jax.devices(), versions, nvidia-smi.
  tests     the tests that mean something on a real device: every model test (bf16
            compute, attention implementations, the MAE loss), the HF ViTMAE forward
            and loss from the same weights (tests/test_convert.py), the masked conv
            stem, and sharding over a mesh of the real device(s); f32 matmuls at full
            precision (JAX_DEFAULT_MATMUL_PRECISION=highest: the GPU's default TF32
            would miss the 1e-5 tolerances).
  bench     benchmarks/bench_vs_torch: mms_jax vs HF ViTMAEForPreTraining (torch on
            the same GPU, sdpa, bf16 autocast), ViT-S/4 at 32x128, batches 128 and
            512, with the f32 loss check and MFU against the bf16 matmul peak
            measured in the same run.
  pretrain  a real pretraining run (configs/pretrain.py:S4_union14m's model on
            generated images, grain feeding it with 8 worker processes), img/s from
            its log.
The summary, OUT/accelerator_check.md, holds one row per stage (status, seconds, the
figures) and the bench table; every stage runs even when one before it fails.
`--dry_run` runs the same stages with the tiny model, batch 8 and a few steps.
"""

import configparser
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS


def _define_flags():  # only when run as a program: tests import this module
  flags.DEFINE_string(
    "out",
    os.environ.get("OUT", "accelerator_check"),
    "folder for the summary and the logs (default: $OUT)",
  )
  flags.DEFINE_string(
    "wheels",
    "",
    "folder of wheels to install the missing requirements from (--prepare_wheels makes it)",
  )
  flags.DEFINE_string(
    "prepare_wheels", "", "download the wheels the device machine lacks into this folder, then exit"
  )
  flags.DEFINE_bool("dry_run", False, "tiny model, small batches, few steps (CPU, CI)")
  flags.DEFINE_list(
    "stages", ["install", "env", "tests", "bench", "pretrain"], "stages to run, in this order"
  )
  flags.DEFINE_integer(
    "budget_s", 480, "overall time budget; a stage gets what is left of it, up to its own limit"
  )


# The device image has jax, flax, optax, orbax, chex, absl, numpy, pillow, matplotlib,
# fonttools, protobuf, pyarrow, psutil, tqdm, wrapt, etils, cloudpickle, pyyaml, attrs,
# requests (../.library/device/KINDS.md); these are what mms_jax needs beyond them.
DEVICE_MISSING = (
  "ml_collections",
  "tensorboardX",
  "grain",
  "portpicker",
  "array_record",
  "tensorflow-datasets",
  "dm-tree",
  "immutabledict",
  "promise",
  "simple_parsing",
  "docstring-parser",
  "tensorflow-metadata",
  "googleapis-common-protos",
  "termcolor",
  "toml",
  "lmdb",
  "importlib_resources",
  "rapidfuzz",
  "dm-pix",
)
SOURCE_ONLY = ("promise",)  # no wheel on PyPI: built here (pure Python, any platform)
DEVICE_PYTHON = "3.12"

DEVICE_TESTS = [
  "tests/test_models.py",
  "tests/test_stem.py",
  "tests/test_convert.py::test_hf_pretraining_forward_square_grid",
  "tests/test_convert.py::test_hf_pretraining_forward_rectangular_grid",
  "tests/test_convert.py::test_hf_encoder_features_match_rectangular_grid",
  "tests/test_pretrain.py::test_train_step_on_a_mesh_of_the_devices",
]
DRY_RUN_TESTS = [
  "tests/test_models.py::test_bf16_compute_f32_params",
  "tests/test_pretrain.py::test_train_step_on_a_mesh_of_the_devices",
]

# (seconds limit, seconds limit in a dry run). The dry run's test stage compiles on
# a 2-core CPU, which the suite may share with other work: 120 s timed out there once.
LIMITS = {
  "install": (90, 60),
  "env": (60, 60),
  "tests": (180, 300),
  "bench": (240, 240),
  "pretrain": (120, 120),
}


def requirements():
  """install_requires of setup.cfg."""
  parser = configparser.ConfigParser()
  parser.read(ROOT / "setup.cfg")
  return [r.strip() for r in parser["options"]["install_requires"].splitlines() if r.strip()]


def prepare_wheels(folder):
  """Downloads DEVICE_MISSING for the device's Python (binary wheels, no dependencies)."""
  platforms = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"]
  binary = [name for name in DEVICE_MISSING if name not in SOURCE_ONLY]
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--dest",
      folder,
      "--no-deps",
      "--only-binary=:all:",
      "--python-version",
      DEVICE_PYTHON,
      *(f"--platform={p}" for p in platforms),
      *binary,
    ],
    check=True,
  )
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "--wheel-dir", folder, "--no-deps", *SOURCE_ONLY],
    check=True,
  )
  size = sum(p.stat().st_size for p in pathlib.Path(folder).glob("*.whl"))
  print(
    f"{len(list(pathlib.Path(folder).glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in "
    f"{folder} (carry it: run(carry=['{folder}']))"
  )


def stage_commands(dry_run, wheels):
  """{stage: (argv, extra environment)}."""
  py = sys.executable
  tests = DRY_RUN_TESTS if dry_run else DEVICE_TESTS
  if dry_run:
    bench = [
      "--models=tiny",
      "--batches=8",
      "--dtypes=float32",
      "--steps=1",
      "--malloc_hugetlb=false",
      "--peak_size=512",
    ]
    pretrain = [
      "--config=configs/pretrain.py:tiny",
      "--config.total_steps=4",
      "--config.log_every=2",
      "--config.picture_every=0",
    ]
  else:
    bench = ["--models=S", "--batches=128,512", "--dtypes=bfloat16", "--steps=5"]
    pretrain = [
      "--config=configs/pretrain.py:S4_union14m",
      "--config.data.source=synthetic",
      "--config.data.reader=direct",
      "--config.num_epochs=None",
      "--config.total_steps=300",
      "--config.batch_size=512",
      "--config.log_every=50",
      "--config.checkpoint.every=100000",
      "--config.picture_every=0",
      "--config.distributed.auto=False",
    ]
  # --no-deps: the image's own versions of everything else stay as they are.
  install = [
    py,
    "-m",
    "pip",
    "install",
    "--no-index",
    f"--find-links={wheels}",
    "--no-deps",
    *DEVICE_MISSING,
  ]
  env_probe = (
    "import jax, importlib.metadata as m; print('devices', jax.devices()); "
    "print('backend', jax.default_backend()); "
    "[print(p, m.version(p)) for p in ('jax', 'jaxlib', 'flax', 'optax', "
    "'orbax-checkpoint', 'grain', 'torch', 'transformers') "
    "if __import__('importlib.util').util.find_spec(p.split('-')[0]) is not None]"
  )
  return {
    "install": (install, {}),
    "env": ([py, "-c", env_probe], {}),
    "tests": (
      [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
      {"JAX_DEFAULT_MATMUL_PRECISION": "highest"},
    ),
    "bench": ([py, "-m", "benchmarks.bench_vs_torch", *bench], {}),
    # The run's workdir stays out of OUT (only a few files come back from there).
    "pretrain": (
      [
        py,
        "-m",
        "mms_jax.main",
        *pretrain,
        f"--workdir={tempfile.mkdtemp(prefix='mms_accel_pretrain_')}",
      ],
      {},
    ),
  }


def figures(stage, log):
  """The figures worth a summary line, read from a stage's output."""
  if stage == "env":
    return "; ".join(
      line for line in log.splitlines() if line.startswith(("devices", "backend", "jax "))
    )
  if stage == "tests":
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", log, re.M)
    return found[-1] if found else ""
  if stage == "bench":
    rows = [line for line in log.splitlines() if re.match(r"^\| (tiny|S) \|", line)]
    checks = re.findall(r"loss check[^\n]*", log)
    return " ".join([f"{len(rows)} rows", *checks])
  if stage == "pretrain":
    rates = re.findall(r"\|\s*([\d.]+) img/s", log)
    return f"last logged {rates[-1]} img/s" if rates else ""
  return ""


def run_stage(stage, argv, env, limit, out):
  log_path = pathlib.Path(out) / f"{stage}.log"
  start = time.time()
  with open(log_path, "w") as log:
    log.write("$ " + " ".join(argv) + "\n")
    log.flush()
    try:
      proc = subprocess.run(
        argv,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        timeout=limit,
        check=False,
      )
      status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
      status = f"timed out after {limit} s"
  seconds = time.time() - start
  text = log_path.read_text(errors="replace")
  return dict(
    stage=stage,
    status=status,
    seconds=round(seconds, 1),
    figures=figures(stage, text),
    log=log_path.name,
  )


def summary(results, bench_log, dry_run):
  lines = [
    f"# accelerator check{' (dry run)' if dry_run else ''}, "
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    "",
    "| stage | status | s | figures |",
    "|---|---|---:|---|",
  ]
  lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['figures']} |" for r in results]
  if bench_log:
    table = [line for line in bench_log.splitlines() if line.startswith("|")]
    lines += ["", "bench_vs_torch:", "", *table]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS.prepare_wheels:
    prepare_wheels(FLAGS.prepare_wheels)
    return
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  commands = stage_commands(FLAGS.dry_run, FLAGS.wheels)
  unknown = sorted(set(FLAGS.stages) - set(commands))
  if unknown:
    raise app.UsageError(f"unknown stages {unknown}; choose from {list(commands)}")
  deadline = time.time() + FLAGS.budget_s
  results = []
  for stage in FLAGS.stages:
    if stage == "install" and not FLAGS.wheels:
      results.append(
        dict(stage=stage, status="skipped (no --wheels)", seconds=0, figures="", log="")
      )
      continue
    limit = min(LIMITS[stage][FLAGS.dry_run], int(deadline - time.time()))
    if limit < 10:
      results.append(
        dict(stage=stage, status="skipped (budget spent)", seconds=0, figures="", log="")
      )
      continue
    argv, env = commands[stage]
    results.append(run_stage(stage, argv, env, limit, out))
    print(
      f"{stage}: {results[-1]['status']} in {results[-1]['seconds']} s; {results[-1]['figures']}",
      flush=True,
    )
  bench_log = (out / "bench.log").read_text() if (out / "bench.log").exists() else ""
  text = summary(results, bench_log, FLAGS.dry_run)
  (out / "accelerator_check.md").write_text(text)
  (out / "accelerator_check.json").write_text(json.dumps(results, indent=1))
  print("\n" + text)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
