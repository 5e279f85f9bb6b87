"""Text <-> token ids over a charset, for the CTC and autoregressive (AR) heads.

Ids (N = len(charset)):

  kind='ctc':  0 = [blank], 1..N = characters.       num_classes = N + 1
  kind='ar':   0 = [E]os,   1..N = characters,
               N + 1 = [B]os, N + 2 = [P]ad.          num_classes = N + 1 (outputs)
                                                      vocab_size  = N + 3 (inputs)

An AR output class is also the input token id of that symbol, so greedy decoding
feeds argmax ids straight back. encode() is vectorised numpy; decode() cuts with
numpy masks and only joins strings in Python.
"""

from collections.abc import Sequence

import numpy as np

from mms_jax.data import labels as labels_lib

BLANK = 0
EOS = 0


class Tokenizer:
  """Encodes and decodes labels over `charset` (a name from labels.CHARSETS or chars)."""

  def __init__(self, charset: str, kind: str = "ar"):
    if kind not in ("ctc", "ar"):
      raise ValueError(f"tokenizer kind={kind!r}: use 'ctc' or 'ar'")
    charset = labels_lib.get_charset(charset)
    if len(set(charset)) != len(charset) or not charset:
      raise ValueError(f"charset {charset!r} is empty or repeats characters")
    self.charset, self.kind = charset, kind
    n = len(charset)
    self.num_classes = n + 1
    self.bos, self.pad = (n + 1, n + 2) if kind == "ar" else (None, BLANK)
    self.eos = EOS
    self.vocab_size = n + 3 if kind == "ar" else n + 1
    codes = np.array([ord(c) for c in charset], np.int64)
    self._order = np.argsort(codes)
    self._sorted_codes = codes[self._order]
    # id -> text; specials map to ''.
    self._table = np.array([""] + list(charset) + [""] * (self.vocab_size - n - 1), object)

  def __len__(self):
    return self.vocab_size

  def sequence_length(self, max_length: int) -> int:
    """Columns of encode(): max_length (+ BOS and EOS for 'ar')."""
    return max_length + 2 if self.kind == "ar" else max_length

  def encode(self, texts: Sequence[str], max_length: int):
    """texts: B strings -> (ids int32[B, T], lengths int32[B]).

    'ctc': ids = characters, then BLANK padding, T = max_length.
    'ar':  ids = [B] characters [E] [P]..., T = max_length + 2 (teacher forcing
           feeds ids[:, :-1] and predicts ids[:, 1:]).
    lengths = number of characters. Raises ValueError for labels longer than
    max_length or with characters outside the charset (normalise labels first, e.g.
    data.charset in the pipeline).
    """
    texts = [str(t) for t in texts]
    lengths = np.array([len(t) for t in texts], np.int32)
    batch, seq = len(texts), self.sequence_length(max_length)
    if batch and lengths.max() > max_length:
      i = int(np.argmax(lengths))
      raise ValueError(f"label {texts[i]!r} has {lengths[i]} > max_length={max_length} characters")
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32).astype(np.int64)
    where = np.clip(np.searchsorted(self._sorted_codes, codes), 0, len(self.charset) - 1)
    known = self._sorted_codes[where] == codes
    if not known.all():
      bad = sorted({chr(c) for c in codes[~known]})
      raise ValueError(
        f"characters {bad} are not in the charset {self.charset!r}; "
        "normalise labels first (config.data.charset)"
      )
    char_ids = (self._order[where] + 1).astype(np.int32)
    ids = np.full((batch, seq), self.pad, np.int32)
    rows = np.repeat(np.arange(batch), lengths)
    cols = np.arange(len(codes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    offset = 1 if self.kind == "ar" else 0
    ids[rows, cols + offset] = char_ids
    if self.kind == "ar":
      ids[:, 0] = self.bos
      ids[np.arange(batch), lengths + 1] = EOS
    return ids, lengths

  def encode_labels(self, labels, max_length: int):
    """encode() of raw labels, normalised to the charset first (the synthetic source
    yields raw labels); a longer label is cut to max_length."""
    texts = [
      (labels_lib.normalize_label(str(t), self.charset, None) or "")[:max_length] for t in labels
    ]
    return self.encode(texts, max_length)

  def decode(self, ids) -> list[str]:
    """ids: int[B, T] -> B strings.

    'ar': stops at the first EOS; BOS / PAD are skipped. 'ctc': blanks are
    skipped (collapse repeats first: models.recognition.ctc_greedy).
    """
    ids = np.asarray(ids)
    if ids.ndim == 1:
      ids = ids[None]
    ids = np.clip(ids, 0, self.vocab_size - 1)
    keep = ids != BLANK
    if self.kind == "ar":
      keep &= np.cumsum(ids == EOS, axis=1) == 0
    chars = np.where(keep, self._table[ids], "")
    return ["".join(row) for row in chars]
