"""Kernel launchers as ``jagged::`` PyTorch custom ops, with an eager fast path.

Every launcher is registered with ``torch.library.custom_op`` (plus ``register_fake`` and
``register_autograd``), so torch.compile, fake tensors, AOT autograd and ``opcheck`` see real
ops. Going through the dispatcher costs host time on every eager call, though: on the H100's
host, 40 us for the attention forward and 80 us for its backward (``benchmarks/host_overhead.py``),
as much as the kernels themselves on short rows. So a plain eager call (real tensors, no
compile, no dispatch mode active) runs the same implementation directly, through a
``torch.autograd.Function`` built from the same setup-context and backward functions when a
gradient is wanted. Both paths run the same code; only the bookkeeping around it differs.
"""

from __future__ import annotations

import functools
import inspect

import torch

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


class JaggedOp:
    """A launcher registered as ``jagged::<name>``; called like the launcher (positional args)."""

    def __init__(self, name: str, impl):
        self.impl = impl
        self.op = torch.library.custom_op(f"jagged::{name}", mutates_args=())(impl)
        parameters = inspect.signature(impl).parameters.values()
        # Missing trailing arguments are filled from these defaults: the autograd paths take every
        # input. A tuple slice, not inspect's bind (the largest item in the host profile of an
        # eager attention forward: benchmarks/NOTES.md, session 11).
        self._defaults = tuple(p.default for p in parameters)
        self._required = sum(d is inspect.Parameter.empty for d in self._defaults)
        self._function = None
        functools.update_wrapper(self, impl)

    def register_fake(self, fake):
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward, *, setup_context) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        self._function = type(f"{impl.__name__}_eager", (torch.autograd.Function,),
                              dict(forward=staticmethod(forward), backward=staticmethod(backward)))

    def __call__(self, *args):
        if len(args) < len(self._defaults):
            if len(args) < self._required:
                raise TypeError(f"{self.impl.__name__}() takes at least {self._required} arguments, got {len(args)}")
            args += self._defaults[len(args):]
        # The custom op outside plain eager calls: under torch.compile or tracing, with a dispatch
        # mode active (fake, proxy, functional, selective checkpointing), or with a tensor
        # subclass among the arguments. One pass over the arguments (this runs on every call).
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
            return self.op(*args)
        wants_grad = False
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) not in _PLAIN_TENSOR_TYPES:
                    return self.op(*args)
                wants_grad = wants_grad or a.requires_grad
        if wants_grad and self._function is not None and torch.is_grad_enabled():
            return self._function.apply(*args)
        return self.impl(*args)


def jagged_op(name: str):
    """Decorator: register a launcher as the custom op ``jagged::<name>`` (see module doc)."""
    return functools.partial(JaggedOp, name)
