"""Frozen-encoder linear probes on cached features: what did pretraining learn?

  python -m mms_jax.main --config=configs/probe.py --workdir=DIR \
      --config.init_from=PRETRAIN_WORKDIR        # '' probes a randomly initialised encoder

The encoder runs once over every image of each split, and its features stay in memory.
Only a linear layer per task is then fitted to them, for the price of one pass over
the data. The segmentation and SR heads are convex problems solved to their optimum, so
they measure the features, not a training recipe:

  recognition       column features [N, gw, D] (tokens averaged over the gh rows of each
                    column) -> linear -> charset + blank, CTC loss (AdamW minibatches,
                    config.total_steps); greedy decoding; word accuracy, 1-NED (the
                    36-character protocol) and the CTC loss per character
  segmentation      token features [N, L, D] -> linear -> a ph x pw foreground patch per
                    token: logistic regression (per-pixel BCE + L2), full-batch L-BFGS;
                    foreground IoU
  super_resolution  token features of the bicubic-upsampled LR image -> linear -> the
                    ph x pw x 3 HR residual per token: ridge regression, closed form;
                    PSNR / SSIM against HR (and bicubic's)

Writes metrics.jsonl (the final 'eval/<split>/...' row at step config.total_steps) and
probe.json. Short enough to rerun: an interrupted probe starts again. Shapes: N images,
L = gh * gw tokens, D encoder width, K classes, P = ph * pw (* 3) pixels per patch.
"""

import json
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mms_jax.data import labels as labels_lib
from mms_jax.data import pipeline
from mms_jax.data import tokenizer as tokenizer_lib
from mms_jax.evaluate import image_metrics
from mms_jax.evaluate import text_metrics
from mms_jax.models import dense_heads
from mms_jax.models import encoder_config
from mms_jax.models import recognition as rec
from mms_jax.models import vit
from mms_jax.train import common

PROGRAM = "probe"
TASKS = ("recognition", "segmentation", "super_resolution")


# ------------------------------------------------------------------------------------
# Config checks and the encoder.
# ------------------------------------------------------------------------------------
def build_encoder(config):
  m = config.model
  return encoder_config.build(
    encoder_config.EncoderConfig.of(common.encoder_of(config)),
    gelu=m.gelu,
    dtype=common.checked_model_dtype(m),
    scan_layers=m.scan_layers,
  )


def feature_encoder(config):
  """The encoder that makes the probed features: the first config.read_depth blocks
  (all when unset) followed by the final LayerNorm. It reads build_encoder's params."""
  depth = config.get("read_depth")
  if depth is None:
    return build_encoder(config)
  return build_encoder(config).clone(depth=depth)


def check_config(config):
  tasks = tuple(config.tasks)
  if not tasks or any(t not in TASKS for t in tasks):
    raise common.ConfigError(f"config.tasks={tasks}: use some of {TASKS}")
  try:
    gh, gw = vit.grid_shape(tuple(config.image_size), build_encoder(config).patch)
  except ValueError as e:
    raise common.ConfigError(f"config.image_size / config.model.encoder.patch: {e}") from e
  if "recognition" in tasks and gw < config.data.max_label_length:
    raise common.ConfigError(
      f"CTC needs at least config.data.max_label_length="
      f"{config.data.max_label_length} columns; the grid has {gw}"
    )
  if {"segmentation", "super_resolution"} & set(tasks) and config.data.source != "synthetic":
    raise common.ConfigError(
      f"config.data.source={config.data.source!r}: the "
      "segmentation and SR probes need the synthetic source (masks "
      "and LR copies of every image)"
    )
  if not config.get("total_steps"):
    raise common.ConfigError("config.total_steps (recognition head steps) is not set")
  if config.segmentation.iterations < 1 or config.segmentation.l2 <= 0:
    raise common.ConfigError(
      "config.segmentation: iterations >= 1 and l2 > 0 (the L2 "
      "term keeps separable pixels from driving weights to inf)"
    )
  if config.super_resolution.ridge <= 0:
    raise common.ConfigError("config.super_resolution.ridge must be > 0")
  if jax.process_count() > 1:
    raise common.ConfigError(
      "the probe runs in one process (its features are cached on "
      "one host); launch it without config.distributed"
    )
  pipeline.validate(config.data)
  depth = build_encoder(config).dims()[1]
  read_depth = config.get("read_depth")
  if read_depth is not None and not 0 <= read_depth <= depth:
    raise common.ConfigError(
      f"config.read_depth={read_depth}: the encoder depth is {depth}; "
      f"use 0 (patch embeddings) to {depth}, or unset it"
    )
  if read_depth is not None and config.model.scan_layers:
    raise common.ConfigError(
      "config.read_depth needs config.model.scan_layers=False "
      "(a scanned stack cannot be cut after a block)"
    )


def encoder_params(config, encoder):
  """The encoder of config.init_from, or a random init from config.seed when it is ''."""
  sample = jnp.zeros((1, *config.image_size, 3), jnp.float32)
  fresh = encoder.init(jax.random.PRNGKey(config.seed), sample)["params"]
  if not config.init_from:
    return fresh
  return common.load_pretrained({"encoder": fresh}, config.init_from)["encoder"]


# ------------------------------------------------------------------------------------
# Feature cache: one encoder pass over a split.
# ------------------------------------------------------------------------------------
def encode_split(config, encode, split, tasks):
  """Runs `encode` (images [B, H, W, 3] -> tokens [B, L, D]) once over `split`.

  Returns numpy arrays with a leading N: 'columns' [N, gw, D] and 'label' (recognition);
  'tokens' [N, L, D] and 'mask' [N, H, W] (segmentation); 'lr_tokens' [N, L, D],
  'upsampled' and 'image' [N, H, W, 3] in [-1, 1] (super_resolution).
  """
  gh, gw = vit.grid_shape(tuple(config.image_size), tuple(config.model.encoder.patch))
  batch_size = config.encode_batch_size
  loader = pipeline.make_loader(
    config.data,
    split,
    batch_size,
    image_size=tuple(config.image_size),
    worker_count=config.data.get("worker_count", 0),
  )
  out = {}
  for batch in loader:
    n = len(batch["image"])
    pad = lambda x: np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    parts = {}
    if {"recognition", "segmentation"} & set(tasks):
      tokens = np.asarray(encode(pad(batch["image"])))[:n]
      if "recognition" in tasks:
        parts["columns"] = tokens.reshape(n, gh, gw, -1).mean(axis=1)
        parts["label"] = np.asarray(batch["label"], object)
      if "segmentation" in tasks:
        parts["tokens"], parts["mask"] = tokens, np.asarray(batch["mask"], np.float32)
    if "super_resolution" in tasks:
      upsampled = np.asarray(dense_heads.upsample(batch["lr_image"], config.image_size))
      parts["lr_tokens"] = np.asarray(encode(pad(upsampled)))[:n]
      parts["upsampled"], parts["image"] = upsampled, np.asarray(batch["image"], np.float32)
    for k, v in parts.items():
      out.setdefault(k, []).append(v)
  if not out:
    raise common.ConfigError(f"split {split!r} of config.data has no images")
  return {k: np.concatenate(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------
# Linear heads: loss and prediction on cached features.
# ------------------------------------------------------------------------------------
def make_head(task, num_outputs):
  # The SR residual head starts at zero, so an untrained probe returns the bicubic image.
  init = nn.initializers.zeros if task == "super_resolution" else nn.initializers.xavier_uniform()
  return nn.Dense(num_outputs, kernel_init=init, name=task)


def segmentation_logits(head, params, tokens, patch, grid):
  """tokens [B, L, D] -> foreground logits [B, H, W]."""
  patches = head.apply({"params": params}, tokens)  # [B, L, ph * pw]
  return vit.unpatchify(patches, patch, grid, 1)[..., 0]


def sr_output(head, params, lr_tokens, upsampled, patch, grid):
  """lr_tokens [B, L, D], upsampled [B, H, W, 3] -> SR image [B, H, W, 3]."""
  residual = head.apply({"params": params}, lr_tokens)  # [B, L, ph * pw * 3]
  return upsampled + vit.unpatchify(residual, patch, grid, 3)


def task_losses(task, head, patch, grid, l2=0.0):
  """(params, batch) -> scalar loss, for one task's cached arrays (+ l2 * |kernel|^2)."""

  def recognition(params, b):
    logits = head.apply({"params": params}, b["columns"])
    return rec.ctc_loss(logits, b["ids"], b["lengths"], blank_id=tokenizer_lib.BLANK)

  def segmentation(params, b):
    logits = segmentation_logits(head, params, b["tokens"], patch, grid)
    bce = optax.sigmoid_binary_cross_entropy(logits, b["mask"]).mean()
    return bce + l2 * jnp.sum(params["kernel"] ** 2)

  def super_resolution(params, b):
    sr = sr_output(head, params, b["lr_tokens"], b["upsampled"], patch, grid)
    return jnp.mean((sr - b["image"]) ** 2)

  return {
    "recognition": recognition,
    "segmentation": segmentation,
    "super_resolution": super_resolution,
  }[task]


def fit_head(
  loss_fn, params, data, *, steps, batch_size, lr, weight_decay, seed, log=None, log_every=0
):
  """AdamW on minibatches of the cached `data` (dict of arrays [N, ...]); returns params.

  Warmup over the first 5% of steps, then cosine decay to 0. log(step, loss) is called
  every log_every steps (and at the last).
  """
  n = len(next(iter(data.values())))
  warmup = max(1, steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
  optimizer = optax.adamw(schedule, weight_decay=weight_decay)
  device_data = jax.device_put(data)

  @jax.jit
  def step_fn(params, opt_state, data, idx):
    batch = jax.tree.map(lambda x: x[idx], data)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed)
  batch_size = min(batch_size, n)
  for step in range(1, steps + 1):
    idx = rng.choice(n, batch_size, replace=False)
    params, opt_state, loss = step_fn(params, opt_state, device_data, idx)
    if log is not None and log_every and (step % log_every == 0 or step == steps):
      log(step, float(loss))
  return params


def fit_lbfgs(loss_fn, params, data, iterations):
  """Full-batch L-BFGS (optax, zoom line search) on loss_fn(params, data); params."""
  optimizer = optax.lbfgs()

  @jax.jit
  def run(params, data):
    value_fn = lambda p: loss_fn(p, data)
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    def body(_, carry):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = optimizer.update(
        grad, state, params, value=value, grad=grad, value_fn=value_fn
      )
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, iterations, body, (params, optimizer.init(params)))[0]

  return run(params, jax.device_put(data))


def fit_ridge(features, targets, ridge):
  """Linear least squares with an L2 penalty, in closed form; nn.Dense params.

  features [M, D], targets [M, P]. The penalty is `ridge` x the mean diagonal of the
  Gram matrix (scale-free), and the bias is not penalised.
  """
  x = np.concatenate([features, np.ones((len(features), 1), features.dtype)], axis=1)
  gram = (x.T @ x).astype(np.float64)
  penalty = ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
  penalty[-1, -1] = 0.0
  w = np.linalg.solve(gram + penalty, (x.T @ targets).astype(np.float64))
  return {"kernel": w[:-1].astype(np.float32), "bias": w[-1].astype(np.float32)}


def fit_task(task, head, params, data, config, patch, grid, log=None):
  """The probe's head for `task` fitted to the cached training arrays `data`."""
  if task == "super_resolution":
    width = data["lr_tokens"].shape[-1]
    residual = vit.patchify(data["image"] - data["upsampled"], patch)
    return fit_ridge(
      data["lr_tokens"].reshape(-1, width),
      residual.reshape(-1, residual.shape[-1]),
      config.super_resolution.ridge,
    )
  if task == "segmentation":
    return fit_lbfgs(
      task_losses(task, head, patch, grid, config.segmentation.l2),
      params,
      data,
      config.segmentation.iterations,
    )
  return fit_head(
    task_losses(task, head, patch, grid),
    params,
    data,
    steps=config.total_steps,
    batch_size=config.batch_size,
    lr=config.recognition.lr,
    weight_decay=config.recognition.weight_decay,
    seed=config.seed,
    log=log,
    log_every=config.log_every,
  )


def _batched(fn, params, arrays, batch_size):
  """fn(params, slice of `arrays`) over slices of batch_size (the last one padded, so
  fn compiles once); outputs with a leading batch axis, concatenated and trimmed to N."""
  n = len(next(iter(arrays.values())))
  outs = []
  for i in range(0, n, batch_size):
    part = {k: v[i : i + batch_size] for k, v in arrays.items()}
    m = len(next(iter(part.values())))
    part = {
      k: np.concatenate([v, np.repeat(v[-1:], batch_size - m, axis=0)]) for k, v in part.items()
    }
    outs.append(jax.tree.map(lambda x, m=m: np.asarray(x)[:m], fn(params, part)))
  return jax.tree.map(lambda *x: np.concatenate(x), *outs)


def evaluate_task(task, head, params, data, config, tokenizer, patch, grid):
  """{metric: value} of one task's probe on one split's cached arrays."""
  batch_size = config.encode_batch_size
  if task == "recognition":
    ids, lengths = tokenizer.encode_labels(data["label"], config.data.max_label_length)

    def predict(p, b):
      logits = head.apply({"params": p}, b["columns"])
      return rec.ctc_greedy(logits)[0], rec.ctc_loss_per_char(
        logits, b["ids"], b["lengths"], tokenizer_lib.BLANK
      )

    pred_ids, per_char = _batched(
      jax.jit(predict),
      params,
      {"columns": data["columns"], "ids": ids, "lengths": lengths},
      batch_size,
    )
    scores = text_metrics.score(
      [str(t) for t in data["label"]], tokenizer.decode(pred_ids), config.eval.charset
    )
    # The CTC loss per character on the split: still informative on the blank plateau.
    return {
      "word_accuracy": scores["word_accuracy"],
      "one_minus_ned": scores["one_minus_ned"],
      "ctc_loss": float(np.mean(per_char)),
    }
  if task == "segmentation":
    counts = jax.jit(
      lambda p, b: image_metrics.confusion_counts(
        jax.nn.sigmoid(segmentation_logits(head, p, b["tokens"], patch, grid)),
        b["mask"],
        config.threshold,
      )
    )
    c = _batched(counts, params, {k: data[k] for k in ("tokens", "mask")}, batch_size)
    summary = image_metrics.segmentation_summary(c["tp"], c["fp"], c["fn"])
    return {"iou": summary["iou"], "fscore": summary["fscore"]}
  quality = jax.jit(
    lambda p, b: {
      "sr": image_metrics.image_quality(
        sr_output(head, p, b["lr_tokens"], b["upsampled"], patch, grid), b["image"]
      ),
      "bicubic": image_metrics.image_quality(b["upsampled"], b["image"]),
    }
  )
  q = _batched(
    quality, params, {k: data[k] for k in ("lr_tokens", "upsampled", "image")}, batch_size
  )
  return {
    "psnr": float(np.mean(q["sr"]["psnr"])),
    "ssim": float(np.mean(q["sr"]["ssim"])),
    "bicubic_psnr": float(np.mean(q["bicubic"]["psnr"])),
    "bicubic_ssim": float(np.mean(q["bicubic"]["ssim"])),
  }


# ------------------------------------------------------------------------------------
# The program.
# ------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir):
  common.resolve_encoder(config)
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  common.write_config(config, workdir)
  tasks = tuple(config.tasks)
  patch = tuple(config.model.encoder.patch)
  grid = vit.grid_shape(tuple(config.image_size), patch)
  encoder = build_encoder(config)
  params = encoder_params(config, encoder)
  read_depth = config.get("read_depth")
  logging.info(
    "Probe of %s (%s): tasks %s.",
    config.init_from or f"a random encoder (seed {config.seed})",
    "all blocks" if read_depth is None else f"the first {read_depth} blocks",
    tasks,
  )
  features = feature_encoder(config)
  apply = jax.jit(lambda p, x: features.apply({"params": p}, x)[0][:, 1:])
  encode = lambda images: apply(params, images)

  started = time.time()
  splits = {
    s: encode_split(config, encode, s, tasks) for s in (config.train_split, *config.eval.splits)
  }
  logging.info(
    "Probe: encoded %s in %.0f s.",
    {s: len(next(iter(v.values()))) for s, v in splits.items()},
    time.time() - started,
  )
  tokenizer = tokenizer_lib.Tokenizer(labels_lib.get_charset(config.charset), "ctc")
  width = encoder.dims()[0]
  outputs = {
    "recognition": len(tokenizer),
    "segmentation": patch[0] * patch[1],
    "super_resolution": patch[0] * patch[1] * 3,
  }
  train = splits[config.train_split]
  if "recognition" in tasks:
    train["ids"], train["lengths"] = tokenizer.encode_labels(
      train.pop("label"), config.data.max_label_length
    )
  fields = {
    "recognition": ("columns", "ids", "lengths"),
    "segmentation": ("tokens", "mask"),
    "super_resolution": ("lr_tokens", "upsampled", "image"),
  }

  writer = common.MetricWriter(workdir)
  results = {}
  for i, task in enumerate(tasks):
    head = make_head(task, outputs[task])
    sample = np.zeros((1, 1, width), np.float32)
    head_params = head.init(jax.random.PRNGKey(config.seed + 1 + i), sample)["params"]
    log = lambda step, loss, task=task: logging.info("[%s %d] loss=%.4g", task, step, loss)
    t0 = time.time()
    data = {k: train[k] for k in fields[task]}
    head_params = fit_task(task, head, head_params, data, config, patch, grid, log)
    loss = float(jax.jit(task_losses(task, head, patch, grid))(head_params, data))
    logging.info(
      "Probe: %s head fitted in %.0f s; training loss %.4g.", task, time.time() - t0, loss
    )
    for split in config.eval.splits:
      metrics = evaluate_task(
        task, head, head_params, splits[split], config, tokenizer, patch, grid
      )
      results.update({f"eval/{split}/{task}/{k}": v for k, v in metrics.items()})
  writer.write_scalars(config.total_steps, results)
  writer.close()
  with open(os.path.join(workdir, "probe.json"), "w") as f:
    json.dump(
      {
        "init_from": config.init_from,
        "read_depth": read_depth,
        "seconds": round(time.time() - started, 1),
        "metrics": results,
      },
      f,
      indent=1,
      sort_keys=True,
    )
  logging.info("Probe done in %.0f s.", time.time() - started)
  return common.RunResult(int(config.total_steps), metrics=results)
