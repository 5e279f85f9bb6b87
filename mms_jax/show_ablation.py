r"""Plots one stage of an ablation: a dot per seed, a bar at the mean and a line per
seed across the arms (the pairs of the paired table).

  python -m mms_jax.show_ablation --out docs/img/ablation_probe.png \
      --runs=workdirs/ablation --runs="visible loss=workdirs/abl_visible"
  python -m mms_jax.show_ablation --out docs/img/ablation_finetune.png \
      --runs=workdirs/abl_small/run --stage=finetune

Each --runs is an ablation workdir (its runs.jsonl), optionally prefixed with a label
that is added to its arms' names; a seed's line joins its arms within one workdir only
(across workdirs the runs need not be pairs). Arms keep the order in which they first
appear; --arms keeps only those named (e.g. without the `@<step>` rows):

  python -m mms_jax.show_ablation --out docs/img/ablation_labels.png --stage=finetune \
      --runs="4,096 labels=workdirs/abl_small/run" \
      --runs="1,024 labels=workdirs/abl_small/l1024" --arms=none,random_patch,mms_per_sample
"""

import json
import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mms_jax.train import ablation  # noqa: E402

TITLES = {
  "eval/test_heldout_fonts/segmentation/iou": "seg IoU, held-out fonts",
  "eval/test_heldout_fonts/super_resolution/psnr": "SR PSNR (dB), held-out fonts",
  "eval/test_heldout_fonts/test_heldout_fonts/word_accuracy": "fine-tune word acc, held-out",
  "eval/test_heldout_fonts/test_heldout_fonts/one_minus_ned": "fine-tune 1-NED, held-out",
  "eval/test_heldout_fonts/iou": "seg IoU (fine-tuned), held-out",
  "eval/test_heldout_fonts/psnr": "SR PSNR (dB, fine-tuned), held-out",
}
# The panels of each stage when --metrics is not given.
DEFAULT_METRICS = {
  "probe": [
    "eval/test_heldout_fonts/segmentation/iou",
    "eval/test_heldout_fonts/super_resolution/psnr",
  ],
  "finetune": [
    "eval/test_heldout_fonts/test_heldout_fonts/word_accuracy",
    "eval/test_heldout_fonts/test_heldout_fonts/one_minus_ned",
  ],
  "segmentation": ["eval/test_heldout_fonts/iou"],
  "super_resolution": ["eval/test_heldout_fonts/psnr"],
}


def read_runs(spec, stage, only_arms=()):
  """'[label=]workdir' -> {arm name: {seed: metrics}} for `stage`, in file order;
  with `only_arms`, only the arms (`<arm>` or `<arm>@<step>`) it names."""
  label, _, workdir = spec.rpartition("=")
  path = os.path.join(workdir, "runs.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} does not exist: --runs takes an ablation workdir "
      "(run configs/ablation.py there first)"
    )
  arms = {}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if row["stage"] == stage:
        arm = ablation.run_label(row)
        if only_arms and arm not in only_arms:
          continue
        name = f"{arm}\n({label})" if label else arm
        arms.setdefault(name, {})[row["seed"]] = row["metrics"]
  return arms


def plot(arms, metrics, out, groups=None):
  """One panel per metric: dots per seed, a bar at their mean, a line per seed within
  each group of arm names (default: one group of all; a dotted rule between groups).
  Returns the figure."""
  names = list(arms)
  position = {name: x for x, name in enumerate(names)}
  groups = groups or [names]
  fig, axes = plt.subplots(
    len(metrics), 1, figsize=(1.3 * len(names) + 2, 3 * len(metrics)), squeeze=False
  )
  for ax, key in zip(axes[:, 0], metrics):
    per_arm = {name: [m[key] for m in arms[name].values() if key in m] for name in names}
    everything = [v for values in per_arm.values() for v in values]
    if not everything:
      known = sorted({k for a in arms.values() for m in a.values() for k in m})
      raise ValueError(f"no run has the metric {key!r}; the runs have {known}")
    for x, values in enumerate(per_arm.values()):
      if values:
        ax.bar(x, sum(values) / len(values), color="#9ecae1", width=0.6)
        ax.plot([x] * len(values), values, "o", color="#08519c", markersize=4)
    # One thin line per seed across a group's arms: the pairs the paired table differences.
    for group in groups:
      seeds = sorted({s for name in group for s in arms[name]})
      for seed in seeds:
        xs = [position[n] for n in group if key in arms[n].get(seed, {})]
        if len(xs) > 1:
          ys = [arms[names[x]][seed][key] for x in xs]
          ax.plot(xs, ys, "-", color="#636363", linewidth=0.6, alpha=0.6)
          ax.annotate(
            f"s{seed}", (xs[-1], ys[-1]), xytext=(4, 0), textcoords="offset points", fontsize=6
          )
    for group in groups[1:]:
      ax.axvline(position[group[0]] - 0.5, color="#636363", linestyle=":", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel(TITLES.get(key, key), fontsize=8)
    low, high = min(everything), max(everything)
    pad = 0.15 * (high - low) or 0.01
    ax.set_ylim(low - pad if "psnr" in key else 0, high + pad)
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  return fig


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.runs:
    raise app.UsageError("give at least one --runs=[LABEL=]ABLATION_WORKDIR")
  arms, groups = {}, []
  for spec in f.runs:
    group = read_runs(spec, f.stage, f.arms)
    if arms.keys() & group.keys():
      raise app.UsageError(
        f"arms {sorted(arms.keys() & group.keys())} come from two --runs: give each "
        "workdir a label, --runs=LABEL=WORKDIR"
      )
    arms.update(group)
    groups.append(list(group))
  if not arms:
    raise app.UsageError(f"no finished {f.stage!r} runs of arms {f.arms or 'any'} in {f.runs}")
  plot(arms, f.metrics or DEFAULT_METRICS[f.stage], f.out, [g for g in groups if g])
  print(f"wrote {f.out}: {len(arms)} arms")


if __name__ == "__main__":
  # Defined here, not at import, so importing the plotting functions registers no flags
  # (mms_jax.show_masks has its own --out).
  flags.DEFINE_multi_string("runs", [], "[LABEL=]ABLATION_WORKDIR, repeatable.")
  flags.DEFINE_string("out", "docs/img/ablation_probe.png", "Output PNG.")
  flags.DEFINE_enum("stage", "probe", list(DEFAULT_METRICS), "Which stage's results to plot.")
  flags.DEFINE_list("arms", [], "Only these arms (<arm> or <arm>@<step>); default: all.")
  flags.DEFINE_list(
    "metrics",
    [],
    "Metric keys of the stage's final evaluation, one panel each (default: the stage's "
    "main metrics, DEFAULT_METRICS).",
  )
  app.run(main)
