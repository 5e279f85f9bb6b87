#!/usr/bin/env bash
# Runs mms_jax on a Cloud TPU VM pod slice: every worker (host) runs the same command,
# and jax.distributed.initialize() finds the others by itself. docs/scaling.md walks
# through a whole run; this script is each step.
#
#   export TPU_NAME=mms-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32
#   bash launch/tpu_pod.sh create                  # the slice (TPU VMs)
#   BUCKET=my-bucket bash launch/tpu_pod.sh mount  # the shared workdir, on every worker
#   bash launch/tpu_pod.sh install                 # this checkout + venv on every worker
#   bash launch/tpu_pod.sh run -- --config=configs/pretrain.py:S4_union14m \
#       --config.data.path=/mnt/mms/union14m_u --config.data.data_dir=/mnt/mms/tfds \
#       --config.total_steps=195312 --workdir=/mnt/mms/workdirs/mms_s4
#   bash launch/tpu_pod.sh status                  # running? last log lines per worker
#   bash launch/tpu_pod.sh logs                    # worker 0's log (all metrics are there)
#   bash launch/tpu_pod.sh stop                    # SIGTERM: save a checkpoint, exit
#   bash launch/tpu_pod.sh collect [DIR]           # every worker's log into DIR
#   bash launch/tpu_pod.sh delete                  # tear the slice down
#
# `run` starts the program detached (nohup) on all workers with --config.distributed.auto=True
# appended, and returns; re-running the same `run` resumes from the workdir's checkpoint.
# The workdir must be one directory that every worker sees (`mount`, or NFS): orbax
# writes the checkpoint cooperatively from all workers. Nothing is exported on the
# workers; JAX reads the slice topology from the TPU VM metadata.
#
# Environment read by this script:
#   TPU_NAME          slice name (required)
#   ZONE              e.g. us-central2-b (v4), us-west4-a (v5e) (required)
#   ACCELERATOR_TYPE  create: v4-32 (16 chips, 4 workers), v5litepod-16, ... (default v4-32)
#   RUNTIME_VERSION   create: TPU software version (default: tpu-ubuntu2204-base for v4,
#                     v2-alpha-tpuv5-lite for v5litepod-*, v2-alpha-tpuv6e for v6e-*)
#   PROJECT           gcloud project (default: gcloud's configured project)
#   SPOT=1            create: a Spot slice (cheaper, can be preempted at any time)
#   REMOTE_DIR        checkout directory on the workers (default: mms_jax, under $HOME)
#   BUCKET            mount: the GCS bucket to mount (name, without gs://)
#   MOUNT_POINT       mount: where it appears on every worker (default /mnt/mms)
#   NUM_WORKERS       collect: worker count (default: asked from gcloud describe)
#   DRY_RUN=1         print the gcloud commands instead of running them
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo "Usage: $0 {create|mount|install|run -- MAIN_ARGS|status|logs [N]|stop|collect [DIR]|delete}"
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  -h|--help|help) usage; exit 0 ;;
  create|mount|install|run|status|logs|stop|collect|delete) ;;
  *) [ -n "$command" ] && echo "error: unknown command '$command'" >&2
     usage >&2; exit 2 ;;
esac
if [ -z "${TPU_NAME:-}" ] || [ -z "${ZONE:-}" ]; then
  echo "error: set TPU_NAME and ZONE (see --help)" >&2
  exit 2
fi
accelerator="${ACCELERATOR_TYPE:-v4-32}"
remote_dir="${REMOTE_DIR:-mms_jax}"
mount_point="${MOUNT_POINT:-/mnt/mms}"
log=mms_jax_run.log pidfile=mms_jax_run.pid

gcloud_tpu() {  # gcloud_tpu VERB ARGS...: one `gcloud compute tpus tpu-vm` call
  local cmd=(gcloud compute tpus tpu-vm "$@" --zone="$ZONE")
  [ -n "${PROJECT:-}" ] && cmd+=(--project="$PROJECT")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    "${cmd[@]}"
  fi
}

on_workers() {  # on_workers WORKERS SHELL_COMMAND: runs it over ssh on those workers
  gcloud_tpu ssh "$TPU_NAME" --worker="$1" --command="$2"
}

case "$command" in
  create)
    version="${RUNTIME_VERSION:-}"
    if [ -z "$version" ]; then
      case "$accelerator" in
        v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
        v5p-*) version=v2-alpha-tpuv5 ;;
        v6e-*) version=v2-alpha-tpuv6e ;;
        *) version=tpu-ubuntu2204-base ;;
      esac
    fi
    extra=()
    [ "${SPOT:-0}" = 1 ] && extra+=(--spot)
    gcloud_tpu create "$TPU_NAME" --accelerator-type="$accelerator" --version="$version" \
      ${extra[@]+"${extra[@]}"}
    ;;

  mount)
    if [ -z "${BUCKET:-}" ]; then echo "error: set BUCKET for mount" >&2; exit 2; fi
    # gcsfuse from Google's apt repository. Orbax commits a checkpoint by renaming its
    # temporary directory; gcsfuse allows directory renames only up to --rename-dir-limit.
    on_workers all "set -e
      if ! command -v gcsfuse >/dev/null; then
        echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
        sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
      fi
      sudo mkdir -p $(printf '%q' "$mount_point") && sudo chown \$(id -u):\$(id -g) $(printf '%q' "$mount_point")
      mountpoint -q $(printf '%q' "$mount_point") || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $(printf '%q %q' "$BUCKET" "$mount_point")"
    ;;

  install)
    # Ship this checkout (not .git, venvs or workdirs) to every worker, then install
    # with launch/install.sh (Python >= 3.11 first: the v4 image has 3.10).
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    staging="$(mktemp -d)"
    trap 'rm -rf "$staging"' EXIT
    archive="$staging/mms_jax.tar.gz"
    tar -C "$repo" --exclude=.git --exclude=.venv --exclude=workdirs --exclude=__pycache__ \
      --exclude='*.egg-info' -czf "$archive" .
    gcloud_tpu scp "$archive" "$TPU_NAME:mms_jax.tar.gz" --worker=all
    rd="$(printf '%q' "$remote_dir")"
    on_workers all "set -e; mkdir -p ~/$rd && tar -xzf ~/mms_jax.tar.gz -C ~/$rd && cd ~/$rd
      if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        [ -x .venv/bin/python ] || { sudo apt-get update -qq &&
          sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv &&
          python3.11 -m venv .venv; }
      fi
      bash launch/install.sh tpu"
    ;;

  run)
    [ "${1:-}" = "--" ] && shift
    if [ $# -eq 0 ]; then
      echo "error: give the program arguments after 'run --'" >&2; usage >&2; exit 2
    fi
    args="$(printf '%q ' "$@")--config.distributed.auto=True"
    rd="$(printf '%q' "$remote_dir")"
    on_workers all "cd ~/$rd && nohup setsid .venv/bin/python -m mms_jax.main $args \
      > ~/$log 2>&1 < /dev/null & echo \$! > ~/$pidfile; echo \"\$(hostname): started pid \$!\""
    echo "Started on every worker; follow it with: bash $0 logs (or status)"
    ;;

  status)
    on_workers all "if kill -0 \$(cat ~/$pidfile 2>/dev/null) 2>/dev/null; then state=running;
      else state=stopped; fi; echo \"== \$(hostname): \$state\"; tail -n 3 ~/$log 2>/dev/null || true"
    ;;

  logs)
    on_workers 0 "tail -n $(printf '%d' "${1:-40}") ~/$log"
    ;;

  stop)
    # JAX's preemption service turns SIGTERM into one agreed step at which every
    # worker saves; the processes then exit 0 and `run` resumes.
    on_workers all "kill -TERM \$(cat ~/$pidfile) 2>/dev/null && echo \"\$(hostname): SIGTERM sent\" || echo \"\$(hostname): not running\""
    ;;

  collect)
    dest="${1:-tpu_logs/$TPU_NAME}"
    mkdir -p "$dest"
    workers="${NUM_WORKERS:-}"
    if [ -z "$workers" ]; then
      if [ "${DRY_RUN:-0}" = 1 ]; then workers=1; else
        workers="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
          ${PROJECT:+--project="$PROJECT"} --format='value(networkEndpoints.len())')"
      fi
    fi
    for ((i = 0; i < workers; i++)); do
      gcloud_tpu scp "$TPU_NAME:$log" "$dest/worker_$i.log" --worker="$i"
    done
    echo "Logs of $workers workers in $dest (checkpoints and metrics are in the workdir)"
    ;;

  delete)
    gcloud_tpu delete "$TPU_NAME" --quiet
    ;;
esac
