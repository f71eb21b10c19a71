"""Memory of one RL step, full fine-tuning vs LoRA, from XLA's compiled memory analysis.

Compiles (never runs) the real jitted step (`rl.make_rl_step` + `rl.jit_rl_step`, state donated
as in `train_rl`) on abstract inputs, so a `base`-size model needs no memory to measure: the
figures are what the compiled program would allocate on this backend's device.

  arguments  state (trainable params + Adam moments) + frozen reference + captions
  temp       activations, sampled clips, gradients, merged LoRA kernels (the step's scratch)
  total      arguments + outputs - donated aliases + temp

Full fine-tuning keeps the policy, the reference and two Adam moments: ~4 copies of the weights.
With LoRA the state holds the adapters only and the frozen reference is the base: ~1 copy.
A toy reward (no reward models) isolates the LM.

Usage:
  python benchmarks/rl_memory.py                       # base, 250 frames, 2 captions x 4
  python benchmarks/rl_memory.py --models tiny,base --rank 16
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from rl_step import load_config, toy_reward  # noqa: E402  (the sibling benchmark's)
from musicrl_jax.errors import report_user_errors  # noqa: E402
from musicrl_jax import partitioning  # noqa: E402
from musicrl_jax.models import lora as lora_lib  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402
from musicrl_jax.training import rl  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="base", help="comma-separated model sizes")
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--captions", type=int, default=2)
    parser.add_argument("--samples_per_caption", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    return parser.parse_args(argv)


def compiled_memory(config, rl_config, captions, lora=None, mesh=None, reward_fn=toy_reward,
                    reward_params=None) -> dict:
    """Per-device figures of the compiled step on `mesh` (default: one device); reward_params
    (abstract or real) are replicated."""
    mesh = mesh or partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    reward_params = {} if reward_params is None else reward_params
    tx = optax.adam(1e-5)
    replicated = NamedSharding(mesh, PartitionSpec())
    reward_shardings = jax.tree.map(lambda _: replicated, reward_params)
    param_shardings = rl.lm_param_shardings(config, mesh)
    abstract_params = jax.eval_shape(
        lambda r: partitioning.unbox(music_lm.init_params(config, r)), jax.random.PRNGKey(0))
    with partitioning.mesh_context(mesh):
        abstract_state, state_shardings = rl.abstract_rl_state(config, tx, mesh, rl_config,
                                                               lora=lora)
        step = rl.jit_rl_step(rl.make_rl_step(config, tx, reward_fn, rl_config, lora),
                              state_shardings, param_shardings, mesh, reward_shardings)
        caption_spec = jax.ShapeDtypeStruct((captions, config.max_caption_length), jnp.int32)
        compiled = step.lower(abstract_state, abstract_params, reward_params, caption_spec,
                              jax.random.PRNGKey(0)).compile()
    analysis = compiled.memory_analysis()
    trainable = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    frozen = (tree_bytes_per_device(abstract_params, param_shardings)
              + tree_bytes_per_device(reward_params, reward_shardings))
    return {"trainable_M": trainable / 1e6,
            "state_GiB": tree_bytes_per_device(abstract_state, state_shardings) / 2**30,
            "frozen_GiB": frozen / 2**30,
            "arguments_GiB": analysis.argument_size_in_bytes / 2**30,
            "temp_GiB": analysis.temp_size_in_bytes / 2**30,
            "total_GiB": (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
            / 2**30}


def tree_bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of `tree` laid out by `shardings`."""
    return sum(int(jnp.dtype(leaf.dtype).itemsize) * math.prod(sharding.shard_shape(leaf.shape))
               for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


@report_user_errors("python benchmarks/rl_memory.py")
def main(argv=None):
    args = parse_args(argv)
    rows = []
    for size in [s.strip() for s in args.models.split(",") if s.strip()]:
        config = load_config(size, args.frames)
        rl_config = rl.RLConfig(samples_per_caption=args.samples_per_caption,
                                num_frames=args.frames)
        params_m = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
            functools.partial(music_lm.init_params, config), jax.random.PRNGKey(0)))) / 1e6
        for name, lora in (("full", None), (f"LoRA r={args.rank}",
                                            lora_lib.LoRAConfig(rank=args.rank))):
            row = {"model": size, "params_M": params_m, "mode": name,
                   **compiled_memory(config, rl_config, args.captions, lora)}
            rows.append(row)
            print(f"{size:5s} {params_m:.1f}M params, {name:10s}: trainable "
                  f"{row['trainable_M']:.2f}M, arguments {row['arguments_GiB']:.3f} GiB, "
                  f"temp {row['temp_GiB']:.3f} GiB, total {row['total_GiB']:.3f} GiB "
                  f"({args.captions} captions x {args.samples_per_caption} samples x "
                  f"{args.frames} frames, {jax.devices()[0].platform})", flush=True)
    return rows


if __name__ == "__main__":
    main()
