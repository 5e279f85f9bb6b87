"""Library pieces every trainer shares: distributed start-up, mesh and shardings,
optimizer and schedule, train state, metric writers and run bookkeeping.

Trainers import these functions; nothing here knows which program runs.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from mms_jax import checkpoints
from mms_jax import errors
from mms_jax.data import pipeline
from mms_jax.models import encoder_config
from mms_jax.models import encoder_weights
from mms_jax.train import guards

BATCH_AXES = ("data", "fsdp")


ConfigError = errors.ConfigError  # a field is invalid; the message names it and the fix


@dataclasses.dataclass
class RunResult:
  """What every program's train_and_evaluate returns.

  step: the step reached (eval_only: the evaluated checkpoint's step; the ablation: the
    number of finished runs); state: the final train state, None when nothing was
    trained (eval_only, the probe, the ablation); metrics: the last evaluation in the
    program's form (recognition: {table: rows}; segmentation and SR: {'eval/...': value};
    the probe: {metric: value}; the ablation: its summary table).
  """

  step: int
  state: Any = None
  metrics: Any = dataclasses.field(default_factory=dict)


def checked_model_dtype(model_config):
  """The compute dtype of `config.model`."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(model_config.dtype)
  if dtype is None:
    raise ConfigError(f"config.model.dtype={model_config.dtype!r}: use 'float32' or 'bfloat16'")
  return dtype


def encoder_of(config, *, from_init=True):
  """The complete, checked encoder section of `config` (models/encoder_config.py):
  fields set in config.model.encoder win; with `from_init`, unset ones come from the
  encoder of config.init_from's run (and set ones must agree with it); the rest from
  the default encoder. A config from before the section (flat `encoder_width`, ...)
  is read through the shim."""
  given = encoder_config.of_model(config.model) or encoder_config.unset()
  source = config.get("init_from")
  pretrained = _pretrained_encoder(str(source)) if from_init and source else None
  return encoder_config.resolve(given, pretrained, source=f"init_from={source!r}")


@functools.lru_cache(maxsize=8)
def init_run_config(init_from):
  """The config of the run behind the checkpoint at `init_from` ({} when it has none),
  read once: finding the checkpoint verifies its manifest, which hashes its files."""
  return checkpoints.run_config(init_from)


def _pretrained_encoder(init_from):
  """The encoder section of the run behind a checkpoint, or None."""
  encoder = encoder_config.of_model(init_run_config(init_from).get("model") or {})
  if encoder is None:
    logging.warning("init_from=%s has no run config: its encoder is assumed to match.", init_from)
  return encoder


def model_kwargs(config, *, from_init=True):
  """The attributes every model class (MAE, the dense models) takes from config.model:
  the encoder (an EncoderConfig of encoder_of) and the compute settings gelu, dtype,
  scan_layers."""
  m = config.model
  return dict(
    encoder=encoder_config.EncoderConfig.of(encoder_of(config, from_init=from_init)),
    gelu=m.gelu,
    dtype=checked_model_dtype(m),
    scan_layers=m.scan_layers,
  )


def resolve_encoder(config, *, from_init=True):
  """Writes encoder_of(config) into config.model.encoder (so config.json records the
  encoder that ran); returns it."""
  encoder = encoder_of(config, from_init=from_init)
  with config.unlocked():
    if "encoder" in config.model:
      config.model.encoder.update(encoder)
    else:
      config.model.encoder = encoder
  return encoder


def load_pretrained(params, init_from, *, strict=True):
  """`params` with the pretrained weights of the checkpoint at `init_from` (a workdir or
  step directory) merged in by encoder_weights.merge: strict=True takes the encoder
  only and fails on a shape mismatch (fine-tuning, the probe); strict=False takes every
  tensor whose path and shape match (continued pretraining)."""
  loaded = checkpoints.load_params(init_from, what="init_from")
  params = encoder_weights.merge(params, loaded, strict=strict, source=str(init_from))
  logging.info("Initialised params from init_from=%s.", init_from)
  return params


def train_data(config, split="train"):
  """This process's shard of the training stream of `split`, global batch
  config.batch_size (data/pipeline.py)."""
  return pipeline.make_pipeline(
    config.data,
    split,
    config.batch_size,
    train=True,
    seed=config.seed,
    image_size=tuple(config.image_size),
  )


def restore_or_fresh(ckpt, config, abstract_state, shardings, make_fresh, data_iter):
  """(state, source): this workdir's latest good checkpoint, else config.resume_from
  (both with their data position, which `data_iter` takes), else `make_fresh()` and
  source 'scratch' (where the trainer merges config.init_from's weights in)."""
  state, data_state, source = checkpoints.restore_or_initialize(
    ckpt,
    checkpoints.abstract_with_sharding(abstract_state, shardings),
    resume_from=config.resume_from or None,
  )
  if data_state is not None:
    try:
      data_iter.set_state(data_state)
    except pipeline.DataStateMismatch as e:
      raise errors.UserError(_stream_fix(e, source, config, ckpt.workdir)) from None
  return (make_fresh() if state is None else state), source


def _stream_fix(error, source, config, workdir):
  """The one-line message of a checkpoint whose data stream is not this config's."""
  if source == "resume_from":
    return (
      f"config.resume_from={config.resume_from!r}: {error}. resume_from continues the "
      "same run on the same data; to train its weights on this data, use "
      f"--config.init_from={config.resume_from!r} instead (a new schedule and optimizer)."
    )
  return (
    f"workdir {os.fspath(workdir)!r}: {error}. Resume it with the data flags it was "
    "started with (its config.json), or give a new --workdir with "
    f"--config.init_from={os.fspath(workdir)!r} to start from its weights."
  )


# ------------------------------------------------------------------------------------
# Start-up.
# ------------------------------------------------------------------------------------
def maybe_initialize_distributed(config):
  """Starts `jax.distributed` when the run spans several processes.

  `config.distributed` may give coordinator_address / num_processes / process_id
  explicitly (local multi-process runs, SLURM without auto-detection); on TPU pods
  and SLURM clusters `auto=True` lets JAX read them from the environment.
  """
  dist = config.get("distributed", None)
  if dist is None or jax.distributed.is_initialized():
    return
  if dist.get("coordinator_address"):
    jax.distributed.initialize(
      coordinator_address=dist.coordinator_address,
      num_processes=dist.num_processes,
      process_id=dist.process_id,
    )
  elif dist.get("auto", False):
    jax.distributed.initialize()


def make_mesh(config):
  """A (data, fsdp) device mesh over all devices of all processes."""
  fsdp = int(config.get("fsdp", 1))
  num_devices = jax.device_count()
  if fsdp < 1 or num_devices % fsdp:
    raise ConfigError(f"config.fsdp={fsdp} must divide the device count {num_devices}")
  return jax.make_mesh(
    (num_devices // fsdp, fsdp), BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2
  )


def batch_sharding(mesh):
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh, min_fsdp_size=2**14):
  """Replicated leaves, except large ones, split along one axis over `fsdp`.

  The rule is by shape, so params and the optimizer moments that mirror them get
  the same sharding. With fsdp = 1 everything is replicated (plain data parallel).
  """
  fsdp = mesh.shape["fsdp"]

  def rule(leaf):
    if fsdp == 1 or leaf.size < min_fsdp_size:
      return replicated(mesh)
    for axis in np.argsort(leaf.shape)[::-1]:
      if leaf.shape[axis] % fsdp == 0:
        spec = [None] * leaf.ndim
        spec[axis] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(rule, abstract_state)


def global_batch(local_arrays, mesh):
  """Assembles per-process numpy batches into global arrays split over devices."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_arrays)


# ------------------------------------------------------------------------------------
# Optimizer.
# ------------------------------------------------------------------------------------
def learning_rate_schedule(config, total_steps):
  """lr = base_lr * global_batch / 256, linear warmup, then cosine decay to 0."""
  peak = config.lr.base * config.batch_size / 256
  warmup = warmup_steps(config, total_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=max(warmup, 1),
    decay_steps=max(total_steps, max(warmup, 1) + 1),
    end_value=config.lr.get("end", 0.0) * peak,
  )


SHORT_RUN_WARMUP_FRACTION = 0.1


def warmup_steps(config, total_steps):
  """The warmup of the lr schedule: config.lr.warmup_fraction of the run, else
  config.lr.warmup_steps. A warmup as long as the run or longer (a short fine-tune
  with a recipe's warmup) would end the run at the peak lr: it is scaled to
  SHORT_RUN_WARMUP_FRACTION of the run, with a warning."""
  if config.lr.get("warmup_fraction") is not None:
    fraction = float(config.lr.warmup_fraction)
    if not 0 <= fraction < 1:
      raise ConfigError(f"config.lr.warmup_fraction={fraction}: use a fraction in [0, 1)")
    return int(round(fraction * total_steps))
  warmup = max(int(config.lr.warmup_steps), 0)
  if total_steps > 1 and warmup >= total_steps:
    scaled = max(1, int(round(SHORT_RUN_WARMUP_FRACTION * total_steps)))
    logging.warning(
      "config.lr.warmup_steps=%d is not shorter than the run's %d steps: warming up "
      "over %d steps (%d %%) instead. Set config.lr.warmup_steps below total_steps "
      "(or config.lr.warmup_fraction) to choose.",
      warmup,
      total_steps,
      scaled,
      round(100 * SHORT_RUN_WARMUP_FRACTION),
    )
    return scaled
  return min(warmup, max(total_steps - 1, 0))


_NO_DECAY = re.compile(r"(bias|scale|cls_token|mask_token|pos_embed|position)")


def weight_decay_mask(params):
  """True where weight decay applies: not on biases, norms, position or special tokens."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return flax.traverse_util.unflatten_dict({k: not _NO_DECAY.search(k) for k in flat}, sep="/")


def make_optimizer(config, total_steps):
  """AdamW with a decay mask, warmup + cosine lr, optional clipping."""
  schedule = learning_rate_schedule(config, total_steps)
  chain = []
  if config.get("grad_clip_norm"):
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(
    optax.adamw(
      schedule,
      b1=config.optimizer.b1,
      b2=config.optimizer.b2,
      weight_decay=config.optimizer.weight_decay,
      mask=weight_decay_mask,
    )
  )
  return optax.chain(*chain), schedule


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data iterator."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so orbax stores it like any array


def new_train_state(params, optimizer, seed):
  """Step 0 of a run: `params`, a fresh optimizer state, the run's step-rng key."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    rng=jax.random.key_data(jax.random.key(seed + 1)),
  )


def step_rng(state, *streams):
  """A key that depends only on the run seed, the step and the named stream."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  for stream in streams:
    key = jax.random.fold_in(key, stream)
  return key


# ------------------------------------------------------------------------------------
# Bookkeeping.
# ------------------------------------------------------------------------------------
def log_run_header(program, config, mesh, workdir):
  """The first line of every run: what runs where, on which data, into which workdir."""
  device = jax.devices()[0]
  logging.info(
    "%s: mesh %s over %d devices in %d processes; global batch %d; %s (%s); "
    "data %s (%s reader); workdir %s.",
    program,
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
    config.batch_size,
    device.platform,
    device.device_kind,
    config.data.source,
    config.data.reader,
    os.path.abspath(workdir),
  )


def is_due(step, every, total_steps):
  """True every `every` steps (0: never) and at the last step."""
  return step == total_steps or bool(every and step % every == 0)


class StepBookkeeping:
  """What every training loop does after its update, the same in each program: the
  NaN check, the log line, the checkpoint and the stop on preemption or at
  config.stop_at_step. Evaluations and pictures stay in the trainer's own loop. A
  context manager: inside it the checkpointer and a PreemptionWatcher are open;
  whatever ends the loop, started saves are finished and get their manifest.

    with common.StepBookkeeping(config, total_steps, start_step, ckpt, data_iter, writer,
                                source) as bk:
      for step in bk.steps():
        state, metrics = train_step(state, batch)
        if bk(step, state, metrics):
          break

  config.stop_at_step (0 or unset: run to the end) stops the run with a checkpoint at
  that step of its total_steps schedule, which stays the schedule: re-running without
  it continues the same run, as after a preemption.
  """

  def __init__(self, config, total_steps, start_step, ckpt, data_iter, writer, source=""):
    self.config, self.total_steps, self.start_step = config, total_steps, start_step
    stop_at = int(config.get("stop_at_step") or 0)
    if stop_at < 0:
      raise ConfigError(f"config.stop_at_step={stop_at}: give a step >= 1, or 0 to run to the end")
    self.last_step = min(stop_at, total_steps) if stop_at else total_steps
    self.source = source  # where the state came from (restore_or_fresh), for the log
    self.ckpt, self.data_iter, self.writer = ckpt, data_iter, writer
    self.throughput = Throughput(self.last_step, config.batch_size, start_step)  # ETA to the stop
    self.last_saved = start_step
    self.watcher = None
    self._stack = contextlib.ExitStack()

  def __enter__(self):
    logging.info(
      "Starting at step %d (%s); training to step %d%s.",
      self.start_step,
      self.source,
      self.total_steps,
      f", stopping at step {self.last_step}" if self.last_step < self.total_steps else "",
    )
    self._stack.enter_context(self.ckpt)
    self.watcher = self._stack.enter_context(guards.PreemptionWatcher())
    return self

  def __exit__(self, *exc_info):
    return self._stack.__exit__(*exc_info)

  def steps(self):
    """The steps this invocation trains: after the restored one, up to the last step
    (config.stop_at_step or total_steps)."""
    return range(self.start_step + 1, self.last_step + 1)

  def __call__(self, step, state, metrics):
    """Returns True when the loop must stop (a checkpoint of `step` was saved)."""
    is_log = step == self.start_step + 1 or is_due(step, self.config.log_every, self.total_steps)
    is_save = step == self.last_step or is_due(step, self.config.checkpoint.every, self.total_steps)
    at_stop_step = self.last_step < self.total_steps and step == self.last_step
    stop = self.watcher.should_stop(step) or at_stop_step
    if is_log or is_save or stop:
      metrics = jax.device_get(metrics)
      guards.check_finite(metrics, step, last_checkpoint=self.last_saved or None)
    if is_log:
      self.writer.write_scalars(step, {**metrics, **self.throughput(step)})
    if is_save or stop:
      data_state = self.data_iter.get_state()
      self.ckpt.save(step, state, data_state=data_state, config=self.config, force=True)
      self.last_saved = step
    if at_stop_step:
      logging.info("Stopped at config.stop_at_step=%d after saving a checkpoint.", step)
    elif stop:
      logging.warning("Stopped at step %d after saving a checkpoint.", step)
    return stop


def write_config(config, workdir, *, keep_existing=False):
  """Writes workdir/config.json, the record of how the run was made; called once every
  check has passed. keep_existing (evaluate-only runs): a training run's config.json
  stays as it is."""
  path = os.path.join(workdir, "config.json")
  if jax.process_index() == 0 and not (keep_existing and os.path.exists(path)):
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


class MetricWriter:
  """Console lines, TensorBoard events and `metrics.jsonl` (process 0 only).

  clu's writers need TensorFlow for event files; tensorboardX writes the same
  format without it.
  """

  def __init__(self, workdir):
    self._events = self._jsonl = None
    self.total_steps = None  # shown as [step/total] once set
    if jax.process_index() == 0:
      import tensorboardX

      self._events = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write_scalars(self, step, scalars, log=True):
    """log=False: events and metrics.jsonl only (the caller prints a table)."""
    if self._events is None:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    if log:
      logging.info("%s", console_line(step, scalars, self.total_steps))
    for name, value in scalars.items():
      self._events.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()  # readable while the run goes on (a line per log step)

  def flush(self):
    if self._events is not None:
      self._events.flush()
      self._jsonl.flush()

  def close(self):
    if self._events is not None:
      self._events.close()
      self._jsonl.close()


def console_line(step, scalars, total_steps=None):
  """'[300/6000] loss=2.889, lr=0.0009967 | 51.0 img/s, eta 59m34s'."""
  prefix = f"[{step}/{total_steps}]" if total_steps else f"[{step}]"
  shown = {k: v for k, v in scalars.items() if k not in ("images_per_sec", "eta_hours")}
  line = f"{prefix} " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items()))
  speed = []
  if "images_per_sec" in scalars:
    speed.append(f"{scalars['images_per_sec']:.1f} img/s")
  if "eta_hours" in scalars:
    speed.append(f"eta {format_duration(scalars['eta_hours'] * 3600)}")
  return line + (" | " + ", ".join(speed) if speed else "")


def format_duration(seconds):
  """3725.2 -> '1h02m', 372.4 -> '6m12s', 42 -> '42s'."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Throughput:
  """images/s and ETA between log steps. The first step after a (re)start compiles the
  update, so it is only timed (logged once): speed and ETA start from the next."""

  def __init__(self, total_steps, images_per_step, start_step):
    self.total_steps, self.images_per_step = total_steps, images_per_step
    self.last_time, self.last_step = time.perf_counter(), start_step
    self.start_step = start_step

  def __call__(self, step):
    now = time.perf_counter()
    if self.last_step == self.start_step:
      logging.info(
        "The first step took %s (compiling); speed and ETA follow.",
        format_duration(now - self.last_time),
      )
      self.last_time, self.last_step = now, step
      return {}
    steps = max(step - self.last_step, 1)
    seconds_per_step = (now - self.last_time) / steps
    self.last_time, self.last_step = now, step
    return {
      "images_per_sec": self.images_per_step / seconds_per_step,
      "eta_hours": seconds_per_step * (self.total_steps - step) / 3600,
    }


def total_steps(config, num_train_examples=None):
  """config.total_steps, or config.num_epochs over the training set."""
  if config.get("total_steps"):
    return int(config.total_steps)
  if config.get("num_epochs") and num_train_examples:
    return max(1, int(config.num_epochs * num_train_examples // config.batch_size))
  raise ConfigError("set config.total_steps, or config.num_epochs with a sized data set")


def micro_batches(x, count):
  """[B, ...] -> [count, B / count, ...]: micro-batch j takes rows j, j + count, ...,
  so every device keeps its own rows (gradient accumulation in a scan)."""
  return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)


def check_batch_size(config, mesh):
  devices, processes = mesh.devices.size, jax.process_count()
  accumulation = int(config.get("grad_accum_steps", 1))
  if config.batch_size % (devices * accumulation) or config.batch_size % processes:
    raise ConfigError(
      f"config.batch_size={config.batch_size} must be a multiple of devices x "
      f"grad_accum_steps = {devices} x {accumulation} (and of {processes} processes)"
    )
  eval_batch = config.eval.batch_size if "eval" in config else None
  if eval_batch is not None and eval_batch % devices:
    raise ConfigError(
      f"config.eval.batch_size={eval_batch} must be a multiple of the {devices} devices"
    )


def log_parameter_summary(params, name):
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  logging.info("%s: %.2fM parameters in %d arrays", name, count / 1e6, len(jax.tree.leaves(params)))
  return count
