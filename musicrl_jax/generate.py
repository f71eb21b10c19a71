"""Text-to-music from an exported artifact, with no training code on the path.

  python -m musicrl_jax.generate --artifact DIR --caption "calm piano in C major" \
      [--caption ...] [--captions_file F] --out_dir D [--seed 0] [--temperature 1.0] \
      [--guidance 1.0] [--batch_size N]

The artifact (written by `python -m musicrl_jax.export`) holds the sampling program serialised
with jax.export, the policy's weights, the caption vocabulary and the audio tokenizer. This
module tokenizes the captions with SentencePiece, runs the deserialised program on per-example
keys derived from --seed (the same keys `decoding.example_rngs` gives, so a checkpoint sampled
in Python with the same seed and settings yields the same codes), decodes the codes to WAVs at
the saved tokenizer's sample rate (16 kHz MelRVQ, or a converted EnCodec's) and writes
`codes.npz` beside them.

It imports jax, numpy, sentencepiece and the audio tokenizer only: no flax, optax, orbax, seqio
or TensorFlow, and nothing from musicrl_jax.models or musicrl_jax.training. (The tokenizer
module registers itself with gin, so gin's module is loaded, but no gin config is read.)

Every problem with the inputs (missing or corrupted artifact file, caption too long for the
model, artifact format from another version) is one paragraph on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zipfile

import numpy as np

from musicrl_jax import jsonl
from musicrl_jax.errors import ConfigError, make_output_dir, report_user_errors

# The artifact format, shared with musicrl_jax.export (the writer imports it from here, the
# reader must stay light).
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.npz"
VOCAB_FILE = os.path.join("vocab", "captions.model")
TOKENIZER_DIR = "tokenizer"
PROGRAM_FILES = {"conditional": "sample_conditional.jax_export",
                 "guided": "sample_guided.jax_export"}
PAD_ID, EOS_ID = 0, 1  # seqio/T5 ids the caption vocabulary was trained with
PRNG_IMPL = "threefry2x32"

PROG = "python -m musicrl_jax.generate"
_REEXPORT = ("Fix: re-export it (python -m musicrl_jax.export --checkpoint_dir ... --out DIR) "
             "or copy the artifact directory again.")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(artifact_dir: str) -> dict:
    if not os.path.isdir(artifact_dir):
        raise ConfigError(f"--artifact {artifact_dir}: no such directory. Fix: pass the --out "
                          "directory of python -m musicrl_jax.export.")
    path = os.path.join(artifact_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"Artifact {artifact_dir} has no {MANIFEST_FILE} (an interrupted "
                          f"export, or not an export directory). {_REEXPORT}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is corrupted ({err}). {_REEXPORT}") from err
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format_version is {version!r}, but this generate reads version "
            f"{FORMAT_VERSION}. Fix: re-export the checkpoint with this version of musicrl_jax "
            "(python -m musicrl_jax.export), or generate with the version that exported it.")
    return manifest


def verify_files(artifact_dir: str, manifest: dict) -> None:
    """Every file the manifest lists exists with its recorded size and sha256."""
    for relative, expected in manifest["files"].items():
        path = os.path.join(artifact_dir, relative)
        if not os.path.isfile(path):
            raise ConfigError(f"Artifact file {path} is missing. {_REEXPORT}")
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            raise ConfigError(f"Artifact file {path} is truncated or corrupted: {size} bytes, "
                              f"the manifest records {expected['bytes']}. {_REEXPORT}")
        if sha256_file(path) != expected["sha256"]:
            raise ConfigError(f"Artifact file {path} is corrupted: its sha256 does not match "
                              f"the manifest's. {_REEXPORT}")


class Artifact:
    """An exported policy: its manifest, weights, caption vocabulary and sampling programs."""

    def __init__(self, directory: str):
        import sentencepiece as spm

        self.directory = os.path.abspath(directory)
        self.manifest = read_manifest(self.directory)
        verify_files(self.directory, self.manifest)
        self.config = self._read_json(CONFIG_FILE)
        self.batch_size = int(self.manifest["batch_size"])
        self.max_caption_length = int(self.manifest["max_caption_length"])
        self.params = self._read_params()
        self.vocabulary = spm.SentencePieceProcessor(
            model_file=os.path.join(self.directory, VOCAB_FILE))
        self._programs: dict = {}

    def _read_json(self, relative: str) -> dict:
        with open(os.path.join(self.directory, relative), encoding="utf-8") as f:
            return json.load(f)

    def _read_params(self) -> dict[str, np.ndarray]:
        path = os.path.join(self.directory, PARAMS_FILE)
        try:
            with np.load(path, allow_pickle=False) as data:
                params = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ConfigError(f"Artifact file {path} is corrupted ({err}). {_REEXPORT}") from err
        expected = self.manifest["params"]
        for name, spec in expected.items():
            array = params.get(name)
            got = None if array is None else (list(array.shape), str(array.dtype))
            if got != (spec["shape"], spec["dtype"]):
                raise ConfigError(f"Artifact file {path}: parameter {name} is {got}, the manifest "
                                  f"records {(spec['shape'], spec['dtype'])}. {_REEXPORT}")
        return params

    def program(self, name: str):
        if name not in self._programs:
            from jax import export
            with open(os.path.join(self.directory, PROGRAM_FILES[name]), "rb") as f:
                self._programs[name] = export.deserialize(bytearray(f.read()))
        return self._programs[name]

    def tokenize(self, captions: list[str]) -> np.ndarray:
        """[n, max_caption_length] int32: pieces + EOS, zero-padded, as the training data
        pipeline builds them. A caption that does not fit is an error, never truncated."""
        tokens = np.full((len(captions), self.max_caption_length), PAD_ID, np.int32)
        for index, caption in enumerate(captions):
            ids = [*self.vocabulary.EncodeAsIds(caption), EOS_ID]
            if len(ids) > self.max_caption_length:
                raise ConfigError(
                    f"Caption {index} ({caption[:60]!r}{'...' if len(caption) > 60 else ''}) is "
                    f"{len(ids)} tokens long (with EOS), but the model reads at most "
                    f"{self.max_caption_length}. Fix: shorten that caption; it is not "
                    "truncated silently.")
            tokens[index, :len(ids)] = ids
        return tokens

    def sample(self, caption_tokens: np.ndarray, *, seed: int, temperature: float = 1.0,
               guidance: float = 1.0) -> dict[str, np.ndarray]:
        """Codes [n, frames, K] and sample log-probs [n] for n captions, in batches of the
        exported size (the last one padded by repeating its first row)."""
        import jax

        if jax.config.jax_default_prng_impl != self.manifest["prng_impl"]:
            raise ConfigError(f"JAX's default PRNG is {jax.config.jax_default_prng_impl!r}, but "
                              f"the artifact's keys are {self.manifest['prng_impl']!r}. Fix: "
                              "unset JAX_DEFAULT_PRNG_IMPL.")
        if temperature <= 0:
            raise ConfigError(f"--temperature={temperature}: must be > 0.")
        # decoding.example_rngs: one key per example, split from the seed.
        keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), len(caption_tokens)))
        program = self.program("conditional" if guidance == 1.0 else "guided")
        scalars = (np.float32(temperature), np.float32(guidance))
        codes, logprobs = [], []
        for start in range(0, len(caption_tokens), self.batch_size):
            chunk_tokens = caption_tokens[start:start + self.batch_size]
            chunk_keys = keys[start:start + self.batch_size]
            real = len(chunk_tokens)
            if real < self.batch_size:
                pad = self.batch_size - real
                chunk_tokens = np.concatenate([chunk_tokens, np.repeat(chunk_tokens[:1], pad, 0)])
                chunk_keys = np.concatenate([chunk_keys, np.repeat(chunk_keys[:1], pad, 0)])
            batch_codes, batch_logprobs = program.call(self.params, chunk_tokens, chunk_keys,
                                                       *scalars)
            codes.append(np.asarray(batch_codes)[:real])
            logprobs.append(np.asarray(batch_logprobs)[:real])
        return {"codes": np.concatenate(codes), "sample_logprobs": np.concatenate(logprobs)}

    def write_wavs(self, codes: np.ndarray, out_dir: str, prefix: str = "sample") -> list[str]:
        from musicrl_jax.audio import listen
        from musicrl_jax.audio.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(os.path.join(self.directory, TOKENIZER_DIR))
        os.makedirs(out_dir, exist_ok=True)
        return listen.codes_to_wavs(tokenizer, codes, out_dir, prefix=prefix)


def read_captions(captions: list[str], captions_file: str | None) -> list[str]:
    captions = list(captions or [])
    if captions_file:
        captions += jsonl.read_lines(captions_file, "--captions_file", "caption")
    if not captions:
        raise ConfigError("No captions. Fix: pass --caption TEXT (repeatable) or --captions_file "
                          "with one caption per line.")
    return captions


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", required=True, help="directory written by the export")
    parser.add_argument("--caption", action="append", default=[], help="repeatable")
    parser.add_argument("--captions_file", help="one caption per line (blank lines skipped)")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance weight; 1.0 = conditional only")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="must equal the exported batch size (default: that size)")
    parser.add_argument("--prefix", default="sample", help="WAV file name prefix")
    return parser.parse_args(argv)


def run(args) -> dict:
    captions = read_captions(args.caption, args.captions_file)
    artifact = Artifact(args.artifact)
    if args.batch_size is not None and args.batch_size != artifact.batch_size:
        raise ConfigError(
            f"--batch_size={args.batch_size}, but the artifact's program was exported for "
            f"batches of {artifact.batch_size}. Fix: drop --batch_size, or re-export with "
            f"python -m musicrl_jax.export --batch_size {args.batch_size}.")
    caption_tokens = artifact.tokenize(captions)
    make_output_dir(args.out_dir, "--out_dir")
    start = time.perf_counter()
    samples = artifact.sample(caption_tokens, seed=args.seed, temperature=args.temperature,
                              guidance=args.guidance)
    sample_seconds = time.perf_counter() - start
    np.savez(os.path.join(args.out_dir, "codes.npz"), caption_tokens=caption_tokens,
             captions=np.array(captions), seed=args.seed, temperature=args.temperature,
             guidance=args.guidance, **samples)
    start = time.perf_counter()
    wavs = artifact.write_wavs(samples["codes"], args.out_dir, prefix=args.prefix)
    decode_seconds = time.perf_counter() - start
    return {"wavs": wavs, "codes": os.path.join(args.out_dir, "codes.npz"),
            "sample_seconds": sample_seconds, "decode_seconds": decode_seconds}


@report_user_errors(PROG)
def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    for path in result["wavs"]:
        print(path)
    print(f"codes: {result['codes']} (sampling {result['sample_seconds']:.2f} s, "
          f"waveform decoding {result['decode_seconds']:.2f} s)")
    return result


if __name__ == "__main__":
    main()
