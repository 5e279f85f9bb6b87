"""Label normalisation and charsets."""

import string

import pytest

from mms_jax.data import labels


def test_charset_sizes():
  assert len(labels.CHARSET_36) == 36
  assert len(labels.CHARSET_62) == 62
  assert len(labels.CHARSET_90) == len(set(labels.CHARSET_90)) == 90
  assert len(labels.CHARSET_94) == len(set(labels.CHARSET_94)) == 94
  assert set(labels.CHARSET_94) == set(string.printable) - set(string.whitespace)
  assert " " in labels.CHARSET_90 and not set("`^{|}") & set(labels.CHARSET_90)
  assert set(labels.CHARSET_36) < set(labels.CHARSET_62) < set(labels.CHARSET_94)
  assert labels.get_charset("36") == labels.DIGITS_LOWER_36


@pytest.mark.parametrize(
  "raw, expected",
  [
    ("Hello", "hello"),
    ("  padded\t\n", "padded"),
    ("Café", "cafe"),  # accent dropped after NFKD
    ("naïve", "naive"),
    ("ﬁsh", "fish"),  # ligature decomposes
    ("ＡＢＣ１２", "abc12"),  # fullwidth -> ASCII
    ("don't stop!", "dontstop"),  # punctuation and inner space filtered in 36 mode
    ("日本2024", "2024"),
    ("x" * 25, "x" * 25),
  ],
)
def test_normalize_36(raw, expected):
  assert labels.normalize_label(raw, labels.CHARSET_36, 25) == expected


@pytest.mark.parametrize("raw", ["", "   ", "\t", "日本", "!!!", "x" * 26, "ab" * 20])
def test_normalize_rejects(raw):
  assert labels.normalize_label(raw, labels.CHARSET_36, 25) is None


def test_reasons():
  assert labels.check_label("   ") == (None, labels.LABEL_EMPTY)
  assert labels.check_label("x" * 30, max_length=25) == (None, labels.LABEL_TOO_LONG)
  assert labels.check_label("x" * 30, max_length=None) == ("x" * 30, None)


@pytest.mark.parametrize(
  "charset, raw, expected",
  [
    ("94", "Café!", "Cafe!"),
    ("94", "ＡＢ c", "ABc"),  # no space in the 94 set
    ("90", "New York!", "New York!"),
    ("90", "a{b}|c", "abc"),
    ("62", "Hi-There", "HiThere"),
  ],
)
def test_case_sensitive_charsets(charset, raw, expected):
  assert labels.normalize_label(raw, charset, 25) == expected


def test_case_override_and_raw_mode():
  assert labels.normalize_label("ABc", "94", 25, case_sensitive=False) == "abc"
  # charset None: only strip + length checks, no ASCII folding.
  assert labels.normalize_label("  Café ", None, 25) == "Café"
