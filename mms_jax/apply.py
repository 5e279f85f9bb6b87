r"""Apply a trained segmentation or super-resolution model to image files.

  python -m mms_jax.apply --workdir=workdirs/seg crops/ word.png --out=masks/
  python -m mms_jax.apply --workdir=workdirs/sr small_crops/ --out=upscaled/

Loads the latest good checkpoint of a segmentation or super-resolution workdir (its run
config rebuilds the model) and writes, for every image named or found under a folder
(the same files and skip rules as `mms_jax.read`), into --out:

  segmentation       <name>_mask.png: the text foreground (white) at the image's own
                     size, thresholded at the run's config.threshold (--threshold to
                     change); --probability writes the probability as grey levels
  super_resolution   <name>_x2.png: the image upscaled 2x

Images are fitted to the model's input like its training data (stretched to H x W for
segmentation, to H/2 x W/2 for SR) and the outputs resized back to the image's own size
(segmentation) or twice it (SR).
"""

import os
import pathlib
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from mms_jax import cli
from mms_jax import errors
from mms_jax import onnx_reader

FLAGS = flags.FLAGS
OUTPUTS = {"segmentation": "_mask.png", "super_resolution": "_x2.png"}


def load(workdir):
  """(program, run_config, apply(batch uint8 [n, h, w, 3]) -> outputs) of a workdir."""
  import jax
  import jax.numpy as jnp

  from mms_jax import checkpoints
  from mms_jax.models import dense_heads

  step_dir = checkpoints.resolve_checkpoint(workdir, what="--workdir")
  run_config = checkpoints.step_run_config(step_dir)
  program = run_config.get("program")
  if program not in OUTPUTS:
    raise errors.UserError(
      f"--workdir={workdir} is a {program!r} run: apply takes a segmentation or "
      "super_resolution workdir (for a recognizer, use python -m mms_jax.read)"
    )
  model = dense_heads.from_config(program, run_config["model"])
  params = jax.tree.map(jnp.asarray, checkpoints.load_params(step_dir, what="--workdir"))
  print(f"applying {program} from {step_dir} (step {step_dir.name})", file=sys.stderr, flush=True)
  run = jax.jit(lambda x: model.apply({"params": params}, x)[0])

  def apply(images):
    return np.asarray(run(jnp.asarray(images, jnp.float32) / 127.5 - 1.0))

  return program, run_config, apply


def process(program, run_config, apply, array, threshold=None, probability=False):
  """One uint8 [h, w, 3] image -> the uint8 output image (module docstring)."""
  height, width = run_config["image_size"]
  h, w = array.shape[:2]
  if program == "segmentation":
    fitted = onnx_reader.fit(array, (height, width), "stretch")
    prob = 1.0 / (1.0 + np.exp(-apply(fitted[None])[0]))
    cut = run_config.get("threshold", 0.5) if threshold is None else threshold
    out = (prob * 255).astype(np.uint8) if probability else ((prob >= cut) * 255).astype(np.uint8)
    return np.asarray(
      Image.fromarray(out).resize((w, h), Image.BILINEAR if probability else Image.NEAREST)
    )
  fitted = onnx_reader.fit(array, (height // 2, width // 2), "stretch")
  sr = np.clip((apply(fitted[None])[0] + 1.0) * 127.5, 0, 255).astype(np.uint8)
  return np.asarray(Image.fromarray(sr).resize((2 * w, 2 * h), Image.BICUBIC))


def main(argv):
  from mms_jax import read as read_lib

  paths = argv[1:]
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: a segmentation or super_resolution workdir")
  if not paths:
    raise app.UsageError("name the images: python -m mms_jax.apply --workdir=W --out=D IMAGES")
  if not FLAGS.out:
    raise app.UsageError("--out is required: the folder the outputs go to")
  if os.path.exists(FLAGS.out) and not os.path.isdir(FLAGS.out):
    raise app.UsageError(f"--out={FLAGS.out} is a file: give a folder")
  files = read_lib.find_images(paths)
  if not files:
    raise errors.UserError(
      f"no image files ({', '.join(onnx_reader.IMAGE_SUFFIXES)}) under {paths}"
    )
  program, run_config, apply = load(FLAGS.workdir)
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  written, skipped = 0, 0
  for path in files:
    try:
      array = onnx_reader.as_rgb_array(path)
      result = process(program, run_config, apply, array, FLAGS.threshold, FLAGS.probability)
    except Exception as e:  # PIL raises many kinds
      skipped += 1
      print(f"skipped {path}: {type(e).__name__}: {e}", file=sys.stderr)
      continue
    target = out / (path.stem + OUTPUTS[program])
    Image.fromarray(result).save(target)
    written += 1
    print(target, flush=True)
  print(f"wrote {written} image(s), skipped {skipped} unreadable", file=sys.stderr)
  if not written:
    sys.exit(1)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A segmentation or super_resolution workdir (or step).")
  flags.DEFINE_string("out", "", "The folder the outputs are written to.")
  flags.DEFINE_float(
    "threshold", None, "Segmentation: the foreground threshold (default: the run's)."
  )
  flags.DEFINE_bool("probability", False, "Segmentation: write the probability, not a mask.")
  cli.run(main, "mms_jax.apply")
