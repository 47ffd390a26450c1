"""Compile the Gluon (Hopper) kernels for an H100 (sm_90) without running them: the attention
forward and backward and jagged_dense_bmm; run by tests/test_kernel_compile.py in a process
without the interpreter. Prints one line per variant; with ``--footprint``, each line also gives
the variant's registers and spills (ptxas -v) and shared memory: what decides how many programs
an SM holds (docs/design.md, the Hopper backward)."""

import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

from jagged.ops import _gluon, attention_hopper, attention_hopper_backward, bmm_hopper


def _pointer(dtype):
    return "*bf16" if dtype == torch.bfloat16 else "*fp16"


FOOTPRINT = "--footprint" in sys.argv


def _footprint(compiled) -> str:
    """'' unless --footprint; else the registers, spill bytes and shared memory of a compiled variant."""
    if not FOOTPRINT:
        return ""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report).group(1)
    spills = re.search(r"(\d+) bytes spill stores", report).group(1)
    return f"| {registers} registers, {spills} bytes spilled, {compiled.metadata.shared} bytes shared"


def _compile(kernel, signature, constexprs, num_warps):
    """Compile for sm_90 with every argument named (constexprs as "constexpr"; a ``maxnreg`` among
    them is the launch option); check that the kernel uses TMA and wgmma."""
    constexprs = dict(constexprs)
    options = {"num_warps": num_warps}
    if "maxnreg" in constexprs:
        options["maxnreg"] = constexprs.pop("maxnreg")
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    assert set(signature) == set(kernel.arg_names), (list(signature), kernel.arg_names)
    signature = {name: signature[name] for name in kernel.arg_names}
    compiled = triton.compile(GluonASTSource(kernel, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    assert "wgmma.mma_async" in compiled.asm["ptx"] and "cp.async.bulk.tensor" in compiled.asm["ptx"]
    return _footprint(compiled)


def main():
    kernel = attention_hopper._attention_forward_hopper_kernel
    kernel = getattr(kernel, "kernel", kernel)  # ops/_launch.py: FastLaunch
    # Each tile family of _tiles: rows up to 512; longer rows, 64-query tiles (causal, or mixed
    # lengths) and 128-query tiles on 8 warps (long on average, not causal; D >= 64).
    shapes = [(256, 0.0, False), (256, 0.0, True), (2048, 0.0, False), (2048, 0.0, True), (2048, 1024.0, False)]
    for head_dim in (32, 64, 128):
        for max_len, mean_len, causal in shapes:
            tiles = attention_hopper._tiles(head_dim, max_len, causal, mean_len)
            # the two-pass row scan (B over 511 rows at 4 warps) on the long-row variants
            scan, stride = attention_hopper.scan_shape(200 if max_len < 2048 else 2000, tiles["num_warps"])
            for dtype in (torch.bfloat16, torch.float16):
                x = torch.empty(1024, 2, head_dim, dtype=dtype)
                q_desc = attention_hopper._descriptor(x, (tiles["BLOCK_M"], head_dim)).descriptor()
                kv_desc = attention_hopper._descriptor(x, (tiles["BLOCK_N"], head_dim)).descriptor()
                constexprs = dict(CAUSAL=causal, HEAD_D=head_dim, SCAN=scan, STRIDE=stride, SAME_OFFSETS=not causal,
                                  **tiles)
                signature = dict(q_desc=mangle_type(q_desc), k_desc=mangle_type(kv_desc),
                                 v_desc=mangle_type(kv_desc), o_ptr=_pointer(dtype),
                                 lse_ptr="*fp32", q_offsets_ptr="*i64", k_offsets_ptr="*i64", batch_size="i32",
                                 qk_scale="fp32", stride_ot="i32", stride_oh="i32", stride_lh="i32")
                footprint = _compile(kernel, signature, constexprs, tiles["num_warps"])
                print("compiled", head_dim, max_len, mean_len, dtype, causal, tiles["num_warps"], footprint, flush=True)


def backward():
    kernel = attention_hopper_backward._attention_backward_hopper_kernel
    kernel = getattr(kernel, "kernel", kernel)  # ops/_launch.py: FastLaunch
    for head_dim in (32, 64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            for causal, fused_delta in ((False, True), (True, True), (False, False)):
                tiles = attention_hopper_backward._tiles(head_dim, causal, fused_delta)
                x = torch.empty(1024, 2, head_dim, dtype=dtype)
                signature = {}
                programs = dict(kv=("KV_BLOCK_M", "KV_BLOCK_N"), dq=("Q_BLOCK_M", "Q_BLOCK_N"))
                for program, (rows_q, rows_k) in programs.items():
                    for name, rows in dict(q=rows_q, k=rows_k, v=rows_k, do=rows_q, o=rows_q).items():
                        descriptor = attention_hopper._descriptor(x, (tiles[rows], head_dim)).descriptor()
                        signature[f"{program}_{name}_desc"] = mangle_type(descriptor)
                signature.update(lse_ptr="*fp32", delta_ptr="*fp32", dq_ptr=_pointer(dtype), dk_ptr=_pointer(dtype),
                                 dv_ptr=_pointer(dtype), q_offsets_ptr="*i64", k_offsets_ptr="*i64", batch_size="i32",
                                 num_kv_slots="i32", qk_scale="fp32", scale="fp32")
                signature.update({name: "i32" for name in kernel.arg_names if name.startswith("stride")})
                # STRIDE: the two-pass row scan (B over 511 rows) on some of the variants; INTERLEAVE
                # (the launcher's rule, short rows) on the self-attention ones.
                interleave = attention_hopper_backward.interleaves(not causal, tiles, 512)
                constexprs = dict(CAUSAL=causal, HEAD_D=head_dim, SCAN=512, STRIDE=64 if causal else 1,
                                  FUSED_DELTA=fused_delta, SAME_OFFSETS=not causal, INTERLEAVE=interleave, **tiles)
                footprint = _compile(kernel, signature, constexprs, tiles["num_warps"])
                print("compiled backward", head_dim, dtype, causal, fused_delta, footprint, flush=True)


def jagged_dense_bmm():
    kernel = bmm_hopper._jagged_dense_bmm_hopper_kernel
    kernel = getattr(kernel, "kernel", kernel)  # ops/_launch.py: FastLaunch
    for k_dim, n_dim in ((128, 128), (256, 256), (48, 24), (64, 200)):
        tiles = bmm_hopper._tiles(k_dim, n_dim)
        for dtype in (torch.bfloat16, torch.float16):
            for transposed in (False, True):
                x = torch.empty(1024, 256, dtype=dtype)
                y_box = [tiles["BLOCK_N"], tiles["BLOCK_K"]] if transposed else [tiles["BLOCK_K"], tiles["BLOCK_N"]]
                x_box = [tiles["BLOCK_M"], tiles["BLOCK_K"]]
                signature = dict(
                    x_desc=mangle_type(_gluon.matrix_descriptor(x, [1024, k_dim], 256, x_box)),
                    y_desc=mangle_type(_gluon.matrix_descriptor(x, [1024, 256], 256, y_box)), out_ptr=_pointer(dtype),
                    offsets_ptr="*i64", batch_size="i32", search_stride="i32", stride_ot="i32")
                constexprs = dict(K=k_dim, N=n_dim, Y_TRANSPOSED=transposed, **tiles)
                footprint = _compile(kernel, signature, constexprs, tiles["num_warps"])
                print("compiled jagged_dense_bmm", k_dim, n_dim, dtype, transposed, footprint, flush=True)


if __name__ == "__main__":
    main()
    backward()
    jagged_dense_bmm()
