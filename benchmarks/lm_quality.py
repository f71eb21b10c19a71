"""How musical is a pretrained music LM? Figures on held-out captions, beside what the tokenizer
allows.

For a pretraining run (or any policy checkpoint) and the music data it was trained on, prints:
  - the validation loss per codebook (nats per token, teacher forced);
  - for tempo_match, key_match, timbre_match, rhythmic_regularity and consonance: the means of
    the corpus renders ("original"), their tokenizer round trips ("tokenized": the ceiling of a
    token LM) and the LM's clips, and the chance level of the text attributes (clips scored
    against another caption's metadata);
  - the headroom (LM - chance) / (tokenized - chance) of the text attributes;
  - the held-out rater panel's win rate of the LM against "tokenized", with its 95% CI.
The full evaluation report (win-rate matrix, spectrograms, WAVs) goes to --out_dir.

  python benchmarks/lm_quality.py --checkpoint runs/demo/pretrain --data_dir data_cache \
      [--split test --num_captions 64 --temperature 1 --top_k 0 --guidance_weight 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from musicrl_jax.errors import report_user_errors  # noqa: E402

PROG = "python benchmarks/lm_quality.py"
ATTRIBUTES = ("tempo_match", "key_match", "timbre_match", "rhythmic_regularity", "consonance")
TEXT = ("tempo_match", "key_match", "timbre_match")


def codebook_losses(lm_config, params, source, batch_size: int = 16, max_batches: int = 8):
    """Mean teacher-forced NLL per codebook over a source's eval batches."""
    import jax
    import numpy as np
    from musicrl_jax.models import music_lm

    @jax.jit
    def sums(params, batch):
        logprobs, mask = music_lm.token_logprobs(lm_config, params, batch["caption_tokens"],
                                                 batch["audio_codes"], batch.get("audio_mask"))
        mask = jax.numpy.broadcast_to(mask, logprobs.shape)
        return -logprobs.sum(axis=(0, 1)), mask.sum(axis=(0, 1))

    total, count = 0.0, 0.0
    for batch in source.eval_batches(batch_size, max_batches=max_batches):
        s, c = jax.device_get(sums(params, batch))
        total, count = total + np.asarray(s, np.float64), count + np.asarray(c, np.float64)
    return total / np.maximum(count, 1)


@report_user_errors(PROG)
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a pretraining (or RL) run directory or its checkpoints/")
    parser.add_argument("--data_dir", default="data_cache")
    parser.add_argument("--config", default="demo", help="musicrl_music builder config")
    parser.add_argument("--split", default="test", help="held-out captions to sample for")
    parser.add_argument("--num_captions", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--guidance_weight", type=float, default=1.0)
    parser.add_argument("--num_raters", type=int, default=40,
                        help="panel size; 30%% are held out and judge, as in the demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default="/tmp/lm_quality")
    args = parser.parse_args(argv)

    from musicrl_jax import decoding, evaluation, pipeline, raters
    from musicrl_jax.audio.tokenizer import load_tokenizer_input
    from musicrl_jax.data import tasks
    from musicrl_jax.data.musicrl_music import assets_dir
    from musicrl_jax.models.music_lm import MusicLMConfig
    from musicrl_jax.training.rl_finetune import policy_checkpoint, restore_policy_params

    start = time.perf_counter()
    assets = assets_dir(args.data_dir, args.config)
    tasks.register_tasks(args.data_dir, args.config)
    tokenizer = load_tokenizer_input(os.path.join(assets, "tokenizer"),
                                     f"--data_dir {args.data_dir} --config {args.config}")
    _, step, meta = policy_checkpoint(args.checkpoint)
    config = MusicLMConfig(**meta["model_config"])
    params = restore_policy_params(config, args.checkpoint, step=step)

    validation = tasks.seqio_source(split="validation", caption_length=config.max_caption_length,
                                    num_frames=config.max_frames)
    losses = codebook_losses(config, params, validation)

    prompts = pipeline.collection_prompts(assets, config.max_caption_length, args.split)
    count = min(args.num_captions, len(prompts.captions))
    sampling = decoding.SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                                       guidance_weight=args.guidance_weight)
    lm = evaluation.ModelUnderTest("LM", config, params, sampling)
    _, eval_panel = raters.split_raters(raters.RaterPanel.sample(args.num_raters, args.seed),
                                        0.3, args.seed)
    result = evaluation.evaluate_models(
        [lm], lm, prompts, tokenizer, eval_panel, args.out_dir, num_captions=count,
        seed=args.seed, reference_audio=pipeline.corpus_renders(assets, prompts, count))

    win = result["win_rates"]["LM|tokenized"]
    figures = {
        "checkpoint": os.path.abspath(args.checkpoint), "step": step,
        "model": {k: meta["model_config"][k] for k in
                  ("embed_dim", "num_decoder_layers", "num_encoder_layers", "num_codebooks",
                   "codebook_size", "max_frames")},
        "sampling": dict(temperature=args.temperature, top_k=args.top_k,
                         guidance_weight=args.guidance_weight),
        "split": args.split, "num_captions": count,
        "validation_loss_per_codebook": [float(x) for x in losses],
        "attributes": {system: {a: result["mean_attributes"][system][a] for a in ATTRIBUTES}
                       for system in ("original", "tokenized", "LM")},
        "chance": {a: result["chance"][a] for a in TEXT},
        "headroom": {a: result["headroom"]["LM"][a] for a in TEXT},
        "win_rate_lm_vs_tokenized": {"rate": win["rate"], "low": win["low"],
                                     "high": win["high"], "n": win["wins"] + win["ties"]
                                     + win["losses"]},
        "report": result["paths"]["report_md"],
        "seconds": time.perf_counter() - start,
    }

    print(f"\n{args.checkpoint} (step {step}), {count} {args.split} captions, sampling "
          f"{figures['sampling']}")
    print("validation loss per codebook (nats/token): "
          + ", ".join(f"{k}: {x:.3f}" for k, x in enumerate(losses)))
    header = f"{'attribute':22s}{'original':>10s}{'tokenized':>11s}{'LM':>8s}{'chance':>9s}" \
             f"{'headroom':>10s}"
    print(header)
    for a in ATTRIBUTES:
        row = figures["attributes"]
        chance = f"{figures['chance'][a]:9.3f}" if a in TEXT else f"{'':9s}"
        headroom = f"{figures['headroom'][a]:10.2f}" if a in TEXT else ""
        print(f"{a:22s}{row['original'][a]:10.3f}{row['tokenized'][a]:11.3f}{row['LM'][a]:8.3f}"
              f"{chance}{headroom}")
    w = figures["win_rate_lm_vs_tokenized"]
    print(f"held-out panel win rate, LM vs tokenized: {w['rate']:.3f} "
          f"[{w['low']:.3f}, {w['high']:.3f}] (n={w['n']})")
    print(f"report: {figures['report']}  ({figures['seconds']:.0f} s)")
    with open(os.path.join(args.out_dir, "lm_quality.json"), "w") as f:
        json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
