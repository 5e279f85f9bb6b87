r"""Text-image super-resolution: bicubic(LR) -> pretrained ViT encoder -> light transformer
head predicting the HR pixels of each patch (docs/method.md §4).

Variants (`--config=configs/finetune_sr.py:VARIANT`):

  (default) small   The encoder of configs/pretrain.py (128 wide, 4 blocks, 4 heads,
                    8x4 patches, conv stem, ALiBi) + a 2-block, 128-wide head that also
                    sees each patch's pixels, on generated 16x64 -> 32x128 pairs
                    (degraded downsampling); batch 32, 300 steps, ~4 min on a 2-core CPU.
                    Evaluated on the synthetic val, test_heldout_fonts and test_hard
                    splits (PSNR / SSIM, also of plain bicubic upsampling): from scratch
                    25.43 dB vs 24.15 bicubic on test_heldout_fonts, 24.92 without the
                    pixel shortcut (docs/super_resolution.md).
  tiny              Seconds-long smoke run (tests).
  paper             ViT-S/4 encoder + head 3 blocks x 384 wide x 2 heads on TextZoom
                    (train1 + train2; test/easy, test/medium, test/hard);
                    set --config.data.path=/path/to/textzoom.

  python -m mms_jax.main --config=configs/finetune_sr.py --workdir=workdirs/sr \
      --config.init_from=workdirs/pretrain
  python -m mms_jax.main --config=configs/finetune_sr.py:paper \
      --config.data.path=/data/textzoom --config.init_from=workdirs/pretrain_s4 --workdir=...
  # Also read the images with a trained recognizer (word accuracy of bicubic / SR / HR):
  #   --config.sr_eval_recognizer=workdirs/recognition
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
  c.program = "super_resolution"
  c.seed = 0
  c.image_size = (32, 128)  # HR size; the LR input is half of it

  # The encoder (models/encoder_config.py): unset fields come from init_from's config.json,
  # else configs/pretrain.py's default (128 wide, 4 deep, 4 heads, 8x4 patches, the masked
  # conv stem, the 2-D ALiBi bias); a field set here (tiny and paper variants, the
  # command line) wins and must match init_from's encoder.
  c.model = dict(
    encoder=encoder_config.unset(),
    head_width=128,
    head_depth=2,
    head_num_heads=2,
    residual=True,
    # The head also sees each patch's bicubic input pixels: the detail the conv stem
    # does not pass on (docs/super_resolution.md: +0.51 dB from scratch at this budget).
    pixel_shortcut=True,
    gelu="erf",
    dtype="float32",
    scan_layers=False,
  )
  # loss = mean (SR - HR)^2 + gradient_weight * L1 between image gradients of SR and HR.
  c.loss = dict(gradient_weight=0.0)

  c.data = pipeline.default_config()
  c.data.reader = "direct"
  c.data.size = dict(train=20_000, val=256, test_heldout_fonts=256, test_hard=256)
  c.data.worker_count = 0
  c.train_split = "train"
  c.sr_eval_recognizer = ""  # a recognition workdir: also report word accuracy

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
  # Evaluated splits, () = by source: synthetic val, test_heldout_fonts, test_hard;
  # TextZoom test (-> test/easy, test/medium, test/hard).
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
    c.data.source = "textzoom"
    c.data.reader = "tfds"
    c.data.worker_count = 4
    c.batch_size = 64
    c.eval.batch_size = 128
    c.total_steps = 0
    c.num_epochs = 100.0
    c.lr = dict(base=1e-3, warmup_steps=0, warmup_fraction=0.05, end=0.0)
    c.log_every = 100
    c.eval.every = 2000
    c.checkpoint = dict(every=2000, keep=2, keep_every=placeholder(int))
  else:
    raise ValueError(f"unknown variant {variant!r}: small, tiny or paper")
  return c
