"""Starting a recognizer from a trained one: its head's tensors under a new charset.

  class_map(old, new, inputs=False) -> int[K_new]
      For each class (inputs=True: each input token) of tokenizer `new`, the class of
      the same symbol in tokenizer `old`, -1 where `new` has a symbol `old` lacks.
  transfer_head(fresh_head, loaded_head, old, new) -> head params
      `fresh_head` (a freshly initialised 'head' tree) with every tensor of
      `loaded_head` put in place. Charset-sized axes keep the rows of the symbols both
      tokenizers share and the fresh rows of the new ones; the AR query positions keep
      the first min(old, new) positions (a longer max_length adds fresh ones).

Charset-sized tensors (ids as in data/tokenizer.py):
  'logits/kernel' [D, K], 'logits/bias' [K]    the output classes (CTC and AR)
  'token_embed/embedding' [V, W]               the AR input tokens ([B]os, [P]ad too)
"""

import numpy as np

from mms_jax.models import encoder_weights

_OUTPUT_CLASSES = ("logits/kernel", "logits/bias")  # classes on the last axis
_INPUT_TOKENS = ("token_embed/embedding",)  # tokens on the first axis
_POSITIONS = ("query_pos_embed",)  # [1, positions, W]


def class_map(old, new, inputs=False):
  """int[K_new]: the `old` class of each `new` class (-1: a symbol `old` lacks)."""
  size = new.vocab_size if inputs else new.num_classes
  index = np.full(size, -1, np.int64)
  index[0] = 0  # CTC [blank] / AR [E]os
  old_class = {c: i + 1 for i, c in enumerate(old.charset)}
  for i, c in enumerate(new.charset):
    index[i + 1] = old_class.get(c, -1)
  if inputs and new.kind == "ar":
    index[new.bos], index[new.pad] = old.bos, old.pad
  return index


def _take(fresh, loaded, index, axis):
  """`fresh` with loaded's entries index[i] (where >= 0) along `axis`."""
  out = np.moveaxis(np.array(fresh, copy=True), axis, 0)
  src = np.moveaxis(np.asarray(loaded), axis, 0)
  keep = index >= 0
  out[keep] = src[index[keep]]
  return np.moveaxis(out, 0, axis)


def transfer_head(fresh_head, loaded_head, old, new):
  """The head params of a recognizer with tokenizer `new`, from one with `old`."""
  if old.kind != new.kind:
    raise ValueError(f"a {old.kind} head cannot start a {new.kind} head")
  fresh = encoder_weights.flatten(fresh_head)
  loaded = {k: np.asarray(v) for k, v in encoder_weights.flatten(loaded_head).items()}
  missing = sorted(set(fresh) - set(loaded))
  if missing:
    raise ValueError(f"the trained head has no {missing} (it has {sorted(loaded)})")
  out = {}
  for name, target in fresh.items():
    value = loaded[name]
    if name in _OUTPUT_CLASSES:
      value = _take(target, value, class_map(old, new), axis=-1)
    elif name in _INPUT_TOKENS:
      value = _take(target, value, class_map(old, new, inputs=True), axis=0)
    elif name in _POSITIONS:
      n = min(value.shape[1], target.shape[1])
      value = np.concatenate([value[:, :n], np.asarray(target)[:, n:]], axis=1)
    if value.shape != tuple(target.shape):
      raise ValueError(
        f"head tensor {name}: trained {value.shape} vs model {tuple(target.shape)}; "
        "the head's config (config.model.decoder_*) must match the trained recognizer's"
      )
    out[name] = encoder_weights.put(value, target)
  return encoder_weights.unflatten(out)
