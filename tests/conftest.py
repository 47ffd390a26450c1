"""Test setup. Runs before any test module imports triton or jagged.

- Without a GPU, Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1 must be set before
  triton is imported), so CI exercises the kernels' indexing and masking.
- Every float tensor made by torch.empty / torch.empty_like during a test starts as NaN, so a
  kernel that forgets to write an output position fails loudly.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# The interpreter is slow: fewer examples on CPU; no deadline anywhere (first calls compile).
settings.register_profile(
    "cpu", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "gpu", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "cpu"))

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poison(t):
    if t.is_floating_point() or t.is_complex():
        with torch.no_grad():  # (torch.empty(..., requires_grad=True) makes a leaf)
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_uninitialised_memory(monkeypatch):
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_real_empty_like(*a, **k)))
    yield
