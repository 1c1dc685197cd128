#!/usr/bin/env bash
# Build mamba-ssm and causal-conv1d wheels for chosen GPU architectures, to install on an offline GPU
# machine. Both packages are source-only on PyPI and compile CUDA code against one torch build, so
# the wheels are built here, against the GPU machine's torch, off the GPU's clock.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd "$HERE/.." && pwd -P)"

ARCHS=()
JOBS="${MAX_JOBS:-2}"
OUT="$ROOT/wheels"
WORK="$ROOT/build/kernel-wheels"
PYTHON=""
TORCH_VERSION="2.11.0"
MAMBA_VERSION="2.3.2.post1"
CONV_VERSION="1.7.0"
EINOPS_VERSION="0.8.2"
SDIST_DIR=""
ONLY=""
DRY_RUN=0
KEEP_LINEINFO=0
STRIP=1

usage() {
  cat <<EOF
Usage: scripts/build_kernel_wheels.sh [options]

Build mamba-ssm and causal-conv1d wheels (plus the pure-Python einops wheel mamba-ssm imports) into
wheels/, for the GPU architectures given, against torch==$TORCH_VERSION on Python 3.12 (PyPI's cp312
wheel of that torch is the CUDA 13.0 build). Needs the CUDA toolkit (nvcc) of the same major version
as that torch; no GPU. With one architecture and MAX_JOBS=2 expect about 10 minutes per package on
two cores: run it in the background, e.g.

  nohup scripts/build_kernel_wheels.sh --arch 90 > build/kernel-wheels.log 2>&1 &

Options:
  --arch A            GPU architecture to compile for, repeatable (90 = H100/H200, 80 = A100,
                      100 = B200, 120 = RTX 50xx). Default: 90.
  --jobs N            parallel compile jobs (MAX_JOBS). Default: \$MAX_JOBS or 2.
  --out DIR           where the wheels go. Default: wheels/ (git-ignored).
  --work DIR          build venv, sdists and logs. Default: build/kernel-wheels/.
  --python EXE        a Python 3.12 interpreter. Default: python3.12, else pyenv's 3.12.
  --torch V           torch version to build against. Default: $TORCH_VERSION.
  --mamba-version V   mamba-ssm version. Default: $MAMBA_VERSION.
  --conv-version V    causal-conv1d version. Default: $CONV_VERSION.
  --sdist-dir DIR     take the two sdists from DIR instead of downloading them.
  --only PKG          build only mamba-ssm or only causal-conv1d.
  --keep-lineinfo     keep nvcc's -lineinfo (profiler line tables; bigger wheels).
  --no-strip          keep debug sections in the .so files (strip --strip-debug cuts 20-27%).
  --dry-run           check the toolkit, Python and the setup.py patch; build nothing.
  -h, --help          this help.

Environment: CUDA_HOME, if set, must be the toolkit folder holding include/cuda_runtime_api.h;
otherwise it is found from nvcc (the nvcc on PATH may be a wrapper script).
EOF
}

die() { echo "build_kernel_wheels: error: $*" >&2; exit 2; }
say() { echo "build_kernel_wheels: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --arch) [ $# -ge 2 ] || die "--arch needs a value"; ARCHS+=("$2"); shift 2 ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a value"; JOBS="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a value"; OUT="$2"; shift 2 ;;
    --work) [ $# -ge 2 ] || die "--work needs a value"; WORK="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs a value"; PYTHON="$2"; shift 2 ;;
    --torch) [ $# -ge 2 ] || die "--torch needs a value"; TORCH_VERSION="$2"; shift 2 ;;
    --mamba-version) [ $# -ge 2 ] || die "--mamba-version needs a value"; MAMBA_VERSION="$2"; shift 2 ;;
    --conv-version) [ $# -ge 2 ] || die "--conv-version needs a value"; CONV_VERSION="$2"; shift 2 ;;
    --sdist-dir) [ $# -ge 2 ] || die "--sdist-dir needs a value"; SDIST_DIR="$2"; shift 2 ;;
    --only) [ $# -ge 2 ] || die "--only needs a value"; ONLY="$2"; shift 2 ;;
    --keep-lineinfo) KEEP_LINEINFO=1; shift ;;
    --no-strip) STRIP=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done

[ ${#ARCHS[@]} -gt 0 ] || ARCHS=(90)
case "$ONLY" in ""|mamba-ssm|causal-conv1d) ;; *) die "--only is '$ONLY'; allowed: mamba-ssm, causal-conv1d" ;; esac
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs is '$JOBS'; it must be a positive integer"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd -P)"
WORK="$(mkdir -p "$WORK" && cd "$WORK" && pwd -P)"

# --- the CUDA toolkit: CUDA_HOME must be the folder with include/cuda_runtime_api.h ---------------
find_toolkit() {
  local nvcc top
  if [ -n "${CUDA_HOME:-}" ]; then
    [ -f "$CUDA_HOME/include/cuda_runtime_api.h" ] \
      || die "CUDA_HOME=$CUDA_HOME has no include/cuda_runtime_api.h; point it at the CUDA toolkit folder or unset it"
    [ -x "$CUDA_HOME/bin/nvcc" ] || die "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
    (cd "$CUDA_HOME" && pwd -P)
    return
  fi
  nvcc="$(command -v nvcc || true)"
  [ -n "$nvcc" ] || die "nvcc not found: install the CUDA toolkit (13.x for torch $TORCH_VERSION) or set CUDA_HOME"
  # nvcc's dry run names its real install (TOP), which a wrapper script on PATH hides.
  top="$("$nvcc" -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1 || true)"
  for candidate in "$top" "$(dirname "$(dirname "$(readlink -f "$nvcc")")")" /usr/local/cuda; do
    if [ -n "$candidate" ] && [ -f "$candidate/include/cuda_runtime_api.h" ] && [ -x "$candidate/bin/nvcc" ]; then
      (cd "$candidate" && pwd -P)
      return
    fi
  done
  die "nvcc at $nvcc belongs to no toolkit folder with include/cuda_runtime_api.h; set CUDA_HOME to the toolkit folder"
}

find_python() {
  local candidate
  if [ -n "$PYTHON" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
      || die "--python $PYTHON is not a working Python 3.12 (the GPU machine runs cp312)"
    command -v "$PYTHON"
    return
  fi
  for candidate in python3.12 $(command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null); do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  die "no working Python 3.12 found (the GPU machine runs cp312); pass --python"
}

CUDA_HOME="$(find_toolkit)"
NVCC_VERSION="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')"
[ -n "$NVCC_VERSION" ] || die "cannot read the version of $CUDA_HOME/bin/nvcc"
CUDA_MAJOR="${NVCC_VERSION%%.*}"
SUPPORTED="$("$CUDA_HOME/bin/nvcc" --list-gpu-code 2>/dev/null | tr '\n' ' ' || true)"
ARCH_LIST=""
for arch in "${ARCHS[@]}"; do
  bare="${arch#sm_}"; bare="${bare//./}"
  [[ "$bare" =~ ^[0-9]{2,3}[af]?$ ]] || die "--arch '$arch' is not a CUDA architecture like 90, sm_90 or 9.0"
  if [[ "$bare" =~ ^[0-9]+$ ]] && [ -n "$SUPPORTED" ] && [[ " $SUPPORTED " != *" sm_$bare "* ]]; then
    die "nvcc $NVCC_VERSION cannot compile for sm_$bare (it supports: $SUPPORTED)"
  fi
  ARCH_LIST="$ARCH_LIST $bare"
done
ARCH_LIST="${ARCH_LIST# }"
TORCH_ARCHS=""  # torch's spelling (9.0;10.0): setup.py's own -gencode flags override it, set for tidiness
for arch in $ARCH_LIST; do num="${arch%[af]}"; TORCH_ARCHS="$TORCH_ARCHS;${num:0:-1}.${num: -1}${arch#"$num"}"; done
TORCH_ARCHS="${TORCH_ARCHS#;}"
LOCAL_TAG="cu${CUDA_MAJOR}0.sm${ARCH_LIST// /.sm}"  # e.g. 1.7.0+cu130.sm90: the wheel names its target
command -v strip >/dev/null || [ "$STRIP" = 0 ] || die "strip (binutils) not found; install it or pass --no-strip"
PY="$(find_python)"
VENV="$WORK/venv-py312-torch$TORCH_VERSION"
PATCH_ARGS=()
for arch in $ARCH_LIST; do PATCH_ARGS+=(--arch "$arch"); done
[ "$KEEP_LINEINFO" = 1 ] && PATCH_ARGS+=(--keep-lineinfo)

say "CUDA toolkit: $CUDA_HOME (nvcc $NVCC_VERSION)"
say "Python: $PY; build venv: $VENV (torch==$TORCH_VERSION)"
say "architectures: $ARCH_LIST; MAX_JOBS=$JOBS; wheels -> $OUT (local version tag +$LOCAL_TAG)"
say "packages: ${ONLY:-causal-conv1d==$CONV_VERSION and mamba-ssm==$MAMBA_VERSION}"

# --- sources: unpack fresh copies and narrow their architecture lists -----------------------------
fetch_sdists() {  # $1: pip of an environment with torch (setup.py imports torch to prepare metadata)
  mkdir -p "$WORK/sdist"
  MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "$1" download --no-deps --no-binary :all: \
    --no-build-isolation -d "$WORK/sdist" "mamba-ssm==$MAMBA_VERSION" "causal-conv1d==$CONV_VERSION"
  SDIST_DIR="$WORK/sdist"
}

prepare_source() {  # $1: dist name (mamba_ssm|causal_conv1d), $2: version, $3: python for --show
  local tarball="$SDIST_DIR/$1-$2.tar.gz" src="$WORK/src"
  [ -f "$tarball" ] || die "sdist $tarball not found"
  mkdir -p "$src"
  rm -rf "${src:?}/$1-$2"
  tar xzf "$tarball" -C "$src"
  "$3" "$HERE/narrow_cuda_archs.py" "$src/$1-$2/setup.py" "${PATCH_ARGS[@]}" --show "$CUDA_HOME" >&2 \
    || die "patching $1's setup.py failed (see above)"
  echo "$src/$1-$2"
}

want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

if [ "$DRY_RUN" = 1 ]; then
  [ -n "$SDIST_DIR" ] || [ ! -d "$WORK/sdist" ] || SDIST_DIR="$WORK/sdist"
  CHECK_PY=""
  for candidate in "$VENV/bin/python" "$ROOT/.venv/bin/python" "$PY" python3; do
    if [ -x "$(command -v "$candidate" || true)" ] && "$candidate" -c 'import torch, setuptools' 2>/dev/null; then
      CHECK_PY="$candidate"; break
    fi
  done
  if [ -z "$SDIST_DIR" ] || [ -z "$CHECK_PY" ]; then
    say "dry run: toolkit, architectures and Python checked; the setup.py patch is not (needs --sdist-dir and a Python with torch)"
    exit 0
  fi
  WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
  want causal-conv1d && prepare_source causal_conv1d "$CONV_VERSION" "$CHECK_PY" >/dev/null
  want mamba-ssm && prepare_source mamba_ssm "$MAMBA_VERSION" "$CHECK_PY" >/dev/null
  say "dry run: all checks passed; nothing was built"
  exit 0
fi

# --- the build venv: the GPU machine's torch, and the build tools setup.py imports --------------
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "creating $VENV (torch==$TORCH_VERSION with its CUDA libraries: several GB, a minute or two)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" setuptools wheel packaging ninja
fi
"$VENV/bin/python" -c "from wheel.bdist_wheel import bdist_wheel" 2>/dev/null \
  || "$VENV/bin/pip" install --quiet "wheel<0.46"  # both setup.py files import wheel.bdist_wheel
TORCH_CUDA="$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")')"
[ -n "$TORCH_CUDA" ] || die "torch==$TORCH_VERSION in $VENV is a CPU build; the kernels need its CUDA build"
[ "${TORCH_CUDA%%.*}" = "$CUDA_MAJOR" ] \
  || die "torch==$TORCH_VERSION is built for CUDA $TORCH_CUDA but nvcc is $NVCC_VERSION; use a CUDA $TORCH_CUDA toolkit"

[ -n "$SDIST_DIR" ] || fetch_sdists "$VENV/bin/pip"
mkdir -p "$WORK/logs" "$WORK/dist"

build_one() {  # $1: pip name, $2: dist name, $3: version, $4: env prefix of the package's switches
  local src log start
  src="$(prepare_source "$2" "$3" "$VENV/bin/python")"
  log="$WORK/logs/$1.log"
  rm -f "$WORK/dist/$2-"*.whl
  say "building $1==$3 for sm_${ARCH_LIST// /, sm_} (log: $log)"
  start=$(date +%s)
  env CUDA_HOME="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH" MAX_JOBS="$JOBS" \
      TORCH_CUDA_ARCH_LIST="$TORCH_ARCHS" \
      "${4}_FORCE_BUILD=TRUE" "${4}_LOCAL_VERSION=$LOCAL_TAG" \
      "$VENV/bin/pip" wheel -v --no-deps --no-build-isolation -w "$WORK/dist" "$src" > "$log" 2>&1 \
    || { tail -n 40 "$log" >&2; die "building $1 failed after $(( $(date +%s) - start )) s (full log: $log)"; }
  say "built $1 in $(( $(date +%s) - start )) s"
}

finish_one() {  # $1: dist name: strip debug sections, re-pack (new RECORD hashes), move to OUT
  local wheel tmp
  wheel="$(ls "$WORK/dist/$1-"*.whl)"
  rm -f "$OUT/$1-"*.whl
  if [ "$STRIP" = 1 ]; then
    tmp="$(mktemp -d)"
    "$VENV/bin/python" -m wheel unpack "$wheel" -d "$tmp" >/dev/null
    find "$tmp" -name '*.so' -exec strip --strip-debug {} +
    "$VENV/bin/python" -m wheel pack "$tmp"/* -d "$OUT" >/dev/null
    rm -rf "$tmp"
  else
    cp "$wheel" "$OUT/"
  fi
}

want causal-conv1d && build_one causal-conv1d causal_conv1d "$CONV_VERSION" CAUSAL_CONV1D && finish_one causal_conv1d
want mamba-ssm && build_one mamba-ssm mamba_ssm "$MAMBA_VERSION" MAMBA && finish_one mamba_ssm
"$VENV/bin/pip" download --quiet --no-deps --only-binary :all: -d "$OUT" "einops==$EINOPS_VERSION"

say "wheels in $OUT:"
ls -l "$OUT"
TOTAL_KB="$(du -ck "$OUT"/*.whl | tail -n1 | cut -f1)"
say "total $(( TOTAL_KB / 1024 )) MiB"
[ "$TOTAL_KB" -le $(( 60 * 1024 )) ] \
  || say "warning: over 60 MiB; a GPU call carries at most 64 MiB in all: build for fewer architectures"
