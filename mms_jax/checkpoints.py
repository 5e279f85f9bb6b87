"""Checkpointing shared by every trainer (pretrain, recognition, segmentation, SR).

A workdir holds its checkpoints in `<workdir>/checkpoints/<step>/`, written by an
`orbax.checkpoint.CheckpointManager` with three items:

  state/  the train state pytree (params, opt_state, step, rng), OCDBT arrays.
  data/   the data iterator state (JSON).
  meta/   program name, step, timestamp and config (JSON).

plus `mms_manifest.json`: size and sha256 of every file. With asynchronous saves it
is written inside orbax's temporary directory after every host's files are written and
before the directory is renamed into place, so it commits with the checkpoint: a
process killed at any moment leaves either no step directory or one with its
manifest. (Synchronous saves write it right after the commit.) orbax does not
detect bytes flipped inside an array file, so a checkpoint without a valid
manifest is treated as corrupt: it is moved to
`<workdir>/checkpoints_corrupt/<step>` (never deleted) and the previous good
checkpoint is used.

Restore priority, the same in every program:
  1. the latest good checkpoint of this workdir,
  2. an explicit `resume_from` (a step directory or another workdir)
     (both `restore_or_initialize`),
  3. a fresh state, with `init_from`'s pretrained weights merged in by the trainer
     (common.load_pretrained).

Usage in a trainer:

  ckpt = checkpoints.Checkpointer(workdir, keep=3, keep_every=10_000,
                                  program="pretrain")
  abstract = checkpoints.abstract_with_sharding(
      jax.eval_shape(init_state, rng), repl_sharding)
  state, data_state, source = checkpoints.restore_or_initialize(
      ckpt, abstract, resume_from=config.resume_from)
  if state is None:
    state = init_state(rng)
    if config.init_from:
      state = state.replace(params=common.load_pretrained(state.params, config.init_from))
  if data_state is not None:
    data_iter.set_state(data_state)
  with guards.PreemptionWatcher() as watcher:
    for step in range(int(state.step) + 1, total_steps + 1):
      state, metrics = train_step(state, next(data_iter))
      stop = watcher.should_stop(step)
      if stop or step % save_every == 0:
        guards.check_finite(metrics, step)
        ckpt.save(step, state, data_state=data_iter.get_state(), config=config)
      if stop:
        break
  ckpt.close()
"""

import base64
import datetime
import hashlib
import json
import logging
import os
import pathlib
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from mms_jax import errors
from mms_jax import shipped

MANIFEST_NAME = "mms_manifest.json"
CHECKPOINTS_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
# orbax writes <step>.orbax-checkpoint-tmp-<timestamp>/ and renames it to <step>/.
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# orbax rewrites this step-level JSON (commit time) as it commits, after the manifest is
# written; it holds no arrays, so it is left out of the manifest.
_ORBAX_COMMIT_METADATA = "_CHECKPOINT_METADATA"
_MANIFEST_VERSION = 1
_HASH = "sha256"

PyTree = Any


class CheckpointError(errors.UserError, RuntimeError):
  """An explicitly requested checkpoint is missing, unreadable or corrupt."""


# ---------------------------------------------------------------------------
# Manifest: our own integrity check on top of orbax.
# ---------------------------------------------------------------------------


def _hash_file(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, _HASH).hexdigest()


def _list_files(step_dir: pathlib.Path) -> list[str]:
  files = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel not in (MANIFEST_NAME, _ORBAX_COMMIT_METADATA):
        files.append(rel)
  return sorted(files)


def write_manifest(step_dir: os.PathLike) -> dict[str, Any]:
  """Hashes every file of a committed checkpoint into `mms_manifest.json`.

  Call only when the save is complete. The manifest is written to a temporary
  name and renamed, so a manifest that exists is always whole.

  Args:
    step_dir: a checkpoint step directory, e.g. `<workdir>/checkpoints/1000`.

  Returns:
    The manifest dict.
  """
  step_dir = pathlib.Path(step_dir)
  files = {}
  for rel in _list_files(step_dir):
    path = step_dir / rel
    files[rel] = {"size": path.stat().st_size, _HASH: _hash_file(path)}
  manifest = {"version": _MANIFEST_VERSION, "hash": _HASH, "files": files}
  tmp = step_dir / (MANIFEST_NAME + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
  os.replace(tmp, step_dir / MANIFEST_NAME)
  return manifest


def verify_manifest(step_dir: os.PathLike) -> str | None:
  """Checks a checkpoint against its manifest.

  Args:
    step_dir: a checkpoint step directory.

  Returns:
    None if every listed file has the recorded size and hash, else a short
    description of the first problem (naming the file).
  """
  step_dir = pathlib.Path(step_dir)
  manifest_path = step_dir / MANIFEST_NAME
  if not manifest_path.exists():
    return (
      f"no {MANIFEST_NAME} (a synchronous save was interrupted right after "
      "orbax committed it, or the directory was not written by mms_jax)"
    )
  try:
    manifest = json.loads(manifest_path.read_text())
    files = manifest["files"]
    algo = manifest.get("hash", _HASH)
  except (ValueError, KeyError) as e:
    return f"unreadable {MANIFEST_NAME}: {e}"
  for rel, want in sorted(files.items()):
    path = step_dir / rel
    if not path.is_file():
      return f"file {rel} is missing"
    if path.stat().st_size != want["size"]:
      return f"file {rel} has size {path.stat().st_size}, expected {want['size']}"
    with open(path, "rb") as f:
      if hashlib.file_digest(f, algo).hexdigest() != want[algo]:
        return f"file {rel} has a wrong {algo} checksum"
  return None


# ---------------------------------------------------------------------------
# Helpers for items.
# ---------------------------------------------------------------------------


def abstract_with_sharding(tree: PyTree, sharding) -> PyTree:
  """Turns arrays (or `jax.eval_shape` output) into sharded ShapeDtypeStructs.

  Args:
    tree: pytree of arrays or ShapeDtypeStructs.
    sharding: one `jax.sharding.Sharding` for all leaves, or a pytree of them
      matching `tree`.

  Returns:
    A pytree of `jax.ShapeDtypeStruct` usable as a restore target.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding
  )


def _encode_data_state(data_state) -> dict[str, Any]:
  """Data iterator states are dicts (grain datasets) or JSON bytes (loaders)."""
  if data_state is None:
    return {"kind": "none"}
  if isinstance(data_state, (bytes, bytearray)):
    return {"kind": "bytes", "value": base64.b64encode(bytes(data_state)).decode("ascii")}
  return {"kind": "json", "value": data_state}


def _decode_data_state(stored: dict[str, Any] | None):
  if not stored or stored.get("kind") == "none":
    return None
  if stored["kind"] == "bytes":
    return base64.b64decode(stored["value"])
  return stored["value"]


def _jsonable(obj) -> Any:
  if obj is not None and hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
    obj = obj.to_dict()
  return json.loads(json.dumps(obj, default=str))


def _restore_args(abstract_state: PyTree) -> ocp.args.Composite:
  return ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract_state),
    data=ocp.args.JsonRestore(),
    meta=ocp.args.JsonRestore(),
  )


def _is_primary() -> bool:
  return jax.process_index() == 0


def _step_dirs(directory: pathlib.Path) -> list[int]:
  """Committed step numbers under a checkpoints directory, newest first."""
  if not directory.is_dir():
    return []
  return sorted(ocp.utils.checkpoint_steps(directory), reverse=True)


# ---------------------------------------------------------------------------
# The manager wrapper.
# ---------------------------------------------------------------------------


class Checkpointer:
  """An orbax CheckpointManager for one workdir, plus checksum manifests.

  All processes must call `save`, `restore`, `latest_good_step`,
  `wait_until_finished` and `close` (orbax writes cooperatively); only process
  0 writes manifests and moves corrupt checkpoints aside.

  Attributes:
    workdir: the run's workdir.
    directory: `<workdir>/checkpoints`.
    manager: the underlying `ocp.CheckpointManager` (for anything not wrapped).
  """

  def __init__(
    self,
    workdir: os.PathLike,
    *,
    keep: int = 3,
    keep_every: int | None = None,
    async_save: bool = True,
    program: str = "",
  ):
    """Opens (or creates) `<workdir>/checkpoints`.

    Args:
      workdir: the run's workdir.
      keep: number of most recent checkpoints to keep (orbax `max_to_keep`).
      keep_every: additionally keep every checkpoint whose step is a multiple
        of this (orbax `keep_period`); None keeps no extra ones.
      async_save: write arrays in a background thread (orbax async saves).
      program: name recorded in each checkpoint's meta, e.g. "pretrain".
    """
    self.workdir = pathlib.Path(workdir)
    self.directory = self.workdir / CHECKPOINTS_DIR
    self.program = program
    self._async = async_save
    self._pending: list[int] = []  # saved steps still lacking a manifest
    self._saving_step: int | None = None
    async_options = (
      ocp.AsyncOptions(post_finalization_callback=self._manifest_at_commit) if async_save else None
    )
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      keep_period=keep_every,
      enable_async_checkpointing=async_save,
      async_options=async_options,
      cleanup_tmp_directories=True,
      create=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory.absolute(), item_names=("state", "data", "meta"), options=options
    )

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(
    self, step: int, state: PyTree, *, data_state=None, config=None, force: bool = False
  ) -> bool:
    """Starts saving a checkpoint (asynchronously by default).

    Args:
      step: the training step; becomes the directory name.
      state: the train state pytree.
      data_state: the data iterator state (`get_state()`): a JSON-serialisable
        dict, JSON bytes, or None.
      config: the run config (dict or ConfigDict), stored in meta.
      force: save even if orbax's policy would skip this step.

    Returns:
      True if a save was started (False e.g. if `step` is not newer than the
      latest checkpoint).
    """
    self._finalize_pending()
    meta = {
      "program": self.program,
      "step": int(step),
      "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "config": _jsonable(config),
    }
    self._saving_step = int(step)  # read by _manifest_at_commit in orbax's thread
    saved = self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(_encode_data_state(data_state)),
        meta=ocp.args.JsonSave(meta),
      ),
      force=force,
    )
    if saved:
      self._pending.append(int(step))
      if not self._async:
        self._finalize_pending()
    return saved

  def _manifest_at_commit(self):
    """Writes the manifest of the save in flight into orbax's temporary directory.

    orbax calls this on the primary host in its background thread once every host's
    files are final and just before it renames the directory to `<step>/` (saves are
    serial: one is in flight). Any failure here only logs: `_finalize_pending` then
    writes the manifest after the commit.
    """
    try:
      step = self._saving_step
      tmp_dirs = [p for p in self.directory.glob(f"{step}{_ORBAX_TMP_SUFFIX}*") if p.is_dir()]
      if len(tmp_dirs) == 1:
        write_manifest(tmp_dirs[0])
      else:
        logging.warning(
          "Checkpoint step %d: found %d orbax temporary directories; "
          "its manifest is written after the commit instead.",
          step,
          len(tmp_dirs),
        )
    except Exception as e:
      logging.warning(
        "Could not write the checkpoint manifest before the commit "
        "(%s); it is written after the commit instead.",
        e,
      )

  def _finalize_pending(self):
    """Waits for outstanding saves; writes any manifest not written at commit."""
    self.manager.wait_until_finished()
    pending, self._pending = self._pending, []
    if not _is_primary():
      return
    for step in pending:
      step_dir = self.step_dir(step)
      if step_dir.is_dir():
        if not (step_dir / MANIFEST_NAME).exists():  # one written at commit is whole
          write_manifest(step_dir)
      else:
        logging.warning(
          "Checkpoint step %d was not committed (see orbax errors above); no manifest written.",
          step,
        )

  def wait_until_finished(self):
    """Blocks until every started save is committed and has its manifest."""
    self._finalize_pending()

  def close(self):
    """Finishes outstanding saves (and manifests) and closes the manager."""
    self._finalize_pending()
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _quarantine(self, step: int) -> pathlib.Path:
    """Moves a corrupt step to `<workdir>/checkpoints_corrupt/<step>[.N]`."""
    corrupt_root = self.workdir / CORRUPT_DIR
    corrupt_root.mkdir(parents=True, exist_ok=True)
    target = corrupt_root / str(step)
    n = 0
    while target.exists():
      n += 1
      target = corrupt_root / f"{step}.{n}"
    os.replace(self.step_dir(step), target)
    return target

  def latest_good_step(self) -> int | None:
    """Returns the newest step whose manifest verifies, or None.

    Corrupt steps (missing manifest or any file mismatch) are logged with a
    WARNING and moved to `<workdir>/checkpoints_corrupt/`, so that neither
    orbax nor a later run picks them up again. Process 0 decides; the result
    is broadcast to the other processes.
    """
    self._finalize_pending()
    good = -1
    if _is_primary():
      for step in _step_dirs(self.directory):
        problem = verify_manifest(self.step_dir(step))
        if problem is None:
          good = step
          break
        moved = self._quarantine(step)
        logging.warning(
          "Checkpoint at step %d in %s is corrupt: %s. Moved it to %s "
          "(not deleted) and falling back to the previous checkpoint.",
          step,
          self.directory,
          problem,
          moved,
        )
    if jax.process_count() > 1:
      good = int(multihost_utils.broadcast_one_to_all(np.int64(good)))
      multihost_utils.sync_global_devices("mms_checkpoints_verified")
    self.manager.reload()
    return None if good < 0 else good

  def restore(self, step: int, abstract_state: PyTree):
    """Restores `(state, data_state, meta)` of a step (no verification).

    Args:
      step: a step of this workdir; use `latest_good_step()` to pick one.
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings; the
        state is restored with these shardings, whatever the device count at
        save time.
    """
    out = self.manager.restore(step, args=_restore_args(abstract_state))
    return out.state, _decode_data_state(out.data), out.meta


# ---------------------------------------------------------------------------
# Explicit paths: resume_from / init_from.
# ---------------------------------------------------------------------------


def run_config(path: os.PathLike, *, what: str = "init_from") -> dict:
  """The config of the run that wrote the checkpoint at `path` (a workdir or step
  directory): the one stored in the checkpoint's meta, else the workdir's config.json,
  else {}."""
  return step_run_config(resolve_checkpoint(path, what=what))


def step_run_config(step_dir: pathlib.Path) -> dict:
  """run_config of an already resolved (verified) step directory."""
  config = {}
  meta = step_dir / "meta" / "metadata"
  if meta.exists():
    config = json.loads(meta.read_text()).get("config") or {}
  if not config:
    for candidate in (step_dir.parent.parent / "config.json", step_dir.parent / "config.json"):
      if candidate.exists():
        config = json.loads(candidate.read_text())
        break
  return json.loads(config) if isinstance(config, str) else config


def resolve_checkpoint(path: os.PathLike, *, what: str = "path") -> pathlib.Path:
  """Finds a verified step directory given a step directory or a workdir.

  Foreign directories are only read: a corrupt step there is skipped with a
  WARNING (workdir) or reported as an error (explicit step directory).

  Args:
    path: `<workdir>/checkpoints/<step>`, `<workdir>/checkpoints`,
      `<workdir>`, or the name of a shipped model (mms_jax/shipped.py).
    what: the option name used in error messages, e.g. "resume_from".

  Returns:
    The step directory to read.

  Raises:
    CheckpointError: the path does not exist, holds no checkpoint, or the
      requested checkpoint is corrupt.
  """
  p = shipped.resolve(path).expanduser()  # a shipped model's name works too
  hint = (
    f"Set {what} to a step directory (<workdir>/{CHECKPOINTS_DIR}/"
    f"<step>) or to a workdir containing {CHECKPOINTS_DIR}/, or unset "
    "it."
  )
  if not p.exists():
    raise CheckpointError(f"{what}={str(path)!r} does not exist. {hint}")
  if (p / "state").is_dir():
    problem = verify_manifest(p)
    if problem is not None:
      raise CheckpointError(
        f"{what}={str(path)!r} is corrupt: {problem}. Point {what} at an "
        "earlier step directory, or rewrite the manifest with "
        "checkpoints.write_manifest() only if you trust the files."
      )
    return p
  root = p / CHECKPOINTS_DIR if (p / CHECKPOINTS_DIR).is_dir() else p
  steps = _step_dirs(root)
  if not steps:
    raise CheckpointError(f"{what}={str(path)!r} contains no checkpoint steps. {hint}")
  for step in steps:
    problem = verify_manifest(root / str(step))
    if problem is None:
      return root / str(step)
    logging.warning("Skipping corrupt checkpoint %s: %s.", root / str(step), problem)
  raise CheckpointError(
    f"{what}={str(path)!r}: every checkpoint step {steps} is corrupt (see warnings above). {hint}"
  )


def restore_path(path: os.PathLike, abstract_state: PyTree, *, what: str = "path"):
  """Restores `(state, data_state, meta)` from a step directory or workdir."""
  step_dir = resolve_checkpoint(path, what=what)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    try:
      out = ckptr.restore(step_dir.absolute(), args=_restore_args(abstract_state))
    except Exception as e:
      raise CheckpointError(
        f"Could not restore {what}={str(path)!r} from {step_dir}: {e}. "
        "Check that the checkpoint matches the model config."
      ) from e
  return out.state, _decode_data_state(out.data), out.meta


def load_params(
  path: os.PathLike, abstract_params: PyTree | None = None, *, what: str = "init_from"
) -> PyTree:
  """Loads only `state['params']` of a checkpoint (no optimizer state).

  Args:
    path: a step directory or a workdir (its latest good step is used).
    abstract_params: optional pytree of `jax.ShapeDtypeStruct` with shardings
      matching the checkpoint's params; then jax arrays with those shardings
      are returned. Without it, numpy arrays are returned (works on any
      device count).
    what: option name for error messages.

  Returns:
    The params pytree (nested dicts as saved).
  """
  step_dir = resolve_checkpoint(path, what=what)
  state_dir = (step_dir / "state").absolute()
  with ocp.PyTreeCheckpointer() as ckptr:
    try:
      tree = ckptr.metadata(state_dir).item_metadata.tree
      if "params" not in tree:
        raise CheckpointError(
          f"{what}={str(path)!r}: the saved state has no 'params' entry "
          f"(top-level keys: {sorted(tree)})."
        )
      if abstract_params is None:
        target = tree["params"]
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
      else:
        target = abstract_params
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
      out = ckptr.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
          item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
        ),
      )
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(
        f"Could not load params from {what}={str(path)!r} ({step_dir}): {e}"
      ) from e
  return out["params"]


def restore_or_initialize(
  ckpt: Checkpointer, abstract_state: PyTree, *, resume_from: os.PathLike | None = None
):
  """Restores a train state: this workdir's latest good checkpoint (a preempted run
  resumes here even if resume_from is set), else `resume_from` (full state and data
  state), else nothing.

  Args:
    ckpt: this workdir's Checkpointer.
    abstract_state: restore target (`abstract_with_sharding`).
    resume_from: optional step directory or workdir.

  Returns:
    `(state, data_state, source)`: source is "workdir" or "resume_from"; (None, None,
    "scratch") when there is nothing to resume, and the trainer initialises the state
    (then `init_from`, if set, puts pretrained weights into it: common.load_pretrained).
  """
  step = ckpt.latest_good_step()
  if step is not None:
    state, data_state, _ = ckpt.restore(step, abstract_state)
    logging.info(
      "Resumed from this workdir's checkpoint at step %d (%s).", step, ckpt.step_dir(step)
    )
    return state, data_state, "workdir"
  if resume_from:
    state, data_state, meta = restore_path(resume_from, abstract_state, what="resume_from")
    logging.info("Resumed from resume_from=%s (step %s).", resume_from, meta.get("step"))
    return state, data_state, "resume_from"
  logging.info("No checkpoint to resume; a fresh state.")
  return None, None, "scratch"
