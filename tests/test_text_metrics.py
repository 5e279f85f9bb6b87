"""Word accuracy and 1 - NED: hand-computed cases, the normalisation protocol, and the
edit distance against a plain dynamic programme and the editdistance library."""

import random

import pytest

from mms_jax.evaluate import text_metrics as tm


def _levenshtein_dp(a, b):
  row = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    prev, row[0] = row[0], i
    for j, cb in enumerate(b, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
  return row[-1]


def test_hand_computed_cases():
  assert tm.edit_distance("kitten", "sitting") == 3
  assert tm.normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
  assert tm.normalized_edit_distance("", "") == 0.0
  assert tm.normalized_edit_distance("abc", "") == 1.0
  # gt 'hello' vs pred 'hallo': 1 substitution over max(5, 5).
  s = tm.score(["hello", "world", "abc"], ["hallo", "world", "abcd"])
  assert s["num"] == 3
  assert s["word_accuracy"] == pytest.approx(1 / 3)
  assert s["one_minus_ned"] == pytest.approx((0.8 + 1.0 + 0.75) / 3)


def test_normalisation_protocol():
  # 36-character mode: case, accents, punctuation and spaces do not count.
  assert tm.normalize(" Café-Bar! ") == "cafebar"
  assert tm.score(["Café"], ["CAFE"])["word_accuracy"] == 1.0
  assert tm.score(["Hello!"], ["hello"], charset="36")["word_accuracy"] == 1.0
  # Case-sensitive modes: 62 keeps case; 94 keeps punctuation too.
  assert tm.score(["Hello"], ["hello"], charset="62")["word_accuracy"] == 0.0
  assert tm.score(["Hello!"], ["Hello"], charset="62")["word_accuracy"] == 1.0
  assert tm.score(["Hello!"], ["Hello"], charset="94")["word_accuracy"] == 0.0
  assert tm.score(["Hello!"], ["Hello"], charset="94")["one_minus_ned"] == pytest.approx(5 / 6)


def test_counts_add_up_to_a_sample_weighted_average():
  a = tm.counts(["a", "b"], ["a", "x"])  # 1 of 2
  b = tm.counts(["c"] * 8, ["c"] * 8)  # 8 of 8
  total = tm.summarize(tm.add_counts(a, b))
  assert total["num"] == 10 and total["word_accuracy"] == pytest.approx(0.9)
  assert tm.summarize(tm.add_counts())["word_accuracy"] == 0.0


def test_distance_matches_a_dp_and_editdistance():
  editdistance = pytest.importorskip("editdistance")
  rng = random.Random(0)
  for _ in range(300):
    a = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 9)))
    b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 9)))
    d = tm.edit_distance(a, b)
    assert d == _levenshtein_dp(a, b) == editdistance.eval(a, b)
