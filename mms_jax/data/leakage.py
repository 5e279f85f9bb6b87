r"""Training images that also sit in a tree's evaluation splits (train/test leakage).

  python -m mms_jax.data.leakage --source=folder --path=/data/my_words \
      [--train=train] [--eval=test,val] [--out=leaks.tsv] [--max_distance=40]

A copy of a test image in the training data inflates every score measured on it (peers
have had to drop thousands of benchmark images from their training sets for exactly
this). Each image is reduced to two fingerprints: the hash of its decoded pixels (exact
duplicates) and a 256-bit perceptual hash (near duplicates: the same crop re-encoded,
resized, brightened): the signs, against their median, of the lowest 8 x 32 DCT
coefficients of its greyscale at 32 x 128 with the contrast stretched. A pair is a near
duplicate when their hashes differ in at most `max_distance` bits. On 400 generated
crops, two different words differ in 80 bits or more, and a copy re-encoded as JPEG
(quality 40-75), resized by 0.7-1.5x or brightened by 20 % in at most 50, in 38 or fewer
for 99 % of them (tests/test_leakage.py checks both sides of the threshold).

The recognition program runs this before training on a tree of the user's (the list
goes to <workdir>/leakage.tsv, the count to the log) when its training split has at most
`MAX_AUTOMATIC` images; for larger trees run this command once instead.
"""

import hashlib

import numpy as np
from PIL import Image
import scipy.fft

HASH_SIZE = (128, 32)  # (width, height) of the greyscale whose DCT is hashed
MAX_DISTANCE = 40  # bits of 256
MAX_AUTOMATIC = 50_000  # training images checked by the program itself


def fingerprints(image):
  """(exact: bytes, perceptual: uint64[4]) of a uint8 [h, w, 3] image."""
  image = np.ascontiguousarray(image)
  exact = hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).digest()
  grey = np.asarray(
    Image.fromarray(image).convert("L").resize(HASH_SIZE, Image.BILINEAR), np.float32
  )
  lo, hi = np.percentile(grey, 2), np.percentile(grey, 98)
  grey = (grey - lo) / max(hi - lo, 1e-3)
  low = scipy.fft.dctn(grey, norm="ortho")[:8, :32].ravel()[1:]  # 255 coefficients, no DC
  bits = np.append(low > np.median(low), False)
  return exact, np.packbits(bits).view(">u8").astype(np.uint64)


def fingerprint_source(source, progress=None):
  """(keys, exact hashes, perceptual hashes uint64[n, 4]) of a formats.Reader's good
  records (bad records are skipped, as training skips them)."""
  keys, exact, perceptual = [], [], []
  for i in range(len(source)):
    example = source[i]
    if example is None:
      continue
    e, p = fingerprints(example["image"])
    keys.append(source.key(i))
    exact.append(e)
    perceptual.append(p)
    if progress and (i + 1) % 10_000 == 0:
      progress(i + 1, len(source))
  return keys, exact, np.stack(perceptual) if perceptual else np.zeros((0, 4), np.uint64)


def hamming(a, b):
  """int[len(a), len(b)]: differing bits between rows of uint64[., 4] arrays."""
  out = np.empty((len(a), len(b)), np.int32)
  for start in range(0, len(a), 64):
    chunk = a[start : start + 64, None, :] ^ b[None, :, :]
    out[start : start + 64] = np.bitwise_count(chunk).sum(axis=-1)
  return out


def find(train, evaluated, max_distance=MAX_DISTANCE):
  """[(evaluated key, train key, distance, 'exact' | 'near')] for every evaluated image
  that has a duplicate among the training images (the closest one); both arguments are
  fingerprint_source results."""
  train_keys, train_exact, train_hashes = train
  keys, exact, hashes = evaluated
  position = {h: i for i, h in enumerate(train_exact)}
  leaks = []
  if not len(train_keys) or not len(keys):
    return leaks
  distances = hamming(hashes, train_hashes)
  for i, key in enumerate(keys):
    if exact[i] in position:
      leaks.append((key, train_keys[position[exact[i]]], 0, "exact"))
      continue
    j = int(np.argmin(distances[i]))
    if distances[i, j] <= max_distance:
      leaks.append((key, train_keys[j], int(distances[i, j]), "near"))
  return leaks


def write(leaks, path):
  with open(path, "w") as f:
    f.write("evaluated\ttraining\tdistance\tkind\n")
    for row in leaks:
      f.write("\t".join(map(str, row)) + "\n")
  return path


def check(
  data_config, train_split, eval_splits, out_path=None, max_distance=MAX_DISTANCE, max_train=None
):
  """{eval split: leaks} of a tree (a data config of any tree source), reading the raw
  tree as the direct reader does; None when the training split has more than
  `max_train` images. Writes the rows to out_path when there are any."""
  from mms_jax.data import pipeline

  direct = data_config.copy_and_resolve_references()
  direct.unlock()
  direct.reader = "direct"
  train_source = pipeline.make_source(direct, train_split)
  if max_train is not None and len(train_source) > max_train:
    return None
  train = fingerprint_source(train_source)
  found = {
    s: find(train, fingerprint_source(pipeline.make_source(direct, s)), max_distance)
    for s in eval_splits
  }
  rows = [(f"{s}:{e}", t, d, k) for s, leaks in found.items() for e, t, d, k in leaks]
  if out_path and rows:
    write(rows, out_path)
  return found


def summary(found):
  """'test: 3 of the evaluated images (2 exact, 1 near duplicate)' per split with leaks."""
  parts = []
  for split, leaks in found.items():
    if leaks:
      exact = sum(kind == "exact" for *_, kind in leaks)
      parts.append(f"{split}: {len(leaks)} ({exact} exact, {len(leaks) - exact} near duplicates)")
  return "; ".join(parts)


def main(argv):
  from absl import flags

  from mms_jax.data import pipeline

  f = flags.FLAGS
  if len(argv) > 1:
    from absl import app

    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = pipeline.default_config()
  config.update(source=f.source, path=f.path, reader="direct", charset="")
  found = check(config, f.train, f.eval, f.out or None, f.max_distance)
  for split, leaks in found.items():
    exact = sum(k == "exact" for *_, k in leaks)
    print(
      f"{split}: {len(leaks)} image(s) also in {f.train} ({exact} exact, "
      f"{len(leaks) - exact} near duplicates)"
    )
  if f.out and any(found.values()):
    print(f"Wrote {f.out}")


if __name__ == "__main__":
  from absl import flags

  from mms_jax import cli

  flags.DEFINE_string("source", "folder", "Tree source: folder or str_lmdb.")
  flags.DEFINE_string("path", None, "The tree's root folder.")
  flags.DEFINE_string("train", "train", "The training split (a sub-folder of the tree).")
  flags.DEFINE_list("eval", ["test"], "Evaluation splits to check against it.")
  flags.DEFINE_string("out", "", "Write the pairs found to this TSV file.")
  flags.DEFINE_integer("max_distance", MAX_DISTANCE, "Near duplicates: at most this many bits.")
  flags.mark_flag_as_required("path")
  cli.run(main, "mms_jax.data.leakage")
