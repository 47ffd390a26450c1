"""Triton kernels, one op per module; each module holds its kernels, its launchers (registered as
``jagged::`` custom ops with their autograd formulas, see ``_library.py``) and public functions."""
