"""Character sets and label normalisation for scene-text recognition.

The community evaluation protocol (docs/method.md §4) normalises labels and predictions
the same way: strip, NFKD to ASCII, lowercase and keep the 36 characters 0-9a-z.
A case-sensitive mode keeps the 94 printable ASCII characters.
"""

import string
import unicodedata

# 0-9a-z: the standard case-insensitive evaluation charset.
CHARSET_36 = string.digits + string.ascii_lowercase
# 0-9a-zA-Z.
CHARSET_62 = string.digits + string.ascii_lowercase + string.ascii_uppercase
# string.printable minus whitespace: 0-9a-zA-Z and the 32 ASCII punctuation marks.
CHARSET_94 = CHARSET_62 + string.punctuation
# Our 90-symbol set (a space-aware training charset): 0-9a-zA-Z, the space, and the
# 32 ASCII punctuation marks minus the five that almost never occur in scene text:
# backquote, caret, and the curly braces / vertical bar ` ^ { | }.
# That is 62 + 1 + 27 = 90 symbols.
_RARE_PUNCTUATION = "`^{|}"
CHARSET_90 = CHARSET_62 + " " + "".join(c for c in string.punctuation if c not in _RARE_PUNCTUATION)

DIGITS_LOWER_36 = CHARSET_36
ALNUM_62 = CHARSET_62
PRINTABLE_94 = CHARSET_94
STR_90 = CHARSET_90

CHARSETS = {
  "36": CHARSET_36,
  "62": CHARSET_62,
  "90": CHARSET_90,
  "94": CHARSET_94,
}

# Reasons returned by `check_label`, also used as skip-count keys.
LABEL_EMPTY = "label_empty"
LABEL_TOO_LONG = "label_too_long"


def get_charset(name_or_chars: str) -> str:
  """Returns a charset given its name ('36', '62', '90', '94') or its characters."""
  return CHARSETS.get(str(name_or_chars), name_or_chars)


def is_case_sensitive(charset: str) -> bool:
  """A charset is case sensitive when it holds upper-case letters."""
  return any(c.isupper() for c in charset)


def to_ascii(text: str) -> str:
  """NFKD decomposition, then drop every non-ASCII code point.

  'é' -> 'e' (base letter + dropped combining accent), 'ﬁ' -> 'fi',
  fullwidth 'Ａ' -> 'A'; characters with no ASCII decomposition vanish.
  """
  return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def check_label(
  label: str,
  charset: str | None = CHARSET_36,
  max_length: int | None = 25,
  case_sensitive: bool | None = None,
) -> tuple[str | None, str | None]:
  """Normalises a label and says why it was rejected.

  Args:
    label: raw label text.
    charset: kept characters (a name from CHARSETS or the characters themselves);
      None keeps the stripped label unchanged (no ASCII folding, no filtering).
    max_length: longest accepted label after normalisation; None for no limit.
    case_sensitive: False lowercases before filtering; None infers it from the
      charset (a charset without upper-case letters is case insensitive).

  Returns:
    (normalised label, None) or (None, reason) with reason in
    {LABEL_EMPTY, LABEL_TOO_LONG}.
  """
  text = label.strip()
  if charset is not None:
    charset = get_charset(charset)
    if case_sensitive is None:
      case_sensitive = is_case_sensitive(charset)
    text = to_ascii(text)
    if not case_sensitive:
      text = text.lower()
    allowed = set(charset)
    text = "".join(c for c in text if c in allowed).strip()
  if not text:
    return None, LABEL_EMPTY
  if max_length is not None and len(text) > max_length:
    return None, LABEL_TOO_LONG
  return text, None


def normalize_label(
  label: str,
  charset: str | None = CHARSET_36,
  max_length: int | None = 25,
  case_sensitive: bool | None = None,
) -> str | None:
  """Community normalisation; None when the result is empty or too long.

  With the 36-character charset: strip, NFKD to ASCII, lowercase, keep 0-9a-z.
  With other charsets: the same, without lowercasing when the charset has
  upper-case letters (or `case_sensitive=True`). See `check_label` for the args.
  """
  return check_label(label, charset, max_length, case_sensitive)[0]
