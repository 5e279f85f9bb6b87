"""Learning curves of recognition runs: word accuracy per evaluated split against
training images and wall-clock minutes (docs/img/recognition_curve.png).

  python -m benchmarks.plot_recognition_curve --runs=workdirs/rec_main \
      --out=docs/img/recognition_curve.png [--peer="Tesseract 5.3=0.63,0.09"]

Reads each run's metrics.jsonl (eval rows) and config.json (batch size); minutes come from
the run's log `<run>.log` beside the workdir when it exists (the time of each evaluation
line minus the time of the "Starting at step" line), and are printed as a table.
"""

import datetime
import json
import os
import re

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", [], "recognition workdirs, each optionally as label=workdir")
flags.DEFINE_string("out", "docs/img/recognition_curve.png", "output PNG")
flags.DEFINE_multi_string("peer", [], "name=heldout,hard word accuracies drawn as lines")

SPLITS = ("test_heldout_fonts", "test_hard")


def eval_points(run):
  rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
  points = {}
  for row in rows:
    for split in SPLITS:
      key = f"eval/{split}/{split}/word_accuracy"
      if key in row:
        points.setdefault(split, []).append((row["step"], row[key]))
  return points


def eval_minutes(run):
  """{step: minutes since the start} from the run's log, if it is there."""
  log = run.rstrip("/") + ".log"
  if not os.path.exists(log):
    return {}
  start, out = None, {}
  for line in open(log):
    m = re.match(r"(\d\d:\d\d:\d\d) INFO (?:Starting at step|\[(\d+)(?:/\d+)?\] eval/)", line)
    if not m:
      continue
    t = datetime.datetime.strptime(m.group(1), "%H:%M:%S")
    if m.group(2) is None:
      start = t
    elif start is not None:
      out.setdefault(int(m.group(2)), (t - start).total_seconds() / 60 % (24 * 60))
  return out


def main(argv):
  del argv
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
  print("| run | step | images | minutes | " + " | ".join(SPLITS) + " |")
  print("|---|---:|---:|---:|" + "---:|" * len(SPLITS))
  for entry in FLAGS.runs:
    label, _, run = entry.rpartition("=")
    label = label or os.path.basename(run.rstrip("/"))
    batch = json.load(open(os.path.join(run, "config.json")))["batch_size"]
    points, minutes = eval_points(run), eval_minutes(run)
    for ax, split in zip(axes, SPLITS):
      steps, acc = zip(*points[split])
      ax.plot(
        [s * batch / 1000 for s in steps],
        [100 * a for a in acc],
        "o-",
        label=label,
      )
    for step, _ in points[SPLITS[0]]:
      cells = [f"{100 * dict(points[s])[step]:.1f}" for s in SPLITS]
      mins = f"{minutes[step]:.1f}" if step in minutes else "-"
      print(f"| {label} | {step} | {step * batch} | {mins} | " + " | ".join(cells) + " |")
  for peer in FLAGS.peer:
    name, values = peer.split("=")
    for ax, value in zip(axes, values.split(",")):
      ax.axhline(100 * float(value), color="grey", linestyle="--")
      ax.text(ax.get_xlim()[0], 100 * float(value) + 1.5, name, color="grey", fontsize=8)
  for ax, split in zip(axes, SPLITS):
    ax.set_title(split)
    ax.set_xlabel("training images (thousands)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("word accuracy (%)")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(FLAGS.out, dpi=110)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
