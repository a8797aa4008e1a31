"""Compile every kernel ahead of time for sm_80 and sm_90 (no GPU needed).

    python -m kernels.compile_all [--arch 80 90] [--out DIR]

Runs the real Triton compiler (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the ptxas in the
triton wheel), which checks what the interpreter cannot: types the hardware path rejects (an
atomic_cas whose cmp dtype differs from the pointee), layouts, register allocation. Prints per
kernel and arch the PTX and cubin sizes (bytes), registers per thread, stack/local bytes (spills)
and static shared memory (from ``cuobjdump --dump-resource-usage`` of the cubin, bundled in the
triton wheel) and the dynamic shared memory Triton launches with, and exits non-zero on any
failure. ``--out`` also writes the ttgir, ptx and cubin files.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

DEFAULT_ARCHS = (80, 90)


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    return shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack, shared memory and local memory of the one kernel in a cubin."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        proc = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    names = {"REG": "regs", "STACK": "stack", "LOCAL": "local", "SHARED": "static_smem"}
    usage = {}
    for name, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", proc.stdout):
        usage.setdefault(names[name], int(value))
    return usage


def compile_one(spec, arch: int):
    """Compile one kernel spec for ``sm_<arch>``; return the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="SM versions (80 90)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write ttgir/ptx/cubin files here")
    args = parser.parse_args(argv)

    from triton import knobs

    if knobs.runtime.interpret:  # TRITON_INTERPRET, read the way triton reads it
        print(
            "kernels.compile_all: TRITON_INTERPRET is set, which turns every @triton.jit kernel into an "
            "interpreted Python function that cannot be compiled. Run it with TRITON_INTERPRET unset: "
            "env -u TRITON_INTERPRET python -m kernels.compile_all",
            file=sys.stderr,
        )
        return 2

    from kernels.cuckoo import KERNELS, interpreted

    if interpreted():  # imported earlier in this process with the interpreter on
        print("kernels.compile_all: kernels.cuckoo was imported with TRITON_INTERPRET=1", file=sys.stderr)
        return 2

    failures = 0
    for spec in KERNELS:
        for arch in args.arch:
            label = f"{spec.name} sm_{arch}"
            try:
                compiled = compile_one(spec, arch)
                ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
                if not cubin:
                    raise RuntimeError("no cubin produced")
            except Exception:
                failures += 1
                print(f"FAIL {label}", flush=True)
                traceback.print_exc()
                continue
            usage = resource_usage(cubin)
            detail = " ".join(f"{k}={v}" for k, v in usage.items()) or "regs=n/a (no cuobjdump)"
            print(
                f"ok   {label}: ptx={len(ptx)} B cubin={len(cubin)} B num_warps={spec.num_warps} {detail} "
                f"dyn_smem={compiled.metadata.shared}",
                flush=True,
            )
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                stem = f"{spec.name}.sm_{arch}"
                (args.out / f"{stem}.ttgir").write_text(compiled.asm["ttgir"])
                (args.out / f"{stem}.ptx").write_text(ptx)
                (args.out / f"{stem}.cubin").write_bytes(cubin)
    total = len(KERNELS) * len(args.arch)
    print(f"compiled {total - failures}/{total} kernel variants", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
