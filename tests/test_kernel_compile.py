"""Compile the attention kernels for an H100 (sm_90) on the CPU, without running them.

The interpreter does not type-check: a variable that changes integer width inside a runtime
branch, or a helper whose returns differ in width, runs there and fails Triton's compiler on the
GPU. Both passed the CPU tests and failed on the GPU once (session 16, the int32 row offsets).
The compile runs in a subprocess: tests/conftest.py sets TRITON_INTERPRET for this process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_attention_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default; silences Triton 3.9's notice
    script = Path(__file__).with_name("_compile_attention.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    assert result.stdout.count("compiled ") == 16, result.stdout


def test_hopper_kernels_compile_for_sm90():
    """The Gluon kernels (ops/attention_hopper.py, attention_hopper_backward.py, bmm_hopper.py) with
    the installed Triton: Gluon's API moves between releases (3.6 and 3.9 name the TMA load
    differently), and the interpreter cannot run Gluon, so this is the CPU's only check of them."""
    pytest.importorskip("triton.backends.nvidia")
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).with_name("_compile_hopper.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    assert result.stdout.count("compiled ") == 30 + 18 + 16, result.stdout


def test_compile_failure_is_recorded_and_warned():
    """ops/_gluon.py: compile_failed, which every Gluon launcher calls when its kernel does not
    compile (the launchers' fallback itself is tested on the GPU, tests/test_bmm_hopper.py)."""
    from jagged.ops import _gluon

    failed = set()
    with pytest.warns(RuntimeWarning, match=r"Hopper demo kernel did not compile .*TypeError: bad"):
        assert _gluon.compile_failed(failed, ("key", 1), "demo", TypeError("bad")) is False
    assert failed == {("key", 1)}
