"""A trained recognizer as an ONNX model that reads without JAX.

  python -m mms_jax.convert --src=workdirs/rec --format=onnx --dst=export/rec_onnx
  python export/rec_onnx/read.py word.png crops/          # numpy, Pillow, onnxruntime only

Writes <dst>/model.onnx (images float32[B, H, W, 3] in [-1, 1], B dynamic -> CTC logits
[B, T, K]), <dst>/reader.json (what reading needs: charset, image size, fit,
normalisation, decoding) and <dst>/read.py (mms_jax/onnx_reader.py, which imports nothing
of JAX or mms_jax). The graph is traced by jax2onnx from the model's own apply function,
so any encoder option exports (conv stem, ALiBi bias, any patch shape); attention is
traced in its 'plain' formulation (the same math as the default). `export` checks the
ONNX outputs against JAX on random images before it returns. Opset 21 (Gelu is an
operator from opset 20): onnxruntime 1.18 or newer.
"""

import contextlib
import io
import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from mms_jax import read
from mms_jax.convert.torch_layouts import ConversionError
from mms_jax.models import recognition

READER_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "onnx_reader.py"
TOLERANCE = 1e-4


def export(src, dst, *, opset=21, check_images=4, seed=0, source=None):
  """Writes the folder of the module docstring; returns its path.

  Raises ConversionError for a source that is not a CTC recognizer or a graph that
  jax2onnx cannot convert, or whose outputs differ from JAX's by more than TOLERANCE.
  """
  try:
    import jax2onnx
    import onnxruntime
  except ImportError as e:
    raise ConversionError(
      f"--format=onnx needs jax2onnx and onnxruntime ({e}): pip install -e .[onnx]"
    ) from None
  for name in list(logging.root.manager.loggerDict):  # jax2onnx sets its own levels on import
    if name.startswith(("jax2onnx", "onnx_ir")):
      logging.getLogger(name).setLevel(logging.ERROR)
  trained = recognition.load(src, what="src")
  if trained.model.head != "ctc":
    raise ConversionError(
      f"src={str(src)!r} has an {trained.model.head!r} head: the ONNX export covers CTC "
      "recognizers (the default head); the autoregressive decoder's greedy loop is not "
      "exported yet"
    )
  model = trained.model.clone(attention="plain")
  params = jax.tree.map(jnp.asarray, trained.params)
  height, width = trained.run_config["image_size"]

  def logits(images):
    return model.apply({"params": params}, images, method=model.ctc_logits)

  out = pathlib.Path(dst)
  out.mkdir(parents=True, exist_ok=True)
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # jax2onnx prints debug lines
      proto = jax2onnx.to_onnx(
        logits,
        [("B", height, width, 3)],
        model_name="mms_jax_recognizer",
        opset=opset,
        input_names=["images"],
        output_names=["logits"],
      )
  except Exception as e:  # jax2onnx raises many kinds for an unsupported primitive
    raise ConversionError(f"jax2onnx could not convert the recognizer: {e}") from e
  (out / "model.onnx").write_bytes(proto.SerializeToString())

  images = np.random.default_rng(seed).uniform(-1, 1, (check_images, height, width, 3))
  images = images.astype(np.float32)
  try:
    session = onnxruntime.InferenceSession(
      str(out / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"images": images})[0]
  except Exception as e:  # onnxruntime's errors have no common base class
    raise ConversionError(f"onnxruntime cannot run the exported graph (opset {opset}): {e}") from e
  want = np.asarray(jax.jit(logits)(images))
  error = float(np.max(np.abs(got - want)))
  if error > TOLERANCE:
    raise ConversionError(f"the ONNX logits differ from JAX's by {error:.2e} > {TOLERANCE}")

  spec = {
    "format": "mms_jax.onnx_recognizer/1",
    "model": "model.onnx",
    "input": "images: float32[B, H, W, 3], RGB, uint8 / 127.5 - 1",
    "image_size": [height, width],
    "fit": read.default_fit(trained.run_config),
    "charset": trained.tokenizer.charset,
    "decoding": "ctc_greedy",
    "blank": 0,
    "eval_charset": ((trained.run_config.get("eval") or {}).get("charset") or "36").split(",")[0],
    "source": {"checkpoint": source or str(trained.step_dir), "step": trained.step},
    "max_abs_error_vs_jax": error,
  }
  (out / "reader.json").write_text(json.dumps(spec, indent=1) + "\n")
  shutil.copyfile(READER_SOURCE, out / "read.py")
  return out
