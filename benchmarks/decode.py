"""Benchmark of batched sampling throughput: KV cache vs full recompute vs transformers.

For one model size, batch and length, times
  1. ``musicrl_jax.decoding.sample(..., use_cache=True)``  (KV cache, the production path),
  2. ``musicrl_jax.decoding.sample(..., use_cache=False)`` (recomputes the whole prefix every
     step; the baseline the cache has to beat),
  3. Hugging Face ``transformers`` ``generate`` (PyTorch, CPU, its own KV cache) on a randomly
     initialised Llama decoder of the same width, depth, heads, MLP size, vocabulary (see
     ``build_llama``), batch and number of decode steps.

Each figure excludes compilation/warm-up: every method is called once untimed first, then
``--runs`` (>= 3) timed rounds call each method once in turn (interleaved, so a change in
background load hits all alike) and the median is reported. A JAX call ends in
``block_until_ready``; ``generate`` is synchronous on CPU. torch runs once per ``--torch_threads``
value (default: all cores, then 1) and the ratio is taken against the fastest: on a loaded
machine torch's OpenMP threads can slow down many-fold.

Units:
  * steps/s  = batch x decode steps / second: the like-for-like figure for both libraries (one
    decoder forward per sequence per step);
  * tokens/s = steps/s x tokens emitted per step: ``num_codebooks`` for ours (one step predicts
    all K codebooks of a delayed frame), 1 for the transformers model.
  Decode steps = frames + K - 1 (the delay pattern), and the transformers model generates the
  same number of new tokens.

Usage:
  python benchmarks/decode.py                                  # tiny model, batch 8, 200 frames
  python benchmarks/decode.py --embed_dim 256 --layers 4 --head_dim 64 --frames 150
  python benchmarks/decode.py --model small --dtype float32 --frames 100 --skip_no_cache
  python benchmarks/decode.py --skip_transformers --json /tmp/decode.json

torch/transformers are optional: ``pip install -e .[bench]`` (torch==2.13.0, transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax.linen import meta  # noqa: E402

from musicrl_jax import decoding  # noqa: E402
from musicrl_jax.errors import ConfigError, report_user_errors  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402  (registers MusicLMConfig with gin)

PROG = "python benchmarks/decode.py"
INSTALL_HINT = ("torch/transformers not installed; install them with `pip install -e .[bench]` "
                "(torch==2.13.0, transformers) to get the transformers comparison.")
# Macros the model size files expect (normally bound by a gin_configs/data/*.gin file).
MACROS = {"CAPTION_VOCAB_SIZE": 256, "CAPTION_LENGTH": 32, "CODEBOOK_SIZE": 256,
          "NUM_CODEBOOKS": 4}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help="model size: a file name in gin_configs/models/ (tiny, small, base, "
                             "large) or a path to a gin file binding MusicLMConfig")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=200,
                        help="audio frames to sample (50 fps: 200 = 4 s); decode steps = "
                             "frames + num_codebooks - 1")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method (median; >= 3)")
    parser.add_argument("--embed_dim", type=int, help="override MusicLMConfig.embed_dim; unless "
                        "also given, num_heads = embed_dim // head_dim and mlp_dim = 2 * embed_dim")
    parser.add_argument("--layers", type=int, help="override MusicLMConfig.num_decoder_layers")
    parser.add_argument("--num_heads", type=int, help="override MusicLMConfig.num_heads")
    parser.add_argument("--head_dim", type=int, help="override MusicLMConfig.head_dim")
    parser.add_argument("--mlp_dim", type=int, help="override MusicLMConfig.mlp_dim")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="override MusicLMConfig.dtype (the transformers model uses the same)")
    parser.add_argument("--torch_threads", default=None,
                        help="comma-separated torch.set_num_threads values, one transformers run "
                             "each (default: '<all cores>,1'; the ratio uses the fastest, since "
                             "torch's OpenMP threads collapse when other processes load the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_transformers", action="store_true",
                        help="only time the two musicrl_jax samplers")
    parser.add_argument("--skip_no_cache", action="store_true",
                        help="skip the full-recompute baseline (slow for long sequences)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be >= 3 (the median of at least three runs is reported)")
    if args.batch < 1 or args.frames < 1:
        parser.error("--batch and --frames must be positive")
    cores = os.cpu_count() or 1
    try:
        threads = [int(t) for t in (args.torch_threads or f"{cores},1").split(",") if t.strip()]
    except ValueError:
        parser.error(f"--torch_threads={args.torch_threads!r}: expected integers, e.g. 2,1")
    if not threads or min(threads) < 1:
        parser.error("--torch_threads: give at least one positive thread count")
    args.torch_threads = list(dict.fromkeys(threads))  # de-duplicated, order kept
    return args


def model_gin_file(model: str) -> str:
    if os.path.isfile(model):
        return model
    name = model if model.endswith(".gin") else f"{model}.gin"
    path = os.path.join(REPO_ROOT, "gin_configs", "models", name)
    if not os.path.isfile(path):
        available = sorted(f[:-4] for f in os.listdir(os.path.join(REPO_ROOT, "gin_configs",
                                                                   "models")) if f.endswith(".gin"))
        raise ConfigError(f"--model={model}: no {path}. Fix: choose one of {available} or give "
                          "the path of a model gin file.")
    return path


def load_config(args) -> music_lm.MusicLMConfig:
    """MusicLMConfig from the model size file plus the macros and the command-line overrides."""
    bindings = [f"{name} = {value}" for name, value in {**MACROS, "MAX_FRAMES": args.frames}.items()]
    gin.clear_config()
    gin.parse_config_files_and_bindings([model_gin_file(args.model)], bindings)
    config = music_lm.MusicLMConfig()
    overrides = {}
    if args.head_dim:
        overrides["head_dim"] = args.head_dim
    head_dim = overrides.get("head_dim", config.head_dim)
    if args.embed_dim:
        overrides["embed_dim"] = args.embed_dim
        overrides["num_heads"] = max(1, args.embed_dim // head_dim)
        overrides["mlp_dim"] = 2 * args.embed_dim
    if args.num_heads:
        overrides["num_heads"] = args.num_heads
    if args.mlp_dim:
        overrides["mlp_dim"] = args.mlp_dim
    if args.layers:
        overrides["num_decoder_layers"] = args.layers
    if args.dtype:
        overrides["dtype"] = args.dtype
    # Sampling never differentiates; remat only matters for training.
    overrides["remat"] = "none"
    return dataclasses.replace(config, **overrides)


@dataclasses.dataclass
class Method:
    """One timed sampler: `run()` must block until its result is ready."""
    name: str
    run: Callable[[], Any]
    tokens_per_step: int
    check: Callable[[Any], None]
    info: dict = dataclasses.field(default_factory=dict)


def time_methods(methods, runs: int, batch: int, steps: int):
    """Warms every method up once (compilation, lazy initialisation; timed as '1st call'), then
    times `runs` rounds, each round calling every method once in turn, so that a change in
    background load hits all methods alike. Returns one figures dict per method."""
    warmups = []
    for method in methods:
        start = time.perf_counter()
        method.check(method.run())
        warmups.append(time.perf_counter() - start)
    times = [[] for _ in methods]
    for _ in range(runs):
        for method, method_times in zip(methods, times):
            start = time.perf_counter()
            method.run()
            method_times.append(time.perf_counter() - start)
    results = []
    for method, warmup, method_times in zip(methods, warmups, times):
        median = statistics.median(method_times)
        steps_per_s = batch * steps / median
        results.append({
            "name": method.name, "batch": batch, "decode_steps": steps,
            "tokens_per_step": method.tokens_per_step, "median_s": median,
            "min_s": min(method_times), "run_s": method_times, "warmup_s": warmup,
            "steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * method.tokens_per_step,
            **method.info})
    return results


def sample_inputs(config, batch: int, seed: int):
    """(captions, per-example rngs) the JAX samplers are timed on."""
    caption_rng, sample_rng = jax.random.split(jax.random.PRNGKey(seed))
    # Random non-padding captions of full length (ids 0 = padding, 1 = EOS).
    captions = jax.random.randint(caption_rng, (batch, config.max_caption_length), 2,
                                  config.caption_vocab_size, jnp.int32)
    return captions, decoding.example_rngs(sample_rng, batch)


def jax_method(config, params, batch: int, frames: int, use_cache: bool, seed: int) -> Method:
    captions, rngs = sample_inputs(config, batch, seed)

    def run():
        out = decoding.sample(config, params, captions, rngs, num_frames=frames, use_cache=use_cache)
        return jax.block_until_ready(out)

    def check(out):
        assert out["codes"].shape == (batch, frames, config.num_codebooks), out["codes"].shape

    name = "musicrl_jax KV cache" if use_cache else "musicrl_jax no cache"
    return Method(name, run, config.num_codebooks, check)


def build_llama(config, torch):
    """A randomly initialised LlamaForCausalLM shaped like our decoder.

    Same width (hidden_size = embed_dim), depth, attention heads (no grouped-query sharing),
    head_dim, gated MLP (Llama's is 3 matrices like ours; tanh-GELU as flax's nn.gelu default),
    RMSNorm, RoPE (theta 10000 like ours).
    vocab_size = codebook_size * num_codebooks: our decoder emits K heads of codebook_size logits
    at every step, i.e. an [embed, K * codebook_size] output projection and K * codebook_size
    logits to normalise and sample from; a single vocabulary of that size is the closest FLOP
    (and sampling-work) match. (vocab = codebook_size would undercount our output layer by K x.)
    The transformers model has no text encoder and no cross-attention, so it does strictly less
    work per step than ours.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = config.codebook_size * config.num_codebooks
    llama_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=config.embed_dim,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_decoder_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        head_dim=config.head_dim,
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=config.decode_length + 8,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        # A real EOS id so that min_new_tokens is enforced (EOS is masked until step L).
        eos_token_id=vocab - 1,
        pad_token_id=0,
        use_cache=True,
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    model = LlamaForCausalLM(llama_config).to(dtype)
    model.eval()
    return model


def transformers_methods(config, batch: int, steps: int, seed: int, thread_counts):
    """One Method per torch thread count for transformers' generate; [] (after printing the
    install hint) if torch/transformers are missing."""
    try:
        import torch
        import transformers
    except ImportError:
        print(INSTALL_HINT)
        return []
    torch.manual_seed(seed)
    model = build_llama(config, torch)
    input_ids = torch.zeros((batch, 1), dtype=torch.long)  # BOS
    attention_mask = torch.ones_like(input_ids)

    def make_run(threads):
        def run():
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      max_new_tokens=steps, min_new_tokens=steps, do_sample=True,
                                      top_k=0, top_p=1.0, temperature=1.0, use_cache=True)
        return run

    def check(out):
        assert tuple(out.shape) == (batch, 1 + steps), tuple(out.shape)

    info = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
            "vocab_size": model.config.vocab_size,
            "params": sum(p.numel() for p in model.parameters())}
    return [Method(f"transformers {threads} thr", make_run(threads), 1, check,
                   {**info, "torch_threads": threads}) for threads in thread_counts]


def num_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@report_user_errors(PROG)
def main(argv=None):
    args = parse_args(argv)
    config = load_config(args)
    steps = args.frames + config.num_codebooks - 1
    params = meta.unbox(music_lm.init_params(config, jax.random.PRNGKey(args.seed)))
    decoder_params = num_params({k: v for k, v in params.items() if k.startswith("decoder_")})

    overridden = [flag for flag in ("embed_dim", "layers", "num_heads", "head_dim", "mlp_dim",
                                    "dtype") if getattr(args, flag)]
    label = args.model + (f" (overriding {', '.join(overridden)})" if overridden else "")
    print(f"model: {label} {config}")
    print(f"params: {num_params(params):,} total, {decoder_params:,} in decoder layers; "
          f"batch {args.batch}, {args.frames} frames -> {steps} decode steps x "
          f"{config.num_codebooks} codebooks")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)); "
          f"host {platform.machine()} with {os.cpu_count()} CPU cores")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores before starting: other "
              "processes compete for the CPU, so the figures will be noisy (torch's multi-threaded "
              "runs suffer most).")
    methods = [jax_method(config, params, args.batch, args.frames, True, args.seed)]
    if not args.skip_no_cache:
        methods.append(jax_method(config, params, args.batch, args.frames, False, args.seed))
    if not args.skip_transformers:
        methods += transformers_methods(config, args.batch, steps, args.seed, args.torch_threads)
    results = time_methods(methods, args.runs, args.batch, steps)
    hf_runs = [r for r in results if r["name"].startswith("transformers")]
    # Compare against transformers' best thread setting (the conservative choice).
    hf = max(hf_runs, key=lambda r: r["steps_per_s"]) if hf_runs else None

    print()
    header = (f"{'method':<24}{'median s':>10}{'min s':>9}{'1st call s':>11}{'steps/s':>12}"
              f"{'tokens/s':>12}  tok/step")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['name']:<24}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['warmup_s']:>11.2f}"
              f"{r['steps_per_s']:>12,.0f}{r['tokens_per_s']:>12,.0f}  {r['tokens_per_step']:>8}")
    print()

    ratios = {}
    cache = results[0]
    by_name = {r["name"]: r for r in results}
    if "musicrl_jax no cache" in by_name:
        ratios["cache_over_no_cache"] = cache["steps_per_s"] / by_name["musicrl_jax no cache"][
            "steps_per_s"]
        print(f"cache / no-cache:           {ratios['cache_over_no_cache']:.2f}x  "
              "(same model, same tokens)")
    if hf is not None:
        ratios["cache_over_transformers_steps"] = cache["steps_per_s"] / hf["steps_per_s"]
        ratios["cache_over_transformers_tokens"] = cache["tokens_per_s"] / hf["tokens_per_s"]
        ratios["transformers_reference"] = hf["name"]
        print(f"cache / transformers:       {ratios['cache_over_transformers_steps']:.2f}x per "
              f"decode step (steps/s); {ratios['cache_over_transformers_tokens']:.2f}x in tokens/s "
              f"(ours emits {config.num_codebooks} tokens per step); vs the faster "
              f"transformers run ({hf['name']})")
    if ratios:
        print()
    notes = [f"steps/s and tokens/s: median of {args.runs} timed runs after one warm-up call "
             "('1st call s': includes JAX compilation / torch lazy initialisation); the runs "
             "are interleaved round-robin across methods."]
    if hf is not None:
        notes += [
            f"transformers {hf['transformers_version']}, torch {hf['torch_version']} "
            f"(threads: {', '.join(str(r['torch_threads']) for r in hf_runs)}); "
            "LlamaForCausalLM with random weights "
            f"({hf['params']:,} params), vocab_size = codebook_size x num_codebooks = "
            f"{hf['vocab_size']} (the same output-layer width as our K heads).",
            "The transformers model has no text encoder and no cross-attention: per step our "
            "decoder does strictly more work (an extra attention block per layer over the "
            f"{config.max_caption_length}-token caption, plus K embedding look-ups).",
            "Compare per decode step (steps/s); tokens/s credits ours with "
            f"{config.num_codebooks} tokens per step.",
        ]
    elif not args.skip_transformers:
        notes.append(INSTALL_HINT)
    print("notes: " + "\n       ".join(notes))

    if args.json:
        report = {
            "model": label,
            "config": dataclasses.asdict(config),
            "batch": args.batch, "frames": args.frames, "decode_steps": steps,
            "runs": args.runs, "jax_version": jax.__version__, "load_average_at_start": load,
            "jax_platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
            "params": num_params(params),
            "results": results, "ratios": ratios,
            # None: not requested (--skip_transformers); False: torch/transformers missing.
            "transformers_available": None if args.skip_transformers else bool(hf_runs),
        }
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
