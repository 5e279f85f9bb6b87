"""grain input pipelines: source -> global shuffle -> preprocess -> host rows of batches.

The entry the trainers call:

  it = make_pipeline(config.data, 'train', global_batch_size=256, train=True,
                     seed=0, image_size=(32, 128), worker_count=2)
  batch = next(it)     # dict of numpy arrays, per-host batch B = global / hosts
  state = it.get_state()   # JSON-serialisable dict; it.set_state(state) resumes

Training batches do not depend on the number of hosts: all hosts share one global
shuffled order and host i takes rows [i*B, (i+1)*B) of every global batch, so the
hosts' batches concatenated in host order are the 1-host global batch.

Batches:
  image:    float32[B, H, W, 3] in [-1, 1]
  label:    object[B] of str                    (labeled sources)
  mask:     float32[B, H, W] in {0, 1}          (synthetic, textseg)
  lr_image: float32[B, H//2, W//2, 3] in [-1, 1] (synthetic, textzoom; not with augment)

`data_config` fields (see `default_config` and docs/data.md):
  source: 'synthetic' | 'str_lmdb' | 'unlabeled' | 'textzoom' | 'textseg' | 'folder'
  path: data root of a real source (ignored for synthetic).
  data_dir: where TFDS array_record files are built (reader='tfds').
  reader: 'tfds' (build once into data_dir, then read array_record) or 'direct'
    (read the raw format / run the generator on the fly; no build step).
  size: synthetic split sizes {split: n} (an int sets the train size).
  synthetic: SyntheticConfig fields.
  synthetic_train: SyntheticConfig fields for the 'train' split only (e.g. easier
    labels), leaving the evaluation splits as they are.
  curriculum: a training mixture that changes with the step (synthetic, direct
    reader): synthetic_train.clean_fraction falls linearly to 0 at `clean_until_step`;
    synthetic_train.hard_fraction rises linearly from 0 at `hard_start_step` to its
    value at `hard_end_step`. 0 (the default) keeps a fraction constant. Other
    sources train on their own records: the curriculum does not apply to them.
  splits: {split: tree sub-path(s)}, e.g. {'train': 'train/real', 'test': 'evaluation'}.
  charset, max_label_length, case_sensitive, max_aspect, max_pixels: read options.
  keep_aspect, augment: preprocessing; worker_count, read_threads, prefetch: grain.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import hashlib
import json
import math
import os
import sys
from typing import Any

import grain.python as grain
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageFilter

from mms_jax import errors
from mms_jax.data import builders
from mms_jax.data import fonts as fonts_lib
from mms_jax.data import formats

SOURCES = formats.SOURCES
READERS = ("tfds", "direct")
# Fields each source yields (besides 'image').
SOURCE_FIELDS = {
  "synthetic": ("label", "mask", "lr_image"),
  "str_lmdb": ("label",),
  "unlabeled": (),
  "textzoom": ("label", "lr_image"),
  "textseg": ("label", "mask"),
  "folder": ("label",),
}
# Default split -> tree sub-path, when data_config.splits does not say.
DEFAULT_SPLITS = {"textzoom": {"train": "train1+train2"}}
# Padding value (uint8) of keep-aspect resizing: 128 is ~0 after normalisation.
PAD_VALUE = 128


def default_config() -> ml_collections.ConfigDict:
  """The data config every program embeds (synthetic data by default)."""
  c = ml_collections.ConfigDict()
  c.source = "synthetic"
  c.path = ""
  c.data_dir = os.environ.get("MMS_DATA_DIR", "~/.cache/mms_jax/tfds")
  c.reader = "tfds"
  c.size = dict(builders.DEFAULT_SYNTHETIC_SIZES)
  c.synthetic = ml_collections.ConfigDict(dict(seed=0))  # seed: every split's data
  c.synthetic_train = ml_collections.ConfigDict()
  c.curriculum = ml_collections.ConfigDict(
    dict(clean_until_step=0, hard_start_step=0, hard_end_step=0)
  )
  # Tree sub-path(s) per split; None: the split's own name. Set one on the command
  # line with --config.data.splits.train=train/real (other names: the dict form).
  c.splits = ml_collections.ConfigDict(
    {name: ml_collections.config_dict.placeholder(str) for name in ("train", "val", "test")}
  )
  c.charset = ""  # '' keeps labels as stored (stripped); '36', '94', ...
  c.max_label_length = 25
  c.case_sensitive = ml_collections.config_dict.placeholder(bool)
  c.max_aspect = 25.0
  c.max_pixels = 4096 * 4096
  c.keep_aspect = False
  c.augment = False
  c.worker_count = 0  # used when make_pipeline gets worker_count=None
  c.read_threads = 8
  c.prefetch = 64
  return c


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
    value = cfg.get(name, default)
  else:
    value = getattr(cfg, name, default)
  return default if value is None else value


def _to_dict(value: Any) -> dict[str, Any]:
  if value is None:
    return {}
  if hasattr(value, "to_dict"):
    return value.to_dict()
  return dict(value)


def read_options(data_config) -> formats.ReadOptions:
  charset = _get(data_config, "charset", "") or None
  source = _get(data_config, "source", "synthetic")
  return formats.ReadOptions(
    max_aspect=float(_get(data_config, "max_aspect", 25.0)),
    max_pixels=int(_get(data_config, "max_pixels", 4096 * 4096)),
    charset=charset,
    max_label_length=_get(data_config, "max_label_length", 25),
    case_sensitive=_get(data_config, "case_sensitive", None),
    # Super-resolution does not need labels: keep pairs with bad labels.
    require_label=source != "textzoom",
  )


def synthetic_sizes(data_config) -> dict[str, int]:
  size = _get(data_config, "size", None)
  if size is None:
    return dict(builders.DEFAULT_SYNTHETIC_SIZES)
  if isinstance(size, int):
    return {**builders.DEFAULT_SYNTHETIC_SIZES, "train": size}
  return {k: int(v) for k, v in _to_dict(size).items()}


def validate(data_config) -> None:
  """Raises ValueError / formats.DataError with the fix, before any work."""
  source = _get(data_config, "source", None)
  if source not in SOURCES:
    raise errors.ConfigError(f"data_config.source={source!r}; expected one of {SOURCES}.")
  reader = _get(data_config, "reader", "tfds")
  if reader not in READERS:
    raise errors.ConfigError(f"data_config.reader={reader!r}; expected one of {READERS}.")
  if reader == "tfds" and not _get(data_config, "data_dir", ""):
    raise errors.ConfigError(
      "data_config.data_dir is empty: set it to a writable folder "
      "where the TFDS array_record files are built."
    )
  if source != "synthetic":
    path = _get(data_config, "path", "")
    if not path:
      raise formats.DataError(
        f"data_config.path is empty for source {source!r}: set it to the data root "
        "(see docs/data.md for the expected layout)."
      )
    formats.check_path(
      os.path.expanduser(path),
      f"{source} data root",
      "Set data_config.path to an existing folder (see docs/data.md).",
    )
  curriculum = Curriculum.from_config(data_config)
  if curriculum.active and source == "synthetic" and reader != "direct":
    raise errors.ConfigError(
      f"data.curriculum={curriculum} changes the generated training images with the "
      "step, which a built (reader='tfds') data set cannot do: set data.reader=direct, "
      "or set data.curriculum's steps to 0."
    )
  charset = _get(data_config, "charset", "")
  if charset:
    from mms_jax.data import labels

    if len(labels.get_charset(charset)) < 2:
      raise errors.ConfigError(f"data_config.charset={charset!r} is not a charset.")


# -------------------------------------------------------------- curriculum ----


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """The training mixture as a function of the step (see `default_config`)."""

  clean_until_step: int = 0
  hard_start_step: int = 0
  hard_end_step: int = 0

  def __post_init__(self):
    for name in ("clean_until_step", "hard_start_step", "hard_end_step"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise errors.ConfigError(
          f"data.curriculum.{name}={value!r}: expected an integer step >= 0 (0: no ramp)."
        )
    if self.hard_end_step and self.hard_end_step <= self.hard_start_step:
      raise errors.ConfigError(
        f"data.curriculum.hard_end_step={self.hard_end_step} must be after "
        f"hard_start_step={self.hard_start_step} (or 0: a constant hard_fraction)."
      )

  @classmethod
  def from_config(cls, data_config) -> "Curriculum":
    fields = _to_dict(_get(data_config, "curriculum", None))
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise errors.ConfigError(
        f"data.curriculum has no field(s) {unknown}: use "
        "clean_until_step, hard_start_step, hard_end_step."
      )
    return cls(**fields)

  @property
  def active(self) -> bool:
    return bool(self.clean_until_step or self.hard_end_step)

  def fractions(
    self, step: int, clean_fraction: float, hard_fraction: float
  ) -> tuple[float, float]:
    """(clean, hard) fractions of training step `step`."""
    clean, hard = clean_fraction, hard_fraction
    if self.clean_until_step:
      clean *= max(0.0, 1.0 - step / self.clean_until_step)
    if self.hard_end_step:
      ramp = (step - self.hard_start_step) / (self.hard_end_step - self.hard_start_step)
      hard *= min(1.0, max(0.0, ramp))
    return clean, hard


def curriculum_applies(data_config) -> bool:
  """True when data.curriculum shapes the training images: it belongs to images
  generated on the fly (source 'synthetic', reader 'direct'); any other source trains
  on its own records and the curriculum does not apply."""
  return (
    Curriculum.from_config(data_config).active
    and _get(data_config, "source") == "synthetic"
    and _get(data_config, "reader", "tfds") == "direct"
  )


def check_curriculum_fits(data_config, total_steps: int, global_batch_size: int) -> None:
  """Refuses a curriculum that would restart: it counts steps within one pass over
  data.size.train generated images."""
  if not curriculum_applies(data_config):
    return
  train_size = synthetic_sizes(data_config)["train"]
  needed = int(total_steps) * int(global_batch_size)
  if needed > train_size:
    raise errors.ConfigError(
      f"data.curriculum needs {total_steps} steps x {global_batch_size} images = "
      f"{needed:,} generated training images in one pass, but data.size.train is "
      f"{train_size:,}: raise data.size.train (generated on the fly, it costs nothing)."
    )


# ----------------------------------------------------------------- sources ----


class NamedSource(grain.RandomAccessDataSource):
  """Wraps a random-access source with a stable repr (checked on state restore).

  `skips`: the records left out when the data set was built (formats.SkipCounts).
  """

  def __init__(self, source, name: str, skips: formats.SkipCounts | None = None):
    self._source = source
    self._name = name
    self.skips = skips if skips is not None else formats.SkipCounts()

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    return self._source[index]

  def __repr__(self) -> str:
    return f"NamedSource({self._name})"


class SyntheticSource(grain.RandomAccessDataSource):
  """Generates synthetic examples on the fly: record i = generator.sample(i).

  `with_curriculum` gives the training copy: its records are read in order, record
  i being training position i, so its mixture is that of step i // images_per_step
  (the generator's samples are independent draws: reading them in order loses
  nothing a shuffle would give). Elsewhere (evaluation) the config's fractions hold.
  """

  def __init__(
    self,
    synthetic: Mapping[str, Any],
    split: str,
    size: int,
    train_overrides: Mapping[str, Any] | None = None,
  ):
    self.config = builders.synthetic_split_config(dict(synthetic), split, train_overrides)
    from mms_jax.data import synthetic as synthetic_lib

    # Names a bad field now, not in a reader thread.
    generator_config = synthetic_lib.SyntheticConfig.from_dict(self.config)
    self._fractions = (generator_config.clean_fraction, generator_config.hard_fraction)
    self.split = split
    self.size = int(size)
    self.curriculum = None
    self.images_per_step = 0
    self._generator = None

  @property
  def in_order(self) -> bool:
    """True: read without a shuffle (record index = training position)."""
    return self.curriculum is not None

  def with_curriculum(self, curriculum: Curriculum, images_per_step: int) -> "SyntheticSource":
    """A copy whose record i has the mixture of step i // images_per_step."""
    if self.split != "train":
      raise errors.ConfigError(f"A curriculum applies to the train split, not {self.split!r}.")
    if images_per_step <= 0:
      raise ValueError(f"images_per_step must be positive, got {images_per_step}")
    source = SyntheticSource.__new__(SyntheticSource)
    source.__dict__.update(self.__getstate__())
    source.curriculum, source.images_per_step = curriculum, int(images_per_step)
    return source

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index):
    if self._generator is None:
      from mms_jax.data import synthetic as synthetic_lib

      self._generator = synthetic_lib.SyntheticGenerator(
        synthetic_lib.SyntheticConfig.from_dict(self.config)
      )
    fractions = (None, None)
    if self.curriculum is not None:
      fractions = self.curriculum.fractions(int(index) // self.images_per_step, *self._fractions)
    s = self._generator.sample(int(index), *fractions)
    return {
      "image": s["image"],
      "label": s["label"],
      "mask": builders.binarize_alpha(s["mask"]),
      "lr_image": s["lr_image"],
    }

  def __getstate__(self):
    return {**self.__dict__, "_generator": None}

  def __repr__(self) -> str:
    curriculum = ""
    if self.curriculum is not None:
      curriculum = f", {self.curriculum}, images_per_step={self.images_per_step}"
    return (
      f"SyntheticSource({self.split}, {self.size}, "
      f"{json.dumps(self.config, sort_keys=True, default=str)}{curriculum})"
    )


def synthetic_fonts(data_config, splits: Sequence[str]) -> dict[str, Any]:
  """{split: {count, fingerprint, fonts}} of generated splits: the fonts a split draws
  depend on the fonts installed (launch/install.sh), so results on a split compare
  across machines only where the fingerprints agree. `reference_fingerprint` is the
  one docs/results.md was measured with (None for a non-default font split)."""
  from mms_jax.data import synthetic as synthetic_lib

  out = {}
  for split in splits:
    config = builders.synthetic_split_config(
      _to_dict(_get(data_config, "synthetic", None)),
      split,
      _to_dict(_get(data_config, "synthetic_train", None)),
    )
    synthetic_config = synthetic_lib.SyntheticConfig.from_dict(config)
    names = synthetic_lib.SyntheticGenerator(synthetic_config).font_names
    default_split = (
      synthetic_config.font_dirs is None
      and not synthetic_config.font_split_salt
      and synthetic_config.heldout_fraction == 0.1
    )
    reference = (
      fonts_lib.REFERENCE_FINGERPRINTS.get(synthetic_config.font_split) if default_split else None
    )
    out[split] = {
      "count": len(names),
      "fingerprint": fonts_lib.fingerprint(names),
      "reference_fingerprint": reference,
      "fonts": sorted(names),
    }
  return out


def _resolve_subpath(data_config, split: str) -> str:
  """The tree sub-path of a split: config.data.splits, else the source's default,
  else the split's own name. Unlabeled data without a `train/` folder (the Union14M-U
  release: book32_lmdb/, cc_lmdb/, ... under one root) trains on the whole tree, and
  so does a labelled folder or LMDB tree with no train/, val/ or test/ folder (one
  gt.txt or data.mdb at its root, say)."""
  source = _get(data_config, "source")
  mapped = _to_dict(_get(data_config, "splits", None)).get(split)
  if mapped is not None:
    return mapped
  if split == "train" and source in ("unlabeled", "folder", "str_lmdb"):
    root = os.path.expanduser(_get(data_config, "path", "") or "")
    split_folders = ("train",) if source == "unlabeled" else ("train", "val", "test")
    if not any(os.path.isdir(os.path.join(root, f)) for f in split_folders):
      return "."
  return DEFAULT_SPLITS.get(source, {}).get(split, split)


def list_benchmarks(data_config, split: str) -> list[str]:
  """Tree-relative data sets a split covers, e.g. one per STR benchmark.

  Pass each back to make_pipeline (as `split`) to score benchmarks one by one.
  """
  validate(data_config)
  source = _get(data_config, "source")
  if source in ("synthetic", "textseg"):
    return [split]
  return formats.list_datasets(
    source, os.path.expanduser(_get(data_config, "path")), _resolve_subpath(data_config, split)
  )


def make_source(data_config, split: str):
  """A random-access source of example dicts for one split (validated)."""
  validate(data_config)
  source = _get(data_config, "source")
  reader = _get(data_config, "reader", "tfds")
  path = os.path.expanduser(_get(data_config, "path", ""))
  options = read_options(data_config)
  if source == "synthetic":
    sizes = synthetic_sizes(data_config)
    if split not in sizes:
      raise ValueError(
        f"Synthetic split {split!r} has no size; data_config.size has {sorted(sizes)}."
      )
  elif source == "textseg" and split not in builders.TEXTSEG_SPLITS:
    raise ValueError(f"TextSeg split {split!r}; expected one of {builders.TEXTSEG_SPLITS}.")

  if reader == "direct":
    if source == "synthetic":
      return SyntheticSource(
        _to_dict(_get(data_config, "synthetic", None)),
        split,
        sizes[split],
        _to_dict(_get(data_config, "synthetic_train", None)),
      )
    if source == "textseg":
      ids = formats.textseg_split_ids(path)[split]
      src = formats.TextSegReader(path, options, name=split, image_ids=ids)
    else:
      src = formats.open_source(source, path, _resolve_subpath(data_config, split), options)
    if src.skips.total:
      src.skips.log(f"{source}:{split} (scan)")
    if len(src) == 0:
      raise formats.DataError(f"{source} split {split!r} under {path!r} is empty.")
    return src

  builder = builders.make_builder(
    source,
    _get(data_config, "data_dir"),
    path=path,
    options=options,
    synthetic=_to_dict(_get(data_config, "synthetic", None)),
    sizes=synthetic_sizes(data_config) if source == "synthetic" else None,
    synthetic_train=_to_dict(_get(data_config, "synthetic_train", None)),
  )
  builders.prepare(builder)
  if source in ("synthetic", "textseg"):
    names = [split]
  else:
    names = [
      formats.split_name(rel)
      for rel in formats.list_datasets(source, path, _resolve_subpath(data_config, split))
    ]
  missing = [n for n in names if n not in builder.info.splits]
  if missing:
    raise formats.DataError(
      f"Split(s) {missing} are not in the built data set {builder.data_path} "
      f"(it has {builders.split_names(builder)}); the data may have no good records "
      "there."
    )
  builders.log_skip_counts(builder, names)
  spec = "+".join(names)
  return NamedSource(
    builder.as_data_source(split=spec),
    f"{builder.name}/{builder.builder_config.name}:{spec}",
    skips=builders.skip_counts(builder, names),
  )


# -------------------------------------------------------------- transforms ----


def _resize(
  array: np.ndarray, size: tuple[int, int], keep_aspect: bool, resample: int, pad_value: int
) -> np.ndarray:
  """uint8[h, w(, c)] -> uint8[H, W(, c)]; keep_aspect scales to height H, then
  pads (right) or squeezes the width to W."""
  height, width = size
  h, w = array.shape[:2]
  new_w = width
  if keep_aspect:
    new_w = max(1, min(width, int(round(w * height / h))))
  if (h, w) != (height, new_w):
    array = np.asarray(Image.fromarray(array).resize((new_w, height), resample))
  if new_w < width:
    pad = [(0, 0), (0, width - new_w)] + [(0, 0)] * (array.ndim - 2)
    array = np.pad(array, pad, constant_values=pad_value)
  return array


@dataclasses.dataclass
class ParseRecord(grain.MapTransform):
  """TFDS / reader record -> {image, label, mask, lr_image} with fixed types."""

  fields: tuple[str, ...]

  def map(self, record):
    out = {"image": np.asarray(record["image"], np.uint8)}
    if "label" in self.fields:
      label = record.get("label", "")
      if isinstance(label, (bytes, np.bytes_)):
        label = label.decode("utf-8")
      out["label"] = np.asarray(str(label), dtype=object)
    if "mask" in self.fields:
      mask = np.asarray(record["mask"], np.uint8)
      out["mask"] = (mask.reshape(mask.shape[:2]) > 0).astype(np.uint8)
    if "lr_image" in self.fields:
      out["lr_image"] = np.asarray(record["lr_image"], np.uint8)
    return out


@dataclasses.dataclass
class Resize(grain.MapTransform):
  """Resizes image and mask to image_size, lr_image to half of it."""

  image_size: tuple[int, int]
  keep_aspect: bool = False

  def map(self, ex):
    h, w = self.image_size
    ex["image"] = _resize(ex["image"], (h, w), self.keep_aspect, Image.BILINEAR, PAD_VALUE)
    if "mask" in ex:
      ex["mask"] = _resize(ex["mask"], (h, w), self.keep_aspect, Image.NEAREST, 0)
    if "lr_image" in ex:
      ex["lr_image"] = _resize(
        ex["lr_image"], (h // 2, w // 2), self.keep_aspect, Image.BICUBIC, PAD_VALUE
      )
    return ex


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Mild fine-tuning augmentation; never a horizontal (or vertical) flip."""

  p_affine: float = 0.5
  max_rotation: float = 5.0  # degrees
  max_shear: float = 0.15
  scale: tuple[float, float] = (0.9, 1.05)
  max_translate: float = 0.04  # fraction of width / height
  p_color: float = 0.5
  color_range: tuple[float, float] = (0.7, 1.3)
  p_blur: float = 0.2
  blur_radius: tuple[float, float] = (0.3, 1.0)
  p_noise: float = 0.2
  noise_std: tuple[float, float] = (2.0, 8.0)


def _affine_coefficients(
  rng: np.random.Generator, h: int, w: int, cfg: AugmentConfig
) -> tuple[float, ...]:
  """PIL AFFINE coefficients (output -> input map) of a random small warp."""
  angle = math.radians(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
  shear = rng.uniform(-cfg.max_shear, cfg.max_shear)
  scale = rng.uniform(*cfg.scale)
  tx = rng.uniform(-cfg.max_translate, cfg.max_translate) * w
  ty = rng.uniform(-cfg.max_translate, cfg.max_translate) * h
  cos, sin = math.cos(angle), math.sin(angle)
  # Forward map about the centre: rotation @ shear @ scale, with positive scale
  # (det > 0): no reflection, so left stays left.
  forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1, shear], [0, 1]]) * scale
  inverse = np.linalg.inv(forward)
  centre = np.array([w / 2, h / 2])
  offset = centre - inverse @ (centre + np.array([tx, ty]))
  return (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])


def augment_example(
  ex: dict[str, Any], rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()
) -> dict[str, Any]:
  """Augments uint8 image (and mask consistently). The warped image is no longer the
  pair of an lr_image (synthetic and TextZoom records carry one), so that is dropped;
  super-resolution refuses data.augment for this reason."""
  ex.pop("lr_image", None)
  image = Image.fromarray(ex["image"])
  if rng.random() < cfg.p_affine:
    h, w = ex["image"].shape[:2]
    coeffs = _affine_coefficients(rng, h, w, cfg)
    border = np.concatenate([ex["image"][0], ex["image"][-1]], axis=0)
    fill = tuple(int(v) for v in np.median(border, axis=0))
    image = image.transform(image.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=fill)
    if "mask" in ex:
      ex["mask"] = np.asarray(
        Image.fromarray(ex["mask"]).transform(
          image.size, Image.AFFINE, coeffs, Image.NEAREST, fillcolor=0
        )
      )
  if rng.random() < cfg.p_color:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
      image = enhance(image).enhance(rng.uniform(*cfg.color_range))
  if rng.random() < cfg.p_blur:
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*cfg.blur_radius)))
  out = np.asarray(image)
  if rng.random() < cfg.p_noise:
    noise = rng.normal(0, rng.uniform(*cfg.noise_std), out.shape)
    out = np.clip(out + noise, 0, 255).astype(np.uint8)
  ex["image"] = np.asarray(out, np.uint8)
  return ex


@dataclasses.dataclass
class Augment(grain.RandomMapTransform):
  cfg: AugmentConfig = AugmentConfig()

  def random_map(self, ex, rng: np.random.Generator):
    return augment_example(ex, rng, self.cfg)


class Normalize(grain.MapTransform):
  """uint8 images -> float32 in [-1, 1]; mask -> float32 {0, 1}."""

  def map(self, ex):
    for k in ("image", "lr_image"):
      if k in ex:
        ex[k] = ex[k].astype(np.float32) / 127.5 - 1.0
    if "mask" in ex:
      ex["mask"] = ex["mask"].astype(np.float32)
    return ex


class DropInvalid(grain.FilterTransform):
  """Drops records a direct reader could not use (returned as None)."""

  def filter(self, element) -> bool:
    return element is not None


# --------------------------------------------------------------- pipeline ----


def _mark_flags_parsed() -> None:
  """grain worker processes read absl flags; outside app.run they are unparsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
  if len(tuple(image_size)) != 2 or min(image_size) < 2:
    raise ValueError(f"image_size={image_size}: expected (height, width).")
  return int(image_size[0]), int(image_size[1])


def _check_batch_size(global_batch_size: int, shard_count: int) -> int:
  """The per-host batch global_batch_size / shard_count."""
  if global_batch_size <= 0 or global_batch_size % shard_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be a positive "
      f"multiple of the shard count {shard_count}."
    )
  return global_batch_size // shard_count


def resolve_shard(
  shard_index: int | None = None, shard_count: int | None = None
) -> tuple[int, int]:
  """(shard_index, shard_count): explicit, else this JAX process of all of them."""
  if shard_index is None and shard_count is None:
    import jax

    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None or not 0 <= shard_index < shard_count:
    raise ValueError(
      f"shard_index={shard_index}, shard_count={shard_count}: give both, "
      "with 0 <= shard_index < shard_count."
    )
  return int(shard_index), int(shard_count)


def _derive_seed(seed: int, purpose: str) -> int:
  """A 32-bit seed per purpose ('shuffle', 'augment'), so streams never overlap."""
  tag = int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4], "little")
  return int(np.random.SeedSequence([int(seed) % 2**32, tag]).generate_state(1)[0])


def _preprocess_ops(data_config, image_size: tuple[int, int]) -> list[Any]:
  """ParseRecord and Resize, the deterministic per-record transforms."""
  fields = SOURCE_FIELDS[_get(data_config, "source")]
  return [ParseRecord(fields), Resize(image_size, bool(_get(data_config, "keep_aspect", False)))]


# ------------------------------------------------------ training pipeline ----
#
# Every host computes the same global record order and cuts the same global
# batches; host i keeps rows [i*b, (i+1)*b) of each (b = B / n). So the
# concatenation of the hosts' batches in host order is the 1-host batch, whatever
# n is, and so is the state (the number of global batches delivered).


class SubstituteInvalid(grain.RandomAccessDataSource):
  """Record k of a direct reader, or the next readable one if it is unreadable.

  A direct reader decodes on the fly and returns None for a bad record. Dropping
  it would shift every later row by one on one host only; instead record k is
  replaced by the first readable record of k+1, k+2, ... (wrapping around). The
  replacement depends on k alone, so all hosts and workers agree; a bad record's
  slot is filled by a duplicate of its successor.
  """

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    n = len(self._source)
    for offset in range(n):
      record = self._source[(int(index) + offset) % n]
      if record is not None:
        return record
    raise formats.DataError(f"{self._source!r} has no readable record.")

  def __repr__(self) -> str:
    return repr(self._source)


def global_records(source, *, seed: int, num_epochs: int | None) -> grain.MapDataset:
  """The global training order: position p -> record, the same on every host.

  Epoch e (positions [e*N, (e+1)*N)) is a permutation of the N records drawn
  from (seed, e): every epoch is reshuffled. num_epochs None repeats forever.
  """
  if isinstance(source, formats.Reader):
    source = SubstituteInvalid(source)
  ds = grain.MapDataset.source(source)
  if not getattr(source, "in_order", False):
    ds = ds.shuffle(seed=_derive_seed(seed, "shuffle"))
  return ds.repeat(num_epochs)


def host_batches(
  records: grain.MapDataset, global_batch_size: int, shard_index: int, shard_count: int
) -> grain.MapDataset:
  """Step s -> this host's rows [i*b, (i+1)*b) of global batch s (b = B / n).

  Positions are cut into mini-batches of b; global batch s is mini-batches
  [s*n, (s+1)*n), of which host i takes number s*n + i. Only complete global
  batches are kept, so every host has the same number of steps.
  """
  local = _check_batch_size(global_batch_size, shard_count)
  minibatches = records.batch(local, drop_remainder=True)
  if len(records) < sys.maxsize:  # finite epochs: drop the partial global batch
    minibatches = minibatches[: len(records) // global_batch_size * shard_count]
  return minibatches[shard_index::shard_count]


def make_train_dataset(
  data_config,
  source,
  global_batch_size: int,
  *,
  seed: int,
  image_size: tuple[int, int],
  shard_index: int,
  shard_count: int,
  num_epochs: int | None,
  augment: bool,
) -> grain.MapDataset:
  """The random-access dataset of this host's training batches (index = step).

  Transforms run per global position p before batching: augmentation draws its
  randomness from (seed, p), p = epoch * N + position in the epoch, never from the
  host or worker.
  """
  ds = global_records(source, seed=seed, num_epochs=num_epochs)
  for op in _preprocess_ops(data_config, image_size):
    ds = ds.map(op)
  if augment:
    ds = ds.random_map(Augment(), seed=_derive_seed(seed, "augment"))
  ds = ds.map(Normalize())
  return host_batches(ds, global_batch_size, shard_index, shard_count)


def _fingerprint(source) -> str:
  return hashlib.sha256(repr(source).encode()).hexdigest()[:16]


class DataStateMismatch(errors.UserError, ValueError):
  """A checkpoint's data position belongs to another training stream (other data,
  seed or global batch size); `changed` maps each field to (saved, now)."""

  def __init__(self, changed: Mapping[str, tuple[Any, Any]]):
    self.changed = dict(changed)
    super().__init__(
      "the checkpoint was trained on another data stream ("
      + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in self.changed.items())
      + ")"
    )


class TrainIterator(grain.DatasetIterator):
  """Iterates a host's training batches; the state is the global step.

  get_state() -> {'step': k, ...} (JSON-serialisable): k global batches were
  delivered. The other fields identify the stream (source, records, seed, global
  batch size) and are checked by set_state. Because positions are global, a state
  resumes on any number of hosts or workers with the same global batch size.
  Prefetching (threads, then `worker_count` processes over whole batches) starts
  at the first next() and restarts at the restored step after set_state().
  """

  STATE_KIND = "mms_jax.train_pipeline/1"

  def __init__(
    self,
    batches: grain.MapDataset,
    *,
    identity: Mapping[str, Any],
    read_options: grain.ReadOptions,
    worker_count: int,
    worker_buffer_size: int = 2,
  ):
    super().__init__()
    self._batches = batches
    self._identity = {"kind": self.STATE_KIND, **identity}
    self._read_options = read_options
    self._worker_count = worker_count
    self._worker_buffer_size = worker_buffer_size
    self._step = 0
    self._iterator = None

  def _start(self) -> None:
    ds = self._batches[self._step :].to_iter_dataset(self._read_options)
    if self._worker_count:
      _mark_flags_parsed()
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self._worker_count, per_worker_buffer_size=self._worker_buffer_size
        )
      )
    self._iterator = iter(ds)

  def _stop(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __next__(self):
    self._assert_not_closed()
    if self._iterator is None:
      self._start()
    batch = next(self._iterator)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {**self._identity, "step": self._step}

  def set_state(self, state) -> None:
    if isinstance(state, (bytes, bytearray, str)):
      state = json.loads(state)
    if not isinstance(state, Mapping) or state.get("kind") != self.STATE_KIND:
      raise ValueError(
        "Not a training-pipeline state (an older per-host loader "
        f"state cannot be resumed exactly): {str(state)[:200]!r}."
      )
    changed = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
    if changed:
      raise DataStateMismatch(changed)
    self._stop()
    self._step = int(state["step"])

  def start_prefetch(self) -> None:
    if self._iterator is None:
      self._start()
    self._iterator.start_prefetch()

  def close(self) -> None:
    self._stop()
    super().close()

  def __str__(self) -> str:
    return f"TrainIterator(step={self._step}, workers={self._worker_count})"


def make_train_iterator(
  data_config,
  split: str,
  global_batch_size: int,
  *,
  seed: int = 0,
  image_size: Sequence[int] = (32, 128),
  worker_count: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_epochs: int | None | str = "auto",
  augment: bool | None = None,
  source=None,
) -> TrainIterator:
  """The training iterator of a split; see `make_pipeline` (train=True)."""
  image_size = _check_image_size(image_size)
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  local = _check_batch_size(global_batch_size, shard_count)
  if source is None:
    source = make_source(data_config, split)
  curriculum = Curriculum.from_config(data_config)
  if curriculum_applies(data_config) and isinstance(source, SyntheticSource):
    source = source.with_curriculum(curriculum, global_batch_size)
  if len(source) == 0:
    raise formats.DataError(f"{source!r} has no records.")
  if num_epochs == "auto":
    num_epochs = None
  if augment is None:
    augment = bool(_get(data_config, "augment", False))
  batches = make_train_dataset(
    data_config,
    source,
    global_batch_size,
    seed=seed,
    image_size=image_size,
    shard_index=shard_index,
    shard_count=shard_count,
    num_epochs=num_epochs,
    augment=augment,
  )
  if worker_count is None:
    worker_count = int(_get(data_config, "worker_count", 0))
  threads = int(_get(data_config, "read_threads", 8))
  prefetch = int(_get(data_config, "prefetch", 64))  # records
  read_options = grain.ReadOptions(
    num_threads=threads, prefetch_buffer_size=max(threads, -(-prefetch // local))
  )
  identity = {
    "source": _fingerprint(source),
    "records": len(source),
    "seed": int(seed),
    "global_batch_size": int(global_batch_size),
  }
  return TrainIterator(
    batches, identity=identity, read_options=read_options, worker_count=worker_count
  )


# ---------------------------------------------------- evaluation pipeline ----


def shard_options(
  train: bool, shard_index: int | None = None, shard_count: int | None = None
) -> grain.ShardOptions:
  """Explicit shards, else one shard per JAX process (evaluation loader)."""
  if shard_index is None and shard_count is None:
    return grain.ShardByJaxProcess(drop_remainder=train)
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  return grain.ShardOptions(shard_index, shard_count, drop_remainder=train)


def shard_bounds(num_records: int, shard: grain.ShardOptions) -> tuple[int, int]:
  """[start, stop) of a host's contiguous slice. With drop_remainder every host
  gets num_records // shard_count records; without, the slices cover everything."""
  n, i, k = num_records, shard.shard_index, shard.shard_count
  if shard.drop_remainder:
    return i * (n // k), (i + 1) * (n // k)
  return n * i // k, n * (i + 1) // k


class ShardSlice(grain.RandomAccessDataSource):
  """Records [start, stop) of a source: one host's shard.

  We slice the source ourselves (and give grain NoSharding) because grain 0.2.18's
  DataLoader loses records of uneven shards when drop_remainder=False.
  """

  def __init__(self, source, start: int, stop: int):
    self._source, self._start, self._stop = source, start, stop

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, index):
    return self._source[self._start + int(index)]

  def __repr__(self) -> str:
    return f"{self._source!r}[{self._start}:{self._stop}]"


def make_loader(
  data_config,
  split: str,
  global_batch_size: int,
  *,
  image_size: Sequence[int] = (32, 128),
  worker_count: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_epochs: int | None | str = "auto",
  augment: bool = False,
  source=None,
) -> grain.DataLoader:
  """The evaluation DataLoader of a split: sequential, each host a contiguous slice
  (together all records), the last partial batch kept; see `make_pipeline`."""
  image_size = _check_image_size(image_size)
  if source is None:
    source = make_source(data_config, split)
  shard = shard_options(False, shard_index, shard_count)
  batch_size = _check_batch_size(global_batch_size, shard.shard_count)
  if num_epochs == "auto":
    num_epochs = 1
  if len(source) < shard.shard_count:
    raise formats.DataError(
      f"{source!r} has {len(source)} records, fewer than the {shard.shard_count} shards."
    )
  operations = [DropInvalid()] if isinstance(source, formats.Reader) else []
  start, stop = shard_bounds(len(source), shard)
  sharded = ShardSlice(source, start, stop)
  operations += _preprocess_ops(data_config, image_size)
  if augment:
    operations.append(Augment())
  operations += [Normalize(), grain.Batch(batch_size, drop_remainder=False)]
  sampler = grain.IndexSampler(
    num_records=len(sharded),
    shard_options=grain.NoSharding(),
    shuffle=False,
    num_epochs=num_epochs,
    seed=0,
  )
  if worker_count is None:
    worker_count = int(_get(data_config, "worker_count", 0))
  if worker_count:
    _mark_flags_parsed()
  return grain.DataLoader(
    data_source=sharded,
    sampler=sampler,
    operations=operations,
    worker_count=worker_count,
    read_options=grain.ReadOptions(
      num_threads=int(_get(data_config, "read_threads", 8)),
      prefetch_buffer_size=int(_get(data_config, "prefetch", 64)),
    ),
  )


def make_pipeline(
  data_config,
  split: str,
  global_batch_size: int,
  *,
  train: bool,
  seed: int = 0,
  image_size: Sequence[int] = (32, 128),
  worker_count: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_epochs: int | None | str = "auto",
  augment: bool | None = None,
):
  """A checkpointable iterator of per-host batches (see the module docstring).

  Training (train=True): every host draws the same global shuffled order
  (from `seed`; reshuffled every epoch), cut into global batches of
  `global_batch_size` consecutive records; host i of n gets rows
  [i*B/n, (i+1)*B/n) of each. Concatenating the hosts' batches in host order gives
  exactly the 1-host batch (augmentation included), for any n and worker count.
  Batches are full and run across epoch boundaries; a finite `num_epochs` ends at
  the last complete global batch.

  Evaluation (train=False): sequential, one epoch, each host a contiguous slice,
  together every record once; the last partial batch is kept.

  Args:
    data_config: ConfigDict (or dict) with the fields of `default_config`.
    split: split name ('train', 'val', ...) or a tree sub-path of a real source.
    global_batch_size: batch over all hosts; each host gets global / shard_count.
    train: see above; also augments (if data_config.augment).
    seed: shuffling and augmentation seed (the same on every host).
    image_size: (H, W) of the model input.
    worker_count: grain worker processes (0: in this process); None uses
      data_config.worker_count.
    shard_index, shard_count: explicit host shard; default one per JAX process.
    num_epochs: None for infinite; 'auto' is None when training, 1 otherwise.
    augment: overrides `train and data_config.augment`.

  Returns:
    Training: a `TrainIterator` (a grain DatasetIterator): next() -> batch dict;
    get_state() -> JSON-serialisable dict (the global step and the stream's
    identity); set_state(dict) resumes, also on another host or worker count.
    Evaluation: a grain DataLoader iterator (get_state() -> bytes).
  """
  if train:
    return make_train_iterator(
      data_config,
      split,
      global_batch_size,
      seed=seed,
      image_size=image_size,
      worker_count=worker_count,
      shard_index=shard_index,
      shard_count=shard_count,
      num_epochs=num_epochs,
      augment=augment,
    )
  loader = make_loader(
    data_config,
    split,
    global_batch_size,
    image_size=image_size,
    worker_count=worker_count,
    shard_index=shard_index,
    shard_count=shard_count,
    num_epochs=num_epochs,
    augment=bool(augment),
  )
  return iter(loader)


def padded_eval_batches(
  data_config,
  split: str,
  global_batch_size: int,
  fields: Mapping[str, Sequence[int]],
  *,
  image_size: Sequence[int] = (32, 128),
  worker_count: int | None = None,
  with_labels: bool = False,
  source=None,
):
  """Yields this host's evaluation batches of `fields`, zero-padded to a fixed size.

  fields: {batch key: per-example shape}, e.g. {'image': (32, 128, 3), 'mask': (32, 128)}.
  Each batch has global_batch_size // hosts rows of every field, 'valid' bool[b] (False
  on padding rows) and, with_labels, 'label' object[b] ('' on padding rows). Every host
  yields the same number of batches (all-padding ones after its slice ends), so one
  jitted step shape serves all of them and multi-host evaluation stays in step.
  `source`: the make_source(data_config, split) to read (e.g. to read its skip counts).
  """
  source = make_source(data_config, split) if source is None else source
  shard = shard_options(False)
  local = _check_batch_size(global_batch_size, shard.shard_count)
  loader = make_loader(
    data_config,
    split,
    global_batch_size,
    image_size=image_size,
    source=source,
    worker_count=worker_count,
  )
  iterator = iter(loader)
  largest_slice = -(-len(source) // shard.shard_count)
  for _ in range(-(-largest_slice // local)):
    batch = next(iterator, None)
    n = 0 if batch is None else len(batch["image"])
    out = {"valid": np.arange(local) < n}
    if with_labels:
      out["label"] = np.full(local, "", object)
      if n and "label" in batch:
        out["label"][:n] = batch["label"]
    for key, shape in fields.items():
      out[key] = np.zeros((local, *shape), np.float32)
      if n:
        out[key][:n] = batch[key]
    yield out
