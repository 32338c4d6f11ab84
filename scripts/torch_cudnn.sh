# Sourced by the launchers (after PYTHON is set): run torch and Transformer Engine on the cuDNN that
# torch ships with. A system cuDNN (apt's libcudnn9, or one under CUDA_HOME) is otherwise found
# first by both the dynamic loader and TE's library search, so the process runs a cuDNN older than
# the one torch was built against. A CUDNN_HOME already set is kept as the user's choice.
if [ -z "${CUDNN_HOME:-}" ] && torch_cudnn=$("${PYTHON:-python3}" -c \
    'import nvidia.cudnn; print(list(nvidia.cudnn.__path__)[0])' 2>/dev/null); then
  export CUDNN_HOME=$torch_cudnn
  export LD_LIBRARY_PATH=$torch_cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
unset torch_cudnn
