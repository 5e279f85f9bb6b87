"""Checkpoint conversion between mms_jax and PyTorch (transformers, timm, MAE code).

Export (mms_jax params -> PyTorch):
  to_hf_vitmae(params, config, out_dir)     transformers ViTMAE directory
                                            (config.json + model.safetensors)
  to_timm_state_dict(params, config)        timm VisionTransformer encoder dict
  to_mae_state_dict(params, config)         original MAE MaskedAutoencoderViT dict
  save_state_dict(sd, path)                 .safetensors (default) or .pth
Import (PyTorch -> mms_jax):
  load_torch_file(path)                     safetensors, or .pth via weights-only load
  from_torch_state_dict(sd, layout)         -> mms_jax params
  read_torch_checkpoint(path)               -> (params, ModelConfig), reads sidecar config
  save_mms_checkpoint(params, config, dir)  orbax checkpoint usable as init_from
Both ways:
  convert(src, dst, fmt)                    what `python -m mms_jax.convert` runs
  load_hf_vitmae(path)                      from_pretrained + rectangular-grid fixes

Exported dicts hold numpy float32 arrays (`{k: torch.from_numpy(v)}` for torch).
torch is imported only where a .pth file or a transformers model is involved;
safetensors files are read and written with numpy.
"""

import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import pickle
from typing import Any
import warnings

import numpy as np

from mms_jax.convert import torch_layouts as tl
from mms_jax.convert.torch_layouts import ConversionError
from mms_jax.convert.torch_layouts import ModelConfig
from mms_jax.models import encoder_config

__all__ = [
  "ConversionError",
  "ModelConfig",
  "to_hf_vitmae",
  "to_timm_state_dict",
  "to_mae_state_dict",
  "save_state_dict",
  "load_torch_file",
  "from_torch_state_dict",
  "read_torch_checkpoint",
  "load_mms_checkpoint",
  "save_mms_checkpoint",
  "convert",
  "load_hf_vitmae",
  "FORMATS",
]

FORMATS = ("hf", "timm", "mae", "mms", "onnx")
SIDECAR = "config.json"  # next to a timm / mae state dict: layout, kwargs, run config
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


# ---------------------------------------------------------------------------
# Export.


def to_timm_state_dict(params, config: ModelConfig) -> tl.StateDict:
  """Encoder params -> timm VisionTransformer state dict (numpy, float32).

  Build the model with `VisionTransformer(**torch_layouts.timm_kwargs(config, params))`
  (or `timm.create_model('vit_small_patch16_224', pretrained=False, **kwargs)`) and
  `load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})` (strict).
  """
  return tl.to_state_dict(params, config, "timm")


def to_mae_state_dict(
  params, config: ModelConfig, *, with_decoder: bool | None = None
) -> tl.StateDict:
  """Params -> original MAE layout (decoder included when present)."""
  return tl.to_state_dict(params, config, "mae", with_decoder=with_decoder)


def to_hf_vitmae(
  params, config: ModelConfig, out_dir, *, with_decoder: bool | None = None
) -> pathlib.Path:
  """Writes a transformers ViTMAE directory: config.json, model.safetensors,
  preprocessor_config.json (uint8 RGB -> [-1, 1], the mms_jax input range).

  With a decoder the directory loads with ViTMAEForPreTraining.from_pretrained when
  the token count is a square number, and with `load_hf_vitmae` always (transformers
  cannot construct the decoder of e.g. 8 x 25 tokens); without one (fine-tuned
  encoder, SimMIM params, with_decoder=False) with ViTMAEModel.from_pretrained.
  The fixed position embeddings of the real grid
  are stored in the safetensors; `load_hf_vitmae` additionally makes the
  pretraining head's patchify work on rectangular images.
  """
  params = tl.normalize_params(params)
  config = config.with_shapes_of(params)
  if with_decoder is None:
    with_decoder = "decoder" in params
  (config if with_decoder else dataclasses.replace(config, decoder_width=None)).check_heads()
  hf_cfg = tl.hf_config(config, with_decoder)  # raises for non-square patches + decoder
  gh, gw = config.grid
  if with_decoder and not _is_square(gh * gw):
    logging.warning(
      "The %dx%d token grid (%d tokens) is not a square number: transformers cannot "
      "construct its ViTMAEDecoder, so load %s with mms_jax.convert.load_hf_vitmae "
      "(ViTMAEForPreTraining.from_pretrained fails; ViTMAEModel.from_pretrained works).",
      gh,
      gw,
      gh * gw,
      out_dir,
    )
  sd = tl.to_state_dict(params, config, "hf", with_decoder=with_decoder)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  _save_safetensors(sd, out / "model.safetensors")
  (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
  (out / "preprocessor_config.json").write_text(
    json.dumps(tl.hf_preprocessor_config(config), indent=2, sort_keys=True)
  )
  return out


def save_state_dict(sd: tl.StateDict, path, metadata: dict[str, str] | None = None):
  """Writes a state dict: safetensors unless the suffix is .pth/.pt/.bin (torch.save
  of a plain dict of tensors, loadable with weights_only=True)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix in _TORCH_SUFFIXES:
    import torch

    torch.save({k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}, path)
  else:
    _save_safetensors(sd, path, metadata)
  return path


def _save_safetensors(sd, path, metadata=None):
  from safetensors.numpy import save_file

  meta = {"format": "pt", **(metadata or {})}
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path), metadata=meta)


# ---------------------------------------------------------------------------
# Reading PyTorch files.


def _to_numpy(value):
  """torch.Tensor or array -> numpy (floating tensors as float32)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    return value.float().numpy() if value.is_floating_point() else value.numpy()
  return np.asarray(value)


def load_torch_file(path) -> tl.StateDict:
  """Reads tensors from .safetensors, a transformers directory or a .pth file.

  .pth/.pt/.bin/.ckpt files are opened with `torch.load(weights_only=True)`,
  which only rebuilds tensors and plain containers: a file holding any other
  pickled object (a model, an argparse.Namespace, ...) is refused with a
  ConversionError and nothing in it is executed. Wrappers such as
  {'model': state_dict} and 'module.' prefixes are removed.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    for name in ("model.safetensors", "pytorch_model.bin"):
      if (path / name).exists():
        return load_torch_file(path / name)
    raise ConversionError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
  if not path.exists():
    raise ConversionError(f"{path} does not exist")
  if path.suffix in _TORCH_SUFFIXES:
    return tl.unwrap_state_dict(_torch_load_weights_only(path))
  try:
    from safetensors.numpy import load_file

    return tl.unwrap_state_dict(load_file(str(path)))
  except (TypeError, ValueError):  # e.g. bfloat16, which numpy lacks: read with torch
    from safetensors.torch import load_file as load_torch

    return tl.unwrap_state_dict({k: _to_numpy(v) for k, v in load_torch(str(path)).items()})


def _torch_load_weights_only(path):
  import torch

  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ConversionError(
      f"refusing to load {path}: it contains pickled Python objects, not only tensors, and "
      "mms_jax reads .pth files with torch.load(weights_only=True) only. If you trust the "
      "file, re-save just its weights elsewhere: torch.save(torch.load(f, weights_only="
      f'False)["model"], "weights.pth"). Details: {str(e).splitlines()[0]}'
    ) from e
  return _tensors_to_numpy(obj)


def _tensors_to_numpy(obj):
  if isinstance(obj, dict):
    return {k: _tensors_to_numpy(v) for k, v in obj.items()}
  return _to_numpy(obj) if hasattr(obj, "detach") else obj


def from_torch_state_dict(
  state_dict,
  layout: str = "auto",
  *,
  image_size: tuple[int, int] | None = None,
  pos_embed: str = "warn",
  strict: bool = True,
  with_decoder: bool | None = None,
  scan_layers: bool = False,
):
  """PyTorch state dict (torch tensors or numpy) -> mms_jax params.

  Args:
    state_dict: HF ViTMAE (ForPreTraining or Model, old or new key names), timm
      VisionTransformer or MAE MaskedAutoencoderViT tensors; wrappers are removed.
    layout: 'hf', 'timm', 'mae' or 'auto' (from the key names).
    image_size: (H, W); None = recover the grid from the stored position embedding.
    pos_embed: 'warn' | 'error' | 'ignore', see torch_layouts.from_state_dict.
      Remarks (e.g. a square-grid embedding was recognised) are issued as warnings.
    strict: raise on unused tensors (e.g. a classification head).
    with_decoder: import the decoder (default: when present, not for timm).
    scan_layers: return stacked `blocks` params (for scan_layers=True models).

  Returns:
    {'encoder': ..., 'decoder': ...} with float32 numpy leaves, ready for
    MAE.apply / Encoder.apply (use params['encoder'] for a bare Encoder).
  """
  params, _, notes = _import(state_dict, layout, image_size, pos_embed, strict, with_decoder)
  for note in notes:
    warnings.warn(note, stacklevel=2)
  return _maybe_scan(params, scan_layers)


def _import(state_dict, layout, image_size, pos_embed, strict, with_decoder):
  sd = tl.unwrap_state_dict(_tensors_to_numpy(dict(state_dict)))
  return tl.from_state_dict(
    sd,
    layout,
    image_size=image_size,
    pos_embed_policy=pos_embed,
    strict=strict,
    with_decoder=with_decoder,
  )


def _maybe_scan(params, scan_layers):
  if not scan_layers:
    return params
  import jax

  from mms_jax.models import vit

  return jax.tree.map(np.asarray, vit.scan_params(params))


def _sidecar(path):
  """The config.json next to (or inside) a PyTorch checkpoint, or {}."""
  path = pathlib.Path(path)
  cfg = (path if path.is_dir() else path.parent) / SIDECAR
  return json.loads(cfg.read_text()) if cfg.exists() else {}


_HF_ACT = {"gelu": "erf", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}


def _config_hints(side: dict[str, Any]) -> dict[str, Any]:
  """Fields of a sidecar config (HF config.json or ours) useful for ModelConfig."""
  if side.get("model_type") == "vit_mae":  # a transformers config
    act = side.get("hidden_act", "gelu")
    if act not in _HF_ACT:
      raise ConversionError(
        f"HF hidden_act={act!r} has no mms_jax equivalent "
        "(mms_jax has exact 'gelu' and tanh-approximate GELU)"
      )
    eps = side.get("layer_norm_eps", 1e-12)
    if abs(eps - 1e-6) > 1e-12:
      warnings.warn(
        f"HF layer_norm_eps={eps}; mms_jax uses 1e-6, so outputs differ slightly", stacklevel=3
      )
    if not side.get("qkv_bias", True):
      raise ConversionError("HF qkv_bias=False: mms_jax attention always has a qkv bias")
    size, patch = side.get("image_size", 224), side.get("patch_size", 16)
    return dict(
      image_size=_pair(size),
      num_heads=side.get("num_attention_heads"),
      decoder_num_heads=side.get("decoder_num_attention_heads"),
      gelu=_HF_ACT[act],
      norm_pix_loss=side.get("norm_pix_loss"),
      mask_ratio=side.get("mask_ratio"),
      patch=_pair(patch),
    )
  if "mms_jax" in side:  # written by this module for timm / mae dicts
    return dict(ModelConfig.from_run_config(side["mms_jax"]).__dict__)
  return {}


def _pair(v):
  return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v), int(v))


def read_torch_checkpoint(
  path,
  layout: str = "auto",
  *,
  image_size=None,
  num_heads=None,
  decoder_num_heads=None,
  gelu=None,
  pos_embed: str = "warn",
  strict: bool = True,
  with_decoder: bool | None = None,
) -> tuple[dict[str, Any], ModelConfig]:
  """A PyTorch checkpoint file or transformers directory -> (params, ModelConfig).

  A config.json beside the weights (HF's, or the one `convert` writes for timm and
  mae dicts) supplies image size, head counts and GELU flavour; arguments that are
  not None override it.
  """
  hints = _config_hints(_sidecar(path))
  for k, v in dict(
    image_size=image_size, num_heads=num_heads, decoder_num_heads=decoder_num_heads, gelu=gelu
  ).items():
    if v is not None:
      hints[k] = v
  size = tuple(hints["image_size"]) if hints.get("image_size") else None
  params, found, notes = _import(
    load_torch_file(path), layout, size, pos_embed, strict, with_decoder
  )
  for note in notes:
    warnings.warn(note, stacklevel=2)
  if hints.get("patch") and tuple(hints["patch"]) != found.patch:
    raise ConversionError(
      f"config.json says patch {hints['patch']} but the patch embedding weight has {found.patch}"
    )
  for k in ("num_heads", "decoder_num_heads", "gelu", "norm_pix_loss", "mask_ratio"):
    if hints.get(k) is not None and (k != "decoder_num_heads" or found.has_decoder):
      setattr(found, k, hints[k])
  return params, found


# ---------------------------------------------------------------------------
# mms_jax checkpoints.


def load_mms_checkpoint(path) -> tuple[dict[str, Any], dict[str, Any]]:
  """An mms_jax workdir / step directory -> (params as numpy, run config dict).

  The run config is the one stored in the checkpoint's meta, else the workdir's
  config.json, else {}.
  """
  from mms_jax import checkpoints

  step_dir = checkpoints.resolve_checkpoint(path, what="src")
  return checkpoints.load_params(step_dir, what="src"), checkpoints.step_run_config(step_dir)


def save_mms_checkpoint(params, config: ModelConfig | None, workdir, *, step: int = 0):
  """Writes `{'params': params}` as an mms_jax checkpoint (with manifest) in
  `<workdir>/checkpoints/<step>`, so that `init_from=<workdir>` and
  `load_mms_checkpoint` read it. Returns the step directory. A workdir that already
  has a checkpoint at `step` is refused (ConversionError), never overwritten."""
  from mms_jax import checkpoints

  if config is not None:
    config = config.with_shapes_of(tl.normalize_params(params))  # decoder fields from tensors
    if config.has_decoder and config.decoder_num_heads is None:
      raise ConversionError(
        "the params have a decoder but the ModelConfig has no "
        "decoder_num_heads (head counts are not in the tensors); set it"
      )
  run_config = config.to_run_config() if config is not None else {}
  run_config["program"] = "convert"
  with checkpoints.Checkpointer(workdir, keep=1, async_save=False, program="convert") as ckpt:
    if step in ckpt.all_steps():
      raise ConversionError(
        f"{ckpt.step_dir(step)} already holds a checkpoint; choose another destination or delete it"
      )
    ckpt.save(step, {"params": params}, config=run_config, force=True)
  return ckpt.step_dir(step)


# ---------------------------------------------------------------------------
# One-call conversion (the CLI).


def check_torch_exportable(params, run_config):
  """Raises ConversionError naming every reason at once why a checkpoint has no
  PyTorch ViT equivalent (hf, timm, mae layouts) and the config that avoids them; warns
  when the export keeps only part of the model (a recognizer's or dense model's head)."""
  encoder = encoder_config.of_model(run_config.get("model") or {}) or {}
  blockers = []
  if "stem" in params.get("encoder", params):
    blockers.append(
      "a convolutional patch stem (model.encoder.stem='conv'): the layouts hold a linear "
      "patch embedding only"
    )
  if (encoder.get("attention_bias") or "none") != "none":
    blockers.append(
      f"an attention bias (model.encoder.attention_bias={encoder['attention_bias']!r}): "
      "a PyTorch ViT has none, so it would compute something else"
    )
  if blockers:
    program = run_config.get("program")
    onnx = " For a recognizer, --format=onnx exports it whole." if program == "recognition" else ""
    raise ConversionError(
      "the hf, timm and mae layouts cannot hold this encoder: "
      + "; ".join(f"({i}) {b}" for i, b in enumerate(blockers, 1))
      + ". Pretrain with configs/pretrain.py:plain (4x4 linear patches, no attention bias) "
      "to export it to PyTorch." + onnx
    )
  program = run_config.get("program")
  if program in ("recognition", "segmentation", "super_resolution"):
    logging.warning(
      "%s is a %s run: the PyTorch layouts hold its encoder only, not its head%s.%s",
      run_config.get("workdir", "src"),
      program,
      " and charset" if program == "recognition" else "",
      " --format=onnx exports the whole recognizer." if program == "recognition" else "",
    )


def convert(
  src,
  dst,
  fmt: str,
  *,
  layout: str = "auto",
  image_size=None,
  num_heads=None,
  decoder_num_heads=None,
  gelu=None,
  encoder_only: bool = False,
  pos_embed: str = "warn",
  strict: bool = True,
  file_format: str = "safetensors",
) -> pathlib.Path:
  """Converts a checkpoint; returns the written path.

  fmt 'hf' | 'timm' | 'mae': src is an mms_jax checkpoint (workdir or step dir;
  its stored run config supplies the model config, the keyword arguments
  override it). 'hf' writes a transformers directory; 'timm' / 'mae' write
  `<dst>/model.<file_format>` plus `<dst>/config.json` (layout, constructor
  kwargs, mms_jax run config).
  fmt 'mms': src is a PyTorch checkpoint (file or directory, `layout` or auto);
  writes an mms_jax checkpoint at `<dst>/checkpoints/0` (use init_from=<dst>).
  fmt 'onnx': src is a CTC recognition workdir or step; writes model.onnx, reader.json
  and read.py, which reads without JAX (convert/onnx_export.py).
  """
  if fmt not in FORMATS:
    raise ConversionError(f"unknown format {fmt!r}; use one of {FORMATS}")
  if fmt == "onnx":
    from mms_jax.convert import onnx_export  # jax2onnx is an optional extra

    return onnx_export.export(src, dst)
  if fmt == "mms":
    params, config = read_torch_checkpoint(
      src,
      layout,
      image_size=image_size,
      num_heads=num_heads,
      decoder_num_heads=decoder_num_heads,
      gelu=gelu,
      pos_embed=pos_embed,
      strict=strict,
      with_decoder=False if encoder_only else None,
    )
    if config.num_heads is None:
      logging.warning(
        "num_heads is unknown (pass --num_heads): the written run config "
        "leaves it unset; the weights do not depend on it."
      )
    return save_mms_checkpoint(params, config, dst)

  params, run_config = load_mms_checkpoint(src)
  check_torch_exportable(params, run_config)
  config = ModelConfig.from_run_config(
    run_config,
    image_size=image_size,
    num_heads=num_heads,
    decoder_num_heads=decoder_num_heads,
    gelu=gelu,
  )
  params = tl.normalize_params(params)
  if encoder_only or fmt == "timm":
    params = {"encoder": params["encoder"]}
  config = config.with_shapes_of(params)
  if fmt == "hf":
    return to_hf_vitmae(params, config, dst)
  config.check_heads()
  sd = to_timm_state_dict(params, config) if fmt == "timm" else to_mae_state_dict(params, config)
  out = pathlib.Path(dst)
  suffix = {"safetensors": ".safetensors", "pth": ".pth"}.get(file_format)
  if suffix is None:
    raise ConversionError(f"file_format must be 'safetensors' or 'pth', got {file_format!r}")
  path = save_state_dict(sd, out / f"model{suffix}")
  kwargs = tl.timm_kwargs(config) if fmt == "timm" else tl.mae_kwargs(config)
  side = {"layout": fmt, "kwargs": kwargs, "mms_jax": config.to_run_config()}
  (out / SIDECAR).write_text(json.dumps(side, indent=2, sort_keys=True))
  return path


# ---------------------------------------------------------------------------
# transformers helper.


def load_hf_vitmae(path, model_class=None, **kwargs):
  """`from_pretrained` for directories written by `to_hf_vitmae`, made grid-safe.

  1. Loads with ViTMAEForPreTraining (if the config lists it) or ViTMAEModel,
     or `model_class`; kwargs go to from_pretrained.
  2. Checks that the position embeddings are the real-grid sin-cos; a
     transformers version that re-initialises them (HF computes them for a
     square grid) gets them rewritten, with a warning.
  3. Marks both position embeddings non-trainable, as ViTMAE's constructor
     and mms_jax have them (transformers 5.23's from_pretrained returns them
     with requires_grad=True, so an optimizer over `model.parameters()` would
     train them and the result would no longer import into mms_jax).
  4. For a non-square image, replaces the instance's `patchify`/`unpatchify`
     (HF's accept square images only) by grid-aware ones, so the pretraining
     forward and loss work on e.g. 32x128 inputs.
  Returns the model in eval mode.
  """
  import torch
  import transformers

  cfg = transformers.ViTMAEConfig.from_pretrained(path)
  if model_class is None:
    pretraining = "ViTMAEForPreTraining" in (cfg.architectures or [])
    model_class = transformers.ViTMAEForPreTraining if pretraining else transformers.ViTMAEModel
  size, patch = _pair(cfg.image_size), _pair(cfg.patch_size)
  grid = (size[0] // patch[0], size[1] // patch[1])
  with _decoder_table_for_any_token_count():
    model = model_class.from_pretrained(path, **kwargs)
  vit_model = getattr(model, "vit", model)
  targets = [(vit_model.embeddings.position_embeddings, cfg.hidden_size)]
  if hasattr(model, "decoder"):
    targets.append((model.decoder.decoder_pos_embed, cfg.decoder_hidden_size))
  for param, width in targets:
    want = torch.from_numpy(tl.pos_embed(width, grid)).to(param.dtype)
    if not torch.allclose(param.data, want, atol=1e-6):
      warnings.warn(
        "transformers re-initialised a position embedding for a square grid; "
        f"restoring the {grid[0]}x{grid[1]} sin-cos",
        stacklevel=2,
      )
      with torch.no_grad():
        param.copy_(want)
    param.requires_grad_(False)
  if size[0] != size[1] and hasattr(model, "patchify"):
    model.patchify = _GridPatchify(patch, cfg.num_channels)
    model.unpatchify = _GridUnpatchify(patch, grid, cfg.num_channels)
  return model.eval()


def _is_square(n: int) -> bool:
  """Whether transformers' ViTMAEDecoder (an isqrt(n) x isqrt(n) table) can hold n tokens."""
  return math.isqrt(n) ** 2 == n


@contextlib.contextmanager
def _decoder_table_for_any_token_count():
  """Lets transformers build a ViTMAEDecoder whose token count is not a square.

  Its constructor fills the decoder position table with a sin-cos of an
  int(sqrt(L)) x int(sqrt(L)) grid, which cannot be copied into the L + 1 rows when L
  is not a perfect square (e.g. 8 x 25 tokens): construction fails. For such counts
  the table is left as allocated (the mask token still gets its initialisation); the
  checkpoint's real-grid table is loaded into it and checked by `load_hf_vitmae`.
  """
  from transformers.models.vit_mae import modeling_vit_mae

  decoder = modeling_vit_mae.ViTMAEDecoder
  square_init = decoder.initialize_weights

  def initialize_weights(self, num_patches):
    if _is_square(num_patches):
      return square_init(self, num_patches)
    import torch

    with torch.no_grad():
      torch.nn.init.normal_(self.mask_token, std=self.config.initializer_range)
    return None

  decoder.initialize_weights = initialize_weights
  try:
    yield
  finally:
    decoder.initialize_weights = square_init


class _GridPatchify:
  """[B, C, H, W] -> [B, gh*gw, ph*pw*C] in HF/MAE order, any grid."""

  def __init__(self, patch, channels):
    self.patch, self.channels = patch, channels

  def __call__(self, pixel_values, interpolate_pos_encoding=False):
    del interpolate_pos_encoding
    b, c, h, w = pixel_values.shape
    (ph, pw), gh, gw = self.patch, h // self.patch[0], w // self.patch[1]
    x = pixel_values.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, ph * pw * c)


class _GridUnpatchify:
  """Inverse of _GridPatchify for the model's own grid."""

  def __init__(self, patch, grid, channels):
    self.patch, self.grid, self.channels = patch, grid, channels

  def __call__(self, patches, original_image_size=None):
    del original_image_size
    (ph, pw), (gh, gw), c = self.patch, self.grid, self.channels
    x = patches.reshape(patches.shape[0], gh, gw, ph, pw, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(patches.shape[0], c, gh * ph, gw * pw)
