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

# CTranslate2 4.x opens libcublas.so.12. The gpu extra's nvidia-cublas-cu12 wheel (580 MB) is over
# what a call carries, so where no cuBLAS 12 is loadable, this machine's cuBLAS 13 stands in under
# the wheel's layout (nvidia/cublas/lib), which is where the flavor's preload looks. The reading
# says which one ran (its cublas comment lines).
if [ "${GPU_DEVICE:-cuda}" = cuda ] && ! python3 -c 'import ctypes; ctypes.CDLL("libcublas.so.12")' 2>/dev/null; then
  lt=$(find / -name 'libcublasLt.so.13*' -not -path '*/proc/*' 2>/dev/null | head -1 || true)
  blas=$(find / -name 'libcublas.so.13*' -not -path '*/proc/*' 2>/dev/null | head -1 || true)
  if [ -n "$lt" ] && [ -n "$blas" ]; then
    mkdir -p "$SITE/nvidia/cublas/lib"
    ln -sf "$lt" "$SITE/nvidia/cublas/lib/libcublasLt.so.12"
    ln -sf "$blas" "$SITE/nvidia/cublas/lib/libcublas.so.12"
    echo "cuBLAS 12 stand-in: $blas (cuBLAS 13) under $SITE/nvidia/cublas/lib"
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
export PYTHONPATH="$SITE:$(pwd)/plugin:$(pwd)/registry" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The kit's BentoML home: the bento (served over HTTP) and its model (which the in-process parts load).
export BENTOML_HOME="$(pwd)/$STAGE/kit/bentoml" BENTOML_DO_NOT_TRACK=True
MODEL=$(ls -d "$BENTOML_HOME"/models/*/*/mlflow_model | head -1)
python3 bench/gpu.py --model "$MODEL" --audio "$STAGE/kit/long_speech.wav" \
  --device "${GPU_DEVICE:-cuda}" ${GPU_COMPUTE_TYPES:+--compute-types "$GPU_COMPUTE_TYPES"} \
  --runs "${GPU_RUNS:-3}" --out "$OUT/gpu.md" --clips "$STAGE/kit/clips.json" --bentos "$STAGE/kit/bentos.json" \
  ${GPU_REQUESTS:+--requests "$GPU_REQUESTS"}
