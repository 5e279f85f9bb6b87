r"""Text segmentation: pretrained ViT encoder + light transformer head (docs/method.md §4).

Variants (`--config=configs/finetune_segmentation.py:VARIANT`):

  (default) small   The encoder of configs/pretrain.py (128 wide, 4 blocks, 4 heads,
                    8x4 patches, conv stem, ALiBi) + a 2-block, 128-wide head that also
                    sees each patch's pixels (model.pixel_shortcut), on generated 32x128
                    text images with exact glyph masks; batch 32, 300 steps, ~3 min on a
                    quiet 2-core CPU. Evaluated on the synthetic val, test_heldout_fonts
                    and test_hard splits. From scratch: 0.68 IoU on test_heldout_fonts;
                    0.30 without the shortcut, whose conv stem loses the pixel detail;
                    0.77 with the paper's 4x4 linear-patch ViT (docs/segmentation.md).
  tiny              Seconds-long smoke run (tests).
  paper             ViT-S/4 encoder + head 3 blocks x 384 wide x 2 heads on TextSeg word
                    crops resized to 32x128; set --config.data.path=/path/to/TextSeg.

  python -m mms_jax.main --config=configs/finetune_segmentation.py \
      --workdir=workdirs/seg --config.init_from=workdirs/pretrain
  python -m mms_jax.main --config=configs/finetune_segmentation.py:paper \
      --config.data.path=/data/TextSeg --config.init_from=workdirs/pretrain_s4 --workdir=...
  # Frozen-encoder probe: --config.freeze_encoder=True
  # Evaluate a checkpoint only: --config.eval_only=True [--config.eval_from=DIR]
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mms_jax.data import pipeline
from mms_jax.models import encoder_config


def get_config(variant="small"):
  variant = variant or "small"
  c = ml_collections.ConfigDict()
  c.program = "segmentation"
  c.seed = 0
  c.image_size = (32, 128)

  # The encoder (models/encoder_config.py): unset fields come from init_from's config.json,
  # else configs/pretrain.py's default (128 wide, 4 deep, 4 heads, 8x4 patches, the masked
  # conv stem, the 2-D ALiBi bias); a field set here (tiny and paper variants, the
  # command line) wins and must match init_from's encoder.
  c.model = dict(
    encoder=encoder_config.unset(),
    head_width=128,
    head_depth=2,
    head_num_heads=2,
    # The head also sees each patch's input pixels: the detail the conv stem does not
    # pass on (docs/segmentation.md: 0.30 -> 0.68 IoU from scratch at this budget).
    pixel_shortcut=True,
    gelu="erf",
    dtype="float32",
    scan_layers=False,
  )
  c.threshold = 0.5  # foreground if sigmoid(logit) >= threshold (metrics, pictures)

  c.data = pipeline.default_config()
  c.data.reader = "direct"
  c.data.size = dict(train=20_000, val=256, test_heldout_fonts=256, test_hard=256)
  c.data.worker_count = 0
  c.train_split = "train"

  c.batch_size = 32
  c.total_steps = 300
  c.num_epochs = placeholder(float)
  c.fsdp = 1
  c.lr = dict(base=4e-3, warmup_steps=30, warmup_fraction=placeholder(float), end=0.0)
  c.optimizer = dict(b1=0.9, b2=0.999, weight_decay=0.05)
  c.grad_clip_norm = 1.0
  c.freeze_encoder = False
  c.layer_decay = 0.75

  c.log_every = 25
  # Evaluated splits, () = by source: synthetic val, test_heldout_fonts, test_hard; TextSeg val, test.
  c.eval = dict(splits=(), every=100, batch_size=64)
  c.pictures = True  # a PNG with every evaluation
  c.num_picture_images = 4
  c.checkpoint = dict(every=100, keep=2, keep_every=placeholder(int))
  # > 0: stop with a checkpoint at this step of the total_steps schedule; re-run
  # without it to continue.
  c.stop_at_step = 0
  c.resume_from = ""
  c.init_from = ""  # a pretraining workdir or step directory (its encoder is loaded)
  c.eval_only = False
  c.eval_from = ""  # eval_only: workdir or step directory (default: this workdir)
  c.distributed = dict(coordinator_address="", num_processes=1, process_id=0, auto=False)

  if variant == "small":
    pass
  elif variant == "tiny":
    c.model.encoder.update(width=32, depth=1, num_heads=2, **encoder_config.PAPER_VIT)
    c.model.update(
      head_width=32,
      head_depth=1,
      head_num_heads=2,
    )
    c.data.size = dict(train=64, val=12, test_heldout_fonts=8, test_hard=8)
    c.batch_size = 8
    c.eval.batch_size = 8
    c.total_steps = 4
    c.lr.warmup_steps = 1
    c.log_every = 2
    c.eval.every = 0
    c.checkpoint.every = 2
    c.num_picture_images = 3
  elif variant == "paper":
    c.model.encoder.update(variant="S", **encoder_config.PAPER_VIT)
    c.model.update(
      head_width=384,
      head_depth=3,
      head_num_heads=2,
      pixel_shortcut=False,  # the paper's head; a linear patch stem passes every pixel on
    )
    c.data.source = "textseg"
    c.data.reader = "tfds"
    c.data.augment = True
    c.data.worker_count = 4
    c.batch_size = 64
    c.eval.batch_size = 128
    c.total_steps = 0
    c.num_epochs = 100.0
    c.lr = dict(base=1e-3, warmup_steps=0, warmup_fraction=0.05, end=0.0)
    c.optimizer.b2 = 0.999
    c.log_every = 100
    c.eval.every = 2000
    c.checkpoint = dict(every=2000, keep=2, keep_every=placeholder(int))
  else:
    raise ValueError(f"unknown variant {variant!r}: small, tiny or paper")
  return c
