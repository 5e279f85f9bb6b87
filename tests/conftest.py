"""Shared test helpers: config loading and running programs as real processes."""

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Most of the suite's time is XLA compiling the same tiny programs again in each test and
# subprocess: JAX's persistent compilation cache (keyed by the program, the flags and the
# jax version) lets them reuse one another's executables. Set before jax is imported.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mms_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def load_config(name, variant=""):
  """configs/<name>.py:get_config(variant), as `--config=configs/<name>.py:variant` does."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def main_command(config, workdir, *overrides):
  return [
    sys.executable,
    "-m",
    "mms_jax.main",
    f"--config={ROOT / 'configs' / config}",
    f"--workdir={workdir}",
    *overrides,
  ]


def subprocess_env(devices=None):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def main_process(config, workdir, *overrides, devices=None, timeout=300):
  """Runs the entry point to its end; returns the CompletedProcess, whatever its status."""
  return subprocess.run(
    main_command(config, workdir, *overrides),
    cwd=ROOT,
    env=subprocess_env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def module_process(module, *args, timeout=300):
  """Runs `python -m <module> <args>` to its end; returns the CompletedProcess."""
  return subprocess.run(
    [sys.executable, "-m", module, *map(str, args)],
    cwd=ROOT,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def run_main(config, workdir, *overrides, devices=None, timeout=300):
  """Runs the entry point to completion; returns its log, fails with it on error."""
  result = main_process(config, workdir, *overrides, devices=devices, timeout=timeout)
  if result.returncode:
    pytest.fail(f"main exited with {result.returncode}:\n{result.stderr[-6000:]}")
  return result.stderr


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def tiny_pretrain_config():
  return load_config("pretrain", "tiny")
