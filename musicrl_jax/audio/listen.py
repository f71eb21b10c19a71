"""Write clips or token sequences to WAV.

  python -m musicrl_jax.audio.listen --tokenizer DIR --tokens samples.npz --out_dir DIR
      decodes every [frames, K] code sequence in the .npz's `codes` array (or a .npy)
  python -m musicrl_jax.audio.listen --tokenizer DIR --wav clip.wav --out_dir DIR
      writes the clip's tokenizer round trip (encode then decode) beside a copy of it
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import soundfile as sf

from musicrl_jax.audio.synthesis import finish_clip, write_wav
from musicrl_jax.audio.tokenizer import AudioTokenizer, load_tokenizer
from musicrl_jax.errors import ConfigError


def decode_clips(tokenizer: AudioTokenizer, codes: np.ndarray) -> np.ndarray:
    """codes [batch, frames, K] -> peak-normalised waveforms [batch, samples] in [-1, 1]."""
    codes = np.asarray(codes)
    if codes.ndim == 2:
        codes = codes[None]
    if codes.ndim != 3 or codes.shape[-1] != tokenizer.num_codebooks:
        raise ConfigError(f"codes of shape {codes.shape} do not fit the tokenizer: expected "
                          f"[batch, frames, {tokenizer.num_codebooks}].")
    return np.stack([finish_clip(w, tokenizer.sample_rate) for w in tokenizer.decode(codes)])


def write_wavs(waveforms: np.ndarray, sample_rate: int, out_dir: str,
               prefix: str = "clip") -> list[str]:
    paths = [os.path.join(out_dir, f"{prefix}_{i:03d}.wav") for i in range(len(waveforms))]
    for path, waveform in zip(paths, waveforms):
        write_wav(path, waveform, sample_rate)
    return paths


def codes_to_wavs(tokenizer: AudioTokenizer, codes: np.ndarray, out_dir: str,
                  prefix: str = "clip") -> list[str]:
    """codes [batch, frames, K] -> one peak-normalised WAV per sequence; returns the paths."""
    return write_wavs(decode_clips(tokenizer, codes), tokenizer.sample_rate, out_dir, prefix)


def round_trip_wav(tokenizer: AudioTokenizer, wav_path: str, out_dir: str) -> tuple[str, str]:
    """Copies a clip and writes its encode->decode reconstruction; returns (original, decoded)."""
    audio, rate = sf.read(wav_path, dtype="float32", always_2d=False)
    tokens = tokenizer.encode(audio if audio.ndim == 1 else audio.mean(1), sample_rate=rate)
    stem = os.path.splitext(os.path.basename(wav_path))[0]
    original = os.path.join(out_dir, f"{stem}.original.wav")
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(wav_path, original)
    decoded = codes_to_wavs(tokenizer, tokens, out_dir, prefix=f"{stem}.tokenized")[0]
    return original, decoded


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="saved tokenizer directory")
    parser.add_argument("--out_dir", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help=".npz with a `codes` array, or a .npy of codes")
    source.add_argument("--wav", help="a clip to round-trip through the tokenizer")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.wav:
        for path in round_trip_wav(tokenizer, args.wav, args.out_dir):
            print(path)
        return
    if not os.path.exists(args.tokens):
        raise SystemExit(f"--tokens {args.tokens}: no such file.")
    loaded = np.load(args.tokens)
    codes = loaded["codes"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    for path in codes_to_wavs(tokenizer, codes, args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
