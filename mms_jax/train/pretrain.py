"""MMS pretraining: a ViT-MAE trained to reconstruct the patches hidden by several
masking strategies (docs/method.md §2-3).

  python -m mms_jax.main --config=configs/pretrain.py --workdir=workdirs/pretrain

Sections, top to bottom: config checks -> mesh -> data -> model and optimizer ->
update step -> resume -> pictures -> loop.
"""

import functools
import logging
import os

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import optax

from mms_jax import checkpoints
from mms_jax import masking
from mms_jax.data import pipeline
from mms_jax.evaluate import pictures
from mms_jax.models import mae as mae_lib
from mms_jax.models import vit
from mms_jax.train import common


# ------------------------------------------------------------------------------------
# Config checks (before anything compiles).
# ------------------------------------------------------------------------------------
def build_model(config):
  m = config.model
  return mae_lib.MAE(
    **common.model_kwargs(config, from_init=False),
    decoder_width=m.decoder_width,
    decoder_depth=m.decoder_depth,
    decoder_num_heads=m.decoder_num_heads,
    encoder_mode=m.encoder_mode,
    attention=m.attention,
  )


def check_config(config):
  """Validates every section; returns the MaskSpec. Errors name the field."""
  encoder = common.encoder_of(config, from_init=False)
  image_size = tuple(config.image_size)
  if len(image_size) != 2:
    raise common.ConfigError("config.image_size is (height, width)")
  spec = masking.build_spec(config.masking, image_size, encoder["patch"])
  if config.model.encoder_mode not in ("mae", "simmim"):
    raise common.ConfigError(
      f"config.model.encoder_mode={config.model.encoder_mode!r}: use 'mae' or 'simmim'"
    )
  common.checked_model_dtype(config.model)
  if config.model.decoder_width % config.model.decoder_num_heads:
    raise common.ConfigError("config.model: decoder_width must be divisible by decoder_num_heads")
  if config.loss.visible_weight < 0:
    raise common.ConfigError("config.loss.visible_weight must be >= 0")
  pipeline.validate(config.data)
  return spec


# ------------------------------------------------------------------------------------
# Update step.
# ------------------------------------------------------------------------------------
def _per_strategy(spec, per_view_loss, strategy_ids):
  """Mean loss of each strategy: per_view_loss [B, V], strategy_ids [B] or [V]."""
  names = masking.strategy_names(spec)
  if spec.mode == "multi_view":
    return {f"loss/{n}": per_view_loss[:, v].mean() for v, n in enumerate(names)}
  if spec.mode == "per_sample":
    out = {}
    for s, n in enumerate(names):
      chosen = (strategy_ids == s).astype(jnp.float32)
      out[f"loss/{n}"] = jnp.sum(per_view_loss[:, 0] * chosen) / jnp.maximum(chosen.sum(), 1)
      out[f"fraction/{n}"] = chosen.mean()
    return out
  return {}


# Per-device micro-batches on CPU: the largest whose biggest activation (the MLP hidden
# layer, f32) stays within this many bytes. Measured in docs/performance.md: on a 2-core
# CPU, ViT-S steps run ~1.2x faster as 4 micro-batches of 4 than as one batch of 16.
CPU_MICRO_BATCH_BYTES = 12 * 2**20


def micro_batches_per_step(model, config, spec, mesh, backend=None):
  """How many micro-batches the step accumulates: grad_accum_steps, times an automatic
  split on CPU (`config.micro_batch_bytes`, default CPU_MICRO_BATCH_BYTES; 0 turns it
  off) that keeps each device's micro-batch small enough to stay in cache. The result
  is the same as one big batch up to float rounding (every sample hides the same
  number of patches, so the loss is the mean of the micro-batch losses)."""
  accumulation = int(config.get("grad_accum_steps", 1))
  budget = config.get("micro_batch_bytes")
  budget = CPU_MICRO_BATCH_BYTES if budget is None else int(budget)
  if (backend or jax.default_backend()) != "cpu" or budget <= 0:
    return accumulation
  per_device = config.batch_size // (mesh.devices.size * accumulation)
  width, _, _ = model.encoder.dims()
  widths = [width] + ([model.decoder_width] if model.encoder_mode == "mae" else [])
  per_example = spec.num_views * (1 + spec.num_cells) * model.mlp_ratio * max(widths) * 4
  split = next(
    n
    for n in range(1, per_device + 1)
    if per_device % n == 0 and (per_device // n) * per_example <= budget or n == per_device
  )
  return accumulation * split


def make_train_step(model, config, spec, optimizer, schedule, mesh, shardings):
  sampler = masking.make_sampler(spec)
  batch_sharding = common.batch_sharding(mesh)
  accumulation = micro_batches_per_step(model, config, spec, mesh)
  patch = model.encoder.patch

  def loss_fn(params, images, mask, num_masked):
    pred, _ = model.apply({"params": params}, images, mask, num_masked=num_masked, train=True)
    loss, aux = mae_lib.mae_loss(
      images,
      pred,
      mask,
      patch,
      norm_pix=config.loss.norm_pix,
      visible_weight=config.loss.visible_weight,
    )
    return loss, aux.get("per_view", aux["per_sample"][:, None])

  def train_step(state, images, num_masked):
    batch = images.shape[0]
    mask, strategy_ids = sampler(common.step_rng(state, 0), batch, num_masked)
    mask = jax.lax.with_sharding_constraint(mask, batch_sharding)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accumulation == 1:
      (loss, per_view), grads = grad_fn(state.params, images, mask, num_masked)
    else:

      def accumulate(carry, xs):
        (loss, per_view), grads = grad_fn(state.params, *xs, num_masked)
        return jax.tree.map(jnp.add, carry, (loss, grads)), per_view

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), per_view = jax.lax.scan(
        accumulate,
        zeros,
        (common.micro_batches(images, accumulation), common.micro_batches(mask, accumulation)),
      )
      loss, grads = jax.tree.map(lambda x: x / accumulation, (loss, grads))
      per_view = per_view.swapaxes(0, 1).reshape(batch, -1)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = jax.tree.map(jnp.add, state.params, updates)
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(state.step),
      "mask_ratio": num_masked / spec.num_cells,
      **_per_strategy(spec, per_view, strategy_ids),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return jax.jit(
    train_step,
    static_argnums=(2,),
    donate_argnums=(0,),
    out_shardings=(shardings, common.replicated(mesh)),
  )


# ------------------------------------------------------------------------------------
# Pictures: input / masked input / reconstruction for each strategy.
# ------------------------------------------------------------------------------------
def reconstruct(images, pred, mask, patch, norm_pix):
  """Images with hidden patches replaced by the prediction, in pixel space."""
  target = vit.patchify(images, patch)
  if norm_pix:  # undo the per-patch normalisation with the true patch statistics
    mean = target.mean(-1, keepdims=True)
    std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  mixed = jnp.where(mask[..., None], pred, target)
  grid = vit.grid_shape(images.shape[1:3], patch)
  masked = jnp.where(mask[..., None], 0.0, target)  # grey = 0 in [-1, 1]
  return (
    vit.unpatchify(masked, patch, grid, images.shape[-1]),
    vit.unpatchify(mixed, patch, grid, images.shape[-1]),
  )


def reconstruction_picture(model, params, images, config, spec, path, step):
  """A PNG: one row triple (input, masked, reconstruction) per strategy."""
  rows, labels = [], []
  patch = model.encoder.patch
  num_masked = spec.num_masked(step, config.total_steps)
  for s, name in enumerate(spec.strategies):
    params_s = dict(spec.params[s])
    mask = getattr(masking, name)(
      jax.random.key(s), images.shape[0], spec.grid, num_masked, **params_s
    )
    pred, _ = _apply_eval(model, params, images, mask, num_masked)
    masked, recon = reconstruct(images, pred, mask, patch, config.loss.norm_pix)
    for kind, batch in (("input", images), ("masked", masked), ("reconstruction", recon)):
      rows.append(pictures.side_by_side(pictures.to_uint8(batch)))
      labels.append(f"{name}: {kind}")
  pictures.save_labelled_rows(rows, labels, path)
  return labels


@functools.partial(jax.jit, static_argnums=(0, 4))
def _apply_eval(model, params, images, mask, num_masked):
  return model.apply({"params": params}, images, mask, num_masked=num_masked)


# ------------------------------------------------------------------------------------
# The program.
# ------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir):
  """Pretrains until config.total_steps; resumes from workdir automatically."""
  common.resolve_encoder(config, from_init=False)
  spec = check_config(config)
  common.maybe_initialize_distributed(config)
  writer = common.MetricWriter(workdir)
  num_train = None
  if not config.get("total_steps"):  # num_epochs: count the training set
    num_train = len(pipeline.make_source(config.data, "train"))
  total_steps = common.total_steps(config, num_train)
  writer.total_steps = total_steps
  config.unlock()
  config.total_steps = total_steps
  config.lock()

  # ---- Mesh.
  mesh = common.make_mesh(config)
  common.check_batch_size(config, mesh)
  common.log_run_header("pretrain", config, mesh, workdir)

  # ---- Data: each process reads its own shard; batches are assembled globally.
  data_iter = common.train_data(config)

  # ---- Model and optimizer, created already sharded.
  model = build_model(config)
  optimizer, schedule = common.make_optimizer(config, total_steps)
  height, width = config.image_size

  def init_state(rng):
    images = jnp.zeros((1, height, width, 3), jnp.float32)
    num_masked = spec.num_masked()
    mask = masking.random_patch(jax.random.key(0), 1, spec.grid, num_masked)
    if spec.mode == "multi_view":
      mask = jnp.repeat(mask[:, None], spec.num_views, axis=1)
    params = model.init({"params": rng}, images, mask, num_masked=num_masked)["params"]
    return common.new_train_state(params, optimizer, config.seed)

  init_rng = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(init_state, init_rng)
  shardings = common.state_shardings(abstract_state, mesh)
  fresh_state = jax.jit(init_state, out_shardings=shardings)

  # ---- Resume: this workdir -> resume_from -> a fresh state (+ init_from's weights).
  ckpt = checkpoints.Checkpointer(
    workdir,
    keep=config.checkpoint.keep,
    keep_every=config.checkpoint.get("keep_every"),
    program="pretrain",
  )

  state, source = common.restore_or_fresh(
    ckpt, config, abstract_state, shardings, lambda: fresh_state(init_rng), data_iter
  )
  if source == "scratch" and config.init_from:
    # every tensor whose path and shape match: the decoder too
    params = common.load_pretrained(state.params, config.init_from, strict=False)
    state, source = state.replace(params=params), "init_from"
  common.write_config(config, workdir)  # every check has passed
  start_step = int(state.step)
  common.log_parameter_summary(state.params, "MAE")

  train_step = make_train_step(model, config, spec, optimizer, schedule, mesh, shardings)
  eval_images = None

  # ---- Loop.
  with common.StepBookkeeping(
    config, total_steps, start_step, ckpt, data_iter, writer, source
  ) as bookkeeping:
    for step in bookkeeping.steps():
      batch = next(data_iter)
      if eval_images is None:
        eval_images = jnp.asarray(batch["image"][: config.num_picture_images])
      images = common.global_batch(batch["image"], mesh)
      state, metrics = train_step(state, images, spec.num_masked(step - 1, total_steps))
      if bookkeeping(step, state, metrics):
        break
      if config.picture_every and common.is_due(step, config.picture_every, total_steps):
        # Every process takes part: with fsdp across hosts no host holds all params.
        params = multihost_utils.process_allgather(state.params, tiled=True)
        if jax.process_index() == 0:
          path = os.path.join(workdir, f"reconstruction_{step:07d}.png")
          reconstruction_picture(model, params, eval_images, config, spec, path, step)
          logging.info("Wrote %s", path)
  writer.close()
  return common.RunResult(int(state.step), state)
