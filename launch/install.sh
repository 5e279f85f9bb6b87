#!/usr/bin/env bash
# Installs everything mms_jax needs on a fresh machine that has only Python:
#   bash launch/install.sh          the package, into ./.venv
#   bash launch/install.sh test     ... plus the test tools, the PyTorch interop extra
#                                   (the converter is tested against transformers) and
#                                   the ONNX extra
#   bash launch/install.sh torch    ... plus only the PyTorch interop extra
# System fonts and a word list come from apt when it is usable; without apt the
# generator falls back to matplotlib's bundled fonts and the bundled word list.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
venv="${MMS_VENV:-.venv}"

# Latin fonts of many styles (print, handwriting, display); see docs/data.md.
FONT_PACKAGES="fonts-dejavu-core fonts-liberation2 fonts-freefont-ttf fonts-urw-base35
  fonts-ebgaramond fonts-linuxlibertine fonts-oldstandard fonts-goudybookletter
  fonts-courier-prime fonts-inconsolata fonts-roboto-unhinted fonts-lato fonts-open-sans
  fonts-dkg-handwriting fonts-breip fonts-femkeklaver fonts-kristi fonts-humor-sans
  fonts-dancingscript fonts-rufscript fonts-bwht fonts-comic-neue fonts-kaushanscript
  fonts-ecolier-court fonts-blankenburg fonts-dustin fonts-engadget wamerican"

all_system_packages_installed() {
  command -v dpkg-query >/dev/null 2>&1 || return 1
  local p
  for p in $FONT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' ok installed$' || return 1
  done
}

install_system_packages() {
  # Every package, not only some: the held-out font split follows the installed fonts.
  if all_system_packages_installed; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install] apt-get not found: using matplotlib's fonts and the bundled word list" >&2
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      echo "[install] not root and no sudo: using matplotlib's fonts and the bundled word list" >&2
      return 0
    fi
  fi
  echo "[install] installing fonts and a word list with apt-get"
  if ! ($sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        --no-install-recommends $FONT_PACKAGES) >/tmp/mms_jax_apt.log 2>&1; then
    echo "[install] apt-get failed (see /tmp/mms_jax_apt.log): falling back to bundled fonts/words" >&2
  fi
}

install_system_packages

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
case "$extras" in
  test) extras="test,torch,onnx" ;;
esac
if [[ ",$extras," == *",torch,"* ]] && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # The CPU build the suite is tested with; an unpinned torch would pull a CUDA build.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$spec"
echo "[install] ready: $venv ($("$venv/bin/python" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'))"
