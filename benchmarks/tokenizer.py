"""Benchmark of the MelRVQ audio tokenizer: reconstruction quality and speed.

Fits a K_max-codebook tokenizer on training clips, then on held-out clips
reports, for K = 1, 2, 4 (prefixes of the same residual stack):
  * quantiser figures (log-mel SNR, mel spectral convergence): tokens -> mel,
    no audio synthesis;
  * round-trip figures (resynthesised-audio mel SNR, STFT spectral
    convergence): tokens -> Griffin-Lim audio -> analysis;
and encode / decode throughput in frames per second.

Usage:
  python benchmarks/tokenizer.py                       # synthetic audio
  python benchmarks/tokenizer.py --corpus_dir /tmp/corpus_demo
The corpus directory holds ``manifest.jsonl`` with records carrying ``wav``
(path relative to the corpus dir) and ``split`` (train/validation/test).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from musicrl_jax.audio.tokenizer import (  # noqa: E402
    MelRVQTokenizer, reconstruction_metrics)
from musicrl_jax.errors import ConfigError, make_output_dir, report_user_errors  # noqa: E402

PROG = "python benchmarks/tokenizer.py"
SAMPLE_RATE = 16000


# ---------------------------------------------------------------------------
# Synthetic test audio
# ---------------------------------------------------------------------------

_MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
_MINOR = np.array([0, 2, 3, 5, 7, 8, 10])


def _tone(freq: float, duration: float, harmonics: np.ndarray, attack: float,
          decay: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One harmonic note with an attack / exponential-decay envelope and a
    little vibrato so partials are not perfectly stationary."""
    n = max(1, int(duration * sample_rate))
    t = np.arange(n) / sample_rate
    vibrato = 1.0 + 0.004 * np.sin(2 * np.pi * rng.uniform(4.0, 6.5) * t)
    phase = 2 * np.pi * freq * np.cumsum(vibrato) / sample_rate
    note = np.zeros(n)
    for h, amp in enumerate(harmonics, start=1):
        if freq * h >= 0.45 * sample_rate:
            break
        note += amp * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    env = np.minimum(t / attack, 1.0) * np.exp(-t / decay)
    release = min(n, int(0.02 * sample_rate))  # avoid clicks at note end
    env[n - release:] *= np.linspace(1.0, 0.0, release)
    return note * env


def render_tone_sequence(seconds: float, rng: np.random.Generator,
                         sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A random polyphonic clip: melody, bass and sustained chords in a random
    key/tempo, each voice with its own harmonic timbre, plus soft noise hits."""
    n = int(seconds * sample_rate)
    out = np.zeros(n)
    root = rng.integers(45, 57)  # MIDI root of the key
    scale = _MAJOR if rng.random() < 0.5 else _MINOR
    beat = 60.0 / rng.uniform(80, 150)
    voices = [  # (octave offset, note length in beats, gain, polyphony)
        (12 + 12 * int(rng.integers(0, 2)), rng.choice([0.5, 1.0]), 0.5, 1),
        (-12, 2.0, 0.35, 1),
        (0, 4.0, 0.18, 3),
    ]
    for octave, beats, gain, poly in voices:
        n_harm = int(rng.integers(3, 12))
        harmonics = rng.uniform(0.2, 1.0, n_harm) / np.arange(1, n_harm + 1) ** rng.uniform(0.7, 2.0)
        attack = rng.uniform(0.005, 0.05)
        decay = rng.uniform(0.2, 1.5) * beats * beat
        t, degree = 0.0, int(rng.integers(0, 7))
        while t < seconds:
            dur = beats * beat * rng.choice([0.5, 1.0, 1.0, 2.0])
            degree = int(np.clip(degree + rng.integers(-2, 3), -3, 10))
            if rng.random() < 0.85:  # occasional rests
                for chord_step in range(poly):
                    d = degree + 2 * chord_step
                    midi = root + octave + 12 * (d // 7) + scale[d % 7]
                    freq = 440.0 * 2 ** ((midi - 69) / 12)
                    note = _tone(freq, dur, harmonics, attack, decay, sample_rate, rng)
                    start = int(t * sample_rate)
                    end = min(n, start + len(note))
                    out[start:end] += gain * note[:end - start]
            t += dur
    # Noise hits on beats: broadband content the tone model lacks.
    hit = np.exp(-np.arange(int(0.08 * sample_rate)) / (0.015 * sample_rate))
    for start in np.arange(0, seconds, beat):
        i = int(start * sample_rate)
        seg = hit[:n - i] * rng.normal(0, 0.15, min(len(hit), n - i))
        out[i:i + len(seg)] += seg
    return (0.6 * out / max(np.max(np.abs(out)), 1e-9)).astype(np.float32)


def synthetic_clips(count: int, seconds: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [render_tone_sequence(seconds, rng) for _ in range(count)]


# ---------------------------------------------------------------------------
# Corpus loading
# ---------------------------------------------------------------------------


def load_corpus(corpus_dir: str, max_seconds: float, max_train: int,
                max_eval: int, seed: int = 0
                ) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """(train clips, held-out clips, held-out split name) from manifest.jsonl,
    resampled to 16 kHz mono and cropped to ``max_seconds``."""
    import librosa
    import soundfile as sf

    from musicrl_jax.data.corpus import load_manifest

    by_split: dict[str, list[str]] = {}
    for clip in load_manifest(corpus_dir):
        by_split.setdefault(clip.split, []).append(clip.wav)
    held_out = "test" if by_split.get("test") else "validation"
    if not by_split.get("train") or not by_split.get(held_out):
        raise ConfigError(f"--corpus_dir {corpus_dir}: need 'train' and 'test' or "
                          f"'validation' records, found splits {sorted(by_split)}.")

    def read(rel_path: str) -> np.ndarray:
        audio, sr = sf.read(os.path.join(corpus_dir, rel_path), dtype="float32",
                            always_2d=True)
        audio = audio.mean(axis=1)
        if sr != SAMPLE_RATE:
            audio = librosa.resample(audio, orig_sr=sr, target_sr=SAMPLE_RATE)
        return audio[:int(max_seconds * SAMPLE_RATE)].astype(np.float32)

    # Seeded random subsets: the manifest is ordered by source collection.
    rng = np.random.default_rng(seed)
    pick = lambda paths, n: [paths[i] for i in sorted(
        rng.choice(len(paths), min(n, len(paths)), replace=False))]
    train = [read(p) for p in pick(by_split["train"], max_train)]
    evaluation = [read(p) for p in pick(by_split[held_out], max_eval)]
    return train, evaluation, held_out


# ---------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------


def _fmt_row(cells, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


@report_user_errors(PROG)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--corpus_dir", default=None,
                        help="corpus with manifest.jsonl; synthetic audio if omitted")
    parser.add_argument("--num_codebooks", type=int, default=4)
    parser.add_argument("--codebook_size", type=int, default=256)
    parser.add_argument("--griffin_lim_iters", type=int, default=32)
    parser.add_argument("--train_clips", type=int, default=48)
    parser.add_argument("--eval_clips", type=int, default=8)
    parser.add_argument("--clip_seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_dir", default=None,
                        help="also save the fitted tokenizer here")
    args = parser.parse_args(argv)
    if args.save_dir:
        make_output_dir(args.save_dir, "--save_dir")

    if args.corpus_dir:
        train, evaluation, held_out = load_corpus(
            args.corpus_dir, args.clip_seconds, args.train_clips, args.eval_clips,
            args.seed)
        source = f"corpus {args.corpus_dir} (train / {held_out})"
    else:
        train = synthetic_clips(args.train_clips, args.clip_seconds, args.seed)
        evaluation = synthetic_clips(args.eval_clips, args.clip_seconds, args.seed + 1)
        source = "synthetic polyphonic tone sequences (disjoint seeds)"
    tokenizer = MelRVQTokenizer(num_codebooks=args.num_codebooks,
                                codebook_size=args.codebook_size,
                                griffin_lim_iters=args.griffin_lim_iters,
                                seed=args.seed)
    seconds = lambda clips: sum(len(c) for c in clips) / SAMPLE_RATE
    print(f"audio: {source}")
    print(f"  train {len(train)} clips / {seconds(train):.0f} s, held-out "
          f"{len(evaluation)} clips / {seconds(evaluation):.0f} s")
    print(f"tokenizer: {tokenizer!r}, n_fft={tokenizer.n_fft}, "
          f"hop={tokenizer.hop_length}, Griffin-Lim iters={tokenizer.griffin_lim_iters}")

    start = time.perf_counter()
    tokenizer.fit(train)
    fit_s = time.perf_counter() - start
    print(f"\nfit: {fit_s:.1f} s (incl. jit compile)")
    for stat in tokenizer.fit_stats:
        print(f"  codebook {stat['codebook']}: {stat['iterations']} Lloyd iters, "
              f"{stat['used_entries']}/{tokenizer.codebook_size} entries used, "
              f"train residual MSE {stat['residual_mse']:.3f} (normalised units)")
    if args.save_dir:
        tokenizer.save(args.save_dir)
        print(f"  saved to {args.save_dir}")

    # Warm the jit caches so throughput excludes compilation.
    tokenizer.encode(evaluation[0])
    ks = sorted({k for k in (1, 2, 4, args.num_codebooks) if k <= args.num_codebooks})
    rows = []
    enc_frames = enc_s = dec_frames = dec_s = 0.0
    for k in ks:
        sums: dict[str, float] = {}
        for clip in evaluation:
            t0 = time.perf_counter()
            tokens = tokenizer.encode(clip, num_codebooks=k)
            t1 = time.perf_counter()
            if k == tokenizer.num_codebooks:
                tokenizer.decode(tokens)
                enc_frames += len(tokens); enc_s += t1 - t0
                dec_frames += len(tokens); dec_s += time.perf_counter() - t1
            for key, value in reconstruction_metrics(clip, tokens, tokenizer=tokenizer).items():
                sums[key] = sums.get(key, 0.0) + value / len(evaluation)
        bits = k * math.log2(tokenizer.codebook_size) * tokenizer.frame_rate
        rows.append([f"K={k}", f"{bits / 1000:.1f}",
                     f"{sums['quantiser_mel_snr_db']:.2f}",
                     f"{sums['quantiser_mel_spectral_convergence']:.3f}",
                     f"{sums['resynth_mel_snr_db']:.2f}",
                     f"{sums['resynth_spectral_convergence']:.3f}"])

    # Ceiling: Griffin-Lim on the unquantised mel (what infinite K would give).
    sums = {}
    for clip in evaluation:
        audio = tokenizer.log_mel_to_waveform(tokenizer.log_mel(clip))
        for key, value in reconstruction_metrics(clip, audio, tokenizer=tokenizer).items():
            sums[key] = sums.get(key, 0.0) + value / len(evaluation)
    rows.append(["no quant.", "-", "inf", "0.000", f"{sums['resynth_mel_snr_db']:.2f}",
                 f"{sums['resynth_spectral_convergence']:.3f}"])

    header = ["codebooks", "kbit/s", "quant melSNR dB", "quant mel SC",
              "resynth melSNR dB", "resynth SC"]
    widths = [max(len(h), 9) for h in header]
    print(f"\nheld-out reconstruction (mean over {len(evaluation)} clips; "
          "SNR higher is better, SC lower is better)")
    print(_fmt_row(header, widths))
    for row in rows:
        print(_fmt_row(row, widths))
    print(f"  quant = tokens -> mel (the quantiser alone, tokenizer's {tokenizer.n_mels}-band mel);")
    print("  resynth = tokens -> Griffin-Lim audio -> 80-band mel / STFT (full round trip).")

    fps = tokenizer.frame_rate
    print(f"\nspeed (K={tokenizer.num_codebooks}, {enc_frames:.0f} frames = "
          f"{enc_frames / fps:.0f} s of audio):")
    print(f"  encode: {enc_frames / enc_s:,.0f} frames/s ({enc_frames / enc_s / fps:.0f}x real time)")
    print(f"  decode: {dec_frames / dec_s:,.0f} frames/s ({dec_frames / dec_s / fps:.1f}x real time, "
          f"{tokenizer.griffin_lim_iters} Griffin-Lim iters)")
    batch = np.stack([c[:min(len(c) for c in evaluation)] for c in evaluation])
    tokenizer.encode(batch)  # compile this block size before timing
    t0 = time.perf_counter()
    batch_tokens = tokenizer.encode(batch)
    t1 = time.perf_counter()
    tokenizer.decode(batch_tokens)
    t2 = time.perf_counter()
    n_frames = batch_tokens.shape[0] * batch_tokens.shape[1]
    print(f"  batched {batch_tokens.shape}: encode {n_frames / (t1 - t0):,.0f} frames/s, "
          f"decode {n_frames / (t2 - t1):,.0f} frames/s")


if __name__ == "__main__":
    main()
