"""ops/_launch.py: the cached launch path. Its key must tell apart every pair of calls Triton
could compile differently (a shared compiled kernel for two of them would be a silent wrong
result), and a cached launch must hand the kernel its arguments in signature order, defaults
filled in. On CPU the caching and binding logic runs against a stand-in kernel; on the GPU, real
kernels with aligned and misaligned pointers are checked against the references, and batches
that differ only in size within one bucket must launch the kernels already compiled."""

from __future__ import annotations

import inspect
import types

import pytest
import torch

import jagged
from jagged import reference
from jagged.ops import _launch
from jagged.ops import softmax as softmax_ops

from helpers import ON_GPU, assert_close, make_offsets, random_values


@pytest.mark.parametrize("a, b", [
    (1, 2), (16, 17), (16, 32 + 1), (2 ** 31 - 16, 2 ** 31), (2 ** 63 - 16, 2 ** 63), (-16, -17), (1, True),
    (0, False), (True, False), (1, 1.0), (0.5, None), (16, 16.0),
])
def test_argument_key_tells_apart_what_triton_specialises_on(a, b):
    assert _launch.argument_key(a) != _launch.argument_key(b)


@pytest.mark.parametrize("a, b", [(3, 5), (16, 48), (2 ** 31 + 1, 2 ** 40 + 3), (0.5, 2.0), (None, None)])
def test_argument_key_shares_what_triton_compiles_alike(a, b):
    assert _launch.argument_key(a) == _launch.argument_key(b)


def test_argument_key_of_tensors_is_dtype_and_16_byte_alignment():
    base = torch.zeros(64, dtype=torch.float32)
    key = _launch.argument_key
    assert key(base) == key(base[8:]) == (torch.float32, True)  # 32 bytes in
    assert key(base[1:]) == key(base[3:]) == (torch.float32, False)  # 4 and 12 bytes in
    assert key(base.double()) != key(base)


class _StandInCompiled:
    """What Triton's launch returns: records the cached launches made through it."""

    def __init__(self, launches):
        self.launches, self.function, self.packed_metadata = launches, "function", "metadata"

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        self.launches.append(("cached", (grid_0, grid_1, grid_2), args))


class _StandInKernel:
    """A jit kernel's surface as FastLaunch uses it: ``params`` and ``kernel[grid](...)``."""

    def __init__(self, fn, constexprs):
        self.params = [types.SimpleNamespace(name=p.name, is_constexpr=p.name in constexprs, default=p.default)
                       for p in inspect.signature(fn).parameters.values()]
        self.signature = inspect.signature(fn)
        self.launches, self.compiled = [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.launches.append(("triton", grid, tuple(bound.arguments.values()), options))
            self.compiled.append(_StandInCompiled(self.launches))
            return self.compiled[-1]
        return launch


def _kernel(x_ptr, n, scale, stride=1, FLAG=0, BLOCK=16):  # FLAG and BLOCK: constexprs (the fixture)
    pass


@pytest.fixture
def stand_in(monkeypatch):
    driver = types.SimpleNamespace(active=types.SimpleNamespace(get_current_device=lambda: 0,
                                                                get_current_stream=lambda device: 7))
    knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))
    monkeypatch.setattr(_launch, "_driver", driver)
    monkeypatch.setattr(_launch, "_knobs", knobs)
    kernel = _StandInKernel(_kernel, {"FLAG", "BLOCK"})
    return kernel, _launch.FastLaunch(kernel)


def test_fast_launch_binds_arguments_in_signature_order(stand_in):
    kernel, launcher = stand_in
    x = torch.zeros(8)
    launcher[(3,)](x, 5, 0.5, BLOCK=32, num_warps=4)
    launcher[(4, 2)](x, 7, 0.25, BLOCK=32, num_warps=4)  # same key: cached, arguments from this call
    launcher[(5,)](x, n=9, scale=2.0, stride=3, BLOCK=32, num_warps=4)
    launcher[(6,)](x, n=11, scale=3.0, stride=19, BLOCK=32, num_warps=4)
    assert kernel.launches == [
        ("triton", (3,), (x, 5, 0.5, 1, 0, 32), {"num_warps": 4}),
        ("cached", (4, 2, 1), (x, 7, 0.25, 1, 0, 32)),
        ("triton", (5,), (x, 9, 2.0, 3, 0, 32), {"num_warps": 4}),
        ("cached", (6, 1, 1), (x, 11, 3.0, 19, 0, 32)),
    ]


@pytest.mark.parametrize("first, second", [
    (dict(BLOCK=32), dict(BLOCK=64)),  # a constexpr: by value
    (dict(num_warps=4), dict(num_warps=8)),  # a launch option: by value
    (dict(n=5), dict(n=1)),  # == 1 becomes a constant in Triton
    (dict(n=5), dict(n=32)),  # divisible by 16
    (dict(n=5), dict(n=2 ** 31 + 1)),  # i64
    (dict(x=torch.zeros(8)), dict(x=torch.zeros(8)[1:])),  # 16-byte alignment
    (dict(x=torch.zeros(8)), dict(x=torch.zeros(8, dtype=torch.float16))),
    (dict(scale=0.5), dict(scale=1)),  # float vs int
    (dict(n=5, scale=0.5), dict(scale=0.5, n=5)),  # keyword order: its own key (never a wrong one)
])
def test_fast_launch_compiles_again_for_a_different_key(stand_in, first, second):
    kernel, launcher = stand_in
    for options in (first, second):
        kwargs = dict(options)  # the case's keywords first, in its order
        for name, value in dict(n=5, scale=0.5).items():
            kwargs.setdefault(name, value)
        launcher[(1,)](kwargs.pop("x", torch.zeros(8)), **kwargs)
    assert [launch[0] for launch in kernel.launches] == ["triton", "triton"]


def test_fast_launch_passes_grid_functions_to_triton(stand_in):
    kernel, launcher = stand_in
    for _ in range(2):
        launcher[lambda meta: (1,)](torch.zeros(8), 5, 0.5)
    assert [launch[0] for launch in kernel.launches] == ["triton", "triton"]


@pytest.mark.skipif(not ON_GPU, reason="the cached launch runs on the GPU only (the interpreter has its own)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_launches_with_misaligned_and_aligned_inputs(dtype):
    # The softmax kernel vectorises loads of 16-byte-aligned rows; a misaligned view after an
    # aligned call (and back) must get a kernel compiled for it, not the cached aligned one.
    lengths = [5, 0, 33, 17, 64, 1]
    offsets = make_offsets(lengths)
    total, width = sum(lengths), 48
    base = random_values((total * width + 8,), dtype)
    launcher = softmax_ops._jagged_softmax_forward_kernel
    for start in (0, 1, 0, 3, 8, 1):  # elements into the buffer: aligned only at 0 and 8 (float32)
        values = base[start:start + total * width].view(total, width)
        x = jagged.JaggedTensor(values, offsets)
        assert_close(jagged.jagged_softmax(x).values, reference.jagged_softmax(values, offsets), name=f"start {start}")
    if _launch.ENABLED:  # (JAGGED_FAST_LAUNCH=0: Triton's own path, nothing kept)
        assert isinstance(launcher, _launch.FastLaunch) and len(launcher._kept) >= 2


@pytest.mark.skipif(not ON_GPU, reason="the cached launch runs on the GPU only")
def test_cached_launches_with_unit_and_wide_strides():
    # A stride of 1 becomes a constant in Triton's compiled kernel: a later call with another
    # stride, through the cache, must not reuse that kernel.
    offsets = make_offsets([3, 7, 0, 12])
    base = random_values((4, 12, 66), torch.float32)
    for view in (base[..., :32], base[..., ::2][..., :32], base[..., 1:33], base[..., :32], base[..., 2::2]):
        assert_close(jagged.dense_to_jagged(view, offsets, 22), reference.dense_to_jagged(view, offsets, 22),
                     exact=True)


def test_argument_key_of_tensor_descriptors_is_their_type():
    """TMA descriptors (ops/attention_hopper.py) key by what Triton compiles for: dtype, block,
    layout; their tensor's shape and strides are runtime values of the launch."""
    gluon_hopper = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from triton.experimental.gluon import language as gl

    def descriptor(rows, block, dtype=torch.bfloat16):
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)
        return gluon_hopper.TensorDescriptor.from_tensor(torch.zeros(rows, 64, dtype=dtype), block, layout)

    assert _launch.argument_key(descriptor(100, [64, 64])) == _launch.argument_key(descriptor(300, [64, 64]))
    assert _launch.argument_key(descriptor(100, [64, 64])) != _launch.argument_key(descriptor(100, [32, 64]))
    assert _launch.argument_key(descriptor(100, [64, 64])) != _launch.argument_key(descriptor(100, [64, 64], torch.float16))
    hash(_launch.argument_key(descriptor(100, [64, 64])))


def test_argument_key_of_tma_matrices_is_dtype_and_block():
    """A TmaMatrix (ops/_gluon.py) stands for the TensorDescriptor it becomes: keyed as Triton
    compiles that (dtype, box; the layout follows from both), never by its tensor's rows or data."""
    from jagged.ops._gluon import TmaMatrix

    def matrix(rows, block, dtype=torch.bfloat16, start=0):
        return TmaMatrix(torch.zeros(rows + 8, 64, dtype=dtype)[start:], rows, 64, 64, block)

    key = _launch.argument_key
    assert key(matrix(100, (64, 64))) == key(matrix(300, (64, 64), start=8))
    assert key(matrix(100, (64, 64))) != key(matrix(100, (32, 64)))
    assert key(matrix(100, (64, 64))) != key(matrix(100, (64, 64), torch.float16))
    hash(key(matrix(100, (64, 64))))


@pytest.mark.parametrize("keep", [True, False])
def test_fast_launch_hands_triton_a_descriptor_for_each_tma_matrix(stand_in, keep, monkeypatch):
    """Triton's own launch (first calls, JAGGED_FAST_LAUNCH=0, and a kept kernel without the
    direct launch: a stand-in's, another Triton's) gets the TensorDescriptor of a TmaMatrix."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from jagged.ops._gluon import TmaMatrix

    kernel, launcher = stand_in
    launcher._keep = keep
    monkeypatch.setattr(_launch, "bind_cuda_context", lambda device: None)  # (no CUDA on the stand-in)
    base = torch.zeros(40, 64, dtype=torch.bfloat16)
    for rows in (40, 24):
        launcher[(1,)](TmaMatrix(base, rows, 64, 64, (16, 64)), 5, 0.5, BLOCK=32)
    assert [launch[0] for launch in kernel.launches] == ["triton", "cached"] if keep else ["triton", "triton"]
    for launch, rows in zip(kernel.launches, (40, 24)):
        descriptor = launch[2][0]
        assert type(descriptor).__name__ == "TensorDescriptor" and descriptor.base is base
        assert (list(descriptor.shape), list(descriptor.strides), list(descriptor.block_shape)) == (
            [rows, 64], [64, 1], [16, 64])


@pytest.mark.skipif(not ON_GPU, reason="the direct launch runs on the GPU only")
def test_direct_launch_matches_tritons_own(monkeypatch):
    """The direct launch (ops/_launch.py: _DirectLaunch, Triton 3.6's C launcher called with the
    arguments its Python layer would pass, TMA descriptors encoded by the library) gives bitwise
    the outputs and gradients of Triton's own launch of the same kernels: the Gluon attention
    forward and backward, the Gluon jagged_dense_bmm, and Triton kernels. On Triton 3.6 it must
    be what the kept kernels use."""
    import triton
    from jagged.ops import attention_hopper, attention_hopper_backward, bmm_hopper
    from jagged.ops import softmax as softmax_module

    lengths = [37, 0, 129, 64, 1, 200, 90]
    offsets = make_offsets(lengths)
    total = sum(lengths)
    q, k, v, grad = (random_values((total, 2, 64), torch.bfloat16) for _ in range(4))
    x = jagged.JaggedTensor(random_values((total, 128), torch.bfloat16), offsets, max_len=max(lengths))
    y = random_values((len(lengths), 128, 128), torch.bfloat16)
    monkeypatch.setattr(bmm_hopper, "MIN_BYTES", 0)  # the Gluon bmm at this small size

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = jagged.jagged_flash_attention_values(*leaves, offsets, offsets, validate=False, max_len=max(lengths))
        grads = torch.autograd.grad(out, leaves, grad)
        return (out, *grads, jagged.jagged_dense_bmm(x, y).values, jagged.jagged_softmax(x).values)

    kernels = (attention_hopper._attention_forward_hopper_kernel,
               attention_hopper_backward._attention_backward_hopper_kernel,
               bmm_hopper._jagged_dense_bmm_hopper_kernel, softmax_module._jagged_softmax_forward_kernel)
    if not all(isinstance(kernel, _launch.FastLaunch) and kernel._keep for kernel in kernels):
        pytest.skip("JAGGED_FAST_LAUNCH=0: nothing is kept")
    for kernel in kernels:
        kernel._kept.clear()
    run()  # compiles (or finds) and keeps each kernel
    direct = run()  # the kept kernels' launches
    if triton.__version__.startswith("3.6"):
        for kernel in kernels:
            assert kernel._kept and all(entry[2] is not None for entry in kernel._kept.values()), kernel
    monkeypatch.setattr(_launch, "_direct_launch", lambda compiled, matrices: None)
    for kernel in kernels:
        kernel._kept.clear()
    run()
    tritons = run()
    for got, want in zip(direct, tritons):
        assert torch.equal(got, want)


def _on_a_fresh_thread(work):
    """Run ``work`` on a new thread (whose CUDA context nothing has made current) and re-raise
    what it raised here."""
    import threading

    errors = []

    def run():
        try:
            work()
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.mark.skipif(not ON_GPU, reason="Gluon kernels run on the GPU only")
def test_gluon_launch_as_a_threads_first_cuda_work():
    """Encoding a TMA descriptor needs the CUDA context current on the calling thread, which
    Triton 3.6 makes current only in the launch that follows: a thread whose first CUDA work is a
    Gluon launch (the autograd engine's backward thread) must still get the right result, through
    the first (Triton's) launch and the kept one alike, and inside a CUDA-graph capture, where
    binding the context must not break the capture (ops/_launch.py: bind_cuda_context)."""
    from jagged.ops import attention_hopper

    lengths = [37, 0, 129, 64]
    offsets = make_offsets(lengths)
    q, k, v = (random_values((sum(lengths), 2, 64), torch.bfloat16) for _ in range(3))
    if not attention_hopper.hopper_forward_supported(q, k, v, offsets, 0.125, 129, True, True):
        pytest.skip("no Gluon attention forward on this GPU / Triton")
    want = reference.jagged_attention(q.float(), k.float(), v.float(), offsets, offsets, causal=False, scale=0.125)
    kernel = attention_hopper._attention_forward_hopper_kernel
    if isinstance(kernel, _launch.FastLaunch):
        kernel._kept.clear()

    def launch():
        assert attention_hopper.attention_forward_hopper(q, k, v, offsets, offsets, False, 0.125, 129, out, lse)

    def capture():
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            launch()
        graph.replay()

    # A new compiled-kernel key (Triton's launch), a kept one, a kept one captured.
    for work in (launch, launch, capture):
        out, lse = torch.empty_like(q), torch.empty((2, q.shape[0]), dtype=torch.float32, device=q.device)
        _on_a_fresh_thread(work)
        assert_close(out, want)


@pytest.mark.skipif(not ON_GPU, reason="the cached launch runs on the GPU only")
def test_kept_launches_still_call_launch_hooks():
    """A launch hook (what profilers set) makes kept launches take Triton's ``run``, which calls
    it; without one they take the direct launch, which calls nothing."""
    from triton import knobs

    offsets = make_offsets([5, 0, 12])
    x = jagged.JaggedTensor(random_values((17, 8), torch.float32), offsets)
    jagged.jagged_softmax(x)  # compiled and kept
    seen = []

    def hook(metadata):
        seen.append(metadata)

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # Triton 3.6: a HookChain
        chain.add(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
    try:
        got = jagged.jagged_softmax(x).values
    finally:
        if hasattr(chain, "remove"):
            chain.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = chain
    assert len(seen) >= 1
    assert_close(got, reference.jagged_softmax(x.values, offsets))
    seen.clear()
    jagged.jagged_softmax(x)
    assert not seen


def _one_training_step(batch_size: int, tokens_mod_16: int, generator: torch.Generator) -> None:
    """Attention forward+backward (D=64 bf16: the Gluon kernels on an H100), jagged_dense_bmm,
    jagged_softmax and jagged_sum with their backward, on a batch of random lengths up to 300
    (one row exactly 300: every batch has the same longest row, so the same tiles), the last
    length moved so that the token count is ``tokens_mod_16`` modulo 16."""
    lengths = torch.randint(1, 301, (batch_size,), generator=generator)
    lengths[0] = 300
    excess = (int(lengths.sum()) - tokens_mod_16) % 16
    lengths[-1] += -excess if lengths[-1] > excess else 16 - excess
    offsets = make_offsets(lengths.tolist(), torch.int64, "cuda")
    total = int(lengths.sum())
    q, k, v = (torch.randn(total, 2, 64, generator=generator).to("cuda", torch.bfloat16).requires_grad_(True)
               for _ in range(3))
    out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, max_len=300)
    values = torch.randn(total, 32, generator=generator).to("cuda").requires_grad_(True)
    x = jagged.JaggedTensor(values, offsets, max_len=300)
    dense = torch.randn(batch_size, 32, 16, generator=generator).to("cuda").requires_grad_(True)
    loss = (out.float().sum() + jagged.jagged_dense_bmm(x, dense).values.sum()
            + (jagged.jagged_softmax(x).values * values).sum() + jagged.jagged_sum(x).sum())
    loss.backward()


@pytest.mark.skipif(not ON_GPU, reason="kernels compile on the GPU only")
def test_batches_of_one_bucket_compile_no_new_kernels():
    """Batch size and token count change from batch to batch. Within one bucket (here 65-127 rows,
    longest row 300) no kernel may compile again: batch-varying integers are not specialised on
    (docs/design.md). Warmed on one batch of 70 rows, the batches after it have 16-multiple and
    other sizes and token counts, so a kernel that specialised on B % 16 or T % 16 (lse's
    stride) compiles a new variant and fails this."""
    from triton import knobs

    generator = torch.Generator().manual_seed(27)
    _one_training_step(70, 5, generator)
    compiled = []
    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda *args, **kwargs: compiled.append(kwargs.get("fn"))
    try:
        for batch_size, tokens_mod_16 in ((96, 0), (71, 0), (112, 3), (127, 8), (80, 0), (65, 11)):
            _one_training_step(batch_size, tokens_mod_16, generator)
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert compiled == [], [getattr(fn, "name", fn) for fn in compiled]
