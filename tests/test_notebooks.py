"""The Colab notebooks run top to bottom on CPU with the tiny configs.

They are executed in the order a user runs them, sharing one workdir: the quickstart
pretrains, the recognition notebook fine-tunes its encoder, the conversion notebook
exports it to PyTorch. MMS_JAX_NOTEBOOK_TINY=1 selects the `tiny` config variants.
"""

import json
import re

from conftest import ROOT
from conftest import load_config
from conftest import subprocess_env
import nbclient
import nbformat

from mms_jax import checkpoints

NOTEBOOKS = ROOT / "notebooks"
ORDER = ("quickstart", "finetune_recognition", "convert_to_pytorch")


def _read(name):
  return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _text(nb):
  """Everything the notebook printed or displayed as text (stdout, stderr, reprs)."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        parts.append(out.text)
      elif out.output_type in ("execute_result", "display_data"):
        parts.extend(out.data.get(k, "") for k in ("text/plain", "text/markdown"))
  return "\n".join(parts)


def _images(nb):
  return sum(
    "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
  )


def test_committed_notebooks_are_clean_and_install_themselves():
  for name in ORDER:
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), name
    first = code[0].source  # Colab: installs the package unless it is importable
    assert 'find_spec("mms_jax") is None' in first and '"pip", "install"' in first, name
    assert nb.metadata.kernelspec.name == "python3"


def test_notebooks_run_in_order_on_cpu(tmp_path):
  env = subprocess_env()
  env.update(MMS_JAX_NOTEBOOK_TINY="1", MMS_JAX_NOTEBOOK_WORKDIR=str(tmp_path))
  env.pop("MMS_JAX_REPO_URL", None)
  ran = {}
  for name in ORDER:
    nb = _read(name)
    client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute(env=env)  # raises CellExecutionError (with the traceback) on failure
    ran[name] = nb

  # Quickstart: set-up skipped (the package is installed), masks drawn, the tiny
  # pretraining run finished with a verified checkpoint, loss plot and reconstructions.
  text = _text(ran["quickstart"])
  assert f"mms_jax from {ROOT / 'mms_jax'}" in text
  assert "tiny configs on 1 x cpu" in text
  steps = load_config("pretrain", "tiny").total_steps
  pretrain_dir = tmp_path / "pretrain"
  assert checkpoints.resolve_checkpoint(pretrain_dir).name == str(steps)  # verified
  metrics = [json.loads(line) for line in open(pretrain_dir / "metrics.jsonl")]
  assert metrics[-1]["step"] == steps
  assert f"final loss {metrics[-1]['loss']:.4f} at step {steps}" in text
  assert _images(ran["quickstart"]) == 3  # masks, loss curve, reconstructions
  assert (pretrain_dir / f"reconstruction_{steps:07d}.png").stat().st_size > 1000

  # Recognition: the encoder came from the quickstart's checkpoint; the run and the
  # eval-only pass both wrote tables; the notebook displayed them and the predictions.
  text = _text(ran["finetune_recognition"])
  assert f"pretrained checkpoint: {pretrain_dir / 'checkpoints' / str(steps)}" in text
  assert f"Initialised params from init_from={pretrain_dir}" in text
  rec_dir, rec = tmp_path / "recognition", load_config("finetune_recognition", "tiny")
  assert checkpoints.resolve_checkpoint(rec_dir).name == str(rec.total_steps)
  assert f"eval_only: evaluating {rec_dir / 'checkpoints' / str(rec.total_steps)}" in text
  for split in rec.eval.splits:
    assert f"| {split} |" in (rec_dir / f"eval_{split}.md").read_text()
    assert f"| {split} |" in text and f"{split}: word accuracy " in text
  assert _images(ran["finetune_recognition"]) == 1
  assert len(re.findall(r"crop_\d\.png\t'[0-9a-z]*'\tconfidence ", text)) == 4, text[-3000:]

  # PyTorch: an HF directory was written and transformers computed the JAX features.
  text = _text(ran["convert_to_pytorch"])
  export = tmp_path / "export_hf"
  assert json.loads((export / "config.json").read_text())["model_type"] == "vit_mae"
  assert (export / "model.safetensors").stat().st_size > 10_000
  width = load_config("pretrain", "tiny").model.encoder.width
  found = re.search(rf"features \(4, 257, {width}\): max \|torch - jax\| = (\S+)", text)
  assert found and float(found.group(1)) < 1e-4, text[-3000:]
