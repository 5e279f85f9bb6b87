r"""Plots a run's curves from its metrics.jsonl, with nothing more to install.

  python -m mms_jax.show_run workdirs/rec                  # -> workdirs/rec/curves.png
  python -m mms_jax.show_run workdirs/rec --out=rec.png --metrics=loss,lr

One panel per metric: by default the training loss and every evaluation metric that
says how good the model is (word accuracy, 1-NED, IoU, PSNR, ...); `--metrics` takes
names as metrics.jsonl writes them, or the end of one (`word_accuracy` matches every
split's). TensorBoard reads the same curves from <workdir>/tensorboard
(`pip install tensorboard`, then `tensorboard --logdir <workdir>`).
"""

import json
import math
import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mms_jax import cli  # noqa: E402
from mms_jax import errors  # noqa: E402

# Metric name endings plotted by default (with "loss").
QUALITY = ("word_accuracy", "one_minus_ned", "iou", "psnr", "ssim", "mask_ratio_loss")


def read_metrics(workdir):
  """{metric: ([steps], [values])} of <workdir>/metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise errors.UserError(
      f"{path} not found: give the --workdir of a run (it writes metrics.jsonl as it trains)"
    )
  curves = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut short by a stopped run
      step = record.pop("step", number)
      for name, value in record.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          steps, values = curves.setdefault(name, ([], []))
          steps.append(step)
          values.append(value)
  return curves


def choose(curves, wanted=()):
  """The metric names to plot: `wanted` (names or name endings), else the defaults."""
  if wanted:
    chosen = [n for w in wanted for n in curves if n == w or n.endswith("/" + w)]
    missing = [w for w in wanted if not any(n == w or n.endswith("/" + w) for n in curves)]
    if missing:
      raise errors.UserError(
        f"--metrics: {missing} not in metrics.jsonl; it has {sorted(curves)[:20]}"
      )
    return list(dict.fromkeys(chosen))
  return [n for n in curves if n == "loss" or n.split("/")[-1] in QUALITY and n != "mask_ratio"]


def plot(curves, names, out, title=""):
  columns = min(3, len(names))
  rows = -(-len(names) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
  for ax, name in zip(axes.ravel(), names):
    steps, values = curves[name]
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3)
    ax.set_title(name.removeprefix("eval/"), fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
    if name == "loss" and min(values) > 0:
      ax.set_yscale("log")
  for ax in axes.ravel()[len(names) :]:
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("name one workdir: python -m mms_jax.show_run WORKDIR [--out=PNG]")
  workdir = argv[1]
  curves = read_metrics(workdir)
  names = choose(curves, FLAGS.metrics or ())
  if not names:
    raise errors.UserError(f"{workdir}/metrics.jsonl has no curve to plot yet")
  out = plot(curves, names, FLAGS.out or os.path.join(workdir, "curves.png"), workdir)
  print(out)


if __name__ == "__main__":
  flags.DEFINE_string("out", "", "The PNG to write (default: <workdir>/curves.png).")
  flags.DEFINE_list("metrics", [], "Metrics to plot (names or name endings).")
  cli.run(main, "mms_jax.show_run")
