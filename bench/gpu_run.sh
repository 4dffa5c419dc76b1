#!/usr/bin/env bash
# On the GPU machine, once per part of .gpu-kit (bench/gpu_kit.py): stage the carried part in
# .gpu-stage (git-ignored, kept while the machine stays warm); when every part is there, install
# the wheels and run bench/gpu.py, writing $OUT/gpu.md (BENCHMARKS.md's GPU section) and its logs.
# The engine part serves the kit's bentos (their compute types, batch_size and device are the kit's:
# python -m bench.gpu_kit --help). GPU_DEVICE=cpu, with a kit built with --device cpu, tries the
# whole path on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.gpu-stage
OUT=${OUT:-$STAGE/out}
mkdir -p "$STAGE" "$OUT"
for part in .gpu-kit/part-*; do
  [ -d "$part" ] && cp "$part"/kit.tar.* "$part"/count "$STAGE"/
done
have=$(ls "$STAGE"/kit.tar.* 2>/dev/null | wc -l)
need=$(cat "$STAGE"/count)
if [ "$have" -lt "$need" ]; then
  echo "staged $have of $need parts; run again with the next part (within 30 s, while the machine is warm)"
  exit 0
fi
if [ ! -d "$STAGE/kit" ]; then
  cat "$STAGE"/kit.tar.* | tar -x -C "$STAGE"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
  --target "$STAGE/site" "$STAGE"/kit/wheels/*.whl
SITE=$(cd "$STAGE/site" && pwd)

# CTranslate2 4.x opens libcublas.so.12 by soname. The gpu extra's nvidia-cublas-cu12 wheel (580 MB)
# is over what a call carries, so where no cuBLAS 12 is loadable, this machine's cuBLAS 13 stands in:
# symlinks named as cuBLAS 12 (and its own Lt, which it needs) in one folder on LD_LIBRARY_PATH, as
# GPU.md's check did. The flavor's preload by path is not enough for a stand-in: a library is found
# again by the name it was opened with or its own soname, and a cuBLAS 13 file's soname is .so.13.
# The reading says which cuBLAS ran (its cublas comment lines).
if [ "${GPU_DEVICE:-cuda}" = cuda ] && ! python3 -c 'import ctypes; ctypes.CDLL("libcublas.so.12")' 2>/dev/null; then
  blas=$(find / -name 'libcublas.so.13*' -not -path '/proc/*' 2>/dev/null | head -1 || true)
  lt=$(ls "$(dirname "${blas:-/nonexistent}")"/libcublasLt.so.13* 2>/dev/null | head -1 || true)
  if [ -n "$lt" ] && [ -n "$blas" ]; then
    STAND_IN="$(pwd)/$STAGE/cublas12"
    mkdir -p "$STAND_IN"
    ln -sf "$blas" "$STAND_IN/libcublas.so.12"
    ln -sf "$lt" "$STAND_IN/libcublasLt.so.12"
    ln -sf "$lt" "$STAND_IN/libcublasLt.so.13"
    export LD_LIBRARY_PATH="$STAND_IN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "cuBLAS 12 stand-in: $blas (cuBLAS 13) in $STAND_IN, on LD_LIBRARY_PATH"
  else
    echo "no cuBLAS 12 and no cuBLAS 13 found: CUDA models will fail to load"
  fi
fi
# CTranslate2's CUDA wheels also open cuDNN 9 (libcudnn.so.9, the same soname for CUDA 12 and 13);
# where it is not on the loader path, the folder of the image's copy goes on LD_LIBRARY_PATH.
if [ "${GPU_DEVICE:-cuda}" = cuda ] && ! python3 -c 'import ctypes; ctypes.CDLL("libcudnn.so.9")' 2>/dev/null; then
  cudnn=$(find / -name 'libcudnn.so.9*' -not -path '/proc/*' 2>/dev/null | head -1 || true)
  if [ -n "$cudnn" ]; then
    export LD_LIBRARY_PATH="$(dirname "$cudnn")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "cuDNN 9: $(dirname "$cudnn") on LD_LIBRARY_PATH"
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
export PYTHONPATH="$SITE:$(pwd):$(pwd)/plugin:$(pwd)/registry" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The kit's BentoML home: the bento (served over HTTP) and its model (which the in-process parts load).
export BENTOML_HOME="$(pwd)/$STAGE/kit/bentoml" BENTOML_DO_NOT_TRACK=True
MODEL=$(ls -d "$BENTOML_HOME"/models/*/*/mlflow_model | head -1)
python3 bench/gpu.py --model "$MODEL" --audio "$STAGE/kit/long_speech.wav" \
  --device "${GPU_DEVICE:-cuda}" ${GPU_COMPUTE_TYPES:+--compute-types "$GPU_COMPUTE_TYPES"} \
  --runs "${GPU_RUNS:-3}" --out "$OUT/gpu.md" --clips "$STAGE/kit/clips.json" --bentos "$STAGE/kit/bentos.json" \
  ${GPU_REQUESTS:+--requests "$GPU_REQUESTS"}
