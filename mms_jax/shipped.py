r"""Models that come with the package: read and fine-tune with no training first.

  python -m mms_jax.read my_crops/                                   # the default recognizer
  python -m mms_jax.main --config=configs/finetune_recognition.py --workdir=W \
      --config.init_from=recognizer_36                               # start from it
  python mms_jax/assets/models/recognizer_36/onnx/read.py my_crops/   # without JAX

A shipped model is a folder under mms_jax/assets/models/<name>/ (or $MMS_JAX_MODELS/<name>):

  checkpoints/<step>/   the params only (no optimizer state), an orbax checkpoint with its
                        sha256 manifest, verified on every load like any checkpoint
  config.json           the run config it was trained with
  onnx/                 convert --format=onnx's export (model.onnx, reader.json, read.py)
  MODEL_CARD.md         config, data, steps, machine and time, scores, licences

Anywhere a checkpoint path is taken (init_from, eval_from, read's --workdir) a shipped
model's name works too (`resolve`). `package` makes one from a trained workdir:

  python -m mms_jax.shipped --src=workdirs/rec --name=recognizer_36 --card=card.md
"""

import json
import os
import pathlib
import shutil

PACKAGED = pathlib.Path(__file__).resolve().parent / "assets" / "models"
DEFAULT_RECOGNIZER = "recognizer_36"


def root():
  """Where shipped models are looked up: $MMS_JAX_MODELS, else the package's own."""
  return pathlib.Path(os.environ.get("MMS_JAX_MODELS") or PACKAGED)


def names():
  """The shipped models present in this installation."""
  folder = root()
  if not folder.is_dir():
    return []
  return sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())


def resolve(path):
  """`path` itself, or the folder of the shipped model it names (a bare name that is not
  an existing path)."""
  text = os.fspath(path)
  if os.sep not in text and not os.path.exists(text) and text in names():
    return root() / text
  return pathlib.Path(text)


def package(src, name, card_text="", into=None):
  """Copies the latest good checkpoint of workdir `src` (params only), its run config
  and its ONNX export (CTC recognizers) into <root>/<name>; returns that folder. An
  existing folder of that name is replaced."""
  from mms_jax import checkpoints
  from mms_jax.convert import onnx_export

  step_dir = checkpoints.resolve_checkpoint(src, what="src")
  run_config = checkpoints.step_run_config(step_dir)
  params = checkpoints.load_params(step_dir, what="src")
  out = pathlib.Path(into or root()) / name
  staging = out.with_name(name + ".tmp")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  with checkpoints.Checkpointer(
    staging, keep=1, async_save=False, program=run_config.get("program", "")
  ) as ckpt:
    ckpt.save(int(step_dir.name), {"params": params}, config=run_config, force=True)
  (staging / "config.json").write_text(json.dumps(run_config, indent=2, sort_keys=True))
  if (
    run_config.get("program") == "recognition"
    and (run_config.get("model") or {}).get("head") == "ctc"
  ):
    onnx_export.export(staging, staging / "onnx", source=f"{name} (from {os.fspath(src)})")
  if card_text:
    (staging / "MODEL_CARD.md").write_text(card_text)
  shutil.rmtree(out, ignore_errors=True)
  staging.rename(out)
  return out


def main(argv):
  from absl import flags

  f = flags.FLAGS
  del argv
  card = pathlib.Path(f.card).read_text() if f.card else ""
  print(package(f.src, f.name, card))


if __name__ == "__main__":
  from absl import flags

  from mms_jax import cli

  flags.DEFINE_string("src", None, "A trained workdir or step directory.")
  flags.DEFINE_string("name", DEFAULT_RECOGNIZER, "The shipped model's name.")
  flags.DEFINE_string("card", "", "A markdown file: the model card.")
  flags.mark_flag_as_required("src")
  cli.run(main, "mms_jax.shipped")
