"""Narrow the GPU architectures that mamba-ssm / causal-conv1d compile for, by patching their setup.py.

Both packages hard-code ``-gencode`` pairs for up to nine architectures in a ``cc_flag`` list that
ends up in nvcc's arguments. Because those arguments already contain ``arch=`` flags, torch's
``cpp_extension`` adds none of its own, so ``TORCH_CUDA_ARCH_LIST`` has no effect: the only way to
build for fewer architectures (9x less compile time for one) is to rewrite ``cc_flag`` before the
compile arguments are assembled. The patch goes right before ``if FORCE_CXX11_ABI:``, which both
setup.py files reach after ``cc_flag`` is complete and before it is used.

``-lineinfo`` (source line tables inside the device code, for profilers) is dropped too unless kept:
it grows the wheels, which must travel under a size limit.

Usage: python narrow_cuda_archs.py path/to/setup.py --arch 90 [--arch 100] [--keep-lineinfo] [--show]

``--show`` then runs the patched setup.py with ``setup()`` stubbed out and prints the nvcc arguments
it would compile with (a dry run: works with a CPU-only torch, nothing is compiled).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ANCHOR = "    if FORCE_CXX11_ABI:\n"
MARKER = "# fedem-flwr: narrowed GPU architectures"
_ARCH = re.compile(r"^[0-9]{2,3}[af]?$")

_SNIPPET = '''\
    {marker}
    _keep = {archs!r}
    _narrowed = []
    _i = 0
    while _i < len(cc_flag):
        if cc_flag[_i] == "-gencode":
            _i += 2  # drop every stock pair; the chosen ones are added below
            continue
        _narrowed.append(cc_flag[_i])
        _i += 1
    if not HIP_BUILD:
        for _arch in _keep:
            _narrowed += ["-gencode", f"arch=compute_{{_arch}},code=sm_{{_arch}}"]
    cc_flag = _narrowed
    print("fedem-flwr: cc_flag =", cc_flag, flush=True)
'''


def check_archs(archs: list[str]) -> list[str]:
    """Accept ``90``, ``sm_90`` or ``9.0`` style names; return bare numbers like ``90``, ``90a``."""
    out = []
    for raw in archs:
        arch = raw.strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not _ARCH.match(arch):
            raise ValueError(f"`--arch` {raw!r} is not a CUDA architecture like 90, sm_90 or 9.0.")
        if arch not in out:
            out.append(arch)
    if not out:
        raise ValueError("`--arch` needs at least one architecture, e.g. 90 for H100/H200.")
    return out


def narrow(text: str, archs: list[str], keep_lineinfo: bool = False) -> str:
    """``text`` (a setup.py) with ``cc_flag`` replaced by ``archs`` only; refuses unknown layouts."""
    archs = check_archs(archs)
    if MARKER in text:
        raise ValueError("setup.py is already patched; unpack the sdist again.")
    if text.count(ANCHOR) != 1 or "cc_flag" not in text:
        raise ValueError(
            f"setup.py does not have exactly one {ANCHOR.strip()!r} after a `cc_flag` list; this version "
            "of the package is laid out differently, adapt the patch before building."
        )
    snippet = _SNIPPET.format(marker=MARKER, archs=archs)
    text = text.replace(ANCHOR, snippet + ANCHOR)
    if not keep_lineinfo:
        text = text.replace('"-lineinfo",', "")
    return text


def show_nvcc_args(setup_py: Path, cuda_home: str) -> list[str]:
    """The nvcc arguments ``setup_py`` would compile with; runs it with ``setup()`` stubbed out."""
    import os

    import setuptools
    import torch
    import torch.utils.cpp_extension as cpp_extension

    captured: dict = {}
    if cpp_extension.CUDA_HOME is None:  # a CPU-only torch: pretend, nothing is compiled
        cpp_extension.CUDA_HOME = cuda_home
        torch.version.cuda = torch.version.cuda or "13.0"
    real_setup, setuptools.setup = setuptools.setup, lambda **kwargs: captured.update(kwargs)
    cwd = os.getcwd()
    try:
        os.chdir(setup_py.parent)
        exec(compile(setup_py.read_text(encoding="utf-8"), str(setup_py), "exec"), {"__file__": str(setup_py), "__name__": "__main__"})
    finally:
        os.chdir(cwd)
        setuptools.setup = real_setup
    return list(captured["ext_modules"][0].extra_compile_args["nvcc"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setup_py", type=Path)
    parser.add_argument("--arch", action="append", required=True, help="e.g. 90 (repeat for more)")
    parser.add_argument("--keep-lineinfo", action="store_true")
    parser.add_argument("--show", metavar="CUDA_HOME", help="print the nvcc arguments the patched file yields")
    args = parser.parse_args(argv)
    try:
        patched = narrow(args.setup_py.read_text(encoding="utf-8"), args.arch, args.keep_lineinfo)
    except (OSError, ValueError) as err:
        print(f"narrow_cuda_archs: {args.setup_py}: {err}", file=sys.stderr)
        return 2
    compile(patched, str(args.setup_py), "exec")  # a syntax error here is a bug in the patch
    args.setup_py.write_text(patched, encoding="utf-8")
    print(f"narrow_cuda_archs: {args.setup_py}: gencode for sm_{', sm_'.join(check_archs(args.arch))} only")
    if args.show:
        nvcc_args = show_nvcc_args(args.setup_py.resolve(), args.show)
        print("narrow_cuda_archs: nvcc", " ".join(nvcc_args))
        arch_args = [a for a in nvcc_args if a.startswith("arch=")]
        if arch_args != [f"arch=compute_{a},code=sm_{a}" for a in check_archs(args.arch)]:
            print(f"narrow_cuda_archs: unexpected architecture arguments {arch_args}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
