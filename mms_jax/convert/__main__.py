r"""Converts checkpoints between mms_jax and PyTorch (transformers, timm, MAE code).

mms_jax -> PyTorch (src: a workdir or a step directory; the model config comes
from the checkpoint's stored run config, flags override it):

  python -m mms_jax.convert --src=workdirs/pretrain --format=hf --dst=export/hf_vitmae
  python -m mms_jax.convert --src=workdirs/pretrain --format=timm --dst=export/timm
  python -m mms_jax.convert --src=workdirs/pretrain --format=mae --dst=export/mae \
      --file_format=pth
  python -m mms_jax.convert --src=workdirs/rec --format=onnx --dst=export/rec_onnx
      (a recognizer that reads without JAX: python export/rec_onnx/read.py IMAGES)

PyTorch -> mms_jax (src: .safetensors, .pth (weights-only load) or a transformers
directory; writes <dst>/checkpoints/0, usable as --config.init_from=<dst>):

  python -m mms_jax.convert --src=export/hf_vitmae --format=mms --dst=workdirs/from_hf
  python -m mms_jax.convert --src=mae_pretrain.pth --format=mms --dst=workdirs/from_mae \
      --image_size=32,128 --num_heads=6 --decoder_num_heads=16

See docs/pytorch.md.
"""

from absl import app
from absl import flags
from absl import logging

from mms_jax import cli
from mms_jax import convert as convert_lib
from mms_jax import errors

flags.DEFINE_string("src", None, "Source checkpoint (see the module docstring).")
flags.DEFINE_string("dst", None, "Output directory.")
flags.DEFINE_enum(
  "format",
  None,
  list(convert_lib.FORMATS),
  "Output format: hf | timm | mae | onnx (from mms_jax) or mms (to mms_jax).",
)
flags.DEFINE_enum(
  "layout", "auto", ["auto", "hf", "timm", "mae"], "--format=mms: layout of the PyTorch tensors."
)
flags.DEFINE_list("image_size", None, "H,W the model runs on (overrides the stored config).")
flags.DEFINE_integer("num_heads", None, "Encoder attention heads (overrides the config).")
flags.DEFINE_integer("decoder_num_heads", None, "Decoder attention heads (overrides).")
flags.DEFINE_enum("gelu", None, ["erf", "tanh"], "GELU flavour (overrides the config).")
flags.DEFINE_bool("encoder_only", False, "Drop the decoder.")
flags.DEFINE_enum(
  "pos_embed",
  "warn",
  ["warn", "error", "ignore"],
  "--format=mms: stored position embedding that is not the real-grid "
  "sin-cos: warn (accept a square-grid sin-cos), error, or ignore (drop any).",
)
flags.DEFINE_bool("strict", True, "--format=mms: fail on unused tensors (e.g. a classifier).")
flags.DEFINE_enum(
  "file_format", "safetensors", ["safetensors", "pth"], "timm / mae output file type."
)
flags.mark_flags_as_required(["src", "dst", "format"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  image_size = tuple(int(x) for x in f.image_size) if f.image_size else None
  if image_size is not None and len(image_size) != 2:
    raise app.UsageError(f"--image_size takes H,W, got {f.image_size}")
  try:
    out = convert_lib.convert(
      f.src,
      f.dst,
      f.format,
      layout=f.layout,
      image_size=image_size,
      num_heads=f.num_heads,
      decoder_num_heads=f.decoder_num_heads,
      gelu=f.gelu,
      encoder_only=f.encoder_only,
      pos_embed=f.pos_embed,
      strict=f.strict,
      file_format=f.file_format,
    )
  except convert_lib.ConversionError as e:
    raise errors.UserError(f"conversion failed: {e}") from e
  logging.info("Wrote %s", out)
  print(out)


if __name__ == "__main__":
  cli.run(main, "mms_jax.convert")
