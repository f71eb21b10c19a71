"""Full-sequence causal self-attention on the CPU: our `layers.Attention` against torch's
`scaled_dot_product_attention`, at the shapes of the RL step's teacher-forced passes.

Times, for one layer, the attention core only (the projections are plain matmuls both
libraries run at similar rates): ours = the `Attention` module's causal path (scores, softmax
and weighted values by blocks of queries) on given projected queries/keys/values (RoPE off;
its output projection is an identity, batch x length x (heads x head_dim)^2 x 2 FLOPs that
torch does not pay), jitted, forward and forward + backward; torch = SDPA (is_causal), forward
and forward + backward.
Median of --runs after one untimed call each (`rl_step.timed`).

Needs torch (`pip install -r requirements-bench.lock`).

Usage:
  python benchmarks/attention.py                                # RL step at width 64: 253 steps
  python benchmarks/attention.py --length 103 --head_dim 64     # width 256: 103 steps
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rl_step import timed  # noqa: E402  (the sibling benchmark's timer)
from musicrl_jax.errors import report_user_errors  # noqa: E402
from musicrl_jax.models.layers import Attention  # noqa: E402

PROG = "python benchmarks/attention.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=253)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=16)
    parser.add_argument("--runs", type=int, default=10)
    return parser.parse_args(argv)


def attention_core(query, key, value):
    """`Attention.__call__`'s core on projected [batch, length, heads, head_dim] inputs, through
    the module's own code path (its projections replaced by the identity)."""
    class Core(Attention):
        def _project(self, name, x):
            return {"query": query, "key": key, "value": value}[name]

        def _output(self, attended, features):
            # No output projection: the attended values, heads concatenated.
            batch, _, length, _ = attended.shape
            return jnp.swapaxes(attended, 1, 2).reshape(batch, length, -1)

    core = Core(query.shape[2], query.shape[3], positions="none")
    x = jnp.zeros(query.shape[:2] + (1,), jnp.float32)
    return core.apply({}, x, causal=True)


@report_user_errors(PROG)
def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
    except ImportError as err:
        raise SystemExit(f"{PROG}: {err}. Fix: pip install -r requirements-bench.lock") from None
    rng = np.random.default_rng(0)
    shape = (args.batch, args.length, args.heads, args.head_dim)
    arrays = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    q, k, v = (jnp.asarray(a) for a in arrays)
    forward = jax.jit(attention_core)
    backward = jax.jit(jax.grad(lambda q, k, v: attention_core(q, k, v).sum(), (0, 1, 2)))
    tq, tk, tv = (torch.tensor(a).transpose(1, 2).contiguous().requires_grad_() for a in arrays)
    expected = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    ours = np.asarray(forward(q, k, v)).reshape(shape)
    np.testing.assert_allclose(ours, expected.detach().transpose(1, 2).numpy(), atol=1e-4)

    def torch_backward():
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        out.sum().backward()

    with torch.no_grad():
        torch_forward = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, is_causal=True), args.runs)
    seconds = {"ours forward": timed(lambda: forward(q, k, v), args.runs),
               "torch SDPA forward": torch_forward,
               "ours forward + backward": timed(lambda: backward(q, k, v), args.runs),
               "torch SDPA forward + backward": timed(torch_backward, args.runs)}
    rows = {name: s * 1e3 for name, s in seconds.items()}
    print(f"causal self-attention, batch {args.batch}, {args.length} positions, {args.heads} "
          f"heads x {args.head_dim} (one layer), median of {args.runs}:")
    for name, ms in rows.items():
        print(f"  {name:30s} {ms:7.1f} ms")
    return rows


if __name__ == "__main__":
    main()
