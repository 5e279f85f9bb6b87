"""Text-image super-resolution: the LR image, bicubic-upsampled to the encoder size, goes
through a pretrained ViT encoder; a light transformer head predicts the HR pixels of
each patch. L2 loss, optionally + a gradient-profile term (METHOD.md §4).

  python -m mms_jax.main --config=configs/finetune_sr.py --workdir=DIR \
      --config.init_from=PRETRAIN_WORKDIR

Sections, top to bottom: config checks -> loss and update step -> evaluation ->
pictures -> the program (mesh -> data -> model and optimizer -> resume -> loop).
Evaluation only: --config.eval_only=True [--config.eval_from=CHECKPOINT].
With --config.sr_eval_recognizer=RECOGNITION_WORKDIR the evaluation also reads the
bicubic, SR and HR images with that recognizer and reports word accuracy.
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
               "textzoom": ("test",)}  # -> test/easy, test/medium, test/hard
PROGRAM = "super_resolution"
SCALE = 2  # the pipeline's lr_image is always half the image size (TextZoom 16x64 -> 32x128)


# ------------------------------------------------------------------------------------
# Config checks (before anything compiles).
# ------------------------------------------------------------------------------------
def eval_splits(config):
  return tuple(config.eval_splits) or EVAL_SPLITS[config.data.source]


def build_model(config):
  m = config.model
  dtype = common.checked_model_dtype(m)
  return dense_heads.SuperResolver(
      encoder_variant=m.encoder_variant, encoder_width=m.get("encoder_width"),
      encoder_depth=m.get("encoder_depth"), encoder_num_heads=m.get("encoder_num_heads"),
      patch=tuple(m.patch), head_width=m.head_width, head_depth=m.head_depth,
      head_num_heads=m.head_num_heads, gelu=m.gelu, dtype=dtype, scan_layers=m.scan_layers,
      scale=SCALE, residual=m.residual, **common.encoder_options(m))


def check_config(config):
  model = build_model(config)
  height, width = config.image_size
  if height % SCALE or width % SCALE:
    raise common.ConfigError(f"config.image_size={tuple(config.image_size)} must be even "
                             "(the LR image is half of it)")
  if min(height, width) < 11:
    raise common.ConfigError("config.image_size: SSIM needs images of at least 11x11")
  try:
    vit.grid_shape((height, width), tuple(config.model.patch))
  except ValueError as e:
    raise common.ConfigError(f"config.image_size / config.model.patch: {e}") from e
  enc_width, _, heads = model.encoder_dims()
  if enc_width % heads or config.model.head_width % config.model.head_num_heads:
    raise common.ConfigError("config.model: widths must be divisible by their head counts")
  if config.loss.gradient_weight < 0:
    raise common.ConfigError("config.loss.gradient_weight must be >= 0")
  if config.data.source not in ("synthetic", "textzoom"):
    raise common.ConfigError(f"config.data.source={config.data.source!r} has no LR/HR "
                             "pairs: use 'synthetic' or 'textzoom'")
  pipeline.validate(config.data)
  return model


# ------------------------------------------------------------------------------------
# Loss and update step.
# ------------------------------------------------------------------------------------
def image_gradients(images):
  """[B, H, W, C] -> (d/dy [B, H - 1, W, C], d/dx [B, H, W - 1, C]), forward differences."""
  return images[:, 1:] - images[:, :-1], images[:, :, 1:] - images[:, :, :-1]


def sr_loss(sr, hr, gradient_weight=0.0):
  """mean (sr - hr)^2 + gradient_weight * (mean |dy sr - dy hr| + mean |dx sr - dx hr|).

  Returns (loss, {'l2', 'gradient'}).
  """
  l2 = jnp.mean((sr - hr) ** 2)
  gradient = sum(jnp.mean(jnp.abs(a - b))
                 for a, b in zip(image_gradients(sr), image_gradients(hr)))
  return l2 + gradient_weight * gradient, {"l2": l2, "gradient": gradient}


def make_train_step(model, config, optimizer, schedule, mesh, shardings):

  def loss_fn(params, lr_images, hr_images):
    sr, _ = model.apply({"params": params}, lr_images, train=True)
    loss, parts = sr_loss(sr, hr_images, config.loss.gradient_weight)
    return loss, (parts, sr)

  def train_step(state, lr_images, hr_images):
    (loss, (parts, sr)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, lr_images, hr_images)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = finetune.apply_updates(state.params, updates)
    mse = jnp.mean((image_metrics.to_unit(sr) - image_metrics.to_unit(hr_images)) ** 2)
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step), "train_psnr": -10.0 * jnp.log10(mse)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,),
                 out_shardings=(shardings, common.replicated(mesh)))


# ------------------------------------------------------------------------------------
# Evaluation: PSNR / SSIM of SR and of the bicubic baseline, per benchmark
# (TextZoom: test/easy, test/medium, test/hard, plus all of them together).
# ------------------------------------------------------------------------------------
def eval_batches(config, split):
  """Yields this host's eval batches padded to a fixed size, with 'valid' and 'label'.

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
  height, width = config.image_size
  shapes = {"image": (height, width, 3), "lr_image": (height // SCALE, width // SCALE, 3)}
  for _ in range(-(-(-(-len(source) // processes)) // local)):
    batch = next(iterator, None)
    n = 0 if batch is None else len(batch["image"])
    out = {"valid": np.arange(local) < n, "label": np.full(local, "", object)}
    if n and "label" in batch:
      out["label"][:n] = batch["label"]
    for key, shape in shapes.items():
      out[key] = np.zeros((local, *shape), np.float32)
      if n:
        out[key][:n] = batch[key]
    yield out


def make_eval_step(model, mesh, with_images=False):
  """(params, batch) -> per-image PSNR / SSIM of SR and bicubic and 'valid' [B], on every
  host; with_images also returns the SR (clipped) and bicubic images."""
  def eval_step(params, batch):
    sr, aux = model.apply({"params": params}, batch["lr_image"])
    sr_q, bic_q = (image_metrics.image_quality(x, batch["image"])
                   for x in (sr, aux["upsampled"]))
    per_image = {"psnr": sr_q["psnr"], "ssim": sr_q["ssim"], "bicubic_psnr": bic_q["psnr"],
                 "bicubic_ssim": bic_q["ssim"], "valid": batch["valid"]}
    if with_images:
      return per_image, jnp.clip(sr, -1, 1), aux["upsampled"]
    return per_image
  return jax.jit(eval_step, out_shardings=common.replicated(mesh))


def evaluate(eval_step, params, config, mesh, recognizer=None):
  """{'eval/<benchmark>/<metric>': value} over every benchmark of config.eval_splits.

  recognizer: optional callable (images [N, H, W, 3] in [-1, 1], labels [N]) -> float32[N]
  (1 = read correctly); adds word accuracy of the bicubic, SR and HR images.
  """
  results = {}
  for split in eval_splits(config):
    benchmarks = pipeline.list_benchmarks(config.data, split)
    totals = image_metrics.Accumulator()
    for bench in benchmarks:
      acc = image_metrics.Accumulator()
      for batch in eval_batches(config, bench):
        arrays = common.global_batch({k: batch[k] for k in ("lr_image", "image", "valid")},
                                     mesh)
        if recognizer is None:
          per_image = jax.device_get(eval_step(params, arrays))
        else:  # reads this host's rows (labels are host-local), then gathers
          per_image, sr, up = jax.device_get(eval_step(params, arrays))
          rows = slice(jax.process_index() * len(batch["valid"]),
                       (jax.process_index() + 1) * len(batch["valid"]))
          local = {"bicubic": up[rows], "sr": sr[rows], "hr": batch["image"]}
          per_image.update(_all_hosts({f"word_accuracy_{k}": recognizer(v, batch["label"])
                                       for k, v in local.items()}))
        valid = per_image.pop("valid")
        acc.update(per_image, valid)
        totals.update(per_image, valid)
      results.update({f"eval/{bench}/{k}": v for k, v in acc.means().items()})
      results[f"eval/{bench}/count"] = acc.count
    if len(benchmarks) > 1:
      results.update({f"eval/{split}/all/{k}": v for k, v in totals.means().items()})
      results[f"eval/{split}/all/count"] = totals.count
  return results


def _all_hosts(per_image):
  """Host-local per-image values [b] -> the global batch's [B] (process order)."""
  if jax.process_count() == 1:
    return per_image
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(
      {k: np.asarray(v, np.float32) for k, v in per_image.items()}, tiled=True)
  return {k: np.asarray(v) for k, v in gathered.items()}


# ------------------------------------------------------------------------------------
# Optional: word accuracy of a recognizer trained by the recognition program.
# ------------------------------------------------------------------------------------
def _recognizer_from_config(rc):
  """(Recognizer, Tokenizer) from a recognition run's config.json (a dict)."""
  from mms_jax.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
  from mms_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from mms_jax.models import recognition  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_lib.Tokenizer(labels_lib.get_charset(rc["charset"]),
                                      rc["model"]["head"])
  model = recognition.from_config(rc["model"], tokenizer)
  return model, tokenizer


def load_recognizer(path):
  """A callable (images [N, H, W, 3] in [-1, 1], labels [N]) -> correct float32[N].

  `path`: a recognition workdir, or a step directory inside one; its config.json
  rebuilds the model and tokenizer, its checkpoint gives the params. Images of
  another size are resized (bilinear) to the recognizer's input size. Labels and
  predictions are compared after text_metrics.normalize with the run's eval charset.
  """
  from mms_jax.evaluate import text_metrics  # pylint: disable=g-import-not-at-top
  step_dir = checkpoints.resolve_checkpoint(path, what="sr_eval_recognizer")
  config_path = step_dir.parent.parent / "config.json"
  if not config_path.exists():
    raise checkpoints.CheckpointError(
        f"sr_eval_recognizer={str(path)!r}: no config.json in {step_dir.parent.parent}; "
        "point it at a recognition workdir.")
  rec_config = json.loads(config_path.read_text())
  if rec_config.get("program") != "recognition":
    raise common.ConfigError(f"sr_eval_recognizer={str(path)!r} is a "
                             f"{rec_config.get('program')!r} run, not 'recognition'")
  model, tokenizer = _recognizer_from_config(rec_config)
  params = jax.tree.map(jnp.asarray, checkpoints.load_params(step_dir,
                                                             what="sr_eval_recognizer"))
  image_size = tuple(rec_config["image_size"])
  charset = (rec_config.get("eval") or {}).get("charset") or text_metrics.DEFAULT_CHARSET
  predict = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.predict))
  logging.info("sr_eval_recognizer: %s (%s head, input %s, scored on charset %r).",
               step_dir, model.head, image_size, charset)

  def read(images, labels):
    images = jnp.asarray(images, jnp.float32)
    if tuple(images.shape[1:3]) != image_size:
      images = jax.image.resize(images, (images.shape[0], *image_size, 3), "bilinear")
    texts = tokenizer.decode(np.asarray(predict(params, images)))
    return np.array([text_metrics.normalize(t, charset) == text_metrics.normalize(g, charset)
                     for t, g in zip(texts, labels)], np.float32)

  return read


# ------------------------------------------------------------------------------------
# Pictures: LR (nearest-upscaled) / bicubic / SR / HR rows.
# ------------------------------------------------------------------------------------
def _to_uint8(images):
  return np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)


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
def _predict(model, params, lr_images):
  sr, aux = model.apply({"params": params}, lr_images)
  return jnp.clip(sr, -1, 1), aux["upsampled"]


def sr_picture(model, params, lr_images, hr_images, path):
  """A PNG of four rows; runs on this process only (params as host arrays)."""
  sr, up = (np.asarray(x) for x in _predict(model, params, jnp.asarray(lr_images)))
  lr = np.repeat(np.repeat(np.asarray(lr_images), SCALE, axis=1), SCALE, axis=2)
  kinds = (("LR (pixels x2)", lr), ("bicubic", up), ("SR", sr), ("HR", hr_images))
  rows = [np.concatenate(list(_to_uint8(x)), axis=1) for _, x in kinds]
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
  recognizer = None
  if config.get("sr_eval_recognizer"):
    recognizer = load_recognizer(config.sr_eval_recognizer)

  # ---- Model and optimizer, created already sharded.
  def init_params(rng):
    lr_images = jnp.zeros((1, height // SCALE, width // SCALE, 3), jnp.float32)
    return model.init({"params": rng}, lr_images)["params"]

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
  eval_step = make_eval_step(model, mesh, with_images=recognizer is not None)
  picture_batch = None
  if config.pictures:  # the first images of the first eval split
    picture_batch = next(eval_batches(config, pipeline.list_benchmarks(
        config.data, eval_splits(config)[0])[0]))
    picture_batch = {k: v[:config.num_picture_images] for k, v in picture_batch.items()}

  def write_eval(step, params):
    metrics = evaluate(eval_step, params, config, mesh, recognizer)
    writer.write_scalars(step, metrics)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, f"eval_{step:07d}.json"), "w") as f:
        json.dump(metrics, f, indent=1, sort_keys=True)
      if config.pictures:
        path = os.path.join(workdir, f"super_resolution_{step:07d}.png")
        sr_picture(model, jax.device_get(params), picture_batch["lr_image"],
                   picture_batch["image"], path)
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
  common.log_parameter_summary(state.params, "SuperResolver")
  logging.info("Starting at step %d (%s); training to step %d; encoder %s.", start_step,
               source, total_steps, "frozen" if config.get("freeze_encoder") else "trained")

  train_step = make_train_step(model, config, optimizer, schedule, mesh, shardings)
  throughput = common.Throughput(total_steps, config.batch_size, start_step)
  last_saved = start_step

  # ---- Loop.
  with ckpt, checkpoints.PreemptionWatcher() as watcher:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(data_iter)
      arrays = common.global_batch({"lr": batch["lr_image"], "hr": batch["image"]}, mesh)
      state, metrics = train_step(state, arrays["lr"], arrays["hr"])

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
