"""Compile the attention kernels for an H100 (sm_90) without running them; run by
tests/test_kernel_compile.py in a process without the interpreter. Prints one line per variant."""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from jagged.ops import attention

FLOATS = {"qk_scale", "scale", "norm", "dropout_p"}
FLOAT32_POINTERS = {"lse_ptr", "delta_ptr", "dbias_ptr"}
INT_POINTERS = {"q_offsets_ptr", "k_offsets_ptr", "targets_ptr"}


def compile_variant(kernel, name, constexprs, num_warps, num_stages):
    fn = getattr(kernel, "kernel", kernel)  # ops/_launch.py: FastLaunch
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "bias_ptr":
            signature[arg] = "*fp32" if constexprs["HAS_BIAS"] else "*i64"
        elif arg in FLOAT32_POINTERS:
            signature[arg] = "*fp32"
        elif arg in INT_POINTERS:
            signature[arg] = "*i64"
        elif arg.endswith("_ptr"):
            signature[arg] = "*bf16"
        else:
            signature[arg] = "fp32" if arg in FLOATS else "i32"
    triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})
    print("compiled", name, flush=True)


def main():
    features = {
        "plain": dict(HSTU_MASK=False, HAS_TARGETS=False, HAS_BIAS=False, DROPOUT=False, ACTIVATION=0),
        "everything": dict(HSTU_MASK=True, HAS_TARGETS=True, HAS_BIAS=True, DROPOUT=True, ACTIVATION=1),
    }
    for feature, flags in features.items():
        for int32 in (True, False):
            for max_len in (100, None):
                common = dict(CAUSAL=True, NORM_BY_LENGTH=True, PRECISION="ieee", INT32_OFFSETS=int32,
                              FAR_TILES=flags["HAS_BIAS"], **flags)
                for kernel_name in ("forward", "backward"):
                    tiles = attention._block_sizes(kernel_name, 32, 32, max_len, feature == "plain")
                    warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
                    if kernel_name == "forward":
                        kernel = attention._attention_forward_kernel
                        constexprs = dict(head_dim=32, head_dim_v=32, SCALE_IN_EXP=feature == "plain",
                                          **common, **tiles)
                    else:
                        kernel = attention._attention_backward_kernel
                        # Programs interleaved where the launcher would (rows up to 512 known).
                        constexprs = dict(BIAS_GRAD=flags["HAS_BIAS"], BLOCK_W=128, INTERLEAVE=max_len is not None,
                                          **common, **tiles)
                    # The row finders: the one-pass scan (int32, short rows), the two-pass scan
                    # (int32, long rows), the binary search (int64).
                    constexprs.update(SCAN_ROWS=(512 if max_len else 64) if int32 else 0,
                                      SCAN_STRIDE=1 if max_len or not int32 else 64)
                    compile_variant(kernel, f"{kernel_name} {feature} int32={int32} max_len={max_len}", constexprs,
                                    warps, stages)


if __name__ == "__main__":
    sys.exit(main())
