"""Scene-text recognition metrics under the community protocol (docs/method.md §4).

Both the ground truth and the prediction are normalised with labels.normalize_label
over the evaluation charset before scoring:
  '36' (default): strip, NFKD to ASCII, lowercase, keep 0-9a-z  (case-insensitive)
  '62' / '94':    the same without lowercasing                  (case-sensitive)

Metrics, as fractions in [0, 1]:
  word accuracy  = mean of [normalised prediction == normalised ground truth]
  1 - NED        = mean of 1 - levenshtein(gt, pred) / max(len(gt), len(pred)),
                   with 1 for two empty strings (the convention parseq reports).
The edit distance is rapidfuzz's Levenshtein (unit insert/delete/substitute costs).

Counts add up (`add_counts`), so averages over benchmarks weight every sample equally.
"""

from collections.abc import Iterable
from collections.abc import Mapping

from rapidfuzz.distance import Levenshtein

from mms_jax.data import labels as labels_lib

DEFAULT_CHARSET = "36"


def normalize(text: str, charset: str = DEFAULT_CHARSET, case_sensitive: bool | None = None) -> str:
  """The protocol's normalisation; '' when nothing is left (no length limit)."""
  return (
    labels_lib.normalize_label(text, charset, max_length=None, case_sensitive=case_sensitive) or ""
  )


def edit_distance(a: str, b: str) -> int:
  return Levenshtein.distance(a, b)


def normalized_edit_distance(gt: str, pred: str) -> float:
  """levenshtein / max(len(gt), len(pred)); 0 for two empty strings."""
  longest = max(len(gt), len(pred))
  return edit_distance(gt, pred) / longest if longest else 0.0


def counts(
  gts: Iterable[str],
  preds: Iterable[str],
  charset: str = DEFAULT_CHARSET,
  case_sensitive: bool | None = None,
) -> dict:
  """Sums over samples: {'num', 'correct', 'one_minus_ned_sum'} (normalised first)."""
  num = correct = 0
  score = 0.0
  for gt, pred in zip(gts, preds, strict=True):
    gt, pred = normalize(gt, charset, case_sensitive), normalize(pred, charset, case_sensitive)
    num += 1
    correct += gt == pred
    score += 1.0 - normalized_edit_distance(gt, pred)
  return {"num": num, "correct": correct, "one_minus_ned_sum": score}


def add_counts(*many: Mapping[str, float]) -> dict:
  out = {"num": 0, "correct": 0, "one_minus_ned_sum": 0.0}
  for c in many:
    for k in out:
      out[k] += c[k]
  return out


def summarize(c: Mapping[str, float]) -> dict:
  """Counts -> {'num', 'word_accuracy', 'one_minus_ned'} (0 for an empty set)."""
  n = c["num"]
  return {
    "num": int(n),
    "word_accuracy": c["correct"] / n if n else 0.0,
    "one_minus_ned": c["one_minus_ned_sum"] / n if n else 0.0,
  }


def score(gts, preds, charset: str = DEFAULT_CHARSET, case_sensitive: bool | None = None) -> dict:
  """Word accuracy and 1 - NED of predictions against ground truths."""
  return summarize(counts(gts, preds, charset, case_sensitive))
