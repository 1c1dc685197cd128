#!/usr/bin/env bash
# The GPU checks in one run of a few minutes, on a machine with a CUDA GPU, its own torch, and no
# network: install the carried wheels (kernels and small pure-Python dependencies) without touching
# what is installed, run the `gpu` tests, then the throughput benchmark; logs and results go to $OUT.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd "$HERE/.." && pwd -P)"
WHEELS="$ROOT/wheels"
BUDGET="${FEDEM_GPU_BUDGET:-480}"   # seconds for everything; the tests get half, the benchmark the rest
MODE=run

usage() {
  cat <<EOF
Usage: scripts/gpu_check.sh [--prepare | --dry-run] [--budget SECONDS]

  (default)     on the GPU machine: install wheels/*.whl that are missing (kernels always, built for
                this GPU), run 'pytest -m gpu', then benchmarks/gpu_train.py; everything lands in
                \$OUT (default: build/gpu-check/): gpu_check.log, pytest.xml, gpu_measurements.jsonl,
                gpu_train.json, pip-freeze.txt, nvidia-smi.txt. Budget: \$FEDEM_GPU_BUDGET or $BUDGET s.
  --prepare     on this (networked) machine: put the small wheels the GPU machine may lack into
                wheels/ (einops, hydra-core, omegaconf, antlr4-python3-runtime, pytest and its dependencies), beside the kernel
                wheels from scripts/build_kernel_wheels.sh, and report the total size (a GPU call
                carries at most 64 MiB).
  --dry-run     on a CPU: check the plumbing (wheel tags, imports, test collection, a tiny benchmark)
                with \$PYTHON (default .venv/bin/python); installs nothing.
  Python: \$PYTHON, else the first of python3 / python whose torch imports.
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare; shift ;;
    --dry-run) MODE=dry-run; shift ;;
    --budget) BUDGET="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; echo "gpu_check: unknown option '$1'" >&2; exit 2 ;;
  esac
done

pick_python() {
  local candidate
  for candidate in ${PYTHON:-} python3 python; do
    if "$candidate" -c "import torch" 2>/dev/null; then echo "$candidate"; return; fi
  done
  echo "gpu_check: no Python with torch found (set PYTHON)" >&2
  exit 2
}

# ------------------------------------------------------------------------------------- --prepare
if [ "$MODE" = prepare ]; then
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  mkdir -p "$WHEELS"
  "$PY" -m pip download --quiet --no-deps --only-binary :all: --python-version 3.12 -d "$WHEELS" \
    einops==0.8.2 hydra-core==1.3.8 omegaconf==2.3.1 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 || exit 1
  ls "$WHEELS"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1 \
    || "$PY" -m pip wheel --quiet --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3 || exit 1  # sdist only
  ls -l "$WHEELS"
  total_kb="$(du -ck "$WHEELS"/*.whl | tail -n1 | cut -f1)"
  echo "gpu_check: wheels/ holds $(( total_kb / 1024 )) MiB"
  ls "$WHEELS"/mamba_ssm-*.whl "$WHEELS"/causal_conv1d-*.whl >/dev/null 2>&1 \
    || echo "gpu_check: no kernel wheels yet: run scripts/build_kernel_wheels.sh first"
  exit 0
fi

# ------------------------------------------------------------------------------------- run / dry-run
if [ "$MODE" = dry-run ]; then
  PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
fi
PY="$(pick_python)"
OUT="${OUT:-$ROOT/build/gpu-check}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "gpu_check [$(elapsed) s]: $*"; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1
export FEDEM_GPU_RECORD="$OUT/gpu_measurements.jsonl"
cd "$ROOT"

say "mode $MODE, budget $BUDGET s, python $PY ($("$PY" --version 2>&1))"
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -m pip freeze > "$OUT/pip-freeze.txt" 2>/dev/null

# The GPU, and the architecture the kernel wheels were built for (their local version, e.g. +cu130.sm90).
CAPABILITY="$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "none")')"
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU",
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
KERNEL_WHEELS_OK=1
for wheel in "$WHEELS"/mamba_ssm-*.whl "$WHEELS"/causal_conv1d-*.whl; do
  if [ ! -f "$wheel" ]; then
    say "missing $(basename "$wheel"): build it with scripts/build_kernel_wheels.sh and carry wheels/"
    KERNEL_WHEELS_OK=0
    continue
  fi
  archs="$(basename "$wheel" | sed -n 's/.*+cu[0-9]*\.\(sm[0-9a-z.]*\)-.*/\1/p')"
  if [ "$CAPABILITY" != none ] && [ -n "$archs" ] && [[ ".$archs." != *".sm$CAPABILITY."* ]]; then
    say "$(basename "$wheel") is built for ${archs//./, } but this GPU is sm_$CAPABILITY: rebuild with --arch $CAPABILITY"
    KERNEL_WHEELS_OK=0
  fi
done

# Install what is missing; never replace a package the machine already has (its torch stack stays).
install_missing() {
  local wheel dist version have
  for wheel in "$WHEELS"/*.whl; do
    [ -f "$wheel" ] || continue
    dist="$(basename "$wheel" | cut -d- -f1)"
    version="$(basename "$wheel" | cut -d- -f2)"
    have="$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print('')" "$dist")"
    case "$dist" in mamba_ssm|causal_conv1d) [ "$KERNEL_WHEELS_OK" = 1 ] || continue ;; esac
    if [ -n "$have" ] && { [ "$have" = "$version" ] || [[ "$dist" != mamba_ssm && "$dist" != causal_conv1d ]]; }; then
      say "keep installed $dist $have"
      continue
    fi
    if [ "$MODE" = dry-run ]; then
      say "would install $(basename "$wheel")"
    else
      say "install $(basename "$wheel")"
      "$PY" -m pip install --quiet --no-deps --no-index --force-reinstall "$wheel" || say "FAILED to install $wheel"
    fi
  done
}
install_missing

# Can the kernels run here? A real launch catches wheels built for another architecture.
KERNELS="$("$PY" - <<'EOF' 2>"$OUT/kernel-probe.stderr"
import torch
try:
    from causal_conv1d import causal_conv1d_fn
    import mamba_ssm  # noqa: F401 (needs the compiled selective_scan_cuda)
except Exception as err:  # noqa: BLE001
    print(f"no: import failed: {type(err).__name__}: {err}")
    raise SystemExit
if not torch.cuda.is_available():
    print("no: CUDA is not available")
    raise SystemExit
try:
    x = torch.randn(1, 64, 32, device="cuda")
    causal_conv1d_fn(x, torch.randn(64, 4, device="cuda"), None, activation="silu")
    torch.cuda.synchronize()
except Exception as err:  # noqa: BLE001
    print(f"no: a kernel launch failed ({err}); built for another GPU architecture?")
    raise SystemExit
from fedem_flwr.model.factory import kernels_available
print("yes" if kernels_available("mamba2") and kernels_available("mamba") else "no: transformers did not bind them")
EOF
)"
say "kernels: ${KERNELS:-no: probe crashed (see kernel-probe.stderr)}"
if [ "${KERNELS:-}" = yes ]; then export FEDEM_REQUIRE_KERNELS=1; fi
"$PY" - <<'EOF'
import importlib
missing = []
for name in ("hydra", "omegaconf", "einops", "pytest", "safetensors", "tokenizers", "tqdm", "datasets", "flwr_datasets"):
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001
        missing.append(f"{name} ({type(err).__name__})")
print("gpu_check: modules missing:", ", ".join(missing) or "none")
for module in ("fedem_flwr.config.loader", "fedem_flwr.model.factory", "fedem_flwr.model.lora", "fedem_flwr.training.finetune"):
    try:
        importlib.import_module(module)
        print(f"gpu_check: import {module}: ok")
    except Exception as err:  # noqa: BLE001
        print(f"gpu_check: import {module} FAILED: {type(err).__name__}: {err}")
EOF

# The tests, then the benchmark, each under its share of the budget.
TEST_S=$(( BUDGET * 50 / 100 ))
say "pytest -m gpu (at most $TEST_S s)"
timeout -k 10 "$TEST_S" "$PY" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q -rA --durations=0 \
  --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.txt" | tail -n 60
say "pytest exit status ${PIPESTATUS[0]} (124: over its budget)"

LEFT=$(( BUDGET - $(elapsed) - 15 ))
if [ "$MODE" = dry-run ]; then
  BENCH=(--device cpu --seq-lens 64 --quick --models llama)
else
  BENCH=(--steps 3 --measure-seconds 2)
fi
if [ "$LEFT" -gt 30 ]; then
  say "benchmarks/gpu_train.py (at most $LEFT s)"
  timeout -k 10 $(( LEFT + 10 )) "$PY" benchmarks/gpu_train.py "${BENCH[@]}" --budget "$LEFT" \
    --save "$OUT/gpu_train.json" --log-dir "$OUT/bench-logs"
  say "benchmark exit status $?"
else
  say "no time left for the benchmark"
fi
say "done; results in $OUT"
