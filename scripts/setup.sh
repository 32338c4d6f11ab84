#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 and install the CPU stack (requirements.txt); add the GPU
# extras (requirements-gpu.txt) where CUDA is present or WITH_GPU=1. Idempotent: a second run only
# re-checks, and reinstalls when a requirements file changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MIN_MINOR=12
VENV=.venv

python_is_new_enough() {
  "$1" -c "import sys; sys.exit(0 if sys.version_info >= (3, $MIN_MINOR) else 1)" >/dev/null 2>&1
}

find_python() {
  local candidate
  # PATH first; pyenv shims answer `command -v` even when that version is not selected, so each
  # candidate is run, not just located.
  for candidate in python3.13 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && python_is_new_enough "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  local root=${PYENV_ROOT:-$HOME/.pyenv}
  for candidate in $(ls -d "$root"/versions/3.* 2>/dev/null | sort -rV); do
    if [ -x "$candidate/bin/python" ] && python_is_new_enough "$candidate/bin/python"; then
      echo "$candidate/bin/python"
      return 0
    fi
  done
  return 1
}

if [ -x "$VENV/bin/python" ] && python_is_new_enough "$VENV/bin/python"; then
  PY="$VENV/bin/python"
else
  if ! BASE_PY=$(find_python); then
    cat >&2 <<MSG
error: no Python >= 3.$MIN_MINOR found (looked at python3.13, python3.12, python3 on PATH and
       ${PYENV_ROOT:-$HOME/.pyenv}/versions/*). megatron-core 0.19 needs Python >= 3.12.
fix:   install one, e.g. 'pyenv install 3.12' or 'apt-get install python3.12 python3.12-venv',
       then run 'bash scripts/setup.sh' again.
MSG
    exit 1
  fi
  echo "setup: creating $VENV with $BASE_PY ($("$BASE_PY" --version))"
  rm -rf "$VENV"
  "$BASE_PY" -m venv "$VENV"
  PY="$VENV/bin/python"
fi

want_gpu=${WITH_GPU:-auto}
if [ "$want_gpu" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then want_gpu=1; else want_gpu=0; fi
fi

files=(requirements.txt)
[ "$want_gpu" = 1 ] && files+=(requirements-gpu.txt)
stamp="$VENV/.requirements.sha256"
digest=$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  echo "setup: $VENV is up to date ($("$PY" --version), GPU extras: $want_gpu)"
  exit 0
fi

echo "setup: installing ${files[*]} into $VENV (GPU extras: $want_gpu)"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet -r requirements.txt
if [ "$want_gpu" = 1 ]; then
  # TE builds its PyTorch extension against the installed torch: no build isolation.
  "$PY" -m pip install --quiet --no-build-isolation -r requirements-gpu.txt
fi
"$PY" -c "import megatron.core, transformers, torch; print('setup: ok | torch', torch.__version__, \
'| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
echo "$digest" > "$stamp"
