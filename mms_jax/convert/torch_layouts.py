"""Pure-numpy mapping between mms_jax params and PyTorch state-dict layouts.

Nothing here imports torch: a "state dict" is a flat `{name: np.ndarray}` dict
with PyTorch's tensor orientation (Linear weight [out, in], Conv2d weight
[out, in, kh, kw]). `mms_jax.convert` turns files into such dicts and back.

Layouts (see docs/pytorch.md for the key tables):
  'mae'  the original MAE `MaskedAutoencoderViT` (cls_token, pos_embed,
         patch_embed.proj.*, blocks.N.*, norm.*, decoder_*, mask_token), also
         what MAERec-style text MAE code loads;
  'timm' timm `VisionTransformer` (the encoder part of 'mae', same names);
  'hf'   Hugging Face `ViTMAEForPreTraining` (`vit.*`, `decoder.*`), written
         with the long-standing Hub names (`vit.encoder.layer.N.attention.
         attention.query`, ...). Newer transformers names (`vit.layers.N.
         attention.q_proj`, ...) and bare `ViTMAEModel` keys are read too.

The mms_jax side is the nested params dict of `mae.MAE` ({'encoder', 'decoder'})
or of a bare `vit.Encoder`; scanned (stacked) blocks are accepted.
"""

import dataclasses
import math
import re
from typing import Any

import numpy as np

from mms_jax import errors
from mms_jax.models import encoder_config
from mms_jax.models import vit

LAYOUTS = ("hf", "timm", "mae")
StateDict = dict[str, np.ndarray]


class ConversionError(errors.UserError, ValueError):
  """A checkpoint cannot be converted; the message names the tensor or field."""


# ---------------------------------------------------------------------------
# Model description.


@dataclasses.dataclass
class ModelConfig:
  """What a converter needs to know beyond the tensors themselves.

  Shapes that the tensors carry (width, depth, patch, channels, decoder dims,
  mlp ratio) are read from them; `image_size` (for the position embedding) and
  the head counts (HF config, timm constructor) must come from the run config
  or the caller.
  """

  image_size: tuple[int, int]
  patch: tuple[int, int] | None = None
  channels: int | None = None
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  decoder_width: int | None = None  # None: encoder only
  decoder_depth: int | None = None
  decoder_num_heads: int | None = None
  mlp_ratio: int | None = None
  gelu: str = "erf"
  norm_pix_loss: bool = True
  mask_ratio: float = 0.75

  @property
  def grid(self):
    return vit.grid_shape(self.image_size, self.patch)

  @property
  def has_decoder(self):
    return self.decoder_width is not None

  @classmethod
  def from_run_config(cls, config, **overrides):
    """Reads an mms_jax run config dict ({'image_size', 'model': {...}, ...}).

    Unknown or absent fields keep their defaults (or None); `overrides` that are
    not None win over the config.
    """
    config = dict(config or {})
    model = dict(config.get("model") or {})
    encoder = encoder_config.of_model(model) or {}
    if (encoder.get("attention_bias") or "none") != "none":
      raise ConversionError(
        f"the run config has model.encoder.attention_bias={encoder['attention_bias']!r}: "
        "PyTorch ViT layouts (hf, timm, mae) have no attention bias, so the exported model "
        "would compute something else; pretrain with attention_bias='none' to export"
      )
    width, depth, heads = (encoder.get(k) for k in ("width", "depth", "num_heads"))
    variant = encoder.get("variant")
    if variant in vit.VARIANTS:
      base = vit.VARIANTS[variant]
      width, depth, heads = (o if o is not None else b for o, b in zip((width, depth, heads), base))
    masking = dict(config.get("masking") or {})
    loss = dict(config.get("loss") or {})
    values = dict(
      image_size=config.get("image_size"),
      patch=encoder.get("patch"),
      channels=model.get("channels"),
      width=width,
      depth=depth,
      num_heads=heads,
      decoder_width=model.get("decoder_width")
      if model.get("encoder_mode", "mae") == "mae"
      else None,
      decoder_depth=model.get("decoder_depth"),
      decoder_num_heads=model.get("decoder_num_heads"),
      mlp_ratio=model.get("mlp_ratio"),
      gelu=model.get("gelu"),
      norm_pix_loss=loss.get("norm_pix"),
      mask_ratio=masking.get("ratio"),
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    values = {k: v for k, v in values.items() if v is not None}
    if "image_size" not in values:
      raise ConversionError(
        "image_size is unknown: the checkpoint has no run config "
        "with image_size; pass it (e.g. --image_size=32,128)"
      )
    for k in ("image_size", "patch"):
      if k in values:
        values[k] = tuple(int(x) for x in values[k])
    return cls(**values)

  def to_run_config(self):
    """The mms_jax run-config fields this describes (written into imported checkpoints)."""
    model = dict(
      encoder=dict(
        variant=None,
        width=self.width,
        depth=self.depth,
        num_heads=self.num_heads,
        patch=list(self.patch),
        stem="patch",
        stem_channels=[],
        attention_bias="none",
      ),
      channels=self.channels,
      mlp_ratio=self.mlp_ratio,
      gelu=self.gelu,
      encoder_mode="mae",
    )
    if self.has_decoder:
      model.update(
        decoder_width=self.decoder_width,
        decoder_depth=self.decoder_depth,
        decoder_num_heads=self.decoder_num_heads,
      )
    return dict(
      image_size=list(self.image_size),
      model=model,
      loss=dict(norm_pix=self.norm_pix_loss),
      masking=dict(ratio=self.mask_ratio),
    )

  def with_shapes_of(self, params):
    """A copy whose tensor-carried fields are read from `params` (mms_jax tree).

    Raises ConversionError if a field that is set disagrees with the tensors.
    Decoder fields are cleared when the params have no decoder.
    """
    found = shapes_from_params(params)
    out = dataclasses.replace(self)
    if found["decoder_width"] is None:
      out.decoder_width = out.decoder_depth = out.decoder_num_heads = None
      del found["decoder_width"], found["decoder_depth"]
    for k, v in found.items():
      old = getattr(self, k)
      old = tuple(old) if isinstance(old, list) else old
      if old is not None and old != v:
        raise ConversionError(f"config says {k}={old} but the tensors have {k}={v}")
      setattr(out, k, v)
    return out

  def check_heads(self):
    """Raises unless head counts are known and divide the widths."""
    pairs = [("num_heads", self.width, self.num_heads)]
    if self.has_decoder:
      pairs.append(("decoder_num_heads", self.decoder_width, self.decoder_num_heads))
    for name, width, heads in pairs:
      if heads is None:
        raise ConversionError(
          f"{name} is unknown (it is not stored in the tensors): set it "
          f"from the run config or pass --{name}"
        )
      if width % heads:
        raise ConversionError(f"{name}={heads} does not divide the width {width}")


# ---------------------------------------------------------------------------
# Small helpers.


def flatten(tree, prefix=""):
  """Nested dicts -> {'a/b/c': np.ndarray}."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if hasattr(v, "items"):
      out.update(flatten(v, path + "/"))
    else:
      out[path] = np.asarray(v)
  return out


def unflatten(flat):
  """{'a/b/c': x} -> nested dicts."""
  tree = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def normalize_params(params):
  """Unscanned, plain nested dicts of numpy arrays.

  Accepts a full `MAE` tree, a train-state-like {'params': ...} wrapper, or a bare
  encoder tree (which is put under 'encoder').
  """
  params = vit.unscan_params(_plain(params))
  if "params" in params and "encoder" not in params:
    params = params["params"]
  if "encoder" not in params:
    if ("patch_embed" in params or "stem" in params) and "cls_token" in params:
      params = {"encoder": params}
    else:
      raise ConversionError(f"params have no 'encoder' subtree (top-level keys: {sorted(params)})")
  if "stem" in params["encoder"]:
    raise ConversionError(
      "the encoder has a convolutional stem (model.encoder.stem='conv'): the hf, timm and mae "
      "PyTorch layouts hold only a linear patch embedding (patch_embed.proj), so this "
      "checkpoint has no PyTorch ViT equivalent; pretrain with model.encoder.stem='patch' to "
      "export, or keep it as an orbax checkpoint"
    )
  return vit.unscan_params(params)


def _plain(tree):
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return np.asarray(tree)


def _count_blocks(tree, name="blocks"):
  idx = [int(m.group(1)) for k in tree for m in [re.match(rf"^{name}_(\d+)$", k)] if m]
  if sorted(idx) != list(range(len(idx))):
    raise ConversionError(f"{name}: non-contiguous block indices {sorted(idx)}")
  return len(idx)


def shapes_from_params(params):
  """Tensor-carried config fields of an mms_jax params tree."""
  params = normalize_params(params)
  enc = params["encoder"]
  ph, pw, c, d = _need(enc, "patch_embed/kernel", "encoder").shape
  depth = _count_blocks(enc)
  hidden = _need(enc, "blocks_0/mlp/fc1/kernel", "encoder").shape[1] if depth else 4 * d
  out = dict(
    width=int(d),
    depth=depth,
    patch=(int(ph), int(pw)),
    channels=int(c),
    mlp_ratio=_ratio(hidden, d, "encoder/blocks_0/mlp/fc1/kernel"),
  )
  dec = params.get("decoder")
  if dec:
    out["decoder_width"] = int(_need(dec, "mask_token", "decoder").shape[-1])
    out["decoder_depth"] = _count_blocks(dec)
  else:
    out["decoder_width"] = out["decoder_depth"] = None
  return out


def _ratio(hidden, width, name):
  if hidden % width:
    raise ConversionError(f"{name}: MLP width {hidden} is not a multiple of {width}")
  return int(hidden // width)


def _need(tree, path, where):
  node = tree
  for p in path.split("/"):
    if not hasattr(node, "items") or p not in node:
      raise ConversionError(f"missing parameter {where}/{path}")
    node = node[p]
  return np.asarray(node)


# ---------------------------------------------------------------------------
# Position embeddings.


def pos_embed(width, grid):
  """The fixed sin-cos embedding mms_jax adds, with its zero cls row: [1, 1+L, D]."""
  return vit.sincos_pos_embed_2d(width, grid, cls_token=True)


def identify_pos_embed(value, width, grid=None, atol=1e-4):
  """Recognises a stored position embedding [1, 1+L, D] (or [1, L, D]).

  Returns (kind, grid_found):
    ('grid', g)    the mms_jax / MAE sin-cos for the real grid g (what we compute);
    ('square', g)  sin-cos for a square s x s grid with s*s = L although the real
                   grid is not square: the layout of MAE code that builds the
                   embedding with int(sqrt(num_patches)) (e.g. 16x16 for a 8x32
                   text-image grid; also HF ViTMAE's own initialisation);
    ('other', None) anything else (e.g. a learned embedding).
  With grid=None every factorisation of L is tried and the first match is 'grid'.
  """
  value = np.asarray(value, np.float64).reshape(-1, width)
  length = value.shape[0]
  has_cls = grid is None or length == grid[0] * grid[1] + 1
  if grid is not None and length not in (grid[0] * grid[1], grid[0] * grid[1] + 1):
    raise ConversionError(
      f"position embedding has {length} rows but the grid "
      f"{grid[0]}x{grid[1]} has {grid[0] * grid[1]} tokens (+1 cls)"
    )

  def matches(g):
    ref = pos_embed(width, g)[0]
    ref = ref if has_cls else ref[1:]
    return ref.shape == value.shape and np.max(np.abs(ref - value)) <= atol

  candidates = (
    [grid]
    if grid is not None
    else [(h, (length - 1) // h) for h in range(1, length) if (length - 1) % h == 0]
  )
  for g in candidates:
    if matches(g):
      return "grid", tuple(g)
  n = length - 1 if has_cls else length
  s = math.isqrt(n)
  if s * s == n and matches((s, s)):
    return "square", (s, s)
  return "other", None


# ---------------------------------------------------------------------------
# Names per layout.


@dataclasses.dataclass(frozen=True)
class _Names:
  """Torch names of one layout; '{i}' is the block index."""

  cls_token: str
  pos_embed: str
  patch: str
  block: str
  norm: str
  dec_embed: str
  dec_mask_token: str
  dec_pos_embed: str
  dec_block: str
  dec_norm: str
  dec_pred: str
  fused_qkv: bool


_MAE = _Names(
  "cls_token",
  "pos_embed",
  "patch_embed.proj",
  "blocks.{i}.",
  "norm",
  "decoder_embed",
  "mask_token",
  "decoder_pos_embed",
  "decoder_blocks.{i}.",
  "decoder_norm",
  "decoder_pred",
  fused_qkv=True,
)
_HF = _Names(
  "vit.embeddings.cls_token",
  "vit.embeddings.position_embeddings",
  "vit.embeddings.patch_embeddings.projection",
  "vit.encoder.layer.{i}.",
  "vit.layernorm",
  "decoder.decoder_embed",
  "decoder.mask_token",
  "decoder.decoder_pos_embed",
  "decoder.decoder_layers.{i}.",
  "decoder.decoder_norm",
  "decoder.decoder_pred",
  fused_qkv=False,
)
NAMES = {"mae": _MAE, "timm": _MAE, "hf": _HF}

# Block sub-modules: flax name -> (MAE/timm name, HF name).
_BLOCK_PARTS = (
  ("norm1", "norm1", "layernorm_before"),
  ("attn/proj", "attn.proj", "attention.output.dense"),
  ("norm2", "norm2", "layernorm_after"),
  ("mlp/fc1", "mlp.fc1", "intermediate.dense"),
  ("mlp/fc2", "mlp.fc2", "output.dense"),
)
_HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")


# ---------------------------------------------------------------------------
# mms_jax -> torch.


def _linear_out(tree, name, torch_name, out):
  """Dense (kernel [in, out], bias) or LayerNorm (scale, bias) -> weight, bias."""
  if "kernel" in tree:
    out[f"{torch_name}.weight"] = np.ascontiguousarray(np.asarray(tree["kernel"]).T)
  elif "scale" in tree:
    out[f"{torch_name}.weight"] = np.asarray(tree["scale"])
  else:
    raise ConversionError(f"missing parameter {name}/kernel (or scale)")
  if "bias" not in tree:
    raise ConversionError(f"missing parameter {name}/bias")
  out[f"{torch_name}.bias"] = np.asarray(tree["bias"])


def _block_to_torch(block, where, prefix, fused, out):
  for flax_name, mae_name, hf_name in _BLOCK_PARTS:
    sub = _subtree(block, flax_name, where)
    _linear_out(sub, f"{where}/{flax_name}", prefix + (mae_name if fused else hf_name), out)
  qkv = _subtree(block, "attn/qkv", where)
  weight = np.ascontiguousarray(_need(qkv, "kernel", f"{where}/attn/qkv").T)  # [3D, D]
  bias = _need(qkv, "bias", f"{where}/attn/qkv")
  if fused:
    out[prefix + "attn.qkv.weight"], out[prefix + "attn.qkv.bias"] = weight, bias
  else:  # rows ordered (3, heads, head_dim): q, k, v are the three row blocks
    for name, w, b in zip(_HF_QKV, np.split(weight, 3), np.split(bias, 3)):
      out[f"{prefix}{name}.weight"], out[f"{prefix}{name}.bias"] = np.ascontiguousarray(w), b


def _subtree(tree, path, where):
  node = tree
  for p in path.split("/"):
    if not hasattr(node, "items") or p not in node:
      raise ConversionError(f"missing parameter {where}/{path}")
    node = node[p]
  return node


def to_state_dict(
  params, config: ModelConfig, layout: str, *, with_decoder: bool | None = None
) -> StateDict:
  """mms_jax params -> flat numpy state dict in `layout` ('hf', 'timm' or 'mae').

  The fixed position embeddings are written out for config.grid. 'timm' is
  encoder-only; for 'hf'/'mae' the decoder is included when present (or when
  with_decoder=True, which raises if it is absent). HF encoder-only dicts carry
  bare ViTMAEModel names (no 'vit.' prefix).
  """
  if layout not in LAYOUTS:
    raise ConversionError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
  params = normalize_params(params)
  config = config.with_shapes_of(params)
  if config.gelu not in ("erf", "tanh"):
    raise ConversionError(f"gelu={config.gelu!r}: use 'erf' or 'tanh'")
  names = NAMES[layout]
  decoder = params.get("decoder")
  if with_decoder is None:
    with_decoder = bool(decoder) and layout != "timm"
  if with_decoder and not decoder:
    raise ConversionError(
      "the checkpoint has no decoder (encoder-only or SimMIM params): export the encoder only"
    )
  if with_decoder and layout == "timm":
    raise ConversionError("the 'timm' layout is encoder-only")

  out: StateDict = {}
  enc = params["encoder"]
  kernel = _need(enc, "patch_embed/kernel", "encoder")  # [ph, pw, C, D]
  out[f"{names.patch}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
  out[f"{names.patch}.bias"] = _need(enc, "patch_embed/bias", "encoder")
  out[names.cls_token] = _need(enc, "cls_token", "encoder").reshape(1, 1, -1)
  out[names.pos_embed] = pos_embed(config.width, config.grid)
  for i in range(config.depth):
    _block_to_torch(
      enc[f"blocks_{i}"], f"encoder/blocks_{i}", names.block.format(i=i), names.fused_qkv, out
    )
  _linear_out(_subtree(enc, "norm", "encoder"), "encoder/norm", names.norm, out)

  if with_decoder:
    _linear_out(_subtree(decoder, "embed", "decoder"), "decoder/embed", names.dec_embed, out)
    out[names.dec_mask_token] = _need(decoder, "mask_token", "decoder").reshape(1, 1, -1)
    out[names.dec_pos_embed] = pos_embed(config.decoder_width, config.grid)
    for i in range(config.decoder_depth):
      _block_to_torch(
        decoder[f"blocks_{i}"],
        f"decoder/blocks_{i}",
        names.dec_block.format(i=i),
        names.fused_qkv,
        out,
      )
    _linear_out(_subtree(decoder, "norm", "decoder"), "decoder/norm", names.dec_norm, out)
    _linear_out(_subtree(decoder, "pred", "decoder"), "decoder/pred", names.dec_pred, out)
  elif layout == "hf":  # bare ViTMAEModel names
    out = {k[len("vit.") :]: v for k, v in out.items()}
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


# ---------------------------------------------------------------------------
# torch -> mms_jax.

# Newer transformers module names -> the Hub names used above (HF layout only).
_HF_RENAMES = (
  (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
  (r"\.attention\.q_proj\.", ".attention.attention.query."),
  (r"\.attention\.k_proj\.", ".attention.attention.key."),
  (r"\.attention\.v_proj\.", ".attention.attention.value."),
  (r"\.attention\.o_proj\.", ".attention.output.dense."),
  (r"\.mlp\.fc1\.", ".intermediate.dense."),
  (r"\.mlp\.fc2\.", ".output.dense."),
)


def unwrap_state_dict(obj) -> StateDict:
  """Finds the tensor dict inside common checkpoint wrappers; strips 'module.'.

  Accepts {'model': sd}, {'state_dict': sd}, {'model_state': sd} or a bare sd.
  Values are converted with np.asarray (callers pass numpy or CPU tensors
  already converted).
  """
  for key in ("model", "state_dict", "model_state", "module"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict):
    raise ConversionError(f"expected a dict of tensors, got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "shape"):
      continue  # non-tensor entries (epoch counters, ...) are not weights
    out[k[len("module.") :] if k.startswith("module.") else k] = np.asarray(v)
  if not out:
    raise ConversionError("the checkpoint holds no tensors")
  return out


def detect_layout(sd: StateDict) -> str:
  """'hf', 'mae' (with decoder) or 'timm' (encoder only) from the key names."""
  if any(k.startswith(("vit.embeddings.", "embeddings.")) for k in sd):
    return "hf"
  if "cls_token" in sd and "patch_embed.proj.weight" in sd:
    return "mae" if "decoder_embed.weight" in sd else "timm"
  raise ConversionError(
    "unrecognised state dict: expected HF ViTMAE keys "
    "(vit.embeddings.*) or MAE/timm keys (cls_token, patch_embed.proj.*); "
    f"first keys: {sorted(sd)[:6]}"
  )


def _canonical_hf(sd):
  out = {}
  for k, v in sd.items():
    for pat, rep in _HF_RENAMES:
      k = re.sub(pat, rep, k)
    if k.startswith(("embeddings.", "encoder.", "layernorm.")):
      k = "vit." + k
    out[k] = v
  return out


class _Reader:
  """Takes tensors out of a state dict by name; tracks what was used."""

  def __init__(self, sd):
    self.sd, self.used = sd, set()

  def has(self, name):
    return name in self.sd

  def get(self, name, shape=None):
    if name not in self.sd:
      raise ConversionError(f"missing tensor {name!r} in the PyTorch state dict")
    value = np.asarray(self.sd[name], np.float32)
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ConversionError(
        f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
      )
    self.used.add(name)
    return value

  def linear(self, name, d_in, d_out):
    return {
      "kernel": np.ascontiguousarray(self.get(f"{name}.weight", (d_out, d_in)).T),
      "bias": self.get(f"{name}.bias", (d_out,)),
    }

  def norm(self, name, d):
    return {"scale": self.get(f"{name}.weight", (d,)), "bias": self.get(f"{name}.bias", (d,))}


def _count(sd, prefix):
  pat = re.compile(re.escape(prefix).replace(r"\{i\}", r"(\d+)"))
  idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
  if idx and sorted(idx) != list(range(len(idx))):
    raise ConversionError(f"{prefix}: non-contiguous block indices {sorted(idx)}")
  return len(idx)


def _block_from_torch(r, prefix, fused, d, hidden):
  get = {}
  for flax_name, mae_name, hf_name in _BLOCK_PARTS:
    name = prefix + (mae_name if fused else hf_name)
    if flax_name.startswith("norm"):
      get[flax_name] = r.norm(name, d)
    elif flax_name == "mlp/fc1":
      get[flax_name] = r.linear(name, d, hidden)
    elif flax_name == "mlp/fc2":
      get[flax_name] = r.linear(name, hidden, d)
    else:
      get[flax_name] = r.linear(name, d, d)
  if fused:
    get["attn/qkv"] = r.linear(prefix + "attn.qkv", d, 3 * d)
  else:
    parts = [r.linear(prefix + n, d, d) for n in _HF_QKV]
    get["attn/qkv"] = {
      "kernel": np.concatenate([p["kernel"] for p in parts], axis=1),
      "bias": np.concatenate([p["bias"] for p in parts]),
    }
  return unflatten({f"{k}/{leaf}": v for k, sub in get.items() for leaf, v in sub.items()})


def from_state_dict(
  sd: StateDict,
  layout: str = "auto",
  *,
  image_size: tuple[int, int] | None = None,
  pos_embed_policy: str = "warn",
  strict: bool = True,
  with_decoder: bool | None = None,
):
  """PyTorch state dict (numpy values) -> (mms_jax params, ModelConfig, notes).

  Args:
    sd: flat dict, e.g. from `unwrap_state_dict`.
    layout: 'hf', 'timm', 'mae' or 'auto'.
    image_size: (H, W) the model was trained on; if None the grid is recovered
      from the stored position embedding (every factorisation of L is tried).
    pos_embed_policy: what to do with a stored position embedding that is not
      the sin-cos of the real grid: 'warn' (default: a recognised square-grid
      layout is accepted with a note; anything else raises), 'error' (square
      layout raises too) or 'ignore' (accept anything, with a note). mms_jax
      always computes the real-grid embedding, so a model trained with another
      one needs fine-tuning to adapt.
    strict: raise if tensors are left over (e.g. a classifier head); otherwise
      list them in the notes.
    with_decoder: import the decoder ('mae'/'hf' only); default: if present.

  Returns:
    params: {'encoder': ..., 'decoder'?: ...} (unscanned, float32 numpy),
    config: a ModelConfig (num_heads left None: PyTorch tensors do not store it),
    notes: list of human-readable remarks (position-embedding layout, ...).
  """
  if pos_embed_policy not in ("warn", "error", "ignore"):
    raise ConversionError(
      f"pos_embed_policy must be warn, error or ignore, got {pos_embed_policy!r}"
    )
  layout = detect_layout(sd) if layout == "auto" else layout
  if layout not in LAYOUTS:
    raise ConversionError(f"unknown layout {layout!r}; use one of {LAYOUTS} or auto")
  if layout == "hf":
    sd = _canonical_hf(sd)
  names = NAMES[layout]
  r = _Reader(sd)
  notes = []

  weight = r.get(f"{names.patch}.weight")
  if weight.ndim != 4:
    raise ConversionError(
      f"tensor {names.patch + '.weight'!r} has shape {weight.shape}, expected [D, C, ph, pw]"
    )
  d, c, ph, pw = weight.shape
  depth = _count(sd, names.block)
  hidden = (
    r.get(
      names.block.format(i=0)
      + ("mlp.fc1.weight" if names.fused_qkv else "intermediate.dense.weight")
    ).shape[0]
    if depth
    else 4 * d
  )
  enc = {
    "patch_embed": {
      "kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),
      "bias": r.get(f"{names.patch}.bias", (d,)),
    },
    "cls_token": r.get(names.cls_token, (1, 1, d)),
  }
  for i in range(depth):
    enc[f"blocks_{i}"] = _block_from_torch(r, names.block.format(i=i), names.fused_qkv, d, hidden)
  enc["norm"] = r.norm(names.norm, d)

  grid = vit.grid_shape(image_size, (ph, pw)) if image_size else None
  grid = _check_pos(r.get(names.pos_embed), d, grid, names.pos_embed, pos_embed_policy, notes)
  params = {"encoder": enc}
  config = ModelConfig(
    image_size=(grid[0] * ph, grid[1] * pw),
    patch=(int(ph), int(pw)),
    channels=int(c),
    width=int(d),
    depth=depth,
    mlp_ratio=_ratio(hidden, d, "mlp.fc1"),
  )

  present = r.has(f"{names.dec_embed}.weight")
  with_decoder = present and layout != "timm" if with_decoder is None else with_decoder
  if with_decoder:
    dd = r.get(names.dec_mask_token).shape[-1]
    ddepth = _count(sd, names.dec_block)
    dhidden = r.get(
      names.dec_block.format(i=0)
      + ("mlp.fc1.weight" if names.fused_qkv else "intermediate.dense.weight")
    ).shape[0]
    dec = {
      "embed": r.linear(names.dec_embed, d, dd),
      "mask_token": r.get(names.dec_mask_token, (1, 1, dd)),
    }
    for i in range(ddepth):
      dec[f"blocks_{i}"] = _block_from_torch(
        r, names.dec_block.format(i=i), names.fused_qkv, dd, dhidden
      )
    dec["norm"] = r.norm(names.dec_norm, dd)
    patch_dim = ph * pw * c
    dec["pred"] = r.linear(names.dec_pred, dd, patch_dim)
    _check_pos(r.get(names.dec_pos_embed), dd, grid, names.dec_pos_embed, pos_embed_policy, notes)
    params["decoder"] = dec
    config.decoder_width, config.decoder_depth = int(dd), ddepth
    if dhidden != config.mlp_ratio * dd:
      raise ConversionError(
        f"decoder MLP ratio {dhidden / dd} differs from the encoder's "
        f"{config.mlp_ratio}; mms_jax uses one ratio for both"
      )

  left = sorted(set(sd) - r.used)
  if with_decoder is False and present:
    left = [k for k in left if not k.startswith(("decoder", "mask_token"))]
  if left:
    msg = f"{len(left)} tensors were not used: {left[:8]}{' ...' if len(left) > 8 else ''}"
    if strict:
      raise ConversionError(msg + " (pass strict=False / --nostrict to drop them)")
    notes.append(msg)
  return params, config, notes


def _check_pos(value, width, grid, name, policy, notes):
  """Validates a stored position embedding; returns the grid to use."""
  kind, found = identify_pos_embed(value, width, grid)
  if kind == "grid":
    return found
  if grid is None and kind == "other":
    raise ConversionError(
      f"tensor {name!r} is not a sin-cos embedding of any grid; pass "
      "image_size so the grid is known (then pos_embed_policy=ignore "
      "accepts it)"
    )
  if kind == "square" and policy != "error":
    notes.append(
      f"{name} holds the sin-cos of a square {found[0]}x{found[1]} grid although "
      f"the image grid is {grid[0]}x{grid[1]} (MAE code that sizes the embedding "
      "by sqrt(num_patches) does this). mms_jax uses the real-grid embedding, so "
      "features differ until the model is fine-tuned."
    )
    return grid
  if policy == "ignore":
    notes.append(
      f"{name} is not the fixed sin-cos of the {grid[0]}x{grid[1]} grid (e.g. a "
      "learned embedding); it was dropped: mms_jax computes the sin-cos one."
    )
    return grid
  what = "a square-grid sin-cos" if kind == "square" else "not a sin-cos embedding"
  raise ConversionError(
    f"tensor {name!r} is {what} for the {grid[0]}x{grid[1]} grid; mms_jax "
    "cannot store position embeddings (it computes the real-grid sin-cos). "
    "Use pos_embed_policy=ignore (--pos_embed=ignore) to drop it anyway."
  )


_KWARG_FIELDS = ("patch", "channels", "width", "depth", "num_heads", "mlp_ratio")


def _shaped(config: ModelConfig, params, what: str) -> ModelConfig:
  """`config` with the tensor-carried fields filled from `params` (if given); raises
  if a constructor argument is still unknown."""
  if params is not None:
    config = config.with_shapes_of(params)
  missing = [k for k in _KWARG_FIELDS if getattr(config, k) is None]
  if config.has_decoder and config.decoder_num_heads is None:
    missing.append("decoder_num_heads")
  if missing:
    raise ConversionError(
      f"{what}: {', '.join(missing)} unknown. Pass the params ({what}(config, params)) or "
      "a config from config.with_shapes_of(params) / read_torch_checkpoint; head counts "
      "come from the run config or --num_heads / --decoder_num_heads"
    )
  return config


def timm_kwargs(config: ModelConfig, params=None) -> dict[str, Any]:
  """Constructor kwargs of a timm VisionTransformer matching the encoder.

  `VisionTransformer(**timm_kwargs(config, params))` (or `timm.create_model(
  'vit_small_patch16_224', pretrained=False, **kwargs)`, whose defaults they all
  override) builds the model that `to_timm_state_dict` loads into with
  strict=True: rectangular `img_size` and (possibly non-square) `patch_size` as
  pairs, exact or tanh GELU, timm's default LayerNorm eps 1e-6, cls token,
  `num_classes=0` (`model(x)` is the cls feature; replace `num_classes` for a new
  head). Tensor-carried fields are read from `params` when given.
  """
  config = _shaped(config, params, "timm_kwargs")
  return dict(
    img_size=list(config.image_size),
    patch_size=list(config.patch),
    in_chans=config.channels,
    embed_dim=config.width,
    depth=config.depth,
    num_heads=config.num_heads,
    mlp_ratio=float(config.mlp_ratio),
    qkv_bias=True,
    class_token=True,
    global_pool="token",
    num_classes=0,
    act_layer="gelu" if config.gelu == "erf" else "gelu_tanh",
  )


def mae_kwargs(config: ModelConfig, params=None) -> dict[str, Any]:
  """Constructor kwargs of MAE's MaskedAutoencoderViT (and derived text MAE code).

  The MAE reference code takes square int sizes and a `norm_layer`; rectangular
  images and non-square patches need code that accepts pairs (as MAERec-style
  code does). `layer_norm_eps` and `gelu` ('exact' | 'tanh') say which LayerNorm
  and GELU the blocks need (the reference model builders use eps 1e-6 and exact GELU).
  """
  config = _shaped(config, params, "mae_kwargs")
  out = dict(
    img_size=list(config.image_size),
    patch_size=list(config.patch),
    in_chans=config.channels,
    embed_dim=config.width,
    depth=config.depth,
    num_heads=config.num_heads,
    mlp_ratio=float(config.mlp_ratio),
    norm_pix_loss=config.norm_pix_loss,
    layer_norm_eps=1e-6,
    gelu="exact" if config.gelu == "erf" else "tanh",
  )
  if config.has_decoder:
    out.update(
      decoder_embed_dim=config.decoder_width,
      decoder_depth=config.decoder_depth,
      decoder_num_heads=config.decoder_num_heads,
    )
  return out


def hf_config(config: ModelConfig, with_decoder: bool) -> dict[str, Any]:
  """config.json of a transformers ViTMAE directory.

  Raises if HF's ViTMAEForPreTraining cannot represent the model (its decoder
  head assumes a square patch).
  """
  ph, pw = config.patch
  if with_decoder and ph != pw:
    raise ConversionError(
      f"HF ViTMAEForPreTraining needs a square patch (its decoder "
      f"predicts patch_size**2 * C values); patch is {ph}x{pw}. "
      "Export the encoder only (ViTMAEModel), or use the mae layout."
    )
  h, w = config.image_size
  out = dict(
    architectures=["ViTMAEForPreTraining" if with_decoder else "ViTMAEModel"],
    model_type="vit_mae",
    hidden_size=config.width,
    num_hidden_layers=config.depth,
    num_attention_heads=config.num_heads,
    intermediate_size=config.mlp_ratio * config.width,
    hidden_act="gelu" if config.gelu == "erf" else "gelu_pytorch_tanh",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    initializer_range=0.02,
    layer_norm_eps=1e-6,
    image_size=h if h == w else [h, w],
    patch_size=ph if ph == pw else [ph, pw],
    num_channels=config.channels,
    qkv_bias=True,
    mask_ratio=config.mask_ratio,
    norm_pix_loss=config.norm_pix_loss,
  )
  if with_decoder:
    out.update(
      decoder_hidden_size=config.decoder_width,
      decoder_num_hidden_layers=config.decoder_depth,
      decoder_num_attention_heads=config.decoder_num_heads,
      decoder_intermediate_size=config.mlp_ratio * config.decoder_width,
    )
  return out


def hf_preprocessor_config(config: ModelConfig) -> dict[str, Any]:
  """A ViTImageProcessor config mapping uint8 RGB to mms_jax's [-1, 1] input."""
  h, w = config.image_size
  return dict(
    image_processor_type="ViTImageProcessor",
    do_resize=True,
    size=dict(height=h, width=w),
    resample=2,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.5] * config.channels,
    image_std=[0.5] * config.channels,
  )
