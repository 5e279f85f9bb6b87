"""Text segmentation: a pretrained ViT encoder + light transformer head predicting a
foreground patch per token, trained with per-pixel binary cross-entropy (METHOD.md §4).

  python -m mms_jax.main --config=configs/finetune_segmentation.py --workdir=DIR \
      --config.init_from=PRETRAIN_WORKDIR

Sections, top to bottom: config checks -> update step -> evaluation -> pictures ->
the program (mesh -> data -> model and optimizer -> resume -> loop).
Evaluation only: --config.eval_only=True [--config.eval_from=CHECKPOINT].
"""
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from PIL import ImageDraw

from mms_jax.data import pipeline
from mms_jax.evaluate import image_metrics
from mms_jax.models import dense_heads
from mms_jax.models import vit
from mms_jax.train import checkpoints
from mms_jax.train import common
from mms_jax.train import finetune
from mms_jax.train import guards

# config.eval_splits = () evaluates these splits of config.data.source.
EVAL_SPLITS = {"synthetic": ("val", "test_heldout_fonts", "test_hard"),
               "textseg": ("val", "test")}
PROGRAM = "segmentation"


# ------------------------------------------------------------------------------------
# Config checks (before anything compiles).
# ------------------------------------------------------------------------------------
def eval_splits(config):
  return tuple(config.eval_splits) or EVAL_SPLITS[config.data.source]


def build_model(config):
  m = config.model
  dtype = common.checked_model_dtype(m)
  return dense_heads.Segmenter(
      encoder_variant=m.encoder_variant, encoder_width=m.get("encoder_width"),
      encoder_depth=m.get("encoder_depth"), encoder_num_heads=m.get("encoder_num_heads"),
      patch=tuple(m.patch), head_width=m.head_width, head_depth=m.head_depth,
      head_num_heads=m.head_num_heads, gelu=m.gelu, dtype=dtype, scan_layers=m.scan_layers,
      **common.encoder_options(m))


def check_config(config):
  model = build_model(config)
  try:
    vit.grid_shape(tuple(config.image_size), tuple(config.model.patch))
  except ValueError as e:
    raise common.ConfigError(f"config.image_size / config.model.patch: {e}") from e
  width, _, heads = model.encoder_dims()
  if width % heads or config.model.head_width % config.model.head_num_heads:
    raise common.ConfigError("config.model: widths must be divisible by their head counts")
  if not 0 < config.threshold < 1:
    raise common.ConfigError(f"config.threshold={config.threshold} must be in (0, 1)")
  if config.data.source not in ("synthetic", "textseg"):
    raise common.ConfigError(f"config.data.source={config.data.source!r} has no masks: use "
                             "'synthetic' or 'textseg'")
  pipeline.validate(config.data)
  return model


# ------------------------------------------------------------------------------------
# Update step.
# ------------------------------------------------------------------------------------
def make_train_step(model, config, optimizer, schedule, mesh, shardings):

  def loss_fn(params, images, masks):
    logits, _ = model.apply({"params": params}, images, train=True)
    loss = optax.sigmoid_binary_cross_entropy(logits, masks).mean()
    return loss, logits

  def train_step(state, images, masks):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, images, masks)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = finetune.apply_updates(state.params, updates)
    counts = image_metrics.confusion_counts(jax.nn.sigmoid(logits), masks, config.threshold)
    tp, fp, fn = (counts[k].sum() for k in ("tp", "fp", "fn"))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
               "train_iou": tp / jnp.maximum(tp + fp + fn, 1.0)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,),
                 out_shardings=(shardings, common.replicated(mesh)))


# ------------------------------------------------------------------------------------
# Evaluation: every benchmark of every config.eval_splits entry.
# ------------------------------------------------------------------------------------
def eval_batches(config, split, fields):
  """Yields this host's eval batches of `fields`, padded to a fixed size, plus 'valid'.

  Every host yields the same number of batches (padding ones after its slice ends),
  so the jitted step has one shape and multi-host runs stay in step.
  """
  source = pipeline.make_source(config.data, split)
  processes = jax.process_count()
  local = config.eval_batch_size // processes
  loader = pipeline.make_loader(config.data, split, config.eval_batch_size,
                                image_size=tuple(config.image_size), source=source,
                                worker_count=config.data.get("worker_count", 0))
  iterator = iter(loader)
  num_batches = -(-(-(-len(source) // processes)) // local)
  shapes = {"image": tuple(config.image_size) + (3,), "mask": tuple(config.image_size)}
  for _ in range(num_batches):
    batch = next(iterator, None)
    n = 0 if batch is None else len(batch["image"])
    out = {"valid": np.arange(local) < n}
    for key in fields:
      padded = np.zeros((local, *shapes[key]), np.float32)
      if n:
        padded[:n] = batch[key]
      out[key] = padded
    yield out


def make_eval_step(model, config, mesh):
  """(params, batch) -> per-image {'tp', 'fp', 'fn', 'valid'} [B], on every host."""
  def eval_step(params, batch):
    logits, _ = model.apply({"params": params}, batch["image"])
    counts = image_metrics.confusion_counts(jax.nn.sigmoid(logits), batch["mask"],
                                            config.threshold)
    return {**counts, "valid": batch["valid"]}
  return jax.jit(eval_step, out_shardings=common.replicated(mesh))


def evaluate(eval_step, params, config, mesh):
  """{'eval/<benchmark>/<metric>': value} over every benchmark of config.eval_splits."""
  results = {}
  for split in eval_splits(config):
    benchmarks = pipeline.list_benchmarks(config.data, split)
    totals = image_metrics.Accumulator()
    for bench in benchmarks:
      acc = image_metrics.Accumulator()
      for batch in eval_batches(config, bench, ("image", "mask")):
        counts = jax.device_get(eval_step(params, common.global_batch(batch, mesh)))
        valid = counts.pop("valid")
        acc.update(counts, valid)
        totals.update(counts, valid)
      results.update(_summary(f"eval/{bench}", acc))
    if len(benchmarks) > 1:
      results.update(_summary(f"eval/{split}/all", totals))
  return results


def _summary(prefix, acc):
  values = acc.values()
  out = image_metrics.segmentation_summary(values["tp"], values["fp"], values["fn"])
  out["count"] = acc.count
  return {f"{prefix}/{k}": v for k, v in out.items()}


# ------------------------------------------------------------------------------------
# Pictures: image / ground-truth mask / predicted probability / thresholded prediction.
# ------------------------------------------------------------------------------------
def _to_uint8(images):
  return np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)


def _mask_rgb(mask):
  """[B, H, W] in [0, 1] -> uint8 [B, H, W, 3], foreground white."""
  return np.repeat((np.clip(np.asarray(mask), 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)


def save_labelled_rows(rows, labels, path, scale=2, gap=4, label_width=150):
  """Stacks uint8 image rows, upscaled, with a text label left of each row."""
  height, width = rows[0].shape[0] * scale, rows[0].shape[1] * scale
  canvas = Image.new("RGB", (label_width + width, len(rows) * (height + gap)), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (row, label) in enumerate(zip(rows, labels)):
    top = i * (height + gap)
    canvas.paste(Image.fromarray(row).resize((width, height), Image.NEAREST), (label_width, top))
    draw.text((6, top + height // 2 - 6), label, fill="black")
  canvas.save(path)


@functools.partial(jax.jit, static_argnums=0)
def _predict(model, params, images):
  return jax.nn.sigmoid(model.apply({"params": params}, images)[0])


def segmentation_picture(model, params, images, masks, config, path):
  """A PNG of four rows; runs on this process only (params as host arrays)."""
  probs = np.asarray(_predict(model, params, jnp.asarray(images)))
  kinds = (("input", _to_uint8(images)), ("ground truth", _mask_rgb(masks)),
           ("probability", _mask_rgb(probs)),
           ("prediction", _mask_rgb(probs >= config.threshold)))
  rows = [np.concatenate(list(x), axis=1) for _, x in kinds]
  save_labelled_rows(rows, [k for k, _ in kinds], path)


# ------------------------------------------------------------------------------------
# The program.
# ------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir):
  """Fine-tunes until config.total_steps (resuming from workdir), evaluating on the way.

  Returns the final train state, or with config.eval_only the metrics dict.
  """
  model = check_config(config)
  common.maybe_initialize_distributed(config)
  common.write_config(config, workdir)
  writer = common.MetricWriter(workdir)

  # ---- Mesh.
  mesh = common.make_mesh(config)
  common.check_batch_size(config, mesh)
  if config.eval_batch_size % mesh.devices.size:
    raise common.ConfigError(f"config.eval_batch_size={config.eval_batch_size} must be a "
                             f"multiple of the {mesh.devices.size} devices")

  # ---- Data.
  num_train = None
  if not config.get("total_steps") and not config.eval_only:
    num_train = len(pipeline.make_source(config.data, config.train_split))
  total_steps = common.total_steps(config, num_train) if not config.eval_only else 0
  writer.total_steps = total_steps
  height, width = config.image_size

  # ---- Model and optimizer, created already sharded.
  def init_params(rng):
    return model.init({"params": rng}, jnp.zeros((1, height, width, 3), jnp.float32))["params"]

  abstract_params = jax.eval_shape(init_params, jax.random.key(config.seed))
  # (eval_only builds the optimizer only for the state's shapes.)
  optimizer, schedule = finetune.make_finetune_optimizer(config, total_steps or 2,
                                                         abstract_params)

  def init_state(rng):
    params = init_params(rng)
    return common.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=optimizer.init(params),
                             rng=jax.random.key_data(jax.random.key(config.seed + 1)))

  init_rng = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(init_state, init_rng)
  shardings = common.state_shardings(abstract_state, mesh)
  fresh_state = jax.jit(init_state, out_shardings=shardings)
  eval_step = make_eval_step(model, config, mesh)
  picture_batch = None
  if config.pictures:  # the first images of the first eval split
    picture_batch = next(eval_batches(config, pipeline.list_benchmarks(
        config.data, eval_splits(config)[0])[0], ("image", "mask")))
    picture_batch = {k: v[:config.num_picture_images] for k, v in picture_batch.items()}

  def write_eval(step, params):
    metrics = evaluate(eval_step, params, config, mesh)
    writer.write_scalars(step, metrics)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, f"eval_{step:07d}.json"), "w") as f:
        json.dump(metrics, f, indent=1, sort_keys=True)
      if config.pictures:
        path = os.path.join(workdir, f"segmentation_{step:07d}.png")
        segmentation_picture(model, jax.device_get(params), picture_batch["image"],
                             picture_batch["mask"], config, path)
        logging.info("Wrote %s", path)
    return metrics

  # ---- Evaluation only.
  if config.eval_only:
    abstract = checkpoints.abstract_with_sharding(abstract_state.params, shardings.params)
    params, step = finetune.load_for_eval(finetune.eval_checkpoint(config, workdir), abstract)
    metrics = write_eval(max(step, 0), params)
    writer.close()
    return metrics

  # ---- Resume: this workdir -> resume_from -> init_from (encoder only) -> scratch.
  data_iter = pipeline.make_pipeline(
      config.data, config.train_split, config.batch_size, train=True, seed=config.seed,
      image_size=tuple(config.image_size), worker_count=config.data.get("worker_count", 0))
  ckpt = checkpoints.Checkpointer(workdir, keep=config.checkpoint.keep,
                                  keep_every=config.checkpoint.get("keep_every"),
                                  program=PROGRAM)
  state, data_state, source = checkpoints.restore_or_initialize(
      ckpt, checkpoints.abstract_with_sharding(abstract_state, shardings),
      resume_from=config.get("resume_from") or None, init_from=config.get("init_from") or None,
      merge_params=finetune.init_from_merger(lambda: fresh_state(init_rng)))
  if state is None:
    state = fresh_state(init_rng)
  if data_state is not None:
    data_iter.set_state(data_state)
  start_step = int(state.step)
  common.log_parameter_summary(state.params, "Segmenter")
  logging.info("Starting at step %d (%s); training to step %d; encoder %s.", start_step,
               source, total_steps, "frozen" if config.get("freeze_encoder") else "trained")

  train_step = make_train_step(model, config, optimizer, schedule, mesh, shardings)
  throughput = common.Throughput(total_steps, config.batch_size, start_step)
  last_saved = start_step

  # ---- Loop.
  with ckpt, checkpoints.PreemptionWatcher() as watcher:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(data_iter)
      arrays = common.global_batch({"image": batch["image"], "mask": batch["mask"]}, mesh)
      state, metrics = train_step(state, arrays["image"], arrays["mask"])

      is_log = step % config.log_every == 0 or step == total_steps or step == start_step + 1
      is_save = step % config.checkpoint.every == 0 or step == total_steps
      is_eval = (config.eval_every and step % config.eval_every == 0) or step == total_steps
      stop = watcher.should_stop(step)
      if is_log or is_save or stop:
        metrics = jax.device_get(metrics)
        guards.check_finite(metrics, step, last_checkpoint=last_saved or None)
      if is_log:
        writer.write_scalars(step, {**metrics, **throughput(step)})
      if is_save or stop:
        ckpt.save(step, state, data_state=data_iter.get_state(), config=config, force=True)
        last_saved = step
      if is_eval and not stop:
        write_eval(step, state.params)
      if stop:
        logging.warning("Stopped at step %d after saving a checkpoint.", step)
        break
  writer.close()
  return state
