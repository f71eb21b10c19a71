"""Our RL step vs TRL's RLOOTrainer and GRPOTrainer step, side by side in one process.

What a user would pick instead of musicrl_jax for RLHF is TRL (PyTorch). For each size this
builds our policy (`OurStep` of rl_step.py: the real jitted `rl_step`, state threaded) and a
`transformers` Llama of the same width, depth, heads, head width and MLP width, whose vocabulary
is our codebooks x codebook size (so its LM head is the size of our K heads), and runs the
same prompts x samples x positions with the same KL coefficient, one update per batch, Adam,
on the same threads. TRL generates `positions` tokens per sample (EOS suppressed); we generate
`positions` frames of K codebook tokens each (the delay pattern's K - 1 extra steps included).

Alternating: each TRL trainer runs `--warmup + --runs` steps; after every one of its steps we
run one of ours (a `TrainerCallback`), so both see the same machine state. A TRL step is the
Trainer's whole step (generation, reward, reference and policy log-probs, backward, optimizer),
timed from `on_step_begin` to `on_step_end`. Figures: median over the timed steps.

Rewards: TRL gets a trivial token reward (share of completion tokens equal to 7); ours runs with
(a) the same kind of trivial reward (`toy_reward`) and (b) the real MusicRL-R combination (text
adherence + quality reward models on the sampled tokens).

Needs the benchmark extra: `pip install -r requirements-bench.lock` (CPU torch, transformers,
trl).

Usage:
  python benchmarks/rl_vs_trl.py                      # both sizes, 5 timed steps each
  python benchmarks/rl_vs_trl.py --sizes 64x2 --runs 7
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rl_step import OurStep, load_config, rl_step_flops  # noqa: E402  (the sibling benchmark)
from musicrl_jax import partitioning  # noqa: E402
from musicrl_jax.training import rl  # noqa: E402

# name: (our MusicLMConfig widths, positions per sample)
SIZES = {
    "64x2": (dict(embed_dim=64, num_heads=4, head_dim=16, mlp_dim=128, num_decoder_layers=2),
             250),
    "256x4": (dict(embed_dim=256, num_heads=4, head_dim=64, mlp_dim=1024,
                   num_decoder_layers=4), 100),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--prompts", type=int, default=8, help="prompts (captions) per step")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient (both sides)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--trainers", default="rloo,grpo")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown or args.runs < 1 or args.prompts < 1 or args.samples < 2:
        parser.error(f"--sizes must be among {list(SIZES)} (got {unknown}); --runs >= 1, "
                     "--prompts >= 1 and --samples >= 2 (RLOO needs two samples per prompt)")
    return args


def _trl_imports():
    try:
        import torch
        import transformers
        import trl
    except ImportError as err:
        raise SystemExit(f"rl_vs_trl: {err}. Fix: pip install -r requirements-bench.lock") from None
    return torch, transformers, trl


def write_llama(config, positions: int, directory: str):
    """A random Llama of our model's shape, and a word-level tokenizer of its vocabulary, saved
    where TRL loads them (it builds its reference model from the path)."""
    torch, transformers, _ = _trl_imports()
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab_size = config.num_codebooks * config.codebook_size
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.embed_dim,
        intermediate_size=config.mlp_dim, num_hidden_layers=config.num_decoder_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_caption_length + positions + 8,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    llama.save_pretrained(directory)
    words = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="t0", eos_token="t1", pad_token="t2",
        unk_token="t3").save_pretrained(directory)
    return vocab_size


def llama_step_flops(config, caption_length: int, positions: int, batch: int) -> float:
    """Model FLOPs of one TRL step on the Llama (`MusicLMTask.flops_per_example`'s convention):
    per sample a forward over prompt + completion to generate it, the reference's forward and
    the policy's forward + backward (with one update per batch TRL takes the old log-probs
    from the policy's own forward)."""
    length = caption_length + positions
    width = config.num_heads * config.head_dim
    layer = length * (4 * config.embed_dim * width + 3 * config.embed_dim * config.mlp_dim)
    layer += 2 * length * length * width
    head = length * config.embed_dim * config.num_codebooks * config.codebook_size
    forward = 2 * (config.num_decoder_layers * layer + head)
    return batch * 5 * forward


def best_matmul_flops_per_s(config, rows: int, runs: int = 5) -> float:
    """The best FLOP/s a jitted float32 matmul reaches here at the model's projection, MLP and
    head shapes ([rows, in] x [in, out]): an optimistic ceiling for any step of this size, so
    the fastest of `runs` calls, not the median."""
    shapes = [(config.embed_dim, config.mlp_dim), (config.mlp_dim, config.embed_dim),
              (config.embed_dim, config.num_heads * config.head_dim),
              (config.embed_dim, config.num_codebooks * config.codebook_size)]
    matmul = jax.jit(jnp.matmul)
    best = 0.0
    for inner, outer in shapes:
        a, b = jnp.ones((rows, inner), jnp.float32), jnp.ones((inner, outer), jnp.float32)
        jax.block_until_ready(matmul(a, b))
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            jax.block_until_ready(matmul(a, b))
            times.append(time.perf_counter() - start)
        best = max(best, 2 * rows * inner * outer / min(times))
    return best


def trivial_reward(completion_ids, **_):
    return [sum(1 for t in ids if t == 7) / max(len(ids), 1) for ids in completion_ids]


def time_trl(kind: str, model_dir: str, vocab_size: int, caption_length: int, positions: int,
             args, after_each_step) -> list[float]:
    """Step times (s) of TRL's `kind` trainer; `after_each_step()` runs after each of them."""
    torch, transformers, trl = _trl_imports()
    import datasets
    import numpy as np
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"t{i}" for i in rng.integers(4, vocab_size, caption_length))
               for _ in range(args.prompts * (args.warmup + args.runs))]
    config_cls, trainer_cls = {"rloo": (trl.RLOOConfig, trl.RLOOTrainer),
                               "grpo": (trl.GRPOConfig, trl.GRPOTrainer)}[kind]
    batch = args.prompts * args.samples
    config = config_cls(
        output_dir=os.path.join(model_dir, kind), per_device_train_batch_size=batch,
        num_generations=args.samples, max_completion_length=positions,
        generation_kwargs={"min_new_tokens": positions}, beta=args.beta, learning_rate=1e-5,
        num_iterations=1, steps_per_generation=1, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.runs, temperature=1.0, top_p=1.0, top_k=0,
        logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        shuffle_dataset=False, seed=0, disable_tqdm=True)
    times = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)
            after_each_step()

    trainer = trainer_cls(
        model=model_dir, reward_funcs=trivial_reward, args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
        callbacks=[Timer()])
    trainer.train()
    return times[args.warmup:]


def bench_size(name: str, args) -> dict:
    widths, positions = SIZES[name]
    config = dataclasses.replace(load_config("tiny", positions), **widths)
    rl_config = rl.RLConfig(samples_per_caption=args.samples, num_frames=positions,
                            beta=args.beta)
    ours = {reward: OurStep(config, rl_config, args.prompts, reward=reward)
            for reward in ("toy", "real")}
    for step in ours.values():  # compile
        step.step()
    our_times = {reward: [] for reward in ours}

    def one_of_ours():
        for reward, step in ours.items():
            start = time.perf_counter()
            step.step()
            our_times[reward].append(time.perf_counter() - start)

    batch = ours["toy"].batch
    row = {"size": name, "embed": config.embed_dim, "layers": config.num_decoder_layers,
           "positions": positions, "samples_per_step": batch}
    with tempfile.TemporaryDirectory() as model_dir:
        vocab_size = write_llama(config, positions, model_dir)
        for kind in [k.strip() for k in args.trainers.split(",") if k.strip()]:
            trl_times = time_trl(kind, model_dir, vocab_size, config.max_caption_length,
                                 positions, args, one_of_ours)
            row[f"trl_{kind}_step_s"] = statistics.median(trl_times)
    for reward, times in our_times.items():
        # The calls during TRL's warm-up steps are warm too (ours compiled first).
        row[f"ours_{reward}_step_s"] = statistics.median(times)
    row["ours_gflop_per_step"] = rl_step_flops(config, positions, batch) / 1e9
    row["trl_gflop_per_step"] = llama_step_flops(config, config.max_caption_length, positions,
                                                 batch) / 1e9
    # At the best matmul rate, with nothing else costing time: the fastest our step could be.
    row["best_matmul_gflop_per_s"] = best_matmul_flops_per_s(
        config, batch * (positions + config.num_codebooks - 1)) / 1e9
    row["ours_floor_step_s"] = row["ours_gflop_per_step"] / row["best_matmul_gflop_per_s"]
    for key in [k for k in row if k.endswith("_step_s")]:
        row[key.replace("_step_s", "_samples_per_s")] = batch / row[key]
    return row


def main(argv=None):
    args = parse_args(argv)
    partitioning.use_cpu_cores()  # the CPU devices the CLI (musicrl_jax.main) runs on
    rows = []
    for name in args.sizes.split(","):
        row = bench_size(name, args)
        rows.append(row)
        trls = [k[4:-14] for k in row if k.startswith("trl_") and k.endswith("_samples_per_s")]
        print(f"width {row['embed']}, {row['layers']} layers, {args.prompts} prompts x "
              f"{args.samples} samples x {row['positions']} positions ({row['samples_per_step']}"
              f" samples/step), beta {args.beta}, median of {args.runs}:", flush=True)
        for reward in ("toy", "real"):
            ours = row[f"ours_{reward}_samples_per_s"]
            ratios = ", ".join(f"{ours / row[f'trl_{t}_samples_per_s']:.2f}x TRL {t.upper()}"
                               for t in trls)
            print(f"  ours ({'trivial' if reward == 'toy' else 'MusicRL-R'} reward): "
                  f"{ours:.1f} samples/s (step {row[f'ours_{reward}_step_s']:.3f} s) = "
                  f"{ratios}", flush=True)
        for t in trls:
            print(f"  TRL {t.upper()} (trivial reward): {row[f'trl_{t}_samples_per_s']:.1f} "
                  f"samples/s (step {row[f'trl_{t}_step_s']:.3f} s)", flush=True)
        floor = row["ours_floor_step_s"]
        print(f"  model GFLOP per step: ours {row['ours_gflop_per_step']:.1f}, TRL "
              f"{row['trl_gflop_per_step']:.1f}; best matmul here "
              f"{row['best_matmul_gflop_per_s']:.0f} GFLOP/s, so our step takes >= "
              f"{floor:.3f} s: at most "
              + ", ".join(f"{row[f'trl_{t}_step_s'] / floor:.1f}x TRL {t.upper()}"
                          for t in trls), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
