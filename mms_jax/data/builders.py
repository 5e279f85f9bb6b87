"""TFDS builders (array_record, no TensorFlow) for the synthetic and real data sets.

Each builder takes its parameters (synthetic config and split sizes, or the user's
data path and read options) through its BuilderConfig, whose name is a hash of
those parameters: different parameters never share a directory in a data_dir.

  builder = make_builder(source, data_dir, path=..., options=..., synthetic=..., sizes=...)
  prepare(builder)                          # builds once, then reuses
  source = builder.as_data_source('train')  # random access, for grain

Images are stored as PNG (TFDS without TensorFlow needs encoded bytes).
Skip counts of each split are stored in the data set's metadata and logged at
build and read time (`log_skip_counts`).
"""

from collections.abc import Iterator
from collections.abc import Mapping
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mms_jax.data import formats

VERSION = tfds.core.Version("1.0.0")

# Synthetic splits: name -> (font_split, difficulty, seed stream).
SYNTHETIC_SPLITS = {
  "train": ("train", "normal", 0),
  "val": ("train", "normal", 1),
  "test_heldout_fonts": ("heldout", "normal", 2),
  "test_hard": ("train", "hard", 3),
}
DEFAULT_SYNTHETIC_SIZES = {"train": 10_000, "val": 500, "test_heldout_fonts": 500, "test_hard": 500}

TEXTSEG_SPLITS = ("train", "val", "test")


def _digest(obj: Any, n: int = 12) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _png(array: np.ndarray) -> bytes:
  return formats.encode_png(np.asarray(array, np.uint8))


def _mask_png(mask: np.ndarray) -> bytes:
  return _png(np.asarray(mask, np.uint8).reshape(mask.shape[:2]))


def binarize_alpha(alpha: np.ndarray) -> np.ndarray:
  """Glyph alpha uint8[H, W] in 0..255 -> uint8[H, W] in {0, 1} (alpha >= 128)."""
  return (np.asarray(alpha) >= 128).astype(np.uint8)


def _image_feature(shape=(None, None, 3)):
  return tfds.features.Image(shape=shape, dtype=np.uint8, encoding_format="png")


def _metadata(builder) -> Mapping[str, Any]:
  return builder.info.metadata or {}


def skip_counts(builder, splits: list[str]) -> formats.SkipCounts:
  """The stored skip counts of `splits` of a prepared builder, summed."""
  skips = _metadata(builder).get("skips", {})
  total = formats.SkipCounts()
  for split in splits:
    if split in skips:
      total.update(formats.SkipCounts.from_dict(skips[split]))
  return total


def log_skip_counts(builder, splits: list[str] | None = None) -> None:
  """Logs the stored skip counts of `splits` (all by default) of a prepared builder."""
  skips = _metadata(builder).get("skips", {})
  for split in splits or sorted(skips):
    if split in skips:
      formats.SkipCounts.from_dict(skips[split]).log(
        f"{builder.name}/{builder.builder_config.name}:{split}"
      )


def _record_skips(builder, split: str, counts: formats.SkipCounts) -> None:
  counts.log(f"{builder.name}:{split} (build)")
  builder.info.metadata.setdefault("skips", {})[split] = counts.to_dict()


# --------------------------------------------------------------- synthetic ----


def synthetic_split_config(
  synthetic: Mapping[str, Any], split: str, train_overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """The SyntheticConfig dict of one split: its fonts, difficulty and own seed.

  `train_overrides` (SyntheticConfig fields) apply to the 'train' split only, so a
  program can train on an easier or different distribution while its evaluation
  splits stay fixed. The split's fonts, difficulty and seed cannot be overridden.
  """
  font_split, difficulty, stream = SYNTHETIC_SPLITS[split]
  seed = int(np.random.SeedSequence([int(synthetic.get("seed", 0)), stream]).generate_state(1)[0])
  overrides = dict(train_overrides or {}) if split == "train" else {}
  fixed = sorted({"seed", "font_split", "difficulty"} & set(overrides))
  if fixed:
    raise ValueError(
      f"data.synthetic_train cannot set {fixed}: the split decides them "
      "(set data.synthetic.seed to change every split)."
    )
  return {
    **synthetic,
    **overrides,
    "seed": seed,
    "font_split": font_split,
    "difficulty": difficulty,
  }


@dataclasses.dataclass
class SyntheticBuilderConfig(tfds.core.BuilderConfig):
  """synthetic_json: SyntheticConfig fields as JSON; train_json: train-only overrides;
  sizes: ((split, n), ...)."""

  synthetic_json: str = "{}"
  train_json: str = "{}"
  sizes: tuple[tuple[str, int], ...] = ()


def synthetic_config(
  synthetic: Mapping[str, Any] | None = None,
  sizes: Mapping[str, int] | None = None,
  train_overrides: Mapping[str, Any] | None = None,
) -> SyntheticBuilderConfig:
  from mms_jax.data import synthetic as synthetic_lib

  # Hash every field (defaults included): a changed default gets a new name.
  synthetic = json.loads(
    json.dumps(
      synthetic_lib.SyntheticConfig.from_dict(dict(synthetic or {})).to_dict(), default=str
    )
  )
  sizes = dict(DEFAULT_SYNTHETIC_SIZES if sizes is None else sizes)
  unknown = set(sizes) - set(SYNTHETIC_SPLITS)
  if unknown:
    raise ValueError(
      f"Unknown synthetic splits {sorted(unknown)}; expected some of {list(SYNTHETIC_SPLITS)}."
    )
  sizes = tuple(sorted((k, int(v)) for k, v in sizes.items() if v > 0))
  train_overrides = json.loads(json.dumps(dict(train_overrides or {}), default=str))
  # Validates the overrides (unknown or fixed fields) before anything is built.
  synthetic_lib.SyntheticConfig.from_dict(
    synthetic_split_config(synthetic, "train", train_overrides)
  )
  key = {"synthetic": synthetic, "sizes": sizes}
  if train_overrides:  # keeps the names of data sets built without overrides
    key["train"] = train_overrides
  return SyntheticBuilderConfig(
    name="cfg_" + _digest(key),
    synthetic_json=json.dumps(synthetic, sort_keys=True),
    train_json=json.dumps(train_overrides, sort_keys=True),
    sizes=sizes,
    description=f"synthetic {synthetic} train overrides {train_overrides} sizes {dict(sizes)}",
  )


class MmsSyntheticText(tfds.core.GeneratorBasedBuilder):
  """Synthetic text images with exact glyph masks and low-resolution pairs."""

  VERSION = VERSION
  BUILDER_CONFIGS = []

  def _synthetic(self) -> dict[str, Any]:
    return json.loads(self.builder_config.synthetic_json)

  def _info(self) -> tfds.core.DatasetInfo:
    from mms_jax.data import synthetic as synthetic_lib

    cfg = synthetic_lib.SyntheticConfig.from_dict(self._synthetic())
    h, w = cfg.image_size
    s = cfg.lr_scale
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": _image_feature((h, w, 3)),
          "mask": _image_feature((h, w, 1)),
          "lr_image": _image_feature((h // s, w // s, 3)),
          "label": tfds.features.Text(),
          "font": tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in self.builder_config.sizes}

  def _generate_examples(self, split: str, n: int) -> Iterator[tuple[str, dict]]:
    from mms_jax.data import synthetic as synthetic_lib

    cfg = synthetic_lib.SyntheticConfig.from_dict(
      synthetic_split_config(self._synthetic(), split, json.loads(self.builder_config.train_json))
    )
    generator = synthetic_lib.SyntheticGenerator(cfg)
    counts = formats.SkipCounts()
    for i in range(n):
      s = generator.sample(i)
      counts.read += 1
      yield (
        f"{i:09d}",
        {
          "image": _png(s["image"]),
          "mask": _mask_png(binarize_alpha(s["mask"])),
          "lr_image": _png(s["lr_image"]),
          "label": s["label"],
          "font": s.get("font", ""),
        },
      )
    _record_skips(self, split, counts)


# -------------------------------------------------------------------- real ----


@dataclasses.dataclass
class RealBuilderConfig(tfds.core.BuilderConfig):
  """path: data root; options_json: formats.ReadOptions as JSON."""

  path: str = ""
  options_json: str = "{}"


def _fingerprint(source: str, path: str) -> list[Any]:
  """Size and mtime of every data file, so changed data gets a new config name."""
  out = []
  for rel in formats.list_datasets(source, path):
    full = os.path.join(path, rel)
    for marker in (".", formats.LMDB_MARKER, formats.GT_FILE, "annotation", "image"):
      p = os.path.join(full, marker)
      if os.path.exists(p):
        st = os.stat(p)
        out.append([rel, marker, st.st_size, st.st_mtime_ns])
  return out


def real_config(
  source: str, path: str, options: formats.ReadOptions = formats.ReadOptions()
) -> RealBuilderConfig:
  path = os.path.abspath(os.path.expanduser(path))
  formats.check_path(path, f"{source} data", "Set data_config.path to the data root.")
  fingerprint = _fingerprint(source, path)
  name = f"{source}_" + _digest({"path": path, "options": options.to_dict(), "files": fingerprint})
  return RealBuilderConfig(
    name=name,
    path=path,
    options_json=json.dumps(options.to_dict(), sort_keys=True),
    description=f"{source} data from {path}",
  )


class _RealBuilderMixin:
  """Shared code of the real-data builders: one TFDS split per data set of the tree."""

  SOURCE = ""
  FIELDS: tuple[str, ...] = ()

  @property
  def _options(self) -> formats.ReadOptions:
    return formats.ReadOptions.from_dict(json.loads(self.builder_config.options_json))

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"image": _image_feature()}
    if "label" in self.FIELDS:
      features["label"] = tfds.features.Text()
    if "mask" in self.FIELDS:
      features["mask"] = _image_feature((None, None, 1))
    if "lr_image" in self.FIELDS:
      features["lr_image"] = _image_feature()
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(features), metadata=tfds.core.MetadataDict()
    )

  def _readers(self) -> dict[str, formats.Reader]:
    """{split name: reader}; opening them checks paths and emptiness up front."""
    path = self.builder_config.path
    readers = {}
    for rel in formats.list_datasets(self.SOURCE, path):
      reader = formats.open_reader(self.SOURCE, path, rel, self._options)
      readers[formats.split_name(rel)] = reader
    return readers

  def _split_generators(self, dl_manager):
    del dl_manager
    readers = self._readers()
    empty = [k for k, r in readers.items() if len(r) == 0]
    if len(empty) == len(readers):
      raise formats.DataError(
        f"No records in {self.builder_config.path!r} ({self.SOURCE}). "
        "Check data_config.path and data_config.source."
      )
    for k in empty:
      logging.warning("%s: data set %s is empty; no split made for it.", self.name, k)
    return {k: self._generate_examples(k, r) for k, r in readers.items() if len(r)}

  def _generate_examples(self, split: str, reader: formats.Reader) -> Iterator[tuple[str, dict]]:
    for key, example in reader.examples():
      record = {"image": _png(example["image"])}
      if "label" in self.FIELDS:
        record["label"] = example["label"]
      if "mask" in self.FIELDS:
        record["mask"] = _mask_png(example["mask"])
      if "lr_image" in self.FIELDS:
        record["lr_image"] = _png(example["lr_image"])
      yield key, record
    _record_skips(self, split, reader.skips)
    if reader.skips.read == 0:
      raise formats.DataError(
        f"Every record of {split!r} in {self.builder_config.path!r} was skipped "
        f"({reader.skips.summary()}). Check the data or data_config read options."
      )


class MmsStrLmdb(_RealBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """Labeled STR LMDB tree: one split per directory holding data.mdb."""

  VERSION = VERSION
  BUILDER_CONFIGS = []
  SOURCE = "str_lmdb"
  FIELDS = ("image", "label")


class MmsUnlabeled(_RealBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """Unlabeled images: an LMDB tree without labels, or a folder of images."""

  VERSION = VERSION
  BUILDER_CONFIGS = []
  SOURCE = "unlabeled"
  FIELDS = ("image",)


class MmsTextZoom(_RealBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """TextZoom LMDB tree (image_hr, image_lr, label), e.g. train1, test/easy."""

  VERSION = VERSION
  BUILDER_CONFIGS = []
  SOURCE = "textzoom"
  FIELDS = ("image", "lr_image", "label")


class MmsTextFolder(_RealBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """Folders of images with a gt.txt; one split per folder holding gt.txt."""

  VERSION = VERSION
  BUILDER_CONFIGS = []
  SOURCE = "folder"
  FIELDS = ("image", "label")


class MmsTextSeg(_RealBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """TextSeg word crops with foreground masks; splits train/val/test.

  The split of each image comes from root/split.json ({"train": [ids], ...}) when
  present, else from a stable hash of the image id (80/10/10).
  """

  VERSION = VERSION
  BUILDER_CONFIGS = []
  SOURCE = "textseg"
  FIELDS = ("image", "mask", "label")

  def _readers(self) -> dict[str, formats.Reader]:
    path = self.builder_config.path
    ids = formats.textseg_split_ids(path)
    return {
      split: formats.TextSegReader(path, self._options, name=split, image_ids=ids[split])
      for split in TEXTSEG_SPLITS
    }


BUILDERS = {
  "synthetic": MmsSyntheticText,
  "str_lmdb": MmsStrLmdb,
  "unlabeled": MmsUnlabeled,
  "textzoom": MmsTextZoom,
  "textseg": MmsTextSeg,
  "folder": MmsTextFolder,
}


def make_builder(
  source: str,
  data_dir: str,
  *,
  path: str = "",
  options: formats.ReadOptions = formats.ReadOptions(),
  synthetic: Mapping[str, Any] | None = None,
  sizes: Mapping[str, int] | None = None,
  synthetic_train: Mapping[str, Any] | None = None,
):
  """The TFDS builder of a source (not yet prepared)."""
  if source not in BUILDERS:
    raise ValueError(f"Unknown source {source!r}; expected one of {list(BUILDERS)}.")
  if source == "synthetic":
    config = synthetic_config(synthetic, sizes, synthetic_train)
  else:
    config = real_config(source, path, options)
  return BUILDERS[source](config=config, data_dir=os.path.expanduser(data_dir))


def prepare(builder) -> Any:
  """Builds the data set as array_record unless already built (the build logs
  each split's skip counts; readers log them again with `log_skip_counts`)."""
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    builder.download_and_prepare(file_format="array_record")
  return builder


def split_names(builder) -> list[str]:
  return sorted(builder.info.splits.keys())
