"""The masking ablation program: runs every (seed, arm, stage), tabulates, resumes."""

import json
import math
import shutil

from conftest import load_config
from conftest import run_main
import jax
import numpy as np
import pytest

from mms_jax import checkpoints
from mms_jax import masking
from mms_jax.train import ablation
from mms_jax.train import common
from mms_jax.train import pretrain


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


def _params_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  return tree_a == tree_b and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def test_pretraining_length_axis_runs_from_a_kept_step_or_a_replay(tmp_path):
  """Stages also run from step 3 of each 6-step pretraining: from its kept checkpoint,
  or, where the pretraining no longer has it, from a re-run stopped at step 3 that
  gives the same weights."""
  overrides = [
    "--config.arms=('none', 'span')",
    "--config.seeds=(0,)",
    "--config.stages=('probe',)",
    "--config.pretrain_lengths=(3,)",
    "--config.compare_to=('none',)",
  ]
  first = tmp_path / "first"
  run_main("ablation.py:tiny", first, *overrides, timeout=600)
  runs = [json.loads(line) for line in (first / "runs.jsonl").read_text().splitlines()]
  assert sorted((r["arm"], r.get("pretrain_step", 0)) for r in runs) == [
    ("none", 0),
    ("span", 0),
    ("span", 3),
  ]
  span = first / "seed_0/span"
  kept = span / "pretrain/checkpoints/3"
  from_step = json.loads((span / "probe_from_step_3/probe.json").read_text())
  assert from_step["init_from"] == str(kept)
  finished = json.loads((span / "probe/probe.json").read_text())
  assert finished["init_from"] == str(span / "pretrain")
  assert from_step["metrics"] != finished["metrics"]
  assert not (span / "pretrain_to_step_3").exists()
  table = (first / "ablation.md").read_text()
  assert "| span@3 | 1 |" in table and "Difference to none" in table
  assert table.index("| span@3 |") < table.index("| span |")

  # Without step 3 in the pretraining, the run re-runs the pretraining to step 3.
  second = tmp_path / "second"
  shutil.copytree(first, second)
  shutil.rmtree(second / "seed_0/span/pretrain/checkpoints/3")
  (second / "runs.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in runs if not r.get("pretrain_step"))
  )
  log = run_main("ablation.py:tiny", second, *overrides, timeout=600)
  assert "does not keep step 3" in log and "1 runs to do" in log
  replay = second / "seed_0/span/pretrain_to_step_3"
  assert [p.name for p in (replay / "checkpoints").iterdir() if p.name.isdigit()] == ["3"]
  assert _params_equal(checkpoints.load_params(replay), checkpoints.load_params(kept))
  replayed = json.loads((second / "seed_0/span/probe_from_step_3/probe.json").read_text())
  assert replayed["init_from"] == str(replay / "checkpoints/3")
  assert replayed["metrics"] == pytest.approx(from_step["metrics"])

  # Another workdir reuses the first one's pretrainings (a second fine-tune setting).
  third = tmp_path / "third"
  log = run_main(
    "ablation.py:tiny", third, *overrides[:3], f"--config.pretrained_in={first}", timeout=600
  )
  assert "reusing the pretraining" in log and "Ablation: pretraining" not in log
  reused = json.loads((third / "seed_0/span/probe/probe.json").read_text())
  assert reused["init_from"] == str(span / "pretrain")
  assert reused["metrics"] == pytest.approx(finished["metrics"])
  assert not (third / "seed_0/span/pretrain").exists()

  # ... only when they were run with the same pretraining config, and finished.
  config = load_config("ablation", "tiny")
  with config.unlocked():
    config.pretrained_in = str(first)
  assert ablation.reused_pretraining(config, "span", 0) == str(span / "pretrain")
  with pytest.raises(common.ConfigError, match="loss.visible_weight: 0.0 there, 1.0 here"):
    with config.unlocked():
      config.pretrain.loss.visible_weight = 1.0
    ablation.reused_pretraining(config, "span", 0)
  with pytest.raises(common.ConfigError, match="no pretraining of span, seed 1"):
    ablation.reused_pretraining(config, "span", 1)
  with config.unlocked():
    config.pretrain.loss.visible_weight = 0.0
    config.pretrain.total_steps = 9
  with pytest.raises(common.ConfigError, match="total_steps: 6 there, 9 here"):
    ablation.reused_pretraining(config, "span", 0)
  with config.unlocked():
    config.pretrain.total_steps = 6
  shutil.rmtree(span / "pretrain/checkpoints/6")
  with pytest.raises(common.ConfigError, match="stopped at step 3 of 6; finish the ablation"):
    ablation.reused_pretraining(config, "span", 0)


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
  # The paired cell adds the t interval: -0.3 ± 12.71 * 0.1414 / sqrt(2).
  assert "| none | 2 | -0.3 ± 0.14 [-1.57, +0.971] |" in ablation.format_markdown(
    list(paired.items()), "t", signed=True
  )
  low, high = ablation.confidence_interval(-0.3, np.std([-0.4, -0.2], ddof=1), 2)
  assert (low, high) == pytest.approx((-0.3 - 1.2706, -0.3 + 1.2706), abs=1e-4)
  assert ablation.confidence_interval(0.5, 0.1, 3) == pytest.approx(
    (0.5 - 4.3027 * 0.1 / np.sqrt(3), 0.5 + 4.3027 * 0.1 / np.sqrt(3)), abs=1e-4
  )


def test_an_arm_can_change_pretraining_settings_besides_its_masking():
  config = load_config("ablation", "small")
  visible = ablation.pretrain_config(config, "mms_visible_loss", seed=2)
  assert visible.loss.visible_weight == 1.0 and visible.seed == 2
  assert visible.masking.mode == "per_sample"
  plain = ablation.pretrain_config(config, "mms_per_sample", seed=2)
  assert plain.loss.visible_weight == 0.0
  assert plain.to_dict() == {**visible.to_dict(), "loss": plain.loss.to_dict()}
  assert config.pretrain.loss.visible_weight == 0.0  # the shared config is untouched
  mae = ablation.pretrain_config(config, "random_patch_visible_loss", seed=2)
  assert mae.loss.visible_weight == 1.0 and mae.masking.strategies == ("random_patch",)
  # Each arm's settings are its own: overriding one leaves the other as it was.
  config.arm_pretrain.mms_visible_loss.loss.visible_weight = 0.5
  assert ablation.pretrain_config(config, "random_patch_visible_loss", 0).loss.visible_weight == 1


@pytest.mark.parametrize("arm", sorted(load_config("ablation", "small").arm_masking.keys()))
def test_every_masking_arm_samples_exact_counts_on_the_ablation_grid(arm):
  config = load_config("ablation", "small")
  spec = pretrain.check_config(ablation.pretrain_config(config, arm, seed=0))
  assert spec.mode == config.arm_masking[arm].mode
  num_masked = spec.num_masked()
  mask, _ = masking.make_sampler(spec)(jax.random.key(0), 64, num_masked)
  mask = np.asarray(mask).reshape(64, spec.num_views, spec.num_cells)
  np.testing.assert_array_equal(mask.sum(-1), num_masked)
  # Not one fixed pattern: the masks of different images differ.
  assert len({m.tobytes() for m in mask[:, 0]}) > 32


def test_pretraining_length_rows_are_paired_at_the_same_length():
  config = load_config("ablation", "tiny")
  key = config.report[0][1]
  with config.unlocked():
    config.arms, config.seeds, config.stages = ("none", "span", "random_patch"), (0, 1), ("probe",)
    config.pretrain_lengths = (3,)
  values = {"none": (0.1, 0.2), "span@3": (0.4, 0.6), "random_patch@3": (0.3, 0.3)}
  values.update({"span": (0.9, 0.9), "random_patch": (0.5, 0.8)})
  runs = {
    (s, name, "probe"): {"metrics": {key: v}}
    for name, per_seed in values.items()
    for s, v in zip((0, 1), per_seed)
  }
  assert ablation.table_arms(config) == [
    "none",
    "span@3",
    "random_patch@3",
    "span",
    "random_patch",
  ]
  table = dict(ablation.summarize(config, runs))
  assert table["span@3"][0][1] == pytest.approx(0.5)
  # Against an arm: the same pretraining length; against 'none': random init.
  paired = dict(ablation.summarize(config, runs, reference="random_patch"))
  assert list(paired) == ["none", "span@3", "span"]
  assert paired["span@3"][0][1] == pytest.approx(0.2)  # (0.1 + 0.3) / 2
  assert paired["span"][0][1] == pytest.approx(0.25)  # (0.4 + 0.1) / 2
  scratch = dict(ablation.summarize(config, runs, reference="none"))
  assert scratch["span@3"][0][1] == pytest.approx(0.35)
  assert scratch["random_patch"][0][1] == pytest.approx(0.5)
  # Rows in runs.jsonl carry the pretraining step; the finished pretraining has none.
  assert ablation.run_label({"arm": "span", "pretrain_step": 3}) == "span@3"
  assert ablation.run_label({"arm": "span"}) == "span"
  # Progress counts this config's runs only, not other rows, seeds or stages of the workdir.
  runs[(0, "span@7", "probe")] = runs[(5, "span", "probe")] = runs[(0, "span", "finetune")] = {}
  assert ablation.runs_done(config, runs) == 10


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("arms", ("none", "jigsaw"), "jigsaw"),
    ("stages", ("probe", "ocr"), "ocr"),
    ("seeds", (), "seeds"),
    ("compare_to", ("mae",), r"compare_to=\('mae',\) names an unknown arm"),
    ("compare_to", ("none", "mae"), "names an unknown arm"),
    ("pretrain_lengths", (0,), "pretrain_lengths"),
    ("arm_pretrain", {"span": {"loss": {"visible_weigh": 1.0}}}, "arm_pretrain.span does not fit"),
    ("arm_pretrain", {"jigsaw": {"seed": 3}}, r"\['jigsaw'\], which config.arm_masking"),
    ("pretrain_lengths", (6,), "between 1 and config.pretrain.total_steps - 1 = 5"),
    ("pretrain_lengths", (3, 3), "distinct"),
    ("pretrained_in", "/nonexistent/abl", "pretrained_in='/nonexistent/abl' is not a directory"),
  ],
)
def test_bad_ablation_config_names_the_field(field, value, message):
  config = load_config("ablation", "tiny")
  with config.unlocked():
    config[field] = value
  with pytest.raises(common.ConfigError, match=message):
    ablation.check_config(config)
