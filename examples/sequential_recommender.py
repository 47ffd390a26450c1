"""A small sequential recommender trained twice: with jagged attention (this library) and with the
padded PyTorch equivalent, from the same weights on the same batches.

Synthetic data: users with a favourite topic; each history (exponential lengths, mean max_len/5)
holds mostly items of that topic, and the next item to predict comes from it too.
Model: item embeddings -> blocks of [causal multi-head attention, residual, LayerNorm, MLP,
residual, LayerNorm] -> mean over the history -> scores against all item embeddings ->
cross-entropy with the next item.

The script prints a progress line, the two loss curves side by side (they agree up to float
rounding), and each variant's time per step and peak GPU memory.

    python examples/sequential_recommender.py                 # full size on a GPU
    python examples/sequential_recommender.py --toy           # seconds on a CPU
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

import jagged


# ------------------------------------------------------------------ data
def make_batch(batch_size, max_len, num_items, num_topics, generator, device):
    """Item ids ``[T]`` of B histories, their offsets ``[B+1]`` and next items ``[B]``."""
    lengths = (torch.empty(batch_size).exponential_(5.0 / max_len, generator=generator).long() + 1).clamp_(1, max_len)
    per_topic = num_items // num_topics
    topics = torch.randint(num_topics, (batch_size,), generator=generator)
    token_topics = topics.repeat_interleave(lengths)
    on_topic = torch.rand(token_topics.shape, generator=generator) < 0.8
    items = torch.where(on_topic, token_topics * per_topic + torch.randint(per_topic, token_topics.shape, generator=generator),
                        torch.randint(num_items, token_topics.shape, generator=generator))
    targets = topics * per_topic + torch.randint(per_topic, (batch_size,), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return items.to(device), offsets.to(device), targets.to(device), int(lengths.max())


# ------------------------------------------------------------------ the two models
class Block(torch.nn.Module):
    """Attention + MLP block; ``attention`` is the library's module or the padded twin below (same
    parameter names, so one state dict fits both)."""

    def __init__(self, dim, heads, attention):
        super().__init__()
        self.attention = attention
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def mix(self, x, attended):
        x = self.norm1(x + attended)
        return self.norm2(x + self.mlp(x))


class PaddedCausalAttention(torch.nn.Module):
    """What a user without this library writes: padded [B, L, E] inputs, SDPA with a causal and
    key-padding mask."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, valid):  # x [B, L, E], valid [B, L]
        batch, length, dim = x.shape
        q, k, v = (p(x).view(batch, length, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class Recommender(torch.nn.Module):
    def __init__(self, num_items, dim, heads, blocks, padded):
        super().__init__()
        self.padded = padded
        self.items = torch.nn.Embedding(num_items, dim)
        torch.nn.init.normal_(self.items.weight, std=dim ** -0.5)  # unit-size scores at the start
        make = (lambda: PaddedCausalAttention(dim, heads)) if padded else \
            (lambda: jagged.nn.JaggedMultiheadAttention(dim, heads, causal=True))
        self.blocks = torch.nn.ModuleList(Block(dim, heads, make()) for _ in range(blocks))

    def forward(self, items, offsets, max_len):
        x = self.items(items)  # [T, E]
        if self.padded:
            lengths = offsets.diff()
            valid = torch.arange(max_len, device=x.device)[None, :] < lengths[:, None]
            dense = x.new_zeros(lengths.numel(), max_len, x.shape[1]).index_put((valid,), x)
            for block in self.blocks:
                dense = block.mix(dense, block.attention(dense, valid))
            user = (dense * valid[..., None]).sum(1) / lengths[:, None]
        else:
            h = jagged.JaggedTensor(x, offsets, max_len=max_len, validate=False)
            for block in self.blocks:
                h = h.with_values(block.mix(h.values, block.attention(h).values))
            user = jagged.jagged_mean(h)
        return user @ self.items.weight.t()  # [B, num_items]


# ------------------------------------------------------------------ training
def train(model, batches, lr, device, label):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step, (items, offsets, targets, max_len) in enumerate(batches):
        start = time.perf_counter()
        loss = F.cross_entropy(model(items, offsets, max_len), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # synchronises: the step's time is complete
        times.append(time.perf_counter() - start)
        done = (step + 1) / len(batches)
        if step % max(1, len(batches) // 100) == 0 or step + 1 == len(batches):
            print(f"\r{label:7s} [{'#' * int(30 * done):30s}] {step + 1}/{len(batches)} loss {losses[-1]:.4f}", end="",
                  flush=True)
    print()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    steady = sorted(times[len(times) // 5:])  # skip warm-up (compilation) steps
    return losses, steady[len(steady) // 2], peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="tiny sizes that run in seconds on a CPU")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--max-len", type=int)
    parser.add_argument("--items", type=int)
    parser.add_argument("--dim", type=int)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    toy = args.toy or device.type == "cpu"
    defaults = dict(steps=60, batch=32, max_len=32, items=500, dim=32) if toy else \
        dict(steps=300, batch=256, max_len=1024, items=4000, dim=256)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [make_batch(args.batch, args.max_len, args.items, 20, generator, device) for _ in range(args.steps)]
    tokens = sum(int(b[1][-1]) for b in batches) / args.steps
    print(f"{device.type.upper()}: {args.steps} steps of B={args.batch} histories (max_len {args.max_len}, "
          f"{tokens:.0f} items a batch, {100 * tokens / (args.batch * args.max_len):.0f}% of the padded size), "
          f"{args.items} items, dim {args.dim}, {args.heads} heads, {args.blocks} blocks")
    jagged_model = Recommender(args.items, args.dim, args.heads, args.blocks, padded=False).to(device)
    padded_model = Recommender(args.items, args.dim, args.heads, args.blocks, padded=True).to(device)
    padded_model.load_state_dict(copy.deepcopy(jagged_model.state_dict()))
    results = {"jagged": train(jagged_model, batches, args.lr, device, "jagged"),
               "padded": train(padded_model, batches, args.lr, device, "padded")}
    (jl, jt, jm), (pl, pt, pm) = results["jagged"], results["padded"]
    print("\nstep   jagged loss   padded loss")
    for step in sorted(set(list(range(0, args.steps, max(1, args.steps // 10))) + [args.steps - 1])):
        print(f"{step:4d}   {jl[step]:11.4f}   {pl[step]:11.4f}")
    gap = max(abs(a - b) for a, b in zip(jl, pl))
    print(f"largest loss difference over {args.steps} steps: {gap:.2e} "
          f"(first loss {jl[0]:.3f}, chance level {math.log(args.items):.3f})")
    memory = lambda m: "n/a on CPU" if m is None else f"{m:.0f} MiB"  # noqa: E731
    print(f"time/step: jagged {jt * 1000:.1f} ms, padded {pt * 1000:.1f} ms ({pt / jt:.2f}x)")
    print(f"peak memory: jagged {memory(jm)}, padded {memory(pm)}")
    return gap


if __name__ == "__main__":
    main()
