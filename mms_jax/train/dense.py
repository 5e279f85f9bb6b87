"""The dense-prediction trainer: a pretrained ViT encoder + a light transformer head that
predicts every pixel, fine-tuned for one `Task` (segmentation.TASK, super_resolution.TASK).

A task says what differs: its model, checks, batch fields, loss, per-image metrics and
their summary, picture, and optional host-side metrics. Everything else is here, once:
the mesh, the sharded state, resume / init_from, the loop, padded host-sharded evaluation.

Sections, top to bottom: the task table -> config checks -> update step -> evaluation
-> the program (mesh -> data -> model and optimizer -> resume -> loop).
"""

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mms_jax import checkpoints
from mms_jax.data import pipeline
from mms_jax.evaluate import image_metrics
from mms_jax.models import vit
from mms_jax.train import common
from mms_jax.train import finetune


# ------------------------------------------------------------------------------------
# The task table.
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Task:
  """What one dense-prediction program adds to the shared trainer.

  Batches are dicts of the keys in `fields(config)`; `input_key` is what the model reads.
  Functions that take (model, config) return the jitted-side function they describe.
  """

  program: str  # config.program; checkpoints and pictures are named after it
  eval_splits: Mapping[str, tuple[str, ...]]  # data source -> splits evaluated by default
  targets: str  # what a data source must provide, for the error message ("masks")
  model_class: type  # a dense_heads._DenseModel subclass
  model_options: Callable[[Any], dict]  # config -> extra model fields
  check_config: Callable[[Any], None]  # config -> None, raises ConfigError
  fields: Callable[[Any], dict]  # config -> {batch key: per-example shape}
  input_key: str
  # (model, config) -> ((params, batch) -> (loss, {metric: scalar})), under jit.
  loss: Callable
  # (model, config) -> ((params, batch) -> ({metric: [B]}, {output: [B, ...]})), under jit.
  per_image: Callable
  # Accumulator -> {metric: value} of one benchmark.
  summarize: Callable[[image_metrics.Accumulator], dict]
  # (model, config, host params, batch, path) -> None: a PNG of predictions.
  picture: Callable
  # config -> None, or (this host's outputs, its batch) -> {metric: [b]} on the host.
  host_metrics: Callable[[Any], Callable | None] = lambda config: None
  with_labels: bool = False  # evaluation batches carry 'label' (for host_metrics)


# ------------------------------------------------------------------------------------
# Config checks (before anything compiles).
# ------------------------------------------------------------------------------------
def eval_splits(task, config):
  return tuple(config.eval.splits) or task.eval_splits[config.data.source]


def entry_points(task):
  """(build_model, check_config, train_and_evaluate) of one task, for programs.py."""
  return tuple(functools.partial(f, task) for f in (build_model, check_config, train_and_evaluate))


def build_model(task, config):
  m = config.model
  return task.model_class(
    **common.model_kwargs(config),
    head_width=m.head_width,
    head_depth=m.head_depth,
    head_num_heads=m.head_num_heads,
    pixel_shortcut=m.pixel_shortcut,
    **task.model_options(config),
  )


def check_config(task, config):
  """The task's checks and the shared ones; returns the model."""
  model = build_model(task, config)
  task.check_config(config)
  try:
    vit.grid_shape(tuple(config.image_size), model.encoder.patch)
  except ValueError as e:
    raise common.ConfigError(f"config.image_size / config.model.encoder.patch: {e}") from e
  if config.model.head_width % config.model.head_num_heads:
    raise common.ConfigError("config.model: head_width must be divisible by head_num_heads")
  if config.data.source not in task.eval_splits:
    raise common.ConfigError(
      f"config.data.source={config.data.source!r} has no {task.targets}: use "
      + " or ".join(repr(s) for s in task.eval_splits)
    )
  pipeline.validate(config.data)
  return model


# ------------------------------------------------------------------------------------
# Update step.
# ------------------------------------------------------------------------------------
def make_train_step(task, model, config, optimizer, schedule, mesh, shardings):
  loss_fn = task.loss(model, config)

  def train_step(state, batch):
    (loss, task_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = finetune.apply_updates(state.params, updates)
    metrics = {
      "loss": loss,
      **task_metrics,
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(
    train_step, donate_argnums=(0,), out_shardings=(shardings, common.replicated(mesh))
  )


# ------------------------------------------------------------------------------------
# Evaluation: every benchmark of every eval split, plus '<split>/all' when a split has
# several (TextZoom test -> test/easy, test/medium, test/hard).
# ------------------------------------------------------------------------------------
def eval_batches(task, config, split):
  """This host's padded evaluation batches of `split` (pipeline.padded_eval_batches)."""
  return pipeline.padded_eval_batches(
    config.data,
    split,
    config.eval.batch_size,
    task.fields(config),
    image_size=tuple(config.image_size),
    with_labels=task.with_labels,
  )


def make_eval_step(task, model, config, mesh, with_outputs=False):
  """(params, batch) -> ({metric: [B], 'valid': [B]}, outputs), replicated on every host;
  outputs are the task's predicted images with_outputs, else {}."""
  per_image = task.per_image(model, config)

  def eval_step(params, batch):
    metrics, outputs = per_image(params, batch)
    return {**metrics, "valid": batch["valid"]}, (outputs if with_outputs else {})

  return jax.jit(eval_step, out_shardings=common.replicated(mesh))


def evaluate(task, eval_step, params, config, mesh, host_metrics=None):
  """{'eval/<benchmark>/<metric>': value} over every benchmark of the eval splits."""
  keys = (*task.fields(config), "valid")
  results = {}
  for split in eval_splits(task, config):
    benchmarks = pipeline.list_benchmarks(config.data, split)
    totals = image_metrics.Accumulator()
    for bench in benchmarks:
      acc = image_metrics.Accumulator()
      for batch in eval_batches(task, config, bench):
        metrics, outputs = jax.device_get(
          eval_step(params, common.global_batch({k: batch[k] for k in keys}, mesh))
        )
        if host_metrics is not None:  # this host's rows (labels are host-local), gathered
          b = len(batch["valid"])
          rows = slice(jax.process_index() * b, (jax.process_index() + 1) * b)
          metrics.update(_all_hosts(host_metrics({k: v[rows] for k, v in outputs.items()}, batch)))
        valid = metrics.pop("valid")
        acc.update(metrics, valid)
        totals.update(metrics, valid)
      results.update(_summary(task, f"eval/{bench}", acc))
    if len(benchmarks) > 1:
      results.update(_summary(task, f"eval/{split}/all", totals))
  return results


def format_table(metrics, title=""):
  """{'eval/<benchmark>/<metric>': value} as a markdown table: a row per benchmark, a
  column per metric (the image count last)."""
  rows = {}
  for key, value in metrics.items():
    bench, _, metric = key.removeprefix("eval/").rpartition("/")
    rows.setdefault(bench, {})[metric] = value
  names = sorted({m for r in rows.values() for m in r if m != "count"})
  lines = [f"### {title}", ""] if title else []
  lines += [
    "| benchmark | " + " | ".join(names) + " | images |",
    "|---|" + "---:|" * (len(names) + 1),
  ]
  for bench, r in rows.items():
    cells = [f"{r[m]:.4g}" if m in r else "" for m in names]
    lines.append(f"| {bench} | " + " | ".join(cells) + f" | {int(r.get('count', 0))} |")
  return "\n".join(lines) + "\n"


def _summary(task, prefix, acc):
  return {f"{prefix}/{k}": v for k, v in {**task.summarize(acc), "count": acc.count}.items()}


def _all_hosts(per_image):
  """Host-local per-image values [b] -> the global batch's [B] (process order)."""
  if jax.process_count() == 1:
    return per_image
  from jax.experimental import multihost_utils  # only multi-host runs need it

  gathered = multihost_utils.process_allgather(
    {k: np.asarray(v, np.float32) for k, v in per_image.items()}, tiled=True
  )
  return {k: np.asarray(v) for k, v in gathered.items()}


# ------------------------------------------------------------------------------------
# The program.
# ------------------------------------------------------------------------------------
def train_and_evaluate(task, config, workdir):
  """Fine-tunes until config.total_steps (resuming from workdir), evaluating on the way.

  Returns a common.RunResult: the final state and the last evaluation (eval_only: no state).
  """
  common.resolve_encoder(config)
  model = check_config(task, config)
  common.maybe_initialize_distributed(config)
  writer = common.MetricWriter(workdir)

  # ---- Mesh.
  mesh = common.make_mesh(config)
  common.check_batch_size(config, mesh)
  common.log_run_header(task.program, config, mesh, workdir)

  # ---- Data.
  num_train = None
  if not config.total_steps and not config.eval_only:
    num_train = len(pipeline.make_source(config.data, config.train_split))
  total_steps = common.total_steps(config, num_train) if not config.eval_only else 0
  writer.total_steps = total_steps
  fields = task.fields(config)
  host_metrics = task.host_metrics(config)

  # ---- Model and optimizer, created already sharded.
  def init_params(rng):
    inputs = jnp.zeros((1, *fields[task.input_key]), jnp.float32)
    return model.init({"params": rng}, inputs)["params"]

  abstract_params = jax.eval_shape(init_params, jax.random.key(config.seed))
  # (eval_only builds the optimizer only for the state's shapes.)
  optimizer, schedule = finetune.make_finetune_optimizer(config, total_steps or 2, abstract_params)

  def init_state(rng):
    params = init_params(rng)
    return common.new_train_state(params, optimizer, config.seed)

  init_rng = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(init_state, init_rng)
  shardings = common.state_shardings(abstract_state, mesh)
  fresh_state = jax.jit(init_state, out_shardings=shardings)
  eval_step = make_eval_step(task, model, config, mesh, with_outputs=host_metrics is not None)
  picture_batch = None
  if config.pictures:  # the first images of the first eval split
    first = pipeline.list_benchmarks(config.data, eval_splits(task, config)[0])[0]
    picture_batch = {
      k: v[: config.num_picture_images] for k, v in next(eval_batches(task, config, first)).items()
    }

  def write_eval(step, params):
    metrics = evaluate(task, eval_step, params, config, mesh, host_metrics)
    writer.write_scalars(step, metrics, log=False)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, f"eval_{step:07d}.json"), "w") as f:
        json.dump(metrics, f, indent=1, sort_keys=True)
      table = format_table(metrics, f"{task.program} at step {step}")
      with open(os.path.join(workdir, "eval.md"), "w") as f:
        f.write(table)
      print(table, flush=True)
      if config.pictures:
        path = os.path.join(workdir, f"{task.program}_{step:07d}.png")
        task.picture(model, config, jax.device_get(params), picture_batch, path)
        logging.info("Wrote %s", path)
    return metrics

  # ---- Evaluation only.
  if config.eval_only:
    abstract = checkpoints.abstract_with_sharding(abstract_state.params, shardings.params)
    params, step = finetune.load_for_eval(finetune.eval_checkpoint(config, workdir), abstract)
    common.write_config(config, workdir, keep_existing=True)
    metrics = write_eval(max(step, 0), params)
    writer.close()
    return common.RunResult(step, metrics=metrics)

  # ---- Resume: this workdir -> resume_from -> a fresh state (+ init_from's encoder).
  data_iter = common.train_data(config, config.train_split)
  ckpt = checkpoints.Checkpointer(
    workdir,
    keep=config.checkpoint.keep,
    keep_every=config.checkpoint.keep_every,
    program=task.program,
  )
  state, source = common.restore_or_fresh(
    ckpt, config, abstract_state, shardings, lambda: fresh_state(init_rng), data_iter
  )
  if source == "scratch" and config.init_from:
    state = state.replace(params=common.load_pretrained(state.params, config.init_from))
    source = "init_from"
  common.write_config(config, workdir)  # every check has passed
  start_step = int(state.step)
  common.log_parameter_summary(
    state.params["encoder"], "encoder (frozen)" if config.freeze_encoder else "encoder"
  )
  common.log_parameter_summary({k: v for k, v in state.params.items() if k != "encoder"}, "head")

  train_step = make_train_step(task, model, config, optimizer, schedule, mesh, shardings)

  # ---- Loop.
  evaluation = {}
  with common.StepBookkeeping(
    config, total_steps, start_step, ckpt, data_iter, writer, source
  ) as bookkeeping:
    for step in bookkeeping.steps():
      batch = next(data_iter)
      state, metrics = train_step(state, common.global_batch({k: batch[k] for k in fields}, mesh))
      if bookkeeping(step, state, metrics):
        break
      if common.is_due(step, config.eval.every, total_steps):
        evaluation = write_eval(step, state.params)
  writer.close()
  return common.RunResult(int(state.step), state, evaluation)
