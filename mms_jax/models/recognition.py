"""Text recognition: the ViT encoder (all tokens) + a CTC or autoregressive head.

Heads:
  'ctc': the encoder's patch tokens [B, gh * gw, D] are laid back on the grid and
         averaged over the gh rows of each column, giving one feature per column:
         a left-to-right sequence [B, gw, D] (gw = W / pw, 32 for 32x128 images with
         4x4 patches; CTC needs gw >= 2 * label length - 1 in the worst case). A linear
         layer maps it to charset + blank. The cls token is not used.
  'ar':  a pre-norm transformer decoder: token embedding + learned query position
         embedding, then per layer causal self-attention, cross-attention to all
         encoder tokens (cls included, projected to the decoder width), MLP; final
         norm and a linear layer over [E]os + charset. Teacher forcing in training.

Losses and greedy decoding are functions outside the module. Ids follow
data/tokenizer.py. Shapes: B batch, T text positions, K classes, D widths.
"""

import dataclasses
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mms_jax import checkpoints
from mms_jax import errors
from mms_jax.data import labels
from mms_jax.data import tokenizer as tokenizer_lib
from mms_jax.models import encoder_config
from mms_jax.models import vit


class CrossAttention(nn.Module):
  """Multi-head attention of queries x [B, T, D] over memory m [B, S, D]."""

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, memory, mask=None):
    """mask: bool broadcastable to [B, heads, T, S], True = may attend."""
    b, t, d = x.shape
    hd = d // self.num_heads
    q = vit.dense(d, self.dtype, "q")(x).reshape(b, t, self.num_heads, hd)
    kv = vit.dense(2 * d, self.dtype, "kv")(memory).reshape(b, -1, 2, self.num_heads, hd)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd**-0.5), k).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return vit.dense(d, self.dtype, "proj")(out)


class DecoderLayer(nn.Module):
  """x + self_attn(norm(x), causal); x + cross_attn(norm(x), memory); x + mlp(norm(x))."""

  num_heads: int
  mlp_ratio: int = 4
  gelu: str = "erf"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, memory):
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    h = vit.layer_norm(self.dtype, "norm1")(x)
    x = x + CrossAttention(self.num_heads, self.dtype, name="self_attn")(h, h, causal)
    h = vit.layer_norm(self.dtype, "norm2")(x)
    x = x + CrossAttention(self.num_heads, self.dtype, name="cross_attn")(h, memory)
    h = vit.layer_norm(self.dtype, "norm3")(x)
    return x + vit.Mlp(self.mlp_ratio, self.gelu, self.dtype, name="mlp")(h)


class ARDecoder(nn.Module):
  """tokens int[B, T] (input ids), memory [B, S, D_enc] -> logits [B, T, K]."""

  num_classes: int
  vocab_size: int
  max_positions: int
  width: int = 384
  depth: int = 6
  num_heads: int = 8
  mlp_ratio: int = 4
  gelu: str = "erf"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, memory):
    t = tokens.shape[1]
    if t > self.max_positions:
      raise ValueError(f"{t} text positions > max_positions={self.max_positions}")
    memory = vit.dense(self.width, self.dtype, "memory_proj")(memory)
    embed = nn.Embed(
      self.vocab_size,
      self.width,
      param_dtype=jnp.float32,
      embedding_init=nn.initializers.normal(0.02),
      name="token_embed",
    )
    pos = self.param(
      "query_pos_embed",
      nn.initializers.normal(0.02),
      (1, self.max_positions, self.width),
      jnp.float32,
    )
    x = (embed(tokens) * np.sqrt(self.width) + pos[:, :t]).astype(self.dtype)
    for i in range(self.depth):
      x = DecoderLayer(self.num_heads, self.mlp_ratio, self.gelu, self.dtype, name=f"layers_{i}")(
        x, memory
      )
    x = vit.layer_norm(self.dtype, "norm")(x)
    return vit.dense(self.num_classes, self.dtype, "logits")(x).astype(jnp.float32)


class CTCHead(nn.Module):
  """x [B, 1 + gh * gw, D] (cls first) -> logits [B, gw, K] (column average, linear)."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid):
    gh, gw = grid
    cols = x[:, 1:].reshape(x.shape[0], gh, gw, x.shape[-1]).mean(axis=1)  # [B, gw, D]
    return vit.dense(self.num_classes, self.dtype, "logits")(cols).astype(jnp.float32)


class Recognizer(nn.Module):
  """vit.Encoder + a 'ctc' or 'ar' head; params {'encoder': ..., 'head': ...}.

  Call (teacher forcing for 'ar'):
    model.apply(v, images)                 -> ctc logits [B, gw, K]
    model.apply(v, images, tokens_in)      -> ar logits  [B, T, K]
  Greedy inference: `predict` (returns ids [B, max_length + 1] for 'ar', collapsed
  ids [B, gw] for 'ctc'; decode both with tokenizer.decode).
  """

  num_classes: int
  head: str = "ar"
  vocab_size: int = 0  # 'ar' input vocabulary (tokenizer.vocab_size)
  bos: int = 0
  eos: int = 0
  max_length: int = 25
  encoder: encoder_config.EncoderConfig = encoder_config.EncoderConfig()
  decoder_width: int = 384
  decoder_depth: int = 6
  decoder_num_heads: int = 8
  decoder_mlp_ratio: int = 4
  gelu: str = "erf"
  dtype: Any = jnp.float32
  scan_layers: bool = False
  attention: str = "auto"  # vit.Attention's formulation ('plain' for exports)

  def setup(self):
    if self.head not in ("ctc", "ar"):
      raise ValueError(f"head={self.head!r}: use 'ctc' or 'ar'")
    self.vit = encoder_config.build(
      self.encoder,
      gelu=self.gelu,
      dtype=self.dtype,
      scan_layers=self.scan_layers,
      attention=self.attention,
      name="encoder",
    )
    if self.head == "ar":
      self.decoder = ARDecoder(
        self.num_classes,
        self.vocab_size,
        self.max_length + 1,
        self.decoder_width,
        self.decoder_depth,
        self.decoder_num_heads,
        self.decoder_mlp_ratio,
        self.gelu,
        self.dtype,
        name="head",
      )
    else:
      self.ctc_head = CTCHead(self.num_classes, self.dtype, name="head")

  def encode(self, images):
    """images [B, H, W, 3] -> memory [B, 1 + L, D]."""
    return self.vit(images)[0]

  def ctc_logits(self, images):
    """images -> logits [B, gw, K]."""
    grid = vit.grid_shape(images.shape[1:3], self.encoder.patch)
    return self.ctc_head(self.encode(images), grid)

  def decode(self, tokens, memory):
    """tokens int[B, T], memory [B, S, D] -> logits [B, T, K]."""
    return self.decoder(tokens, memory)

  def __call__(self, images, tokens_in=None, train=False):
    del train
    if self.head == "ctc":
      return self.ctc_logits(images)
    if tokens_in is None:
      raise ValueError("the 'ar' head needs tokens_in (teacher forcing); use predict")
    return self.decode(tokens_in, self.encode(images))

  def predict(self, images):
    """Greedy decoding with a fixed length (jittable); ids for tokenizer.decode."""
    if self.head == "ctc":
      return ctc_greedy(self.ctc_logits(images))[0]
    memory = self.encode(images)
    return ar_greedy(
      lambda tokens: self.decode(tokens, memory),
      images.shape[0],
      self.max_length + 1,
      self.bos,
      self.eos,
    )[0]

  def predict_scored(self, images):
    """(ids as `predict` returns them, confidence float32[B]): the confidence is the
    probability of the greedy path (CTC: the product over frames of the best class'
    probability; AR: the product of the chosen tokens' probabilities up to and
    including the first [E]os)."""
    if self.head == "ctc":
      logits = self.ctc_logits(images)
      best = jax.nn.log_softmax(logits, axis=-1).max(axis=-1)  # [B, gw]
      return ctc_greedy(logits)[0], jnp.exp(best.sum(axis=-1))
    memory = self.encode(images)
    ids, logits = ar_greedy(
      lambda tokens: self.decode(tokens, memory),
      images.shape[0],
      self.max_length + 1,
      self.bos,
      self.eos,
    )
    best = jax.nn.log_softmax(logits, axis=-1).max(axis=-1)  # [B, T]
    eos_before = jnp.cumsum(ids == self.eos, axis=1) - (ids == self.eos)
    return ids, jnp.exp(jnp.sum(jnp.where(eos_before == 0, best, 0.0), axis=-1))


def from_config(m, tokenizer, encoder=None) -> Recognizer:
  """The Recognizer of a recognition config's `model` field (ConfigDict or the dict of
  a run's config.json, older flat ones too) and its tokenizer (data/tokenizer.py);
  `encoder` (a complete encoder section) replaces the one in `m`."""
  return Recognizer(
    num_classes=tokenizer.num_classes,
    head=m["head"],
    vocab_size=tokenizer.vocab_size,
    bos=tokenizer.bos or 0,
    eos=tokenizer.eos,
    max_length=m["max_length"],
    decoder_width=m["decoder_width"],
    decoder_depth=m["decoder_depth"],
    decoder_num_heads=m["decoder_num_heads"],
    decoder_mlp_ratio=m.get("decoder_mlp_ratio", 4),
    gelu=m.get("gelu", "erf"),
    dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.get("dtype", "float32")],
    scan_layers=m.get("scan_layers", False),
    encoder=encoder_config.EncoderConfig.of(encoder or encoder_config.of_model(m)),
  )


# ------------------------------------------------------------------------------------
# A trained recognizer.
# ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Trained:
  """A trained recognizer as `load` returns it: params are numpy arrays (any device
  count), run_config the dict of its run's config."""

  model: Recognizer
  tokenizer: Any
  params: Any
  run_config: dict
  step_dir: pathlib.Path

  @property
  def step(self):
    return int(self.step_dir.name) if self.step_dir.name.isdigit() else -1


def load(path, *, what="workdir"):
  """The trained recognizer of a recognition workdir or step directory (its latest good
  checkpoint; the run's config rebuilds model and tokenizer, so the training data need
  not exist where it is loaded). Raises checkpoints.CheckpointError (a missing or
  corrupt checkpoint) or errors.ConfigError (another program's run, a bad model
  config), their messages naming `what`."""
  step_dir = checkpoints.resolve_checkpoint(path, what=what)
  run_config = checkpoints.step_run_config(step_dir)
  if run_config.get("program") != "recognition":
    raise errors.ConfigError(
      f"{what}={str(path)!r} is a {run_config.get('program')!r} run, not a recognition "
      "one: point it at a fine-tuned recognizer (configs/finetune_recognition.py)"
    )
  try:
    m = run_config["model"]
    tokenizer = tokenizer_lib.Tokenizer(labels.get_charset(run_config["charset"]), m["head"])
    model = from_config(m, tokenizer)
  except (errors.ConfigError, ValueError, KeyError) as e:
    raise errors.ConfigError(f"{what}={str(path)!r}: its run config: {e}") from None
  params = jax.tree.map(np.asarray, checkpoints.load_params(step_dir, what=what))
  return Trained(model, tokenizer, params, run_config, step_dir)


# ------------------------------------------------------------------------------------
# Losses.
# ------------------------------------------------------------------------------------
def ar_loss(logits, targets, pad_id, label_smoothing=0.0):
  """Mean token cross-entropy over non-pad targets.

  logits [B, T, K]; targets int[B, T] (tokenizer ids[:, 1:]: characters, EOS, PAD).
  Returns (loss, token accuracy).
  """
  k = logits.shape[-1]
  valid = (targets != pad_id).astype(jnp.float32)
  labels = optax.smooth_labels(jax.nn.one_hot(jnp.minimum(targets, k - 1), k), label_smoothing)
  per_token = optax.softmax_cross_entropy(logits, labels)
  count = jnp.maximum(valid.sum(), 1.0)
  accuracy = ((logits.argmax(-1) == targets) * valid).sum() / count
  return (per_token * valid).sum() / count, accuracy


def ctc_loss_per_char(logits, labels, label_lengths, blank_id=0):
  """CTC over all gw frames, divided by the label length: float32[B].

  logits [B, T, K]; labels int[B, N] (padded); label_lengths int[B].
  """
  b, t, _ = logits.shape
  label_paddings = jnp.arange(labels.shape[1])[None] >= label_lengths[:, None]
  per_seq = optax.ctc_loss(
    logits,
    jnp.zeros((b, t), jnp.float32),
    labels,
    label_paddings.astype(jnp.float32),
    blank_id=blank_id,
  )
  return per_seq / jnp.maximum(label_lengths, 1)


def ctc_loss(logits, labels, label_lengths, blank_id=0):
  """The batch mean of ctc_loss_per_char."""
  return jnp.mean(ctc_loss_per_char(logits, labels, label_lengths, blank_id))


# ------------------------------------------------------------------------------------
# Greedy decoding.
# ------------------------------------------------------------------------------------
def ctc_greedy(logits, blank_id=0):
  """Argmax, collapse repeats, drop blanks; jittable, fixed shape.

  logits [B, T, K] -> (ids int32[B, T]: kept ids first, then blank_id padding;
  lengths int32[B]). Finish with tokenizer.decode (which skips blanks).
  """
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  prev = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  keep = (best != blank_id) & (best != prev)
  order = jnp.argsort(~keep, axis=1, stable=True)  # kept positions first, in order
  ids = jnp.where(
    jnp.take_along_axis(keep, order, 1), jnp.take_along_axis(best, order, 1), blank_id
  )
  return ids, keep.sum(axis=1).astype(jnp.int32)


def ar_greedy(step_logits, batch, num_steps, bos, eos):
  """Greedy autoregressive decoding over a fixed-size token buffer.

  step_logits(tokens int32[B, num_steps]) -> logits [B, num_steps, K]; position t
  must depend on tokens[:, :t + 1] only (causal). Each of the num_steps iterations
  re-runs it on the buffer (no KV cache: O(T) decoder passes) and writes the argmax
  of position t into position t + 1. Once a row emitted EOS, later outputs are EOS.

  Returns (ids int32[B, num_steps]: output classes, EOS-padded; logits of the
  chosen path [B, num_steps, K]).
  """
  tokens = jnp.full((batch, num_steps), eos, jnp.int32).at[:, 0].set(bos)
  out = jnp.full((batch, num_steps), eos, jnp.int32)

  def body(t, carry):
    tokens, out, done = carry
    logits = step_logits(tokens)
    pick = jnp.where(done, eos, jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32))
    out = out.at[:, t].set(pick)
    nxt = jnp.minimum(t + 1, num_steps - 1)
    tokens = jnp.where(t + 1 < num_steps, tokens.at[:, nxt].set(pick), tokens)
    return tokens, out, done | (pick == eos)

  tokens, out, _ = jax.lax.fori_loop(0, num_steps, body, (tokens, out, jnp.zeros((batch,), bool)))
  return out, step_logits(tokens)
