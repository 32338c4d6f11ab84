#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 and install the CPU stack (requirements.txt), plus the GPU
# extras (requirements-gpu.txt) where CUDA is present or WITH_GPU=1, at the versions pinned in
# constraints.txt. Idempotent: a rerun only re-checks, and reinstalls when one of those changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MIN_MINOR=12
VENV=.venv
# The CUDA build of torch on GPU machines; the toolkit that compiles Transformer Engine's
# extension (and that tilelang calls at run time) must have the same major version.
TORCH_CUDA=13.0
TORCH_CUDA_TAG=cu${TORCH_CUDA/./}
TORCH_INDEX=https://download.pytorch.org/whl/$TORCH_CUDA_TAG

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

pinned() {
  sed -n "s/^$1==\([^[:space:]#]*\).*/\1/p" constraints.txt
}

cuda_toolkit_missing() {
  cat >&2 <<MSG
error: GPU extras: $1
       Transformer Engine's PyTorch extension is compiled here against the CUDA toolkit's headers,
       and fla's tilelang backend runs nvcc while training.
fix:   install the CUDA toolkit $TORCH_CUDA (nvcc and headers; torch $(pinned torch)+$TORCH_CUDA_TAG is
       built on CUDA $TORCH_CUDA), set CUDA_HOME to it (e.g. export CUDA_HOME=/usr/local/cuda-$TORCH_CUDA),
       then run 'WITH_GPU=1 bash scripts/setup.sh' again (WITH_GPU=0 installs the CPU stack only).
MSG
  exit 1
}

# Checked before anything is downloaded, since without the toolkit the build fails only after
# gigabytes of wheels. TE and tilelang both take CUDA_HOME first, then nvcc on PATH, then
# /usr/local/cuda; the root found is exported as CUDA_HOME so TE's build uses its headers.
check_cuda_toolkit() {
  local nvcc root release
  if [ -n "${CUDA_HOME:-}" ]; then
    root=$CUDA_HOME
    [ -x "$root/bin/nvcc" ] || cuda_toolkit_missing "CUDA_HOME=$CUDA_HOME has no bin/nvcc."
    nvcc=$root/bin/nvcc
  elif nvcc=$(command -v nvcc); then
    root=$(dirname "$(dirname "$nvcc")")
    # A wrapper such as /usr/local/bin/nvcc lies outside the toolkit it runs.
    [ -f "$root/include/cuda_runtime.h" ] || root=/usr/local/cuda
  elif [ -x /usr/local/cuda/bin/nvcc ]; then
    root=/usr/local/cuda
    nvcc=$root/bin/nvcc
  else
    cuda_toolkit_missing "nvcc not found (CUDA_HOME is unset, no nvcc on PATH or in /usr/local/cuda/bin)."
  fi
  [ -f "$root/include/cuda_runtime.h" ] \
    || cuda_toolkit_missing "$nvcc found, but no CUDA headers (no $root/include/cuda_runtime.h)."
  release=$("$nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
  # torch's extension builder refuses a toolkit of another CUDA major version.
  if [ "${release%%.*}" != "${TORCH_CUDA%%.*}" ]; then
    cuda_toolkit_missing "$nvcc is CUDA ${release:-of unknown version}, torch is built on CUDA $TORCH_CUDA."
  fi
  export CUDA_HOME=$root
  echo "setup: CUDA toolkit $release, CUDA_HOME=$CUDA_HOME"
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

files=(constraints.txt requirements.txt)
[ "$want_gpu" = 1 ] && files+=(requirements-gpu.txt)
stamp="$VENV/.requirements.sha256"
digest=$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  echo "setup: $VENV is up to date ($("$PY" --version), GPU extras: $want_gpu)"
  exit 0
fi

[ "$want_gpu" = 1 ] && check_cuda_toolkit
echo "setup: installing ${files[*]} into $VENV (GPU extras: $want_gpu)"
"$PY" -m pip install --quiet --upgrade pip
if [ "$want_gpu" = 1 ]; then
  # The measured build, named with its local version (+cu130): any torch 2.11.0 already in the
  # venv (a +cpu build, say) satisfies the plain pin and would otherwise stay. PyPI stays an index
  # for the dependencies, which the pins name at versions PyTorch's index may not carry.
  "$PY" -m pip install --extra-index-url "$TORCH_INDEX" -c constraints.txt \
    "torch==$(pinned torch)+$TORCH_CUDA_TAG" "torchvision==$(pinned torchvision)+$TORCH_CUDA_TAG"
fi
"$PY" -m pip install --quiet -r requirements.txt -c constraints.txt
if [ "$want_gpu" = 1 ]; then
  # TE builds its PyTorch extension against the installed torch (no build isolation), so its
  # build tools come first; ninja lets torch's extension builder run MAX_JOBS compilers at once.
  "$PY" -m pip install --quiet -c constraints.txt ninja wheel
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  echo "setup: compiling Transformer Engine's PyTorch extension against torch" \
    "$("$PY" -c 'import torch; print(torch.__version__)') with MAX_JOBS=$MAX_JOBS; this typically" \
    "takes many minutes (how long exactly has not been measured). The compiler's output follows."
  "$PY" -m pip install --verbose --no-build-isolation -r requirements-gpu.txt -c constraints.txt
fi
"$PY" -c "import megatron.core, transformers, torch; print('setup: ok | torch', torch.__version__, \
'| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
echo "$digest" > "$stamp"
if [ "$want_gpu" = 1 ]; then
  echo "setup: tilelang compiles kernels with nvcc while training: keep CUDA_HOME=$CUDA_HOME set there"
  echo "setup: GPU self-test (versions, Gated DeltaNet and TE attention numerics, one training step):"
  echo "  PYTHON=$VENV/bin/python source scripts/torch_cudnn.sh && $VENV/bin/python -m scripts.gpu_check"
fi
