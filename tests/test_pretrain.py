"""The pretraining program end to end: runs, resumes exactly, survives preemption,
stops on NaN, counts epochs, and gives the same result on 1 or 8 devices (several
processes: tests/test_launch.py)."""

import json
import math
import signal
import subprocess
import time

from conftest import ROOT
from conftest import load_config
from conftest import main_command
from conftest import run_main
from conftest import subprocess_env
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mms_jax import checkpoints
from mms_jax import masking
from mms_jax.train import common
from mms_jax.train import guards
from mms_jax.train import pretrain

QUICK = ["--config.picture_every=0", "--config.log_every=1"]


def _params(workdir):
  return jax.tree.map(np.asarray, checkpoints.load_params(workdir))


def _assert_trees(a, b, **tolerance):
  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    if tolerance:
      np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tolerance)
    else:
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_main_job_runs_end_to_end_and_rerun_resumes(tmp_path, tiny_pretrain_config):
  workdir = tmp_path / "run"
  state = pretrain.train_and_evaluate(tiny_pretrain_config, str(workdir)).state
  assert int(state.step) == 6
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 6]
  for step in (3, 6):
    assert checkpoints.verify_manifest(workdir / "checkpoints" / str(step)) is None
  assert json.loads((workdir / "config.json").read_text())["program"] == "pretrain"
  assert (workdir / "reconstruction_0000006.png").stat().st_size > 1000
  assert list((workdir / "tensorboard").iterdir())
  # Re-running the finished workdir resumes at its last step and trains no further.
  again = pretrain.train_and_evaluate(load_config("pretrain", "tiny"), str(workdir)).state
  assert int(again.step) == 6
  _assert_trees(jax.device_get(again.params), _params(workdir))


def test_init_from_continues_a_pretraining_decoder_included(tmp_path, tiny_pretrain_config):
  source = tmp_path / "source"
  pretrain.train_and_evaluate(tiny_pretrain_config, str(source))
  config = load_config("pretrain", "tiny")
  config.init_from, config.lr.base, config.total_steps = str(source), 0.0, 1
  state = pretrain.train_and_evaluate(config, str(tmp_path / "continued")).state
  # At lr 0 the one step changes nothing: every tensor is the source's, decoder too.
  _assert_trees(jax.device_get(state.params), _params(source))


def test_invalid_config_fails_before_compiling(tmp_path, tiny_pretrain_config):
  tiny_pretrain_config.masking.strategies = ("random_patch", "spam")
  with pytest.raises(ValueError, match=r"masking.strategies\[1\]='spam'"):
    pretrain.train_and_evaluate(tiny_pretrain_config, str(tmp_path))
  config = load_config("pretrain", "tiny")
  config.batch_size = 7
  config.grad_accum_steps = 2
  with pytest.raises(ValueError, match="config.batch_size=7"):
    pretrain.train_and_evaluate(config, str(tmp_path / "b"))


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  results = []
  for accumulation in (1, 4):
    config = load_config("pretrain", "tiny")
    config.total_steps, config.picture_every, config.grad_accum_steps = 2, 0, accumulation
    state = pretrain.train_and_evaluate(config, str(tmp_path / str(accumulation))).state
    results.append(jax.device_get(state.params))
  _assert_trees(*results, rtol=2e-4, atol=2e-6)


def test_nan_after_a_checkpoint_leaves_it_intact(tmp_path):
  config = load_config("pretrain", "tiny")
  config.picture_every, config.log_every, config.total_steps = 0, 1, 8
  state = pretrain.train_and_evaluate(config, str(tmp_path)).state  # checkpoints at 3, 6, 8
  config = load_config("pretrain", "tiny")
  config.picture_every, config.log_every, config.total_steps = 0, 1, 12
  config.lr.base = math.nan  # the lr and, after one update, the loss become NaN
  with pytest.raises(guards.NonFiniteError, match=r"step 9\b.*lr=nan"):
    pretrain.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoints.Checkpointer(tmp_path, program="pretrain")
  assert ckpt.latest_good_step() == 8
  ckpt.close()
  _assert_trees(_params(tmp_path), jax.device_get(state.params))


def _wait_for(predicate, process, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    if process.poll() is not None:
      pytest.fail(f"the run ended before the expected point:\n{process.stderr.read()[-4000:]}")
    if time.time() > deadline:
      process.kill()
      pytest.fail("timed out waiting for the run")
    time.sleep(0.005)


def test_sigkill_after_a_checkpoint_then_restart_is_exact(tmp_path):
  steps = ["--config.total_steps=160", "--config.checkpoint.every=5"]
  run_main("pretrain.py:tiny", tmp_path / "straight", *QUICK, *steps)

  workdir = tmp_path / "killed"
  process = subprocess.Popen(
    main_command("pretrain.py:tiny", workdir, *QUICK, *steps),
    cwd=ROOT,
    env=subprocess_env(),
    stderr=subprocess.PIPE,
    text=True,
  )
  manifest = workdir / "checkpoints" / "10" / checkpoints.MANIFEST_NAME
  _wait_for(manifest.exists, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  log = run_main("pretrain.py:tiny", workdir, *QUICK, *steps)
  resumed = int(log.split("Starting at step ")[1].split()[0])
  assert 10 <= resumed < 160 and "(workdir)" in log
  _assert_trees(_params(workdir), _params(tmp_path / "straight"))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  process = subprocess.Popen(
    main_command(
      "pretrain.py:tiny",
      tmp_path,
      *QUICK,
      "--config.total_steps=100000",
      "--config.checkpoint.every=100000",
    ),
    cwd=ROOT,
    env=subprocess_env(),
    stderr=subprocess.PIPE,
    text=True,
  )
  log = []
  while not any("[3/" in line for line in log):  # the [step/total] log line of step 3
    line = process.stderr.readline()
    assert line or process.poll() is None, "".join(log)
    log.append(line)
  process.send_signal(signal.SIGTERM)
  rest = process.communicate(timeout=120)[1]
  assert process.returncode == 0, rest
  stopped = int(rest.split("Stopped at step ")[1].split()[0])
  step_dir = tmp_path / "checkpoints" / str(stopped)
  assert checkpoints.verify_manifest(step_dir) is None
  assert "Preemption (SIGTERM)" in rest


# Adam turns the float noise of gradients that are ~0 in exact arithmetic (the key bias
# has no effect on attention) into lr-sized updates, so params agree to ~lr * 1e-1.
def test_eight_devices_and_fsdp_match_one_device(tmp_path):
  steps = [*QUICK, "--config.total_steps=3"]
  run_main("pretrain.py:tiny", tmp_path / "one", *steps)
  run_main("pretrain.py:tiny", tmp_path / "eight", *steps, devices=8)
  run_main(
    "pretrain.py:tiny",
    tmp_path / "fsdp",
    *steps,
    "--config.fsdp=4",
    "--config.model.encoder.width=64",
    "--config.model.decoder_width=64",
    devices=8,
  )
  run_main(
    "pretrain.py:tiny",
    tmp_path / "one_wide",
    *steps,
    "--config.model.encoder.width=64",
    "--config.model.decoder_width=64",
  )
  _assert_trees(_params(tmp_path / "one"), _params(tmp_path / "eight"), rtol=1e-4, atol=1e-5)
  _assert_trees(_params(tmp_path / "one_wide"), _params(tmp_path / "fsdp"), rtol=1e-4, atol=1e-5)


def test_num_epochs_sets_the_length_from_the_training_set(tmp_path):
  log = run_main(
    "pretrain.py:tiny",
    tmp_path,
    *QUICK,
    "--config.total_steps=0",
    "--config.num_epochs=1.0",
    "--config.data.size.train=24",
  )
  assert "training to step 3." in log  # 24 images / batch 8
  assert (tmp_path / "checkpoints" / "3").is_dir()


def _random_images(seed, batch, hw=(32, 128)):
  return jax.random.uniform(jax.random.key(seed), (batch, *hw, 3), minval=-1, maxval=1)


def _initial_state(model, spec, optimizer):
  """The train state of a fresh tiny MAE (params from key 0, step rng from key 1)."""
  n = spec.num_masked()
  params = model.init(
    {"params": jax.random.key(0)},
    _random_images(0, 1),
    masking.random_patch(jax.random.key(0), 1, spec.grid, n),
    num_masked=n,
  )["params"]
  return common.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    rng=jax.random.key_data(jax.random.key(1)),
  )


def test_cpu_micro_batches_match_one_batch():
  """The automatic CPU micro-batch split of the pretraining step (docs/performance.md)
  gives the same update as one batch, up to float rounding."""

  def one_step(micro_batch_bytes):
    config = load_config("pretrain", "tiny")
    config.micro_batch_bytes = micro_batch_bytes
    spec = pretrain.check_config(config)
    mesh, model = common.make_mesh(config), pretrain.build_model(config)
    optimizer, schedule = common.make_optimizer(config, config.total_steps)
    n = spec.num_masked()
    state = _initial_state(model, spec, optimizer)
    shardings = common.state_shardings(state, mesh)
    split = pretrain.micro_batches_per_step(model, config, spec, mesh)
    step = pretrain.make_train_step(model, config, spec, optimizer, schedule, mesh, shardings)
    images = common.global_batch(np.asarray(_random_images(5, config.batch_size)), mesh)
    state, metrics = step(state, images, n)
    return split, jax.device_get((state.params, metrics))

  (one, (params_1, metrics_1)), (split, (params_n, metrics_n)) = one_step(0), one_step(1)
  assert (one, split) == (1, 8)
  np.testing.assert_allclose(metrics_n["loss"], metrics_1["loss"], rtol=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(params_n), jax.tree_util.tree_leaves(params_1)):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


def test_train_step_on_a_mesh_of_the_devices():
  """The sharded step on whatever devices this process has (8 simulated CPUs in the
  suite's subprocess tests, the real GPU in benchmarks/accelerator_check.py): the state
  lives on every device of the mesh, the batch is split over them, the loss is finite,
  and a second run from the same seed gives the same parameters."""
  config = load_config("pretrain", "tiny")
  config.batch_size = 8 * jax.device_count()
  spec = pretrain.check_config(config)
  mesh, model = common.make_mesh(config), pretrain.build_model(config)
  optimizer, schedule = common.make_optimizer(config, config.total_steps)
  n = spec.num_masked()

  def run():
    state = _initial_state(model, spec, optimizer)
    initial = jax.device_get(state.params)  # the step donates the state's buffers
    shardings = common.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step = pretrain.make_train_step(model, config, spec, optimizer, schedule, mesh, shardings)
    losses = []
    for seed in (5, 6):
      images = common.global_batch(np.asarray(_random_images(seed, config.batch_size)), mesh)
      assert images.sharding.mesh.devices.size == jax.device_count()
      state, metrics = step(state, images, n)
      losses.append(float(metrics["loss"]))
    return state, losses, initial

  state, losses, initial = run()
  assert all(np.isfinite(losses)), losses
  leaf = jax.tree_util.tree_leaves(state.params)[0]
  assert set(leaf.sharding.device_set) == set(jax.devices())
  assert int(state.step) == 2
  moved = [
    not np.allclose(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(initial))
  ]
  assert sum(moved) > len(moved) // 2
  again, losses_again, _ = run()
  assert losses_again == losses
  _assert_trees(jax.device_get(again.params), jax.device_get(state.params))


def test_console_line_reads_like_progress():
  line = common.console_line(
    300, {"loss": 2.889, "images_per_sec": 51.04, "eta_hours": 3574 / 3600}, total_steps=6000
  )
  assert line == "[300/6000] loss=2.889 | 51.0 img/s, eta 59m34s"
  assert [common.format_duration(s) for s in (42, 372.4, 3725.2)] == ["42s", "6m12s", "1h02m"]
