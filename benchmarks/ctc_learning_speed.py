"""How many CTC steps before a recognizer leaves the all-blank plateau? (docs/results.md)

  python -m benchmarks.ctc_learning_speed                              # vit and cnn, clean data
  python -m benchmarks.ctc_learning_speed --models=vit --train=normal --steps=800
  python -m benchmarks.ctc_learning_speed --models=vit --init_from=workdirs/pretrain

Every model trains on the same pre-generated labelled images (dictionary words up to 12
letters, training fonts; `--train=clean` draws black text on white without geometry,
degradations or occluders, `--train=normal` uses the generator's normal difficulty) with
the same CTC loss, AdamW schedule and batches. Every `--every` steps it prints the mean
loss of the last steps and the greedy word accuracy on 256 training images and on the
held-out-fonts test split (normal difficulty, the split the recognition program reports).

Models:
  vit  the recognition program's encoder (configs/finetune_recognition.py sizes, or
       --vit_width/--vit_depth) with the CTC head (column mean + linear),
       optionally initialised from a pretraining checkpoint (--init_from).
  cnn  a reference with convolutional inductive bias: three 3x3 conv + LayerNorm + ReLU
       stages (64, 128, 256 channels; pooling to 1 x 32 columns), a width-3 conv over
       the columns and a linear layer. It is a calibration, not a model of this project:
       it tells whether the data, loss and decoding can be learned in this many steps.
"""

import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mms_jax.data import builders
from mms_jax.data import labels
from mms_jax.data import synthetic
from mms_jax.data import tokenizer as tokenizer_lib
from mms_jax.models import encoder_config
from mms_jax.models import recognition as rec
from mms_jax.train import common

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["vit", "cnn"], "vit and/or cnn")
flags.DEFINE_enum("train", "clean", ["clean", "normal"], "training image distribution")
flags.DEFINE_integer("num_train", 16384, "pre-generated training images")
flags.DEFINE_integer("num_test", 512, "held-out-font test images")
flags.DEFINE_integer("steps", 800, "training steps per model")
flags.DEFINE_integer("every", 100, "report interval (steps)")
flags.DEFINE_integer("batch_size", 32, "batch size")
flags.DEFINE_float("lr", 1e-3, "peak learning rate (linear warmup, cosine decay)")
flags.DEFINE_integer("warmup_steps", 50, "warmup steps")
flags.DEFINE_integer("vit_width", 128, "ViT width")
flags.DEFINE_integer("vit_depth", 4, "ViT depth")
flags.DEFINE_integer("vit_heads", 4, "ViT heads")
flags.DEFINE_string("init_from", "", "vit: pretraining workdir to load the encoder from")
flags.DEFINE_list("vit_patch", ["4", "4"], "vit: patch (ph, pw)")
flags.DEFINE_enum("vit_stem", "patch", ["patch", "conv"], "vit: patch embedding or conv stem")
flags.DEFINE_list("vit_stem_channels", [], "vit: conv stem stage widths (default: auto)")
flags.DEFINE_enum("vit_attention_bias", "none", ["none", "alibi_2d"], "vit: attention bias")
flags.DEFINE_float("clip", 1.0, "gradient clipping norm")
flags.DEFINE_float("weight_decay", 0.05, "AdamW weight decay")
flags.DEFINE_float("random_strings", 0.0, "fraction of random strings in training labels")
flags.DEFINE_integer("max_label_length", 12, "longest training label")

CHARSET = labels.CHARSETS["36"]
CLEAN = dict(appearance=False, geometry=False, degradations=False, occluders=False)


class ConvReference(nn.Module):
  """images [B, 32, 128, 3] -> CTC logits [B, 32, K]."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    for channels, pool in ((64, (2, 2)), (128, (2, 2)), (256, (2, 1))):
      x = nn.relu(nn.LayerNorm()(nn.Conv(channels, (3, 3))(x)))
      x = nn.max_pool(x, pool, pool)
    x = x.mean(axis=1)  # [B, 32, 256]
    x = nn.relu(nn.Conv(256, (3,), padding="SAME")(x))
    return nn.Dense(self.num_classes)(x)


def generate(split, n, overrides=None):
  """(images float32 [n, 32, 128, 3] in [-1, 1], normalised labels)."""
  config = builders.synthetic_split_config({"seed": 0}, split, overrides)
  batch = synthetic.SyntheticGenerator(config).sample_batch(range(n))
  texts = [labels.normalize_label(t, CHARSET) or "" for t in batch["label"]]
  return batch["image"].astype(np.float32) / 127.5 - 1.0, texts


def build(name, tokenizer):
  """(apply(params, images) -> logits, initial params)."""
  images = jnp.zeros((1, 32, 128, 3))
  if name == "cnn":
    model = ConvReference(tokenizer.num_classes)
    return model.apply, model.init(jax.random.key(0), images)
  model = rec.Recognizer(
    num_classes=tokenizer.num_classes,
    head="ctc",
    encoder=encoder_config.EncoderConfig(
      width=FLAGS.vit_width,
      depth=FLAGS.vit_depth,
      num_heads=FLAGS.vit_heads,
      patch=tuple(int(p) for p in FLAGS.vit_patch),
      stem=FLAGS.vit_stem,
      stem_channels=tuple(int(c) for c in FLAGS.vit_stem_channels),
      attention_bias=FLAGS.vit_attention_bias,
    ),
  )
  variables = model.init(jax.random.key(0), images)
  if FLAGS.init_from:
    variables = {"params": common.load_pretrained(variables["params"], FLAGS.init_from)}
  return model.apply, variables


def train_one(name, train, test, tokenizer):
  apply, variables = build(name, tokenizer)
  warmup = min(FLAGS.warmup_steps, FLAGS.steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, warmup, FLAGS.steps, 0.0)
  optimizer = optax.chain(
    optax.clip_by_global_norm(FLAGS.clip), optax.adamw(schedule, weight_decay=FLAGS.weight_decay)
  )
  opt_state = optimizer.init(variables)

  @jax.jit
  def step(variables, opt_state, images, ids, lengths):
    def loss_fn(v):
      return rec.ctc_loss(apply(v, images), ids, lengths)

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  @jax.jit
  def predict(variables, images):
    return rec.ctc_greedy(apply(variables, images))[0]

  def word_accuracy(images, texts):
    out = []
    for i in range(0, len(images), 128):
      out += tokenizer.decode(np.asarray(predict(variables, images[i : i + 128])))
    return float(np.mean([p == t for p, t in zip(out, texts)]))

  (train_images, train_texts), (test_images, test_texts) = train, test
  train_ids, train_lengths = tokenizer.encode(train_texts, 25)
  rng = np.random.default_rng(0)
  losses, rows, start = [], [], time.time()
  for s in range(1, FLAGS.steps + 1):
    idx = rng.integers(0, len(train_texts), FLAGS.batch_size)
    variables, opt_state, loss = step(
      variables, opt_state, train_images[idx], train_ids[idx], train_lengths[idx]
    )
    losses.append(float(loss))
    if s % FLAGS.every == 0 or s == FLAGS.steps:
      rows.append(
        (
          s,
          np.mean(losses[-FLAGS.every :]),
          word_accuracy(train_images[:256], train_texts[:256]),
          word_accuracy(test_images, test_texts),
          time.time() - start,
        )
      )
      print(
        f"{name:>4} step {s:5d}  loss {rows[-1][1]:.3f}  train acc {rows[-1][2]:.3f}  "
        f"held-out acc {rows[-1][3]:.3f}  {rows[-1][4]:.0f} s",
        flush=True,
      )
  return rows


def main(argv):
  del argv
  tokenizer = tokenizer_lib.Tokenizer(CHARSET, kind="ctc")
  overrides = dict(
    fraction_random_strings=FLAGS.random_strings,
    max_label_length=FLAGS.max_label_length,
    **(CLEAN if FLAGS.train == "clean" else {}),
  )
  train = generate("train", FLAGS.num_train, overrides)
  test = generate("test_heldout_fonts", FLAGS.num_test)
  results = {name: train_one(name, train, test, tokenizer) for name in FLAGS.models}
  print(
    f"\nCTC loss / train word acc / held-out-font word acc; train={FLAGS.train}, "
    f"batch {FLAGS.batch_size}, peak lr {FLAGS.lr}"
    + (f", vit init_from={FLAGS.init_from}" if FLAGS.init_from else "")
  )
  print("| step | " + " | ".join(results) + " |")
  print("|---:|" + "---|" * len(results))
  for i, (s, *_) in enumerate(next(iter(results.values()))):
    cells = [f"{r[i][1]:.2f} / {r[i][2]:.2f} / {r[i][3]:.2f}" for r in results.values()]
    print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
