r"""Small-scale MMS ablation: which masking makes the best encoder? (docs/results.md)

For every seed and arm, pretrains the same encoder on the same unlabeled synthetic
images with one masking setting (or not at all, arm 'none'), then runs each stage of
config.stages from that encoder and collects the final evaluation of each:

  arms    none (random init) | random_patch (plain MAE) | blockwise | span |
          mms_per_sample | mms_multi_view | mms_union (every image's mask superimposes
          the three strategies, each drawing a third of the count) | mms_visible_loss
          (per_sample, and the loss also on visible patches: paper 002) |
          random_patch_visible_loss (plain MAE with that loss: tells masking from loss) |
          mms_union_visible_loss (union masking with that loss);
          config.arm_masking and config.arm_pretrain define them
  stages  probe (frozen encoder, linear heads on cached features: recognition,
          segmentation and SR; configs/probe.py) | finetune (recognition, all weights) |
          segmentation | super_resolution (all weights)

Writes ablation.md (mean ± std over seeds, then each arm's difference to
config.compare_to at the same seed), ablation.csv and ablation_raw.json to the
workdir, and keeps every run's own workdir under <workdir>/seed_<s>/<arm>/<stage>.
Re-running the command skips finished runs and resumes an interrupted one.

Variants (`--config=configs/ablation.py:VARIANT`):

  (default) small   Does pretraining help a recognizer that reads, and MMS more than
                    MAE? Arms none / random_patch (plain MAE) / mms_per_sample, seeds
                    0, 1, 2; per arm and seed 3,000 pretraining steps of the
                    configs/pretrain.py encoder, then the `finetune` stage: the
                    recognition default recipe (configs/finetune_recognition.py) on a
                    1,500-step schedule (warmup 150) with 4,096 labelled images of the
                    test distribution, half of them rendered clean, no hard images;
                    scored on 500 images of test_heldout_fonts and test_hard. On a
                    2-core Intel Xeon (runs.jsonl has `seconds` and
                    `pretrain_seconds`): a 3,000-step pretraining 15-20 min, a
                    fine-tune 10-12 min, a seed 60-82 min, the default 3.0-3.4 h. The
                    segmentation and SR columns (--config.stages="('finetune',
                    'segmentation', 'super_resolution')", 300 steps each,
                    pixel-shortcut heads) add 3-5 min per run: ~40 min per seed for
                    four arms.
  lengths           The default plus pretraining length as an axis: every arm's
                    fine-tune also from step 1,000 of its 3,000-step pretraining (rows
                    '<arm>@1000'; the default keeps that checkpoint, and where a
                    pretraining no longer has it, it is re-run to step 1,000). Run in
                    the default's workdir it adds 2 fine-tunes per seed (7.5 min each
                    with both cores free) plus, per seed whose step 1,000 was not kept,
                    two re-runs to step 1,000 (4-10 min each).
  quick             The same with arms none / mms_per_sample, seed 0 and 1,000
                    pretraining steps. 22 min end to end on the same Xeon with an
                    empty compilation cache (the pretraining 4.8 min, each fine-tune
                    8.7 min).
  probe             The linear-probe study: six arms, 600 pretraining steps, the probe
                    stage only (frozen encoder, linear probes for recognition,
                    segmentation and SR on 2,048 images). About 90 min per seed with
                    the earlier plain 4x4 encoder (8.5 min per pretraining, multi_view
                    ~3x, 5 min per probe); the current encoder pretrains 600 steps in
                    ~4 min. The other stages stay available through --config.stages:
                    segmentation and SR fine-tunes of 300 steps each (3-5 min per run).
  tiny              Seconds per run: the suite runs it so the pipeline keeps working.

  python -m mms_jax.main --config=configs/ablation.py --workdir=workdirs/ablation
  python -m mms_jax.main --config=configs/ablation.py:lengths --workdir=workdirs/ablation
  python -m mms_jax.main --config=configs/ablation.py:quick --workdir=workdirs/ablation_quick
  # the same pretrainings, 1,024 labelled images (fine-tunes only; 81 min for the 9
  # runs, 8.6-10.2 min each):
  python -m mms_jax.main --config=configs/ablation.py --workdir=workdirs/ablation_1024 \
      --config.pretrained_in=workdirs/ablation --config.finetune.data.size.train=1024
  # ... and with the pipeline's augmentation, which keeps that fine-tune from memorising
  # its labels (docs/results.md; 15-16 min per run beside a second study):
  python -m mms_jax.main --config=configs/ablation.py --workdir=workdirs/ablation_1024_aug \
      --config.pretrained_in=workdirs/ablation --config.finetune.data.size.train=1024 \
      --config.finetune.data.augment=True
  python -m mms_jax.main --config=configs/ablation.py:probe --workdir=workdirs/ablation_probe \
      --config.stages="('probe', 'finetune', 'segmentation', 'super_resolution')"
"""

import importlib.util
import os

import ml_collections


def _sibling(name, variant):
  """configs/<name>.py:get_config(variant), loaded from beside this file."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"mms_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(variant="small"):
  variant = variant or "small"
  if variant not in ("small", "lengths", "quick", "probe", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: small, lengths, quick, probe or tiny")
  c = ml_collections.ConfigDict()
  c.program = "ablation"
  mms = ("random_patch", "blockwise", "span")
  # Pretraining arm -> the masking it uses; 'none' (no pretraining) needs no entry.
  c.arm_masking = dict(
    random_patch=dict(mode="single", strategies=("random_patch",)),
    blockwise=dict(mode="single", strategies=("blockwise",)),
    span=dict(mode="single", strategies=("span",)),
    mms_per_sample=dict(mode="per_sample", strategies=mms),
    mms_multi_view=dict(mode="multi_view", strategies=mms),
    mms_union=dict(mode="union", strategies=mms),
    mms_visible_loss=dict(mode="per_sample", strategies=mms),
    random_patch_visible_loss=dict(mode="single", strategies=("random_patch",)),
    mms_union_visible_loss=dict(mode="union", strategies=mms),
  )
  # Pretraining settings an arm changes besides its masking, nested as in
  # configs/pretrain.py. The *_visible_loss arms also score the visible patches (paper 002).
  c.arm_pretrain = {
    arm: dict(loss=dict(visible_weight=1.0))
    for arm in ("mms_visible_loss", "random_patch_visible_loss", "mms_union_visible_loss")
  }
  c.arms = ("none", "random_patch", "blockwise", "span", "mms_per_sample", "mms_multi_view")
  c.seeds = (0,)
  # Paired tables: each arm minus each of these arms at the same seed (() for none).
  c.compare_to = ("random_patch",)
  # Pretraining length as an axis: steps of each arm's pretraining from which every
  # stage also runs (table rows '<arm>@<step>'); checkpoints along the one schedule,
  # so its learning rate and masking ratio are those of that step, not of a shorter
  # run. () runs from the finished pretraining only.
  c.pretrain_lengths = ()
  # Another ablation workdir whose finished pretrainings (same config.pretrain, checked)
  # the stages start from, instead of pretraining here; '' pretrains here.
  c.pretrained_in = ""
  # Every arm and seed compiles the same programs: keep them in <workdir>/xla_cache.
  c.compilation_cache = True
  c.report_only = False  # True: tabulate the finished runs, run nothing
  c.stages = ("probe",)
  # Table columns: (stage, metric key in that stage's final evaluation, column title).
  c.report = (
    ("probe", "eval/test_heldout_fonts/recognition/word_accuracy", "probe word acc held-out fonts"),
    ("probe", "eval/test_heldout_fonts/recognition/one_minus_ned", "probe 1-NED held-out fonts"),
    ("probe", "eval/test_hard/recognition/word_accuracy", "probe word acc hard"),
    ("probe", "eval/test_hard/recognition/one_minus_ned", "probe 1-NED hard"),
    ("probe", "eval/test_heldout_fonts/recognition/ctc_loss", "probe CTC loss held-out fonts"),
    ("probe", "eval/test_hard/recognition/ctc_loss", "probe CTC loss hard"),
    ("probe", "eval/test_heldout_fonts/segmentation/iou", "probe seg IoU held-out fonts"),
    ("probe", "eval/test_hard/segmentation/iou", "probe seg IoU hard"),
    ("probe", "eval/test_heldout_fonts/super_resolution/psnr", "probe SR PSNR held-out fonts"),
    ("probe", "eval/test_hard/super_resolution/psnr", "probe SR PSNR hard"),
    ("probe", "eval/test_heldout_fonts/super_resolution/ssim", "probe SR SSIM held-out fonts"),
    (
      "finetune",
      "eval/test_heldout_fonts/test_heldout_fonts/word_accuracy",
      "fine-tune word acc held-out fonts",
    ),
    (
      "finetune",
      "eval/test_heldout_fonts/test_heldout_fonts/one_minus_ned",
      "fine-tune 1-NED held-out fonts",
    ),
    ("finetune", "eval/test_hard/test_hard/word_accuracy", "fine-tune word acc hard"),
    ("finetune", "eval/test_hard/test_hard/one_minus_ned", "fine-tune 1-NED hard"),
    ("segmentation", "eval/test_heldout_fonts/iou", "seg IoU held-out fonts"),
    ("super_resolution", "eval/test_heldout_fonts/psnr", "SR PSNR held-out fonts"),
    ("super_resolution", "eval/test_heldout_fonts/ssim", "SR SSIM held-out fonts"),
  )

  # The synthetic data every stage reads: one seed for all arms and model seeds, so
  # arms differ only in their masking.
  data_seed = 0
  recognition_train = dict(fraction_random_strings=0.0, max_label_length=12)

  c.pretrain = _sibling("pretrain", "tiny" if variant == "tiny" else "small")
  c.pretrain.data.synthetic.seed = data_seed
  c.pretrain.picture_every = 0

  c.finetune = _sibling("finetune_recognition", "tiny" if variant == "tiny" else "small")
  c.finetune.data.synthetic.seed = data_seed
  c.finetune.pictures = False
  c.probe = _sibling("probe", "tiny" if variant == "tiny" else "small")
  c.probe.data.synthetic.seed = data_seed

  c.segmentation = _sibling("finetune_segmentation", "tiny" if variant == "tiny" else "small")
  c.super_resolution = _sibling("finetune_sr", "tiny" if variant == "tiny" else "small")
  for stage in (c.segmentation, c.super_resolution):
    stage.data.synthetic.seed = data_seed
    stage.pictures = False
    stage.eval.splits = ("test_heldout_fonts",)

  if variant != "tiny":
    # The recognition recipe in the low-label setting: 4,096 labelled images, half of
    # them rendered clean (the clean start needs fresh images), 1,500 steps.
    f = c.finetune
    f.total_steps = 1500
    f.lr.warmup_steps = 150
    f.data.size = dict(train=4096, val=256, test_heldout_fonts=500, test_hard=500)
    f.data.synthetic_train.update(clean_fraction=0.5, hard_fraction=0.0)
    f.data.curriculum.update(clean_until_step=0, hard_start_step=0, hard_end_step=0)
    f.eval.every = 0
    f.checkpoint.every = 500
  if variant in ("small", "lengths", "quick"):
    c.arms = ("none", "random_patch", "mms_per_sample")
    c.compare_to = ("random_patch", "none")
    c.seeds = (0, 1, 2)
    c.stages = ("finetune",)
    c.pretrain.total_steps = 3000
    # Keeps step 1,000 of every pretraining for the `lengths` variant.
    c.pretrain.checkpoint.keep_every = 1000
    if variant == "lengths":
      c.pretrain_lengths = (1000,)
    if variant == "quick":
      c.arms = ("none", "mms_per_sample")
      c.compare_to = ("none",)
      c.seeds = (0,)
      c.pretrain.total_steps = 1000
  elif variant == "probe":
    c.pretrain.total_steps = 600
    for stage in (c.segmentation, c.super_resolution):
      stage.total_steps = 300
      stage.eval.every = 0
      stage.data.size = dict(train=2048, test_heldout_fonts=256)
  else:
    c.arms = ("none", "random_patch", "mms_multi_view")
    c.seeds = (0, 1)
    c.finetune.data.synthetic_train = recognition_train
    c.finetune.model.head = "ctc"
    c.finetune.eval.splits = ("test_heldout_fonts", "test_hard")
    for stage in (c.segmentation, c.super_resolution):
      stage.data.size = dict(train=64, test_heldout_fonts=8)
  return c
