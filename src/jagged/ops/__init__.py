"""Triton kernels, one op per module; each module holds its kernels, launcher, autograd.Function
and public function."""
