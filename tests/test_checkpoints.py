"""Tests for mms_jax.checkpoints and mms_jax.train.guards."""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from mms_jax import checkpoints
from mms_jax.train import guards

REPO = pathlib.Path(__file__).resolve().parents[1]


@struct.dataclass
class TrainState:
  params: dict
  opt_state: optax.OptState
  step: jax.Array
  rng: jax.Array


def make_state(seed=0, step=0):
  k = jax.random.PRNGKey(seed)
  params = {
    "encoder": {"w": jax.random.normal(k, (8, 4))},
    "decoder": {"b": jnp.full((4,), float(seed))},
  }
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu
  return TrainState(params, opt_state, jnp.asarray(step, jnp.int32), jax.random.PRNGKey(seed + 100))


def abstract(sharding=None):
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpoints.abstract_with_sharding(jax.eval_shape(make_state), sharding)


def assert_tree_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(workdir, steps, **kw):
  with checkpoints.Checkpointer(workdir, program="test", **kw) as ckpt:
    for s in steps:
      assert ckpt.save(s, make_state(seed=s, step=s), data_state={"pos": s}, config={"lr": 0.1})


def largest_array_file(state_dir):
  """The biggest OCDBT data file (array bytes, not metadata) of a state item."""
  files = [p for p in pathlib.Path(state_dir).rglob("ocdbt.process_*/d/*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


# --- save / restore ----------------------------------------------------------


def test_roundtrip_state_data_and_meta(tmp_path):
  state = make_state(seed=3, step=7)
  with checkpoints.Checkpointer(tmp_path, program="pretrain") as ckpt:
    ckpt.save(
      7, state, data_state={"shard": 2, "index": [1, 2]}, config={"lr": 1e-3, "model": {"depth": 2}}
    )
    ckpt.wait_until_finished()
    manifest = ckpt.step_dir(7) / checkpoints.MANIFEST_NAME
    assert manifest.exists()
    assert checkpoints.verify_manifest(ckpt.step_dir(7)) is None

  with checkpoints.Checkpointer(tmp_path) as ckpt:
    restored, data_state, source = checkpoints.restore_or_initialize(ckpt, abstract())
    _, _, meta = ckpt.restore(7, abstract())
  assert source == "workdir"
  assert isinstance(restored, TrainState)
  assert_tree_equal(restored, state)
  assert data_state == {"shard": 2, "index": [1, 2]}
  assert meta["program"] == "pretrain" and meta["step"] == 7
  assert meta["config"] == {"lr": 1e-3, "model": {"depth": 2}}
  assert "timestamp" in meta


def test_bytes_data_state_roundtrip(tmp_path):
  blob = b'{"next_index": 17, "worker": 1}'
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, make_state(), data_state=blob)
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    _, data_state, _ = checkpoints.restore_or_initialize(ckpt, abstract())
  assert data_state == blob


def test_keep_last_n_and_keep_every_k(tmp_path):
  save_steps(tmp_path, range(1, 11), keep=2, keep_every=4)
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    assert sorted(ckpt.all_steps()) == [4, 8, 9, 10]
  for s in (4, 8, 9, 10):
    assert checkpoints.verify_manifest(tmp_path / "checkpoints" / str(s)) is None


def test_sync_save_writes_manifest_immediately(tmp_path):
  with checkpoints.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, make_state())
    assert (ckpt.step_dir(1) / checkpoints.MANIFEST_NAME).exists()


def test_manifest_commits_with_the_step_directory(tmp_path):
  """A process killed (SIGKILL) the moment a step directory appears keeps that step."""
  script = textwrap.dedent(f"""
      import os, pathlib, signal, sys, time
      sys.path.insert(0, {str(REPO / "tests")!r})
      from test_checkpoints import make_state
      from mms_jax import checkpoints
      ckpt = checkpoints.Checkpointer({str(tmp_path)!r})
      ckpt.save(3, make_state(seed=3, step=3))
      ckpt.wait_until_finished()
      ckpt.save(5, make_state(seed=5, step=5))
      step_dir = pathlib.Path({str(tmp_path)!r}) / "checkpoints" / "5"
      while not step_dir.is_dir():
        time.sleep(0.001)
      os.kill(os.getpid(), signal.SIGKILL)  # no close(), no next save
  """)
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert checkpoints.verify_manifest(tmp_path / "checkpoints" / "5") is None
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_good_step() == 5
    restored, _, _ = checkpoints.restore_or_initialize(ckpt, abstract())
  assert_tree_equal(restored, make_state(seed=5, step=5))
  assert not (tmp_path / checkpoints.CORRUPT_DIR).exists()


# --- corruption ----------------------------------------------------------------


def test_flipped_bytes_fall_back_to_previous(tmp_path, caplog):
  save_steps(tmp_path, [1, 2])
  victim = largest_array_file(tmp_path / "checkpoints" / "2" / "state")
  raw = bytearray(victim.read_bytes())
  mid = len(raw) // 2
  raw[mid : mid + 4] = bytes(b ^ 0xFF for b in raw[mid : mid + 4])
  victim.write_bytes(bytes(raw))

  with caplog.at_level(logging.WARNING):
    with checkpoints.Checkpointer(tmp_path) as ckpt:
      state, data_state, source = checkpoints.restore_or_initialize(ckpt, abstract())
      assert ckpt.all_steps() == [1]
  assert source == "workdir"
  assert_tree_equal(state, make_state(seed=1, step=1))
  assert data_state == {"pos": 1}
  text = caplog.text
  assert "step 2" in text and victim.name in text and "corrupt" in text
  moved = tmp_path / "checkpoints_corrupt" / "2"
  assert moved.is_dir()
  assert (moved / victim.relative_to(tmp_path / "checkpoints" / "2")).exists()


def test_missing_manifest_falls_back(tmp_path, caplog):
  save_steps(tmp_path, [1, 2])
  (tmp_path / "checkpoints" / "2" / checkpoints.MANIFEST_NAME).unlink()
  with caplog.at_level(logging.WARNING):
    with checkpoints.Checkpointer(tmp_path) as ckpt:
      state, _, _ = checkpoints.restore_or_initialize(ckpt, abstract())
      # Saving again at step 2 must work (the corrupt dir is out of the way).
      assert ckpt.save(2, make_state(seed=22, step=2))
  assert int(state.step) == 1
  assert "step 2" in caplog.text and checkpoints.MANIFEST_NAME in caplog.text
  assert (tmp_path / "checkpoints_corrupt" / "2").is_dir()
  assert checkpoints.verify_manifest(tmp_path / "checkpoints" / "2") is None


def test_all_corrupt_means_scratch(tmp_path):
  save_steps(tmp_path, [1])
  (tmp_path / "checkpoints" / "1" / checkpoints.MANIFEST_NAME).unlink()
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    state, data_state, source = checkpoints.restore_or_initialize(ckpt, abstract())
  assert (state, data_state, source) == (None, None, "scratch")


# --- restore priority --------------------------------------------------------


@pytest.fixture(name="sources")
def fixture_sources(tmp_path):
  save_steps(tmp_path / "resume_src", [3])
  return tmp_path


def test_priority_order(sources):
  resume = sources / "resume_src"

  def run(workdir, **kw):
    with checkpoints.Checkpointer(workdir) as ckpt:
      return checkpoints.restore_or_initialize(ckpt, abstract(), **kw)

  # (c) nothing -> scratch (the trainer builds a fresh state, then merges init_from).
  assert run(sources / "w0") == (None, None, "scratch")
  # (b) resume_from: full state and data state.
  state, data_state, source = run(sources / "w2", resume_from=resume)
  assert source == "resume_from" and int(state.step) == 3
  assert data_state == {"pos": 3}
  # (a) the workdir's own checkpoint beats resume_from.
  save_steps(sources / "w3", [5])
  state, _, source = run(sources / "w3", resume_from=resume)
  assert source == "workdir" and int(state.step) == 5


def test_resume_from_step_dir_and_checkpoints_dir(sources):
  step_dir = sources / "resume_src" / "checkpoints" / "3"
  for path in (step_dir, step_dir.parent):
    state, _, meta = checkpoints.restore_path(path, abstract())
    assert int(state.step) == 3 and meta["step"] == 3


def test_explicit_path_errors_are_clear(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(checkpoints.CheckpointError, match="resume_from=.*nope.*does not exist"):
    checkpoints.restore_path(missing, abstract(), what="resume_from")
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint steps"):
    checkpoints.load_params(tmp_path / "empty")
  save_steps(tmp_path / "src", [1])
  step_dir = tmp_path / "src" / "checkpoints" / "1"
  (step_dir / checkpoints.MANIFEST_NAME).unlink()
  with pytest.raises(checkpoints.CheckpointError, match="corrupt"):
    checkpoints.restore_path(step_dir, abstract())


def test_load_params_with_abstract_target(tmp_path):
  save_steps(tmp_path, [2])
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  target = checkpoints.abstract_with_sharding(
    jax.eval_shape(make_state).params, NamedSharding(mesh, P())
  )
  params = checkpoints.load_params(tmp_path, target)
  assert_tree_equal(params, make_state(seed=2).params)
  assert isinstance(params["encoder"]["w"], jax.Array)
  assert isinstance(params["encoder"]["w"].sharding, NamedSharding)


# --- shardings / device counts -----------------------------------------------


def test_restore_onto_named_sharding(tmp_path):
  save_steps(tmp_path, [1])
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    state, _, _ = checkpoints.restore_or_initialize(ckpt, abstract(NamedSharding(mesh, P())))
  assert_tree_equal(state, make_state(seed=1, step=1))
  assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree.leaves(state))


def test_restore_on_four_devices_in_subprocess(tmp_path):
  save_steps(tmp_path, [1])
  np.save(tmp_path / "expected_w.npy", np.asarray(make_state(seed=1).params["encoder"]["w"]))
  script = textwrap.dedent(f"""
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from mms_jax import checkpoints
      assert jax.device_count() == 4, jax.devices()
      mesh = Mesh(np.array(jax.devices()), ("data",))
      def shard(x):
        spec = P("data") if x.ndim and x.shape[0] % 4 == 0 else P()
        return NamedSharding(mesh, spec)
      raw = checkpoints.load_params({str(tmp_path)!r})  # numpy, any devices
      abstract = checkpoints.abstract_with_sharding(
          raw, jax.tree.map(shard, raw))
      params = checkpoints.load_params({str(tmp_path)!r}, abstract)
      w = params["encoder"]["w"]
      assert len(w.sharding.device_set) == 4, w.sharding
      np.testing.assert_array_equal(
          np.asarray(w), np.load({str(tmp_path / "expected_w.npy")!r}))
      print("RESTORED_ON_4")
  """)
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(REPO),
  )
  proc = subprocess.run(
    [sys.executable, "-c", script],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert "RESTORED_ON_4" in proc.stdout, proc.stderr[-3000:]


# --- preemption --------------------------------------------------------------


def test_sigterm_sets_flag_and_does_not_kill(caplog):
  before = signal.getsignal(signal.SIGTERM)
  with guards.PreemptionWatcher() as watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not watcher.should_stop(2) and time.time() < deadline:
      time.sleep(0.01)
    with caplog.at_level(logging.WARNING):
      assert watcher.should_stop(3)
  assert signal.getsignal(signal.SIGTERM) is before


# --- guards ------------------------------------------------------------------


@pytest.mark.parametrize(
  "bad,shown", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf")]
)
def test_check_finite_fires(bad, shown):
  metrics = {"loss": jnp.asarray(bad), "grad_norm": np.float32(1.0), "step_count": 5}
  with pytest.raises(guards.NonFiniteError) as e:
    guards.check_finite(metrics, step=1234)
  msg = str(e.value)
  assert "step 1234" in msg and f"loss={shown}" in msg
  assert "grad_norm" not in msg.split("Training stopped")[0]
  assert "last good checkpoint" in msg and "learning rate" in msg
  assert e.value.step == 1234 and set(e.value.bad) == {"loss"}


def test_check_finite_names_array_metric_and_passes_finite():
  guards.check_finite({"loss": 0.5, "grad_norm": jnp.ones(3)}, step=1)
  with pytest.raises(guards.NonFiniteError, match="grad_norm=inf"):
    guards.check_finite({"loss": 0.5, "grad_norm": jnp.array([1.0, jnp.inf])}, step=2)
