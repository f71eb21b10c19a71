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
import zipfile

import numpy as np
import soundfile as sf

from musicrl_jax.audio.synthesis import finish_clip, write_wav
from musicrl_jax.audio.tokenizer import AudioTokenizer, load_tokenizer_input
from musicrl_jax.errors import ConfigError, make_output_dir, report_user_errors

PROG = "python -m musicrl_jax.audio.listen"


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


def read_clip(path: str, flag: str, sample_rate: int) -> np.ndarray:
    """A clip the user named as `flag`, mono float32 [samples] at `sample_rate` (the
    tokenizer's): a missing or unreadable file or another rate is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file. Fix: pass an audio file (WAV, FLAC "
                          "or OGG).")
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    except sf.SoundFileError as err:  # libsndfile cannot read it
        raise ConfigError(f"{flag} {path}: not readable audio ({err}). Fix: pass a WAV, FLAC "
                          "or OGG file.") from err
    if rate != sample_rate:
        raise ConfigError(f"{flag} {path} is {rate} Hz audio, but the tokenizer reads "
                          f"{sample_rate} Hz. Fix: resample it, e.g. ffmpeg -i {path} -ar "
                          f"{sample_rate} OUT.wav.")
    return audio.mean(axis=1)


def read_codes(path: str, flag: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(codes, mask or None) from a file the user named as `flag`: an .npz with `codes` (and
    optionally `mask`), as sampled codes are saved, or a .npy of codes. A missing file, another
    kind of file or an .npz without `codes` is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{flag} {path}: not a NumPy .npz/.npy file ({err}). Fix: save the "
                          "codes with np.savez(path, codes=codes).") from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return loaded, None
    with loaded:
        if "codes" not in loaded.files:
            raise ConfigError(f"{flag} {path}: no 'codes' array (found {loaded.files}). Fix: "
                              "save the sampled codes as np.savez(path, codes=codes).")
        return loaded["codes"], loaded["mask"] if "mask" in loaded.files else None


def round_trip_wav(tokenizer: AudioTokenizer, wav_path: str, out_dir: str,
                   flag: str = "--wav") -> tuple[str, str]:
    """Copies a clip and writes its encode->decode reconstruction; returns (original, decoded)."""
    tokens = tokenizer.encode(read_clip(wav_path, flag, tokenizer.sample_rate))
    stem = os.path.splitext(os.path.basename(wav_path))[0]
    original = os.path.join(out_dir, f"{stem}.original.wav")
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(wav_path, original)
    decoded = codes_to_wavs(tokenizer, tokens, out_dir, prefix=f"{stem}.tokenized")[0]
    return original, decoded


@report_user_errors(PROG)
def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="saved tokenizer directory")
    parser.add_argument("--out_dir", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help=".npz with a `codes` array, or a .npy of codes")
    source.add_argument("--wav", help="a clip to round-trip through the tokenizer")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer_input(args.tokenizer, f"--tokenizer {args.tokenizer}")
    make_output_dir(args.out_dir, "--out_dir")
    if args.wav:
        for path in round_trip_wav(tokenizer, args.wav, args.out_dir):
            print(path)
        return
    codes, _ = read_codes(args.tokens, "--tokens")
    for path in codes_to_wavs(tokenizer, codes, args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
