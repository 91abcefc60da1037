#!/usr/bin/env bash
# A GPU check script to run on your own GPU machine: the GPU measurements in one run, JSON and
# logs to $OUT; $OUT/tables.md then holds the docs' tables with your GPU's numbers (memory per
# image size, docs/experiments/2026-12-05-memory.md; the timings of docs/guides/performance.md).
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # from the repository root
#
# Needs: nstjax installed with JAX for your GPU (pip install ".[cuda]"). Installs nothing from
# the network. On a machine without network access, wheels put in .whl/ (gitignored) are
# unpacked into /tmp/site when jaxopt, flax or pydantic is missing; make them elsewhere for the
# GPU machine's Python, e.g. for Python 3.12:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl jaxopt==0.8.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 POT==0.9.7.post1
# PyTorch is used for --compare-torch only when it is importable. Each step has its own time
# limit inside a total budget (BUDGET seconds, default 480) and the most important steps go first.
#   0. memory per image size (256x192, 512x384, 1024x768): XLA's memory analysis of the solver
#      chunk and the device's peak after running it; default, bfloat16, default with remat
#      (one process each: the peak is per process)
#   1. 512x384: highest/default/bfloat16, 500-iteration solves, PyTorch side by side
#   2. nstjax run, 500 iterations at 512x384, start to final.png: cold, then warm compile cache
#   3. sizes 256x192 .. 3840x2160, default and bfloat16 (cost against pixels)
#   4. 3840x2160 highest and default, PyTorch side by side
#   5. 3840x2160 with model.remat (memory against time)
#   6. only with WEIGHTS=file.npz (real VGG16 weights, e.g. carried hed_bsds500.npz): 500-iteration
#      runs in highest/default/bfloat16 on the demo images; final losses, PSNR against highest
# Then: python -m nstjax.cli bench --table $OUT/<step>.json --markdown  (one step's tables).
# A dry run of the script's logic on a CPU, in a few minutes:
#   OUT=/tmp/gc S512=32x32 SIZES=32x32,64x48 S4K=64x48 MEMSIZES=32x24 ITERS=2 REPEATS=2 \
#     bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
BUDGET=${BUDGET:-480}
S512=${S512:-512x384}
SIZES=${SIZES:-256x192,512x384,1024x768,1920x1080,3840x2160}
S4K=${S4K:-3840x2160}
MEMSIZES=${MEMSIZES:-256x192,512x384,1024x768}
ITERS=${ITERS:-500}
REPEATS=${REPEATS:-50}
mkdir -p "$OUT"
T0=$(date +%s)
ms() { date +%s%N | cut -c1-13; }
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export NSTJAX_HOME=/tmp/nstjax-home  # weights and compile caches: never the user's
# JAX takes 75% of GPU memory up front by default; leave PyTorch room in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}

log() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$OUT/gpu_check.log"; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }

# step NAME MAX_SECONDS CMD...: run with min(MAX, budget left - 10 s), log output to $OUT/NAME.log
step() {
  local name=$1 max=$2 lim
  shift 2
  lim=$(left)
  lim=$((lim - 10 < max ? lim - 10 : max))
  if [ "$lim" -lt 20 ]; then log "SKIP $name: budget spent"; return 1; fi
  log "START $name (limit ${lim}s)"
  local t rc
  t=$(ms)
  timeout -k 5 "$lim" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  log "END $name rc=$rc in $(($(ms) - t)) ms"
  tail -n 25 "$OUT/$name.log"
  return $rc
}

if ! $PY -c "import jaxopt, flax.linen, pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  log "installing .whl/*.whl into /tmp/site (no index, no deps)"
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvidia-smi -L
} >"$OUT/nvidia-smi.txt" 2>&1
$PY - >"$OUT/env.txt" 2>&1 <<'EOF'
import importlib, jax
print("devices", jax.devices(), "backend", jax.default_backend())
for m in ("jax", "jaxlib", "jaxopt", "flax", "optax", "numpy", "scipy", "PIL", "h5py", "yaml", "pydantic",
          "tqdm", "torch"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING", type(e).__name__, e)
EOF
cat "$OUT/env.txt"
if ! $PY -c "import nstjax.bench, jaxopt, flax.linen, pydantic" 2>>"$OUT/gpu_check.log"; then
  log "FATAL: nstjax.bench, jaxopt, flax or pydantic does not import; see env.txt (put wheels in .whl/)"
  exit 3
fi
TORCH=()
if $PY -c "import torch" 2>/dev/null; then TORCH=(--compare-torch); fi
log "torch: ${TORCH[*]:-not installed, no comparison}"
BENCH=($PY -m nstjax.cli bench --quiet)

# 0. memory per image size (docs/experiments/2026-12-05-memory.md's table); one process per variant
step memory_default 60 "${BENCH[@]}" --memory --sizes "$MEMSIZES" --precisions default \
  --out "$OUT/bench_memory_default.json"
step memory_bfloat16 60 "${BENCH[@]}" --memory --sizes "$MEMSIZES" --precisions bfloat16 \
  --out "$OUT/bench_memory_bfloat16.json"
step memory_remat 60 "${BENCH[@]}" --memory --remat --sizes "$MEMSIZES" --precisions default \
  --out "$OUT/bench_memory_remat.json"

# 1. the headline size, every precision, 500-iteration solves
step bench_512 200 "${BENCH[@]}" --sizes "$S512" --precisions highest,default,bfloat16 \
  --iters "$ITERS" --repeats "$REPEATS" --warmup 3 "${TORCH[@]}" --out "$OUT/bench_512.json"

# 2. end to end: `nstjax run`, 500 iterations, 512x384, cold then warm persistent compile cache
RUNCFG=$OUT/run_512.yaml
cat >"$RUNCFG" <<EOF
content: $PWD/configs/demo/content.png
style: $PWD/configs/demo/style.png
image: {size: [${S512%x*}, ${S512#*x}]}
model: {weights: random, precision: default}
solver: {maxiter: $ITERS}
EOF
rm -rf /tmp/nstjax-home/jax
for kind in cold warm; do
  t=$(ms)
  step "run_$kind" 90 $PY -m nstjax.cli run "$RUNCFG" --quiet --out "/tmp/nstjax-run-$kind-$$"
  echo "{\"kind\": \"$kind\", \"rc\": $?, \"wall_seconds\": $(($(ms) - t))e-3}" \
    >"$OUT/run_${kind}_wall.json"
  cp "/tmp/nstjax-run-$kind-$$/run.json" "$OUT/run_${kind}.json" 2>/dev/null
  ls -la "/tmp/nstjax-run-$kind-$$" >>"$OUT/run_$kind.log" 2>&1
done

# 3. cost against pixels, 256x192 to 4K
step bench_sizes 150 "${BENCH[@]}" --sizes "$SIZES" --precisions default,bfloat16 --iters 0 \
  --repeats $((REPEATS < 20 ? REPEATS : 20)) --out "$OUT/bench_sizes.json"

# 4. 4K side by side with PyTorch (the check of its loss reuses the `highest` program)
if [ ${#TORCH[@]} -gt 0 ]; then
  step bench_4k_torch 90 "${BENCH[@]}" --sizes "$S4K" --precisions highest,default --iters 0 \
    --repeats $((REPEATS < 10 ? REPEATS : 10)) "${TORCH[@]}" --out "$OUT/bench_4k_torch.json"
fi

# 5. 4K with rematerialization: memory against time
step bench_4k_remat 60 "${BENCH[@]}" --sizes "$S4K" --precisions default,bfloat16 --remat \
  --iters 0 --repeats $((REPEATS < 10 ? REPEATS : 10)) --out "$OUT/bench_4k_remat.json"

# 6. precision against quality, with real weights only
if [ -n "${WEIGHTS:-}" ] && [ -f "$WEIGHTS" ]; then
  for prec in highest default bfloat16; do
    step "quality_$prec" 60 $PY -m nstjax.cli run "$RUNCFG" --quiet \
      --out "$OUT/quality_$prec" "model.weights=$(realpath "$WEIGHTS")" "model.precision=$prec"
  done
  $PY - "$OUT" >"$OUT/quality.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
out = Path(sys.argv[1])
ref = None
for prec in ("highest", "default", "bfloat16"):
    d = out / f"quality_{prec}"
    if not (d / "final.png").exists():
        print(prec, "missing")
        continue
    rec = json.loads((d / "run.json").read_text())
    img = np.asarray(Image.open(d / "final.png").convert("RGB"), np.float64)
    ref = img if ref is None else ref
    mse = np.mean((img - ref) ** 2)
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    print(f"{prec}: final loss {rec['final_loss']['total']:.6g}, "
          f"{rec['ms_per_evaluation']} ms/eval, PSNR vs highest {psnr:.2f} dB")
EOF
  cat "$OUT/quality.txt"
fi

for f in "$OUT"/bench_*.json; do
  [ -f "$f" ] && { echo "== $f"; $PY -m nstjax.cli bench --table "$f" --markdown; }
done | tee "$OUT/tables.md"
log "done in $(($(date +%s) - T0))s; files in $OUT"
