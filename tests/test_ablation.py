"""The masking ablation program: runs every (seed, arm, stage), tabulates, resumes."""

import json
import math

from conftest import load_config
from conftest import run_main
import numpy as np
import pytest

from mms_jax.train import ablation
from mms_jax.train import checkpoints
from mms_jax.train import common


def test_tiny_ablation_runs_tabulates_and_skips_finished_runs(tmp_path):
  overrides = [
    "--config.arms=('none', 'span')",
    "--config.seeds=(0,)",
    "--config.stages=('probe', 'segmentation')",
  ]
  log = run_main("ablation.py:tiny", tmp_path, *overrides, timeout=600)
  runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
  assert sorted((r["arm"], r["stage"]) for r in runs) == [
    ("none", "probe"),
    ("none", "segmentation"),
    ("span", "probe"),
    ("span", "segmentation"),
  ]
  config = load_config("ablation", "tiny")
  for r in runs:
    wanted = {key for stage, key, _ in config.report if stage == r["stage"]}
    assert wanted <= set(r["metrics"]), (r["stage"], sorted(r["metrics"]))
    assert all(math.isfinite(v) for v in r["metrics"].values())
  # The pretraining time is on the first stage run after it, nowhere else.
  timed = {(r["arm"], r["stage"]): r["pretrain_seconds"] for r in runs}
  assert timed[("span", "probe")] > 0
  assert timed[("span", "segmentation")] is None and timed[("none", "probe")] is None
  table = (tmp_path / "ablation.md").read_text()
  assert "| none |" in table and "| span |" in table and "seg IoU" in table
  assert "probe seg IoU" in table and "probe 1-NED hard" in table
  assert "fine-tune" not in table  # stages not run are not reported

  # Each stage starts from its arm's own encoder: the probe reads the arm's pretraining
  # (a random encoder for 'none'), the fine-tune starts from it and trains it.
  probed = {
    arm: json.loads((tmp_path / f"seed_0/{arm}/probe/probe.json").read_text())
    for arm in ("none", "span")
  }
  assert probed["span"]["init_from"] == str(tmp_path / "seed_0/span/pretrain")
  assert probed["none"]["init_from"] == ""
  assert probed["span"]["metrics"] != probed["none"]["metrics"]
  pretrained = checkpoints.load_params(tmp_path / "seed_0/span/pretrain")["encoder"]
  tuned = checkpoints.load_params(tmp_path / "seed_0/span/segmentation")["encoder"]
  assert pretrained.keys() == tuned.keys()
  assert not np.array_equal(tuned["patch_embed"]["kernel"], pretrained["patch_embed"]["kernel"])
  assert not (tmp_path / "seed_0/none/pretrain").exists()

  again = run_main("ablation.py:tiny", tmp_path, *overrides)
  assert "0 runs to do" in again and "Ablation: pretraining" not in again
  assert "Ablation: pretraining span" in log

  # report_only tabulates what has finished (seed 1 has nothing yet) and runs nothing.
  report = run_main(
    "ablation.py:tiny",
    tmp_path,
    *overrides[:1],
    "--config.seeds=(0, 1)",
    "--config.stages=('probe', 'segmentation')",
    "--config.report_only=True",
  )
  assert "Ablation: pretraining" not in report and not (tmp_path / "seed_1").exists()
  assert "seeds (0, 1)" in (tmp_path / "ablation.md").read_text()


def test_summary_is_mean_and_sample_std_over_seeds():
  config = load_config("ablation", "tiny")
  key = config.report[0][1]
  runs = {
    (s, arm, "probe"): {"metrics": {key: v}}
    for arm, values in (("none", (0.1, 0.3)), ("span", (0.5, 0.5)))
    for s, v in zip((0, 1), values)
  }
  with config.unlocked():
    config.arms, config.seeds, config.stages = ("none", "span", "random_patch"), (0, 1), ("probe",)
  table = dict(ablation.summarize(config, runs))
  title, mean, std, n = table["none"][0]
  assert title == config.report[0][2] and n == 2
  assert mean == pytest.approx(0.2) and std == pytest.approx(np.std([0.1, 0.3], ddof=1))
  assert table["span"][0][1:] == (0.5, 0.0, 2)
  assert table["random_patch"][0][3] == 0  # not run yet: shown as a dash
  markdown = ablation.format_markdown(list(table.items()), "t")
  assert "| random_patch | 0 | —" in markdown and "| none | 2 | 0.2 ± 0.14" in markdown

  # Paired by seed: none - span is (0.1 - 0.5, 0.3 - 0.5); random_patch has no seed.
  paired = dict(ablation.summarize(config, runs, reference="span"))
  assert "span" not in paired
  assert paired["none"][0][1:] == pytest.approx((-0.3, np.std([-0.4, -0.2], ddof=1), 2))
  assert paired["random_patch"][0][3] == 0
  assert "| none | 2 | -0.3 ± 0.14" in ablation.format_markdown(
    list(paired.items()), "t", signed=True
  )


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("arms", ("none", "jigsaw"), "jigsaw"),
    ("stages", ("probe", "ocr"), "ocr"),
    ("seeds", (), "seeds"),
    ("compare_to", "mae", "compare_to='mae' is not an arm"),
  ],
)
def test_bad_ablation_config_names_the_field(field, value, message):
  config = load_config("ablation", "tiny")
  with config.unlocked():
    config[field] = value
  with pytest.raises(common.ConfigError, match=message):
    ablation.check_config(config)
