"""Tokenizer: ids layout, round trips, EOS stop, errors."""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from mms_jax.data import labels
from mms_jax.data import tokenizer as tok_lib


def test_ar_layout_and_decode_stops_at_eos():
  t = tok_lib.Tokenizer("36", "ar")
  assert (t.num_classes, t.vocab_size, t.bos, t.pad) == (37, 39, 37, 38)
  ids, lengths = t.encode(["ab", "", "z9"], max_length=3)
  np.testing.assert_array_equal(
    ids, [[37, 11, 12, 0, 38], [37, 0, 38, 38, 38], [37, 36, 10, 0, 38]]
  )
  np.testing.assert_array_equal(lengths, [2, 0, 2])
  assert t.decode(ids[:, 1:]) == ["ab", "", "z9"]
  # Everything after the first EOS is ignored, BOS / PAD are skipped.
  assert t.decode([[11, 37, 12, 0, 13, 14], [38, 13, 0, 0, 0, 0]]) == ["ab", "c"]


def test_ctc_layout():
  t = tok_lib.Tokenizer("abc", "ctc")
  assert (t.num_classes, t.vocab_size) == (4, 4)
  ids, lengths = t.encode(["cab", "a"], max_length=4)
  np.testing.assert_array_equal(ids, [[3, 1, 2, 0], [1, 0, 0, 0]])
  assert t.decode(ids) == ["cab", "a"]
  assert t.decode([0, 2, 0, 2]) == ["bb"]  # blanks dropped (collapse happens before)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["36", "62", "94", "90"]), st.sampled_from(["ar", "ctc"]), st.data())
def test_round_trip(name, kind, data):
  charset = labels.get_charset(name)
  texts = data.draw(st.lists(st.text(alphabet=charset, max_size=7), min_size=1, max_size=5))
  t = tok_lib.Tokenizer(name, kind)
  ids, lengths = t.encode(texts, max_length=7)
  assert ids.dtype == np.int32 and ids.shape == (len(texts), t.sequence_length(7))
  np.testing.assert_array_equal(lengths, [len(x) for x in texts])
  assert t.decode(ids[:, 1:] if kind == "ar" else ids) == texts


def test_errors_name_the_problem():
  t = tok_lib.Tokenizer("36", "ar")
  with pytest.raises(ValueError, match="'abcdef' has 6 > max_length=5"):
    t.encode(["ab", "abcdef"], 5)
  with pytest.raises(ValueError, match=r"\['\?', 'A'\] are not in the charset"):
    t.encode(["aA?"], 5)
  with pytest.raises(ValueError, match="kind"):
    tok_lib.Tokenizer("36", "attention")
