"""config.program -> the module whose train_and_evaluate(config, workdir) runs it."""

PROGRAMS = {
  "pretrain": "mms_jax.train.pretrain",
  "recognition": "mms_jax.train.recognition",
  "segmentation": "mms_jax.train.segmentation",
  "super_resolution": "mms_jax.train.super_resolution",
  "probe": "mms_jax.train.probe",
  "ablation": "mms_jax.train.ablation",
}
