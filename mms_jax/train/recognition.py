"""Scene-text recognition fine-tuning of a pretrained MMS encoder (docs/method.md §4).

  python -m mms_jax.main --config=configs/finetune_recognition.py --workdir=DIR \
      --config.init_from=PRETRAIN_WORKDIR
  ... --config.eval_only=True [--config.eval_from=CKPT]    # score a checkpoint, exit

Sections, top to bottom: config checks -> mesh -> data -> model and optimizer ->
update step -> resume -> evaluation and pictures -> loop.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mms_jax import checkpoints
from mms_jax.data import formats
from mms_jax.data import labels as labels_lib
from mms_jax.data import leakage
from mms_jax.data import pipeline
from mms_jax.data import tokenizer as tokenizer_lib
from mms_jax.evaluate import pictures
from mms_jax.evaluate import str_benchmarks
from mms_jax.evaluate import text_metrics
from mms_jax.models import encoder_weights
from mms_jax.models import recognition as rec
from mms_jax.models import recognizer_weights
from mms_jax.models import vit
from mms_jax.train import common
from mms_jax.train import finetune


# ------------------------------------------------------------------------------------
# Config checks (before anything compiles).
# ------------------------------------------------------------------------------------
def check_config(config):
  """Validates the fields; returns the Tokenizer. Errors name the field."""
  m = config.model
  if m.head not in ("ctc", "ar"):
    raise common.ConfigError(f"config.model.head={m.head!r}: use 'ctc' or 'ar'")
  common.checked_model_dtype(m)
  encoder = common.encoder_of(config)
  if m.decoder_width % m.decoder_num_heads:
    raise common.ConfigError("config.model: decoder_width must be divisible by decoder_num_heads")
  gh, gw = vit.grid_shape(tuple(config.image_size), encoder["patch"])
  charset = labels_lib.get_charset(config.charset)
  data_charset = labels_lib.get_charset(config.data.charset or config.charset)
  if not set(data_charset) <= set(charset):
    raise common.ConfigError(
      f"config.data.charset={config.data.charset!r} has characters "
      f"outside config.charset={config.charset!r}"
    )
  if not config.data.charset:
    raise common.ConfigError(
      "config.data.charset is empty: set it (e.g. to config.charset) "
      "so labels are normalised to the model's charset"
    )
  if config.data.max_label_length > m.max_length:
    raise common.ConfigError(
      f"config.data.max_label_length={config.data.max_label_length} "
      f"> config.model.max_length={m.max_length}"
    )
  if m.head == "ctc" and gw < m.max_length:
    raise common.ConfigError(
      f"CTC needs at least max_length={m.max_length} columns; the patch grid has gw={gw}"
    )
  if not 0 <= config.loss.label_smoothing < 1:
    raise common.ConfigError("config.loss.label_smoothing must be in [0, 1)")
  pipeline.validate(config.data)
  if config.total_steps:
    pipeline.check_curriculum_fits(config.data, config.total_steps, config.batch_size)
  check_eval_splits(config)
  check_benchmarks_path(config)
  tokenizer = tokenizer_lib.Tokenizer(charset, m.head)
  source_recognizer(config)
  return tokenizer


# The splits of generated data that a tree of the user's does not have.
SYNTHETIC_EVAL_SPLITS = ("test_heldout_fonts", "test_hard")
TREE_EVAL_SPLITS = ("test", "val")


def _split_problem(data, split):
  """None when `split` of the data config `data` exists, else why not."""
  if data.source == "synthetic":
    sizes = pipeline.synthetic_sizes(data)
    return None if split in sizes else f"generated data has no size for it ({sorted(sizes)})"
  try:
    pipeline.list_benchmarks(data, split)
  except (formats.DataError, ValueError) as e:
    return str(e)
  return None


def check_eval_splits(config):
  """Every split config.eval.splits names must exist, checked before anything compiles.
  On a tree of the user's (any source but 'synthetic'), the default generated-data
  splits (test_heldout_fonts, test_hard) become the tree's own test and/or val split
  (config.eval.splits is updated, so config.json records what was scored)."""
  splits = tuple(config.eval.splits)
  if config.data.source != "synthetic" and splits and set(splits) <= set(SYNTHETIC_EVAL_SPLITS):
    found = tuple(s for s in TREE_EVAL_SPLITS if _split_problem(config.data, s) is None)
    config.eval.splits = found
    if not found:
      logging.warning(
        "data.path=%s has no test or val split, so this run scores nothing: put held-out "
        "crops in its test/ folder (docs/data.md), or set config.eval.splits (and "
        "config.data.splits.<split>) to sub-folders of it.",
        config.data.path,
      )
      return
    logging.info(
      "Evaluating on the tree's own %s split(s) (config.eval.splits; the default %s "
      "belong to generated data).",
      "/".join(found),
      "/".join(splits),
    )
    return
  for split in splits:
    problem = _split_problem(config.data, split)
    if problem is not None:
      raise common.ConfigError(
        f"config.eval.splits has {split!r}, which the {config.data.source} data does not "
        f"hold: {problem} Set config.eval.splits to splits the data has (or map one with "
        f"--config.data.splits.{split}=SUB/FOLDER)."
      )


# Head fields that decide a trained head's tensors, by head kind.
HEAD_FIELDS = {
  "ctc": (),
  "ar": ("decoder_width", "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio"),
}


def source_recognizer(config):
  """The run config of config.init_from when it is a recognizer whose head this run
  keeps (config.init_head), else None. Checked before anything compiles: the head
  kind and the head's own fields must be the trained recognizer's."""
  if not config.init_from or not config.get("init_head", True):
    return None
  source = common.init_run_config(str(config.init_from))
  if source.get("program") != "recognition":
    return None
  trained, m = source.get("model") or {}, config.model
  if trained.get("head") != m.head:
    raise common.ConfigError(
      f"init_from={config.init_from!r} is a recognizer with a {trained.get('head')!r} "
      f"head, and config.model.head={m.head!r}: set --config.model.head="
      f"{trained.get('head')} to keep its head, or --config.init_head=False to start a "
      "new head on its encoder."
    )
  clash = [f for f in HEAD_FIELDS[m.head] if trained.get(f, m[f]) != m[f]]
  if clash:
    raise common.ConfigError(
      f"init_from={config.init_from!r} has another {m.head} head: "
      + ", ".join(f"config.model.{f}={m[f]} vs {trained[f]}" for f in clash)
      + ". Set these to the trained recognizer's, or --config.init_head=False to start a "
      "new head on its encoder."
    )
  return source


def init_from_recognizer(params, config, tokenizer, source):
  """`params` with init_from's encoder and, when `source` (source_recognizer) is set,
  its head, mapped onto this run's charset (new characters keep their fresh rows)."""
  loaded = checkpoints.load_params(config.init_from, what="init_from")
  params = encoder_weights.merge(params, loaded, strict=True, source=str(config.init_from))
  if source is None:
    logging.info("Initialised params from init_from=%s: the encoder.", config.init_from)
    return params
  old = tokenizer_lib.Tokenizer(source.get("charset") or "36", config.model.head)
  head = recognizer_weights.transfer_head(params["head"], loaded["head"], old, tokenizer)
  new_chars = sorted(set(tokenizer.charset) - set(old.charset))
  logging.info(
    "Initialised params from init_from=%s, a recognizer: the encoder and its %s head "
    "(charset %d -> %d characters%s).",
    config.init_from,
    config.model.head,
    len(old.charset),
    len(tokenizer.charset),
    f"; new, starting fresh: {''.join(new_chars)!r}" if new_chars else "",
  )
  return {**params, "head": head}


def check_benchmarks_path(config):
  """config.eval.benchmarks_path, if set, must hold LMDB benchmarks: checked before any
  compiling or scoring, with the field's name in the message."""
  path = config.eval.benchmarks_path
  if not path:
    return
  fix = (
    "set it to a folder of STR LMDB benchmarks (<path>/<name>/data.mdb, or one "
    "benchmark's own folder; docs/recognition.md) or to '' to skip them"
  )
  if not os.path.isdir(os.path.expanduser(path)):
    raise common.ConfigError(f"config.eval.benchmarks_path={path!r} is not a folder: {fix}")
  _, data, split = eval_targets(config)[-1]
  try:
    pipeline.list_benchmarks(data, split)
  except (formats.DataError, ValueError) as e:
    raise common.ConfigError(
      f"config.eval.benchmarks_path={path!r} (config.eval.benchmarks_split={split!r}): {e}; {fix}"
    ) from None


def build_model(config, tokenizer):
  return rec.from_config(config.model, tokenizer, encoder=common.encoder_of(config))


# ------------------------------------------------------------------------------------
# Update step.
# ------------------------------------------------------------------------------------
def make_train_step(model, config, tokenizer, optimizer, schedule, mesh, shardings):
  """The jitted update. With config.grad_accum_steps = a > 1 the batch is cut into a
  micro-batches (rows j, j + a, ...: each device keeps its rows) whose gradients are
  averaged in a scan: CTC's per-sample mean is then the full batch's; the AR loss is
  the mean of the micro-batches' token means."""
  frozen = bool(config.freeze_encoder)
  accumulation = int(config.grad_accum_steps)

  def loss_fn(params, images, ids, lengths):
    if frozen:  # no encoder backward pass at all
      params = {**params, "encoder": jax.lax.stop_gradient(params["encoder"])}
    variables = {"params": params}
    if config.model.head == "ar":
      logits = model.apply(variables, images, ids[:, :-1], train=True)
      return rec.ar_loss(logits, ids[:, 1:], tokenizer.pad, config.loss.label_smoothing)
    logits = model.apply(variables, images, train=True)
    loss = rec.ctc_loss(logits, ids, lengths, blank_id=tokenizer_lib.BLANK)
    return loss, jnp.zeros((), jnp.float32)

  def train_step(state, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    inputs = (batch["image"], batch["ids"], batch["lengths"])
    if accumulation == 1:
      (loss, accuracy), grads = grad_fn(state.params, *inputs)
    else:

      def accumulate(carry, xs):
        return jax.tree.map(jnp.add, carry, grad_fn(state.params, *xs)), None

      zeros = (
        (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
        jax.tree.map(jnp.zeros_like, state.params),
      )
      total, _ = jax.lax.scan(
        accumulate, zeros, tuple(common.micro_batches(x, accumulation) for x in inputs)
      )
      (loss, accuracy), grads = jax.tree.map(lambda x: x / accumulation, total)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = finetune.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    if config.model.head == "ar":
      metrics["token_accuracy"] = accuracy
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(
    train_step, donate_argnums=(0,), out_shardings=(shardings, common.replicated(mesh))
  )


def host_batch(batch, tokenizer, max_length):
  """The batch's images with the token ids of its labels (tokenizer.encode_labels)."""
  ids, lengths = tokenizer.encode_labels(batch["label"], max_length)
  return {"image": batch["image"], "ids": ids, "lengths": lengths}


# ------------------------------------------------------------------------------------
# Evaluation and pictures.
# ------------------------------------------------------------------------------------
def make_predict(model, tokenizer, mesh):
  """params -> (this process's rows of a global batch, images float32[b, H, W, 3] -> b
  strings). Every process calls it with its own rows (pipeline.padded_eval_batches); the
  model runs once on the global batch and each process decodes its own rows."""
  apply = jax.jit(
    lambda p, x: model.apply({"params": p}, x, method=model.predict),
    out_shardings=common.replicated(mesh),
  )

  def predictor(params):
    def predict(images):
      ids = np.asarray(apply(params, common.global_batch(np.asarray(images, np.float32), mesh)))
      mine = slice(jax.process_index() * len(images), (jax.process_index() + 1) * len(images))
      return tokenizer.decode(ids[mine])

    return predict

  return predictor


def eval_targets(config):
  """[(table name, data config, split)] to evaluate."""
  targets = [
    (s.replace("/", "_").strip("._") or "benchmarks", config.data, s) for s in config.eval.splits
  ]
  if config.eval.benchmarks_path:
    data = config.data.copy_and_resolve_references()
    data.unlock()
    data.update(source="str_lmdb", path=config.eval.benchmarks_path, reader="direct")
    targets.append(("benchmarks", data, config.eval.benchmarks_split or "."))
  return targets


def eval_protocols(config):
  """The charsets config.eval.charset scores with ('36', or several: '36,94')."""
  names = [c.strip() for c in str(config.eval.charset or "").split(",") if c.strip()]
  return names or [text_metrics.DEFAULT_CHARSET]


def run_evals(predict, config, workdir, step, writer):
  """Scores every eval target under every protocol of config.eval.charset (the first
  gives the table eval_<name>, each other one eval_<name>_<charset>); writes their
  .md and .csv; returns {table name: rows}."""
  results, kept = {}, []
  protocols = eval_protocols(config)

  def keep(batch, preds):
    if len(kept) < config.num_picture_images:
      take = config.num_picture_images - len(kept)
      kept.extend(zip(batch["image"][:take], batch["label"][:take], preds[:take]))

  for target, data, split in eval_targets(config):
    for i, protocol in enumerate(protocols):
      name = target if i == 0 else f"{target}_{protocol}"
      rows = str_benchmarks.evaluate(
        predict,
        data,
        split,
        batch_size=config.eval.batch_size,
        image_size=tuple(config.image_size),
        charset=protocol,
        max_batches=config.eval.max_batches,
        on_batch=keep if not results else None,
      )
      results[name] = rows
      title = f"{name} at step {step} (charset {protocol})"
      if jax.process_index() == 0:
        str_benchmarks.write_tables(rows, workdir, f"eval_{name}", title)
        print(str_benchmarks.format_table(rows, title), flush=True)
      writer.write_scalars(
        step,
        {
          f"eval/{name}/{r['benchmark']}/{k}": r[k]
          for r in rows
          for k in ("word_accuracy", "one_minus_ned", "skipped")
        },
      )
  if config.pictures and kept and jax.process_index() == 0:
    path = os.path.join(workdir, f"predictions_{step:07d}.png")
    pictures.save_prediction_grid(kept, path, protocols[0])
    logging.info("Wrote %s", path)
  return results


def check_leakage(config, workdir):
  """Warns, with a list in <workdir>/leakage.tsv, about evaluation images of a user's tree
  that are also training images (exact or near duplicates; data/leakage.py)."""
  if config.data.source == "synthetic" or not config.eval.splits or jax.process_index():
    return
  out = os.path.join(workdir, "leakage.tsv")
  found = leakage.check(
    config.data, "train", config.eval.splits, out, max_train=leakage.MAX_AUTOMATIC
  )
  if found is None:
    logging.info(
      "Training set larger than %d images: not checked for copies of the evaluation "
      "images; run python -m mms_jax.data.leakage --source=%s --path=%s --eval=%s once.",
      leakage.MAX_AUTOMATIC,
      config.data.source,
      config.data.path,
      ",".join(config.eval.splits),
    )
  elif any(found.values()):
    logging.warning(
      "Evaluation images that are also training images (%s): their scores are inflated. "
      "The pairs are in %s; remove them from one side.",
      leakage.summary(found),
      out,
    )
  else:
    logging.info("No evaluation image is also a training image (data/leakage.py).")


def record_synthetic_fonts(config, workdir):
  """Logs and writes workdir/synthetic_fonts.json: which fonts the generated training
  and test splits draw on this machine (they follow the installed fonts)."""
  splits = ("train", *[s for s in config.eval.splits if s != "train"])
  report = pipeline.synthetic_fonts(config.data, splits)
  logging.info(
    "Synthetic fonts on this machine: %s (workdir/synthetic_fonts.json; "
    "results compare across machines with the same fingerprints).",
    ", ".join(f"{s} {r['count']} [{r['fingerprint']}]" for s, r in report.items()),
  )
  differ = [
    s for s, r in report.items() if r["reference_fingerprint"] not in (None, r["fingerprint"])
  ]
  if differ:
    logging.warning(
      "The fonts of %s differ from those docs/results.md was measured with, so its "
      "figures do not compare with this run's. To get the same fonts, run "
      "launch/install.sh on Debian 12 with apt (it installs the font packages).",
      ", ".join(differ),
    )
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "synthetic_fonts.json"), "w") as f:
      json.dump(report, f, indent=1)
  return report


# ------------------------------------------------------------------------------------
# The program.
# ------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir):
  """Fine-tunes until config.total_steps (resuming from workdir), then evaluates.

  Returns a common.RunResult whose metrics are the last evaluation, {table name: rows};
  with config.eval_only, evaluates finetune.eval_checkpoint(config, workdir) only.
  """
  common.resolve_encoder(config)
  tokenizer = check_config(config)
  common.maybe_initialize_distributed(config)
  writer = common.MetricWriter(workdir)
  num_train = None
  if not config.total_steps:  # num_epochs: count the training set
    num_train = len(pipeline.make_source(config.data, "train"))
  total_steps = common.total_steps(config, num_train)
  writer.total_steps = total_steps
  max_length = config.model.max_length

  # ---- Mesh.
  mesh = common.make_mesh(config)
  common.check_batch_size(config, mesh)
  common.log_run_header("recognition", config, mesh, workdir)
  if config.data.source == "synthetic" and not config.eval_only:
    record_synthetic_fonts(config, workdir)
  if pipeline.Curriculum.from_config(config.data).active and not pipeline.curriculum_applies(
    config.data
  ):
    logging.info(
      "data.curriculum shapes generated images only: data.source=%s trains on its own "
      "records as they are.",
      config.data.source,
    )

  # ---- Model and optimizer, created already sharded.
  model = build_model(config, tokenizer)
  height, width = config.image_size

  def init_params(rng):
    images = jnp.zeros((1, height, width, 3), jnp.float32)
    args = (
      (images, jnp.zeros((1, max_length + 1), jnp.int32))
      if config.model.head == "ar"
      else (images,)
    )
    return model.init({"params": rng}, *args)["params"]

  init_rng = jax.random.key(config.seed)
  abstract_params = jax.eval_shape(init_params, init_rng)
  optimizer, schedule = finetune.make_finetune_optimizer(config, total_steps, abstract_params)

  def init_state(rng):
    params = init_params(rng)
    return common.new_train_state(params, optimizer, config.seed)

  abstract_state = jax.eval_shape(init_state, init_rng)
  shardings = common.state_shardings(abstract_state, mesh)
  fresh_state = jax.jit(init_state, out_shardings=shardings)
  predictor = make_predict(model, tokenizer, mesh)

  # ---- Evaluate-only: score a checkpoint and exit.
  if config.eval_only:
    params, step = finetune.load_for_eval(
      finetune.eval_checkpoint(config, workdir),
      checkpoints.abstract_with_sharding(abstract_state.params, shardings.params),
    )
    common.write_config(config, workdir, keep_existing=True)
    results = run_evals(predictor(params), config, workdir, step, writer)
    writer.close()
    return common.RunResult(step, metrics=results)

  # ---- Data: each process reads its own shard; batches are assembled globally.
  data_iter = common.train_data(config)

  # ---- Resume: this workdir -> resume_from -> a fresh state (+ init_from's encoder).
  ckpt = checkpoints.Checkpointer(
    workdir,
    keep=config.checkpoint.keep,
    keep_every=config.checkpoint.keep_every,
    program="recognition",
  )
  state, source = common.restore_or_fresh(
    ckpt, config, abstract_state, shardings, lambda: fresh_state(init_rng), data_iter
  )
  trained = source_recognizer(config)
  if source == "scratch" and config.init_from:
    state = state.replace(params=init_from_recognizer(state.params, config, tokenizer, trained))
    source = "init_from" if trained is None else "init_from, head included"
  elif source == "scratch":
    logging.warning("No init_from: the encoder starts from random weights.")
  common.write_config(config, workdir)  # every check has passed
  if source != "workdir":
    check_leakage(config, workdir)
  start_step = int(state.step)
  common.log_parameter_summary(
    state.params["encoder"], "encoder (frozen)" if config.freeze_encoder else "encoder"
  )
  common.log_parameter_summary(state.params["head"], f"{config.model.head} head")

  train_step = make_train_step(model, config, tokenizer, optimizer, schedule, mesh, shardings)

  # ---- Loop; a run that starts from a trained recognizer is scored first.
  evaluation = {}
  if source == "init_from, head included" and eval_targets(config):
    logging.info("Scoring the trained recognizer before the first step.")
    evaluation = run_evals(predictor(state.params), config, workdir, 0, writer)
  with common.StepBookkeeping(
    config, total_steps, start_step, ckpt, data_iter, writer, source
  ) as bookkeeping:
    for step in bookkeeping.steps():
      batch = common.global_batch(host_batch(next(data_iter), tokenizer, max_length), mesh)
      state, metrics = train_step(state, batch)
      if bookkeeping(step, state, metrics):
        break
      if common.is_due(step, config.eval.every, total_steps):
        evaluation = run_evals(predictor(state.params), config, workdir, step, writer)
  writer.close()
  return common.RunResult(int(state.step), state, evaluation)
