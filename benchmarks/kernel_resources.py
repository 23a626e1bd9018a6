"""Registers, spills and shared memory of fxopt's attention kernels, compiled for a GPU without one.

Triton compiles for an explicit target (here sm_90, the H100) on any machine: its bundled ptxas assembles the
kernel and cuobjdump reports what each thread and program use. That is what decides occupancy (how many
programs share an SM) and whether a config spills registers to local memory, so a candidate config or a code
change can be looked at before GPU time is spent on it. It says nothing about speed: only a GPU run does.

Per (kernel, config, variant): registers per thread, spilled bytes per thread (STACK), shared memory per
program, and the programs per SM those allow (H100: 65,536 registers and 228 KiB of shared memory per SM).
Variants: "causal" (the causal flag, no mask) and "mask" (a bool mask given, as HF passes it).
The integer arguments are specialised as a real launch specialises them (strides of the head dim equal to 1,
the others divisible by 16). Numbers are for the Triton installed here; the GPU machine's may differ.

    python benchmarks/kernel_resources.py [--kernels fwd,dq,dkdv] [--configs 64,64,4,3;64,64,8,3] [--head-dim 64]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
POINTERS = dict(Q="*bf16", K="*bf16", V="*bf16", PAD="*fp32", MASK="*i1", SUMMARY="*i32", DO="*bf16", LSE="*fp32",
                DELTA="*fp32", DQ="*bf16", OUT="*bf16", DK="*bf16", DV="*bf16")
FLOATS = ("qk_scale", "softcap", "mask_min", "scale")
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dd", "stride_gd", "stride_kgd", "stride_mk",
                "stride_vgd")
DIVISIBLE = ("S", "S_BUCKET", "field_stride")  # integer arguments (besides strides) a launch finds divisible by 16


def compile_for_sm90(fn, constexprs: dict, num_warps: int, num_stages: int):
    """triton.compile of fn for sm_90 with its other arguments typed and specialised as a launch would: an
    integer argument a launch sees divisible by 16 (strides and DIVISIBLE) carries that fact, which decides the
    loads' vector width and so whether the pipeliner can stage them (cp.async takes 4 bytes and more)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in UNIT_STRIDES:
            signature[name] = "constexpr"
            consts[(i,)] = constexprs.get(name, 1)
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") or name in DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(kernel) -> tuple[int, int, int]:
    """(registers per thread, spilled bytes per thread, shared memory bytes per program) of a compiled kernel."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource line: {usage[:200]}")
    return int(m.group(1)), int(m.group(2)), int(kernel.metadata.shared)


def programs_per_sm(regs: int, smem: int, num_warps: int) -> int:
    by_regs = REGS_PER_SM // max(1, regs * 32 * num_warps)
    by_smem = SMEM_PER_SM // max(1, smem)
    return min(by_regs, by_smem)


def parse_configs(text: str) -> list[tuple[int, int, int, int]]:
    out = []
    for part in text.split(";"):
        vals = tuple(int(v) for v in part.split(","))
        if len(vals) != 4:
            raise SystemExit(f"--configs: each config is BLOCK_M,BLOCK_N,num_warps,num_stages; got {part!r}")
        out.append(vals)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="fwd,dq,dkdv", help="comma-separated, of fwd, dq, dkdv")
    p.add_argument("--configs", default="", help="BLOCK_M,BLOCK_N,num_warps,num_stages;... (default: each "
                   "kernel's tuning list for head dims up to 128)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--variants", default="causal,mask")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        print("kernel_resources.py: this Triton has no NVIDIA backend; nothing to compile.")
        return
    import torch

    from fxopt.kernels import attention as ak

    if ak._INTERPRETED:
        print("kernel_resources.py: fxopt's attention kernels are interpreted here (TRITON_INTERPRET=1): unset it.")
        return
    # the constexpr flags exactly as the op derives them for a bf16 call, with the causal flag or with HF's mask
    q = torch.empty(1, 1, 1, args.head_dim, dtype=torch.bfloat16)
    flags = {"causal": ak._flags(q, True, 0, 0.0, None), "mask": ak._flags(q, False, 0, 0.0, None,
                                                                            torch.ones(1, 1, 1, 1, dtype=torch.bool))}
    wide = flags["causal"]["BLOCK_D"] > 128  # which tuning list, as _launch picks it
    print("| kernel | BLOCK_M, BLOCK_N, warps, stages | variant | registers | spilled bytes | shared KiB | "
          "programs per SM |")
    print("|---|---|---|---|---|---|---|")
    for name in args.kernels.split(","):
        fn = ak._KERNELS[name]
        configs = parse_configs(args.configs) if args.configs else ak._CONFIGS[(name, wide)]
        for bm, bn, warps, stages in configs:
            for variant in args.variants.split(","):
                consts = dict(flags[variant], BLOCK_M=bm, BLOCK_N=bn)
                try:
                    regs, spill, smem = resources(compile_for_sm90(fn, consts, warps, stages))
                except Exception as e:  # a config that does not fit: say so, go on
                    print(f"| {name} | {bm}, {bn}, {warps}, {stages} | {variant} | failed: "
                          f"{type(e).__name__}: {str(e)[:80]} | | | |")
                    continue
                print(f"| {name} | {bm}, {bn}, {warps}, {stages} | {variant} | {regs} | {spill} | "
                      f"{smem / 1024:.1f} | {programs_per_sm(regs, smem, warps)} |", flush=True)


if __name__ == "__main__":
    main()
