"""The ablation plot shows every seed's value and their mean, per arm."""

import json

from conftest import load_config
import numpy as np
import pytest

from mms_jax import show_ablation

IOU = "eval/test_heldout_fonts/segmentation/iou"


def _write_runs(workdir, rows):
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "runs.jsonl", "w") as f:
    for seed, arm, stage, iou in rows:
      f.write(json.dumps({"seed": seed, "arm": arm, "stage": stage, "metrics": {IOU: iou}}) + "\n")


def test_plot_has_a_dot_per_seed_and_a_bar_at_the_mean(tmp_path):
  _write_runs(
    tmp_path / "a",
    [
      (0, "none", "probe", 0.4),
      (1, "none", "probe", 0.2),
      (0, "span", "probe", 0.1),
      (0, "span", "segmentation", 0.9),
    ],
  )
  _write_runs(tmp_path / "b", [(0, "span", "probe", 0.3)])
  arms = show_ablation.read_runs(str(tmp_path / "a"), "probe")
  arms.update(show_ablation.read_runs(f"long={tmp_path / 'b'}", "probe"))
  assert list(arms) == ["none", "span", "span\n(long)"]
  assert arms["span"] == {0: {IOU: 0.1}}  # the segmentation stage is not mixed in

  out = tmp_path / "plot.png"
  ax = show_ablation.plot(arms, [IOU], str(out)).axes[0]
  assert out.stat().st_size > 1000
  np.testing.assert_allclose([p.get_height() for p in ax.patches], [0.3, 0.1, 0.3])
  dots = [line.get_ydata() for line in ax.lines if line.get_marker() == "o"]
  np.testing.assert_allclose(np.concatenate(dots), [0.4, 0.2, 0.1, 0.3])
  # Seed 0 is in all three arms: one line joins its values; seed 1 only has 'none'.
  (seed_line,) = [line for line in ax.lines if line.get_linestyle() == "-"]
  np.testing.assert_allclose(seed_line.get_ydata(), [0.4, 0.1, 0.3])

  # Grouped by workdir: seed 0's line stays within workdir a, a rule separates b.
  ax = show_ablation.plot(arms, [IOU], str(out), [["none", "span"], ["span\n(long)"]]).axes[0]
  (seed_line,) = [line for line in ax.lines if line.get_linestyle() == "-"]
  np.testing.assert_allclose(seed_line.get_ydata(), [0.4, 0.1])
  (rule,) = [line for line in ax.lines if line.get_linestyle() == ":"]
  np.testing.assert_allclose(rule.get_xdata(), [1.5, 1.5])


def test_only_the_named_arms_are_read(tmp_path):
  _write_runs(tmp_path, [(0, "none", "finetune", 0.5), (0, "span", "finetune", 0.2)])
  rows = (tmp_path / "runs.jsonl").read_text().splitlines()
  step_row = json.loads(rows[1])
  step_row["pretrain_step"] = 1000
  (tmp_path / "runs.jsonl").write_text("\n".join([*rows, json.dumps(step_row)]) + "\n")
  arms = show_ablation.read_runs(str(tmp_path), "finetune", only_arms=["span", "none"])
  assert list(arms) == ["none", "span"]
  assert list(show_ablation.read_runs(str(tmp_path), "finetune", ["span@1000"])) == ["span@1000"]


def test_runs_from_a_pretraining_step_are_their_own_arm(tmp_path):
  _write_runs(tmp_path, [(0, "span", "finetune", 0.5), (0, "span", "finetune", 0.2)])
  rows = (tmp_path / "runs.jsonl").read_text().splitlines()
  first = json.loads(rows[0])
  first["pretrain_step"] = 1000
  (tmp_path / "runs.jsonl").write_text(json.dumps(first) + "\n" + rows[1] + "\n")
  arms = show_ablation.read_runs(str(tmp_path), "finetune")
  assert arms == {"span@1000": {0: {IOU: 0.5}}, "span": {0: {IOU: 0.2}}}


def test_missing_workdir_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="ablation workdir"):
    show_ablation.read_runs(str(tmp_path / "nowhere"), "probe")


def test_a_metric_no_run_has_is_named(tmp_path):
  _write_runs(tmp_path / "a", [(0, "none", "probe", 0.4)])
  arms = show_ablation.read_runs(str(tmp_path / "a"), "probe")
  with pytest.raises(ValueError, match="no run has the metric 'eval/typo'.*segmentation/iou"):
    show_ablation.plot(arms, ["eval/typo"], str(tmp_path / "plot.png"))


def test_each_stage_plots_metrics_the_ablation_reports_by_default():
  reported = {(stage, key) for stage, key, _ in load_config("ablation", "small").report}
  for stage, keys in show_ablation.DEFAULT_METRICS.items():
    assert keys and all((stage, key) in reported for key in keys), stage
