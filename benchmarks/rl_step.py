"""Benchmark of one MusicRL step: samples/s and where the time goes (sample / score / update).

For each model size, builds the real step (`rl.make_rl_step` jitted by `rl.jit_rl_step` on a
mesh over the available devices) with the MusicRL-R reward (text-adherence dual encoder +
quality regressor, randomly initialised: their cost does not depend on their weights) and times

  sample  jit(decoding.sample) of the policy: KV-cache sampling of every clip;
  score   jit(reward_fn + teacher-forced log-probs under the reference and the policy): what
          the step computes on the samples before differentiating;
  step    the whole rl_step (sample + score + backward + optimizer update),
  update  = step - sample - score (backward, optimizer; the residual of the two above).

Every figure excludes compilation (one untimed call first) and is the median of --runs calls,
each ended by block_until_ready. samples/s = captions x samples_per_caption / step time. On a
GPU/TPU the MFU of the step is reported too (model FLOPs, `rl_step_flops`: sampling counts
a forward per token, the reference's log-probs a forward, the update a forward + backward
of the policy, from `MusicLMTask.flops_per_example`), against --peak_tflops per device.

Usage:
  python benchmarks/rl_step.py                          # tiny and small on this machine
  python benchmarks/rl_step.py --models tiny --frames 250 --captions 8
  python benchmarks/rl_step.py --models base --frames 250 --captions 16 --peak_tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from decode import MACROS, model_gin_file  # noqa: E402  (the sibling benchmark's model loading)
from musicrl_jax.errors import report_user_errors  # noqa: E402
from musicrl_jax import decoding, partitioning  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402
from musicrl_jax.rewards import RewardCombination, RewardModel  # noqa: E402
from musicrl_jax.training import rl  # noqa: E402
from musicrl_jax.training.reward_tasks import QualityRewardTask, TextRewardTask  # noqa: E402
from musicrl_jax.training.tasks import MusicLMTask  # noqa: E402

# Per size: frames per clip and captions per step that fit a 2-core CPU run in ~a minute.
CPU_DEFAULTS = {"tiny": (250, 8), "small": (100, 2), "base": (100, 2), "large": (50, 2)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,small", help="comma-separated model sizes")
    parser.add_argument("--frames", type=int, default=0, help="frames per clip (0: per-size "
                        "default, 250 = 5 s for tiny)")
    parser.add_argument("--captions", type=int, default=0, help="captions per step (0: default)")
    parser.add_argument("--samples_per_caption", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="per-device peak TFLOP/s for MFU (default: from the device kind)")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    return parser.parse_args(argv)


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "v5 lite": 197.0, "v4": 275.0}


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), 0.0)


def load_config(size: str, frames: int) -> music_lm.MusicLMConfig:
    gin.clear_config()
    bindings = [f"{k} = {v}" for k, v in {**MACROS, "MAX_FRAMES": frames}.items()]
    gin.parse_config_files_and_bindings([model_gin_file(size)], bindings)
    return music_lm.MusicLMConfig()


def timed(fn, runs: int) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def toy_reward(params, caption_tokens, audio_codes, audio_mask=None):
    """A trivial token reward (share of first-codebook tokens equal to 7), like TRL examples'."""
    del params, caption_tokens, audio_mask
    reward = (audio_codes[..., 0] == 7).mean(-1).astype(jnp.float32)
    return reward, {"toy": reward}


def musicrl_r_reward(config: music_lm.MusicLMConfig, key) -> RewardCombination:
    """MusicRL-R's text-adherence + quality combination, randomly initialised (their cost does
    not depend on their weights)."""
    tasks = {"text": TextRewardTask(config=config, num_audio_layers=1, projection_dim=64),
             "quality": QualityRewardTask(config=config, num_audio_layers=1)}
    return RewardCombination(
        rewards={name: RewardModel(task, partitioning.unbox(task.fresh_params(key)))
                 for name, task in tasks.items()},
        weights={"text": 1.0, "quality": 1.0},
        reference_stats={"text": {"mean": 0.0, "std": 1.0}, "quality": {"mean": 3.0, "std": 1.0}})


def rl_step_flops(config: music_lm.MusicLMConfig, frames: int, batch: int) -> float:
    """Model FLOPs of one RL step: per sample a forward to sample it, the reference's
    teacher-forced forward and the update's forward + backward (`rl.make_rl_step`: the update's
    forward also gives the old log-probs)."""
    example = {"audio_codes": np.zeros((1, frames, config.num_codebooks)),
               "caption_tokens": np.zeros((1, config.max_caption_length), np.int32)}
    train_flops = MusicLMTask(train_source=None, eval_source=None,
                              config=config).flops_per_example(example)  # 3 x forward
    return batch * (2 * train_flops / 3 + train_flops)


class OurStep:
    """The real jitted RL step on a mesh over the available devices, state threaded from call
    to call (each call is one update, as in training), plus its sample and score parts alone.
    reward: "real" (MusicRL-R) or "toy" (`toy_reward`)."""

    def __init__(self, config: music_lm.MusicLMConfig, rl_config: rl.RLConfig, captions: int,
                 reward: str = "real"):
        self.mesh = partitioning.make_mesh()
        self.captions = max(captions, partitioning.batch_divisor(self.mesh))
        self.batch = self.captions * rl_config.samples_per_caption
        self.key = key = jax.random.PRNGKey(0)
        self.params = partitioning.unbox(music_lm.init_params(config, key))
        if reward == "real":
            combination = musicrl_r_reward(config, key)
            reward_fn, reward_params = combination.reward_fn, combination.params
        else:
            reward_fn, reward_params = toy_reward, {}
        tx = optax.adam(1e-5)
        caption_tokens = np.random.default_rng(0).integers(
            2, config.caption_vocab_size, (self.captions, config.max_caption_length)
        ).astype(np.int32)
        caption_tokens[:, -1] = decoding.EOS_ID
        self.caption_tokens = caption_tokens
        frames = rl_config.num_frames
        with partitioning.mesh_context(self.mesh):
            self.state, state_shardings, param_shardings = rl.create_rl_state(
                config, tx, self.params, self.mesh, rl_config)
            self.reference = jax.device_put(self.params, param_shardings)
            reward_shardings = rl.existing_shardings(reward_params, self.mesh)
            self.reward_params = jax.device_put(reward_params, reward_shardings)
            self._step = rl.jit_rl_step(rl.make_rl_step(config, tx, reward_fn, rl_config),
                                        state_shardings, param_shardings, self.mesh,
                                        reward_shardings, donate_state=False)
            repeated = np.repeat(caption_tokens, rl_config.samples_per_caption, axis=0)
            self.repeated = partitioning.shard_batch({"c": repeated}, self.mesh)["c"]
            self.sharded_captions = partitioning.shard_batch({"c": caption_tokens},
                                                             self.mesh)["c"]
            self.rngs = decoding.example_rngs(key, self.batch)
            self._sample = jax.jit(lambda p, c, r: decoding.sample(
                config, p, c, r, num_frames=frames, sampling=rl_config.sampling)["codes"])

            def score_fn(p, ref, rp, c, codes):
                total, _ = reward_fn(rp, c, codes)
                ref_lp, _, _ = rl.policy_token_stats(config, ref, c, codes)
                lp, _, _ = rl.policy_token_stats(config, p, c, codes)
                return total, ref_lp.sum(), lp.sum()

            self._score = jax.jit(score_fn)
        self.calls = 0

    def step(self):
        """One RL step (sample, score, update); blocks until done."""
        with partitioning.mesh_context(self.mesh):
            self.calls += 1
            self.state, metrics = self._step(self.state, self.reference, self.reward_params,
                                             self.sharded_captions,
                                             jax.random.fold_in(self.key, self.calls))
            return jax.block_until_ready(metrics)

    def sample(self):
        with partitioning.mesh_context(self.mesh):
            return jax.block_until_ready(self._sample(self.state.params, self.repeated,
                                                      self.rngs))

    def score(self, codes):
        with partitioning.mesh_context(self.mesh):
            return jax.block_until_ready(self._score(
                self.state.params, self.reference, self.reward_params, self.repeated, codes))


def bench_size(size: str, args) -> dict:
    frames, captions = CPU_DEFAULTS.get(size, (100, 2))
    frames, captions = args.frames or frames, args.captions or captions
    config = load_config(size, frames)
    rl_config = rl.RLConfig(samples_per_caption=args.samples_per_caption, num_frames=frames)
    ours = OurStep(config, rl_config, captions)
    mesh, captions, batch, params = ours.mesh, ours.captions, ours.batch, ours.params
    codes = ours.sample()
    t_sample = timed(ours.sample, args.runs)
    t_score = timed(lambda: ours.score(codes), args.runs)
    t_step = timed(ours.step, args.runs)

    step_flops = rl_step_flops(config, frames, batch)
    result = {"model": size, "params_M": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
              "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
              "mesh": dict(mesh.shape), "frames": frames, "captions": captions,
              "samples_per_step": batch, "sample_s": t_sample, "score_s": t_score,
              "update_s": max(t_step - t_sample - t_score, 0.0), "step_s": t_step,
              "samples_per_s": batch / t_step,
              "tokens_per_s": batch * frames * config.num_codebooks / t_step,
              "model_tflops_per_step": step_flops / 1e12}
    peak = peak_tflops(args)
    if peak and jax.devices()[0].platform != "cpu":
        result["mfu"] = step_flops / t_step / jax.device_count() / (peak * 1e12)
    return result


@report_user_errors("python benchmarks/rl_step.py")
def main(argv=None):
    args = parse_args(argv)
    partitioning.use_cpu_cores()  # the CPU devices the CLI (musicrl_jax.main) runs on
    rows = []
    for size in [s.strip() for s in args.models.split(",") if s.strip()]:
        row = bench_size(size, args)
        rows.append(row)
        split = " / ".join(f"{row[k]:.3f}" for k in ("sample_s", "score_s", "update_s"))
        print(f"{size:6s} {row['params_M']:.1f}M params, {row['devices']}, {row['captions']} "
              f"captions x {args.samples_per_caption} samples x {row['frames']} frames: "
              f"step {row['step_s']:.3f} s = {row['samples_per_s']:.1f} samples/s "
              f"({row['tokens_per_s']:.0f} tokens/s); sample / score / update {split} s"
              + (f"; MFU {row['mfu']:.1%}" if "mfu" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
