"""The encoder's architecture as one value: `EncoderConfig`, and the config section it
comes from, `config.model.encoder`.

Every program builds its encoder from the same eight fields, the vit.Encoder
attributes that decide its weights and what they mean:

  variant (a vit.VARIANTS name or None), width, depth, num_heads (override the
  variant), patch (ph, pw), stem ('patch' | 'conv'), stem_channels (() = default),
  attention_bias ('none' | 'alibi_2d')

gelu, dtype, scan_layers and attention are compute settings of the whole model and stay
in `config.model`.

  EncoderConfig                        the frozen, hashable value every model class
                                       (MAE, Recognizer, the dense models) takes as its
                                       `encoder` attribute; its defaults are DEFAULT,
                                       configs/pretrain.py's encoder; .dims()
  build(encoder, **compute) -> vit.Encoder   the one place an encoder module is made
  check(section, where) -> dict        the one validator; errors name the field
  resolve(given, pretrained, where)    a fine-tune encoder: fields set in `given` win and
                                       must agree with `pretrained` (init_from's); unset
                                       ones come from `pretrained`, else DEFAULT
  of_model(model) -> dict or None      the section of a model config or a run's
                                       config.json; configs written before the section
                                       existed (flat `encoder_width`, `patch`, ...) are
                                       read through a shim
"""

import dataclasses

from ml_collections.config_dict import placeholder

from mms_jax import errors
from mms_jax.models import vit

FIELDS = (
  "variant",
  "width",
  "depth",
  "num_heads",
  "patch",
  "stem",
  "stem_channels",
  "attention_bias",
)

# configs/pretrain.py's default encoder: 128 wide, 4 deep, 4 heads, 8x4 patches, the
# masked conv stem and the 2-D ALiBi bias (tests/test_configs.py keeps them equal).
DEFAULT = dict(
  variant=None,
  width=128,
  depth=4,
  num_heads=4,
  patch=(8, 4),
  stem="conv",
  stem_channels=(),
  attention_bias="alibi_2d",
)
# The paper's plain ViT: 4x4 linear patches, no attention bias.
PAPER_VIT = dict(patch=(4, 4), stem="patch", attention_bias="none")

# The flat model fields of configs written before `model.encoder` existed.
_FLAT = dict(
  variant="encoder_variant",
  width="encoder_width",
  depth="encoder_depth",
  num_heads="encoder_num_heads",
  patch="patch",
  stem="stem",
  stem_channels="stem_channels",
  attention_bias="attention_bias",
)
_FLAT_DEFAULTS = dict(stem="patch", stem_channels=(), attention_bias="none")


_TYPES = dict(
  variant=str,
  width=int,
  depth=int,
  num_heads=int,
  patch=tuple,
  stem=str,
  stem_channels=tuple,
  attention_bias=str,
)


def unset():
  """A section with every field unset (None, typed for command-line overrides): the
  fine-tune configs', completed at run time by resolve."""
  return {name: placeholder(_TYPES[name]) for name in FIELDS}


def _normalised(encoder):
  out = {name: encoder.get(name) for name in FIELDS}
  for name in ("patch", "stem_channels"):
    if out[name] is not None:
      out[name] = tuple(int(v) for v in out[name])
  return out


def check(encoder, where="config.model.encoder"):
  """The complete, normalised section; ConfigError names a bad or missing field."""
  if encoder is None:
    raise errors.ConfigError(f"{where} is missing: the model config has no encoder section")
  unknown = sorted(set(encoder) - set(FIELDS))
  if unknown:
    raise errors.ConfigError(f"{where} has unknown fields {unknown}: the fields are {FIELDS}")
  enc = _normalised(encoder)
  if enc["variant"] not in (None, *vit.VARIANTS):
    raise errors.ConfigError(
      f"{where}.variant={enc['variant']!r}: use one of {sorted(vit.VARIANTS)} or None"
    )
  try:
    width, _, heads = _dims(enc)
  except ValueError:
    raise errors.ConfigError(
      f"{where}: set variant, or width, depth and num_heads (got {enc})"
    ) from None
  if width % heads:
    raise errors.ConfigError(f"{where}: width {width} is not divisible by num_heads {heads}")
  if enc["patch"] is None or len(enc["patch"]) != 2 or min(enc["patch"]) < 1:
    raise errors.ConfigError(f"{where}.patch={enc['patch']}: use (height, width), each >= 1")
  if enc["stem"] not in vit.STEMS:
    raise errors.ConfigError(f"{where}.stem={enc['stem']!r}: use one of {vit.STEMS}")
  if enc["stem"] == "conv":
    try:
      strides = vit.stem_strides(enc["patch"])
    except ValueError as e:
      raise errors.ConfigError(f"{where}.patch: {e}") from None
    if enc["stem_channels"] and len(enc["stem_channels"]) != len(strides):
      raise errors.ConfigError(
        f"{where}.stem_channels={enc['stem_channels']}: patch {enc['patch']} needs "
        f"{len(strides)} stages (one per halving), or () for the default"
      )
  if enc["stem_channels"] is None:
    enc["stem_channels"] = ()
  if enc["attention_bias"] not in vit.ATTENTION_BIASES:
    raise errors.ConfigError(
      f"{where}.attention_bias={enc['attention_bias']!r}: use one of {vit.ATTENTION_BIASES}"
    )
  return enc


def of_model(model):
  """The encoder section of a model config (ConfigDict or a config.json dict), or None
  when it has neither the section nor the flat fields of older configs."""
  if model.get("encoder") is not None:
    return _normalised(model["encoder"])
  if not any(old in model for old in _FLAT.values()):
    return None
  flat = {}
  for name, old in _FLAT.items():
    value = model.get(old)
    flat[name] = _FLAT_DEFAULTS[name] if not value and name in _FLAT_DEFAULTS else value
  return _normalised(flat)


def resolve(given, pretrained=None, where="config.model.encoder", source="init_from"):
  """The encoder of a fine-tune run (module docstring); checked."""
  given = _normalised(given)
  if pretrained is None:
    return check(_fill(given, DEFAULT), where)
  pretrained = check(pretrained, f"{source}'s config.model.encoder")
  merged = check(_fill(given, pretrained), where)
  clash = [n for n in FIELDS if given[n] is not None and given[n] != pretrained[n]]
  if _dims(merged) == _dims(pretrained):  # e.g. variant 'S' == width 384, depth 12, 6 heads
    clash = [n for n in clash if n not in _SIZE]
  if clash:
    raise errors.ConfigError(
      f"{where} differs from the encoder of {source}: "
      + ", ".join(f"{n}={given[n]!r} vs {pretrained[n]!r}" for n in clash)
      + ". Leave these fields unset to take the pretrained encoder's."
    )
  return merged


_SIZE = ("variant", "width", "depth", "num_heads")


def _fill(given, base):
  """given's fields, its unset ones from base; a given variant brings its own width,
  depth and heads (only those given override it), never base's."""
  return {
    n: given[n]
    if given[n] is not None
    else (None if n in _SIZE and given["variant"] is not None else base[n])
    for n in FIELDS
  }


def _dims(enc):
  return vit.Encoder(**{k: enc[k] for k in _SIZE}).dims()


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The encoder's architecture (module docstring); defaults: DEFAULT."""

  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  patch: tuple[int, int] = DEFAULT["patch"]
  stem: str = DEFAULT["stem"]
  stem_channels: tuple[int, ...] = DEFAULT["stem_channels"]
  attention_bias: str = DEFAULT["attention_bias"]

  def __post_init__(self):
    # Without a variant, unset sizes are DEFAULT's; a variant brings its own.
    if self.variant is None:
      for name in ("width", "depth", "num_heads"):
        if getattr(self, name) is None:
          object.__setattr__(self, name, DEFAULT[name])
    object.__setattr__(self, "patch", tuple(int(v) for v in self.patch))
    object.__setattr__(self, "stem_channels", tuple(int(v) for v in self.stem_channels or ()))

  @classmethod
  def of(cls, section, where="config.model.encoder"):
    """The value of a complete config section (checked), or of an EncoderConfig."""
    if isinstance(section, cls):
      return section
    return cls(**check(section, where))

  def as_dict(self):
    return dataclasses.asdict(self)

  def dims(self):
    """(width, depth, num_heads), the variant's unless overridden."""
    return _dims(self.as_dict())


def build(encoder, **compute):
  """The vit.Encoder of `encoder` (an EncoderConfig); `compute`: gelu, dtype,
  scan_layers, attention, mlp_ratio, return_blocks, name, ..."""
  return vit.Encoder(
    variant=encoder.variant,
    width=encoder.width,
    depth=encoder.depth,
    num_heads=encoder.num_heads,
    patch=encoder.patch,
    stem=encoder.stem,
    stem_channels=encoder.stem_channels,
    attention_bias=encoder.attention_bias,
    **compute,
  )
