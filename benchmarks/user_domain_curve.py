r"""The curve a user wants before labelling data: a recognizer trained on generated images,
fine-tuned on N labelled crops of a style it never saw, against its encoder alone and
against a random start (docs/results.md, "Fine-tuning on your own crops").

  python -m benchmarks.user_domain_curve --recognizer=workdirs/rec \
      --workdir=workdirs/user_curve [--sizes=64,256,1024] [--seeds=0,1,2] [--steps=300]

The "user" domain is words in the 16 held-out fonts, which the recognizer never trained
on, written as a folder tree the way docs/data.md lays one out: test/ holds the first 500
images of the generated test_heldout_fonts split (the images the recognizer's own
evaluation reads), train_<N>/ the next N. Every start fine-tunes with the same recipe,
the default config on that tree with data.augment, peak lr 5e-4 (warmup 30 steps),
--steps steps of batch 32:

  recognizer   --config.init_from=<recognizer>                        encoder + CTC head
  encoder      --config.init_from=<recognizer> --config.init_head=False
  scratch      no init_from

Each run is a workdir under <workdir>/runs (finished ones are skipped, so the command
resumes). Prints word accuracy on test/ (mean ± std over seeds) and the paired
differences with 95 % t intervals, and draws --out.
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("recognizer", None, "A recognition workdir trained on generated images.")
flags.DEFINE_string("workdir", "workdirs/user_curve", "Where the tree and the runs go.")
flags.DEFINE_list("sizes", ["64", "256", "1024"], "Labelled training crops N.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Fine-tuning seeds.")
flags.DEFINE_list("starts", ["recognizer", "encoder", "scratch"], "Starts to run.")
flags.DEFINE_integer("steps", 300, "Fine-tuning steps.")
flags.DEFINE_string("out", "docs/img/user_domain_curve.png", "The figure ('' for none).")
flags.DEFINE_bool("report_only", False, "Only print the table and draw the figure.")

TEST_SIZE = 500
KEY = "eval/test/test/word_accuracy"


def make_tree(root, sizes):
  """Writes <root>/test and each missing <root>/train_<N>: the generated images are the
  same for any N (each is drawn from its own index), so train_64 is train_256's first 64."""
  from mms_jax.data import formats
  from mms_jax.data import pipeline

  config = pipeline.default_config()
  config.update(reader="direct")
  config.size = {"test_heldout_fonts": TEST_SIZE + max(sizes)}
  source = pipeline.make_source(config, "test_heldout_fonts")
  folders = {"test": range(TEST_SIZE)}
  folders.update({f"train_{n}": range(TEST_SIZE, TEST_SIZE + n) for n in sizes})
  for name, indices in folders.items():
    if not os.path.exists(os.path.join(root, name, "gt.txt")):
      formats.write_folder(os.path.join(root, name), (source[i] for i in indices))


def run_dir(start, n, seed):
  return os.path.join(FLAGS.workdir, "runs", f"{start}_n{n}_s{seed}")


def final_accuracy(workdir, step=None):
  """The word accuracy on test/ at `step` (default: the run's last evaluation), or None."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = [json.loads(line) for line in open(path) if KEY in line]
  rows = [r for r in rows if step is None or r["step"] == step]
  return rows[-1][KEY] if rows else None


def run(start, n, seed):
  workdir = run_dir(start, n, seed)
  if final_accuracy(workdir, FLAGS.steps) is not None:
    return
  command = [
    sys.executable,
    "-m",
    "mms_jax.main",
    "--config=configs/finetune_recognition.py",
    f"--workdir={workdir}",
    "--config.data.source=folder",
    f"--config.data.path={os.path.join(FLAGS.workdir, 'tree')}",
    f"--config.data.splits.train=train_{n}",
    "--config.data.augment=True",
    f"--config.total_steps={FLAGS.steps}",
    "--config.lr.base=4e-3",
    "--config.lr.warmup_steps=30",
    "--config.eval.every=0",
    f"--config.checkpoint.every={FLAGS.steps}",
    "--config.pictures=False",
    f"--config.seed={seed}",
  ]
  if start != "scratch":
    command.append(f"--config.init_from={FLAGS.recognizer}")
  if start == "encoder":
    command.append("--config.init_head=False")
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  with open(workdir + ".log", "a") as log:
    subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def table(sizes, seeds):
  """{(start, n): [accuracy per seed]} of the finished runs."""
  out = {}
  for start in FLAGS.starts:
    for n in sizes:
      values = [final_accuracy(run_dir(start, n, s), FLAGS.steps) for s in seeds]
      out[start, n] = [v for v in values if v is not None]
  return out


def report(results, sizes, seeds):
  from mms_jax.train import ablation

  print(f"Word accuracy on the user domain's test/ ({TEST_SIZE} images), %, mean ± std over seeds")
  print("| N | " + " | ".join(FLAGS.starts) + " |")
  print("|---:|" + "---:|" * len(FLAGS.starts))
  for n in sizes:
    cells = []
    for start in FLAGS.starts:
      v = 100 * np.array(results[start, n])
      cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f} (n={len(v)})")
    print(f"| {n} | " + " | ".join(cells) + " |")
  step0 = [final_accuracy(run_dir("recognizer", sizes[0], s), 0) for s in seeds]
  step0 = [v for v in step0 if v is not None]
  if step0:
    print(f"The recognizer before fine-tuning: {100 * step0[0]:.1f} %")
  pairs = [("recognizer", "encoder"), ("encoder", "scratch"), ("recognizer", "scratch")]
  print("\nPaired differences (same seed), points: mean [95 % t interval]")
  for n in sizes:
    for a, b in pairs:
      if a not in FLAGS.starts or b not in FLAGS.starts:
        continue
      da = {s: final_accuracy(run_dir(a, n, s), FLAGS.steps) for s in seeds}
      db = {s: final_accuracy(run_dir(b, n, s), FLAGS.steps) for s in seeds}
      d = 100 * np.array([da[s] - db[s] for s in seeds if da[s] is not None and db[s] is not None])
      if len(d):
        std = d.std(ddof=1) if len(d) > 1 else float("nan")
        lo, hi = ablation.confidence_interval(d.mean(), std, len(d))
        print(f"N={n}: {a} - {b} = {d.mean():+.1f} [{lo:+.1f}, {hi:+.1f}] (n={len(d)})")
  return step0


def draw(results, sizes, step0, out):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  labels = {
    "recognizer": "from the recognizer (head kept)",
    "encoder": "from its encoder only",
    "scratch": "from scratch",
  }
  for start in FLAGS.starts:
    xs = [n for n in sizes if results[start, n]]
    means = [100 * np.mean(results[start, n]) for n in xs]
    stds = [100 * np.std(results[start, n]) for n in xs]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=labels.get(start, start))
  if step0:
    ax.axhline(100 * step0[0], color="grey", ls=":", label="the recognizer, not fine-tuned")
  ax.set_xscale("log", base=2)
  ax.set_xticks(sizes, [str(n) for n in sizes])
  ax.set_xlabel("labelled crops of the new style (N)")
  ax.set_ylabel("word accuracy on its test set (%)")
  ax.set_ylim(-2, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(0.02, 0.3))  # between the lines
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print(f"Wrote {out}")


def main(argv):
  del argv
  sizes, seeds = [int(n) for n in FLAGS.sizes], [int(s) for s in FLAGS.seeds]
  if not FLAGS.report_only:
    if not FLAGS.recognizer:
      raise app.UsageError("--recognizer is required: a recognition workdir")
    make_tree(os.path.join(FLAGS.workdir, "tree"), sizes)
    for n in sizes:
      for seed in seeds:
        for start in FLAGS.starts:
          run(start, n, seed)
  results = table(sizes, seeds)
  step0 = report(results, sizes, seeds)
  if FLAGS.out:
    draw(results, sizes, step0, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
