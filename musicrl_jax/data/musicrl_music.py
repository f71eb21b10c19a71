"""TFDS builder `musicrl_music`: the rendered, captioned corpus with its audio tokens.

Building a config runs the whole data stage once and caches it under `data_dir`:
  1. render the corpus (music21 scores -> MIDI -> FluidSynth WAVs + captions), `data/corpus.py`
  2. fit the audio tokenizer (RVQ of log-mel frames) on the training split, `audio/tokenizer.py`
  3. train the caption SentencePiece vocabulary on the training captions, `data/vocab.py`
  4. encode every clip and write train/validation/test TFRecords with TFDS
Steps 1-3 write to `<data_dir>/musicrl_music_assets/<config>/` (corpus, tokenizer/, vocab/),
which later stages read (decode tokens to audio, tokenize captions).

A config with `pretrained_codec` (musicgen, musicgen_tiny) fits and trains nothing: the build
copies a pretrained tokenizer (`python -m musicrl_jax.convert encodec`: MusicGen's EnCodec) and
caption SentencePiece model (T5's spiece.model) from `prepare_music_data.tokenizer_dir` and
`.caption_vocab` into tokenizer/ and vocab/captions.model, renders the corpus at the codec's
sample rate (resampled when FluidSynth cannot render at it) and encodes with the codec. A cached
build made with another tokenizer or vocabulary is refused, not silently mixed.

CLI: python -m musicrl_jax.data.build --data_dir DIR [--config demo]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import time
from math import gcd

import gin
import numpy as np
import soundfile as sf
import tensorflow_datasets as tfds
from tqdm import tqdm

from musicrl_jax.audio import synthesis
from musicrl_jax.audio.tokenizer import MelRVQTokenizer, load_tokenizer, load_tokenizer_input
from musicrl_jax.data import corpus as corpus_lib
from musicrl_jax.data import vocab as vocab_lib
from musicrl_jax.errors import ConfigError

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class MusicrlMusicConfig(tfds.core.BuilderConfig):
    num_clips: int = 4000
    clip_seconds: float = 5.0
    # The demo's codec: 25 token frames/s and two codebooks of 512 keep the tempo and key of the
    # renders as well as 50 frames/s x 4 x 256 did (benchmarks/lm_quality.py), in a quarter of
    # the tokens, so the LM learns music from far less compute.
    num_codebooks: int = 2
    codebook_size: int = 512
    hop_length: int = 640
    n_fft: int = 2048
    n_mels: int = 128
    caption_vocab_size: int = 512
    max_clips_per_score: int | None = None
    seed: int = 0
    # Tokens from a pretrained codec and captions from a pretrained SentencePiece model, both
    # named by prepare_music_data (tokenizer_dir, caption_vocab); num_codebooks and
    # codebook_size are then what the codec must give (checked), the mel fields are unused.
    pretrained_codec: bool = False


# FluidSynth's synth.sample-rate range: a codec rate outside it is rendered at the nearest end
# and resampled.
RENDER_RATE_RANGE = (8000, 96000)


def assets_dir(data_dir: str, config_name: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "musicrl_music_assets", config_name)


def read_wav(path: str) -> np.ndarray:
    audio, _ = sf.read(path, dtype="float32", always_2d=False)
    return audio if audio.ndim == 1 else audio.mean(axis=1)


def render_rate(codec_rate: int) -> int:
    """The rate the corpus is rendered at for a codec of `codec_rate` Hz."""
    return int(min(max(codec_rate, RENDER_RATE_RANGE[0]), RENDER_RATE_RANGE[1]))


def read_wav_at(path: str, sample_rate: int) -> np.ndarray:
    """A clip as mono float32 at `sample_rate` (polyphase resampling, as synthesis does)."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        from scipy.signal import resample_poly
        step = gcd(int(rate), int(sample_rate))
        audio = resample_poly(audio, sample_rate // step, rate // step)
    return np.asarray(audio, np.float32)


def _digest(files: dict[str, str]) -> str:
    """Content hash of {installed name: path}: the same files copied elsewhere hash equal."""
    sha = hashlib.sha256()
    for name in sorted(files):
        with open(files[name], "rb") as f:
            sha.update(name.encode() + b"\0" + f.read())
    return sha.hexdigest()[:16]


def _files(directory: str) -> dict[str, str]:
    return {n: os.path.join(directory, n) for n in os.listdir(directory)
            if os.path.isfile(os.path.join(directory, n)) and not n.endswith(".tmp")}


def builder_config(config_name: str) -> MusicrlMusicConfig:
    """The named config; an unknown name (a gin binding or flag) is a ConfigError."""
    for config in MusicrlMusic.BUILDER_CONFIGS:
        if config.name == config_name:
            return config
    raise ConfigError(f"musicrl_music has no config {config_name!r}; choose among "
                      f"{[c.name for c in MusicrlMusic.BUILDER_CONFIGS]}.")


def install_pretrained_assets(data_dir: str, config_name: str, tokenizer_dir: str | None,
                              caption_vocab: str | None) -> None:
    """Copies a pretrained tokenizer and caption vocabulary into the config's assets (once),
    after checking the codec gives the config's token shape. Assets copied before from other
    files mean the cached dataset holds other tokens or caption ids: a ConfigError names the
    field, never a silent mix."""
    cfg = builder_config(config_name)
    given = {"tokenizer_dir": tokenizer_dir, "caption_vocab": caption_vocab}
    missing = [f"prepare_music_data.{k}" for k, v in given.items() if not v]
    if missing:
        raise ConfigError(f"musicrl_music/{config_name} tokenizes with a pretrained codec and "
                          f"vocabulary, but {' and '.join(missing)} is not set. Fix: bind "
                          "tokenizer_dir to a `python -m musicrl_jax.convert encodec` output and "
                          "caption_vocab to T5's spiece.model (MUSICGEN_DIR/vocab/captions.model "
                          "of a converted MusicGen); python -m musicrl_jax.data.build takes them "
                          "as --tokenizer_dir and --caption_vocab.")
    tokenizer = load_tokenizer_input(tokenizer_dir,
                                     f"prepare_music_data.tokenizer_dir={tokenizer_dir}")
    shape = (tokenizer.num_codebooks, tokenizer.codebook_size)
    if shape != (cfg.num_codebooks, cfg.codebook_size):
        raise ConfigError(f"prepare_music_data.tokenizer_dir={tokenizer_dir} gives {shape[0]} "
                          f"codebooks of {shape[1]}; musicrl_music/{config_name} holds "
                          f"{cfg.num_codebooks} of {cfg.codebook_size}. Fix: convert the codec "
                          "with the bandwidth that gives that many codebooks, or pick the config "
                          "made for this codec.")
    if not os.path.isfile(caption_vocab):
        raise ConfigError(f"prepare_music_data.caption_vocab={caption_vocab} is not a file. Fix: "
                          "point it at a SentencePiece model (T5's spiece.model).")
    assets = assets_dir(data_dir, config_name)
    wanted = {"tokenizer_dir": (_files(tokenizer_dir), os.path.join(assets, "tokenizer")),
              "caption_vocab": ({vocab_lib.VOCAB_FILE: caption_vocab},
                                os.path.join(assets, "vocab"))}
    for field, (files, target) in wanted.items():
        installed = _files(target) if os.path.isdir(target) else {}
        if field == "caption_vocab":  # the vocab dir may hold other files
            installed = {n: p for n, p in installed.items() if n in files}
        if installed:
            if _digest(installed) != _digest(files):
                tfds_dir = os.path.join(os.path.abspath(data_dir), "musicrl_music", config_name)
                raise ConfigError(
                    f"prepare_music_data.{field}={given[field]} is not the one the cached "
                    f"musicrl_music/{config_name} in {os.path.abspath(data_dir)} was built "
                    f"with (copied to {target}). Fix: use another data_dir for this "
                    f"codec/vocabulary, or delete {assets} and {tfds_dir} to rebuild.")
            continue
        tmp = f"{target}.{os.getpid()}.tmp"  # copied whole, then renamed: never half a copy
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, src in files.items():
            shutil.copyfile(src, os.path.join(tmp, name))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)


class MusicrlMusic(tfds.core.GeneratorBasedBuilder):
    """Captioned music clips rendered from music21's scores, with K-codebook audio tokens."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Rendered music21 corpus, mel-RVQ tokens, SentencePiece captions.",
                     "1.1.0": "demo: 4,000 clips; 25 frames/s, 2 codebooks of 512, 128 mels "
                              "(n_fft 2048)."}
    BUILDER_CONFIGS = [
        MusicrlMusicConfig(name="demo", description="~4,000 clips of 5 s: the CPU demo."),
        MusicrlMusicConfig(name="paper", description="~20,000 clips of 10 s, as the paper's.",
                           num_clips=20000, clip_seconds=10.0, num_codebooks=4,
                           codebook_size=1024, hop_length=320, n_fft=1024, n_mels=80),
        MusicrlMusicConfig(name="tiny", description="60 clips of 2 s for tests and smoke runs.",
                           num_clips=60, clip_seconds=2.0, num_codebooks=2, codebook_size=32,
                           hop_length=320, n_fft=1024, n_mels=80, caption_vocab_size=200,
                           max_clips_per_score=2),
        MusicrlMusicConfig(name="musicgen", description="~4,000 clips of 10 s in MusicGen's "
                           "tokens: its EnCodec (4 codebooks of 2048) and T5 SentencePiece.",
                           num_clips=4000, clip_seconds=10.0, num_codebooks=4,
                           codebook_size=2048, pretrained_codec=True),
        MusicrlMusicConfig(name="musicgen_tiny", description="40 clips of 1 s through the "
                           "pretrained-codec path for tests (4 codebooks of 64).",
                           num_clips=40, clip_seconds=1.0, num_codebooks=4, codebook_size=64,
                           max_clips_per_score=2, pretrained_codec=True),
    ]
    DEFAULT_CONFIG_NAME = "demo"

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "clip_id": tfds.features.Text(),
            "caption": tfds.features.Text(),
            "wav_path": tfds.features.Text(),
            "audio_tokens": tfds.features.Tensor(shape=(None, cfg.num_codebooks), dtype=np.int32),
            "collection": tfds.features.Text(),
            "style": tfds.features.Text(),
            "instruments": tfds.features.Sequence(tfds.features.Text()),
            "programs": tfds.features.Sequence(np.int32),
            "tempo_bpm": np.int32,
            "key_tonic": tfds.features.Text(),
            "key_mode": tfds.features.Text(),
            "time_signature": tfds.features.Text(),
            "score_path": tfds.features.Text(),
        }), homepage="https://arxiv.org/abs/2402.04229")

    @property
    def assets(self) -> str:
        return assets_dir(self._data_dir_root, self.builder_config.name)

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is made locally; nothing is downloaded
        cfg = self.builder_config
        corpus_dir = os.path.join(self.assets, "corpus")
        rate = synthesis.DEFAULT_SAMPLE_RATE
        if cfg.pretrained_codec:
            tokenizer_dir = os.path.join(self.assets, "tokenizer")
            if not os.path.isdir(tokenizer_dir):
                raise ConfigError(f"musicrl_music/{cfg.name}: no pretrained tokenizer in "
                                  f"{tokenizer_dir}. Fix: build it with prepare_music_data "
                                  "(tokenizer_dir=..., caption_vocab=...).")
            rate = render_rate(load_tokenizer(tokenizer_dir).sample_rate)
        build = corpus_lib.build_corpus(corpus_dir, num_clips=cfg.num_clips,
                                        clip_seconds=cfg.clip_seconds, seed=cfg.seed,
                                        max_clips_per_score=cfg.max_clips_per_score,
                                        sample_rate=rate)
        clips = {split: [c for c in build.clips if c.split == split] for split in SPLITS}
        empty = [s for s, c in clips.items() if not c]
        if empty:
            raise ConfigError(f"musicrl_music/{cfg.name}: the corpus in {corpus_dir} has no "
                              f"clips in split(s) {empty}. Fix: raise num_clips.")
        if cfg.pretrained_codec:  # installed by prepare_music_data
            tokenizer = load_tokenizer(os.path.join(self.assets, "tokenizer"))
            return {split: self._generate_examples(corpus_dir, clips[split], tokenizer, split)
                    for split in SPLITS}
        tokenizer = self._fit_tokenizer(corpus_dir, clips["train"])
        vocab_lib.train_caption_vocabulary([c.caption for c in clips["train"]],
                                           os.path.join(self.assets, "vocab"),
                                           vocab_size=cfg.caption_vocab_size)
        return {split: self._generate_examples(corpus_dir, clips[split], tokenizer, split)
                for split in SPLITS}

    def _fit_tokenizer(self, corpus_dir, train_clips):
        cfg = self.builder_config
        path = os.path.join(self.assets, "tokenizer")
        wanted = dict(num_codebooks=cfg.num_codebooks, codebook_size=cfg.codebook_size,
                      hop_length=cfg.hop_length, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                      seed=cfg.seed)
        if os.path.exists(os.path.join(path, "config.json")):
            tokenizer = load_tokenizer(path)
            saved = tokenizer.config()
            if all(saved.get(k) == v for k, v in wanted.items()):
                return tokenizer
            print(f"musicrl_music: the tokenizer in {path} was fitted with other settings; "
                  "refitting.", file=sys.stderr)
        start = time.perf_counter()
        waveforms = [read_wav(os.path.join(corpus_dir, c.wav)) for c in train_clips]
        tokenizer = MelRVQTokenizer(**wanted).fit(waveforms)
        tokenizer.save(path)
        print(f"musicrl_music: fitted the audio tokenizer on {len(waveforms)} clips in "
              f"{time.perf_counter() - start:.0f}s -> {path}", file=sys.stderr)
        return tokenizer

    def _generate_examples(self, corpus_dir, clips, tokenizer, split):
        for clip in tqdm(clips, desc=f"encode {split}", mininterval=2.0):
            wav_path = os.path.join(corpus_dir, clip.wav)
            tokens = tokenizer.encode(read_wav_at(wav_path, tokenizer.sample_rate))
            yield clip.clip_id, {
                "clip_id": clip.clip_id,
                "caption": clip.caption,
                "wav_path": wav_path,
                "audio_tokens": tokens.astype(np.int32),
                "collection": clip.collection,
                "style": clip.style,
                "instruments": [i["name"] for i in clip.instruments],
                "programs": [int(i["program"]) for i in clip.instruments],
                "tempo_bpm": int(clip.tempo_bpm),
                "key_tonic": clip.key_tonic,
                "key_mode": clip.key_mode,
                "time_signature": clip.time_signature,
                "score_path": clip.score_path,
            }


@gin.configurable
def prepare_music_data(data_dir: str = gin.REQUIRED, config_name: str = "demo",
                       tokenizer_dir: str | None = None,
                       caption_vocab: str | None = None) -> str:
    """Builds `musicrl_music/<config_name>` (cached); returns its assets directory.
    `tokenizer_dir` and `caption_vocab` (a pretrained codec and SentencePiece model) are for
    the pretrained_codec configs (musicgen, musicgen_tiny) and refused by the others."""
    cfg = builder_config(config_name)
    if cfg.pretrained_codec:
        install_pretrained_assets(data_dir, config_name, tokenizer_dir, caption_vocab)
    elif tokenizer_dir or caption_vocab:
        raise ConfigError(f"prepare_music_data.tokenizer_dir/caption_vocab are set but "
                          f"musicrl_music/{config_name} fits its own tokenizer and vocabulary. "
                          "Fix: unset them, or use config_name='musicgen'.")
    builder = MusicrlMusic(config=config_name, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    assets = assets_dir(data_dir, config_name)
    if cfg.pretrained_codec:
        return assets  # the pretrained vocabulary is kept as it is (no tempo pieces)
    vocab_dir = os.path.join(assets, "vocab")
    if not vocab_lib.caption_vocabulary_is_current(vocab_dir):
        # Captions are tokenised when read, so a cached dataset only needs its vocabulary refitted.
        train = builder.as_dataset(split="train").as_numpy_iterator()
        vocab_lib.train_caption_vocabulary([r["caption"].decode() for r in train], vocab_dir,
                                           vocab_size=builder.builder_config.caption_vocab_size)
    return assets
