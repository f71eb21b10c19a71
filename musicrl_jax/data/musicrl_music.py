"""TFDS builder `musicrl_music`: the rendered, captioned corpus with its audio tokens.

Building a config runs the whole data stage once and caches it under `data_dir`:
  1. render the corpus (music21 scores -> MIDI -> FluidSynth WAVs + captions), `data/corpus.py`
  2. fit the audio tokenizer (RVQ of log-mel frames) on the training split, `audio/tokenizer.py`
  3. train the caption SentencePiece vocabulary on the training captions, `data/vocab.py`
  4. encode every clip and write train/validation/test TFRecords with TFDS
Steps 1-3 write to `<data_dir>/musicrl_music_assets/<config>/` (corpus, tokenizer/, vocab/),
which later stages read (decode tokens to audio, tokenize captions).

CLI: python -m musicrl_jax.data.build --data_dir DIR [--config demo]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import gin
import numpy as np
import soundfile as sf
import tensorflow_datasets as tfds
from tqdm import tqdm

from musicrl_jax.audio.tokenizer import MelRVQTokenizer, load_tokenizer
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


def assets_dir(data_dir: str, config_name: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "musicrl_music_assets", config_name)


def read_wav(path: str) -> np.ndarray:
    audio, _ = sf.read(path, dtype="float32", always_2d=False)
    return audio if audio.ndim == 1 else audio.mean(axis=1)


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
        build = corpus_lib.build_corpus(corpus_dir, num_clips=cfg.num_clips,
                                        clip_seconds=cfg.clip_seconds, seed=cfg.seed,
                                        max_clips_per_score=cfg.max_clips_per_score)
        clips = {split: [c for c in build.clips if c.split == split] for split in SPLITS}
        empty = [s for s, c in clips.items() if not c]
        if empty:
            raise ConfigError(f"musicrl_music/{cfg.name}: the corpus in {corpus_dir} has no "
                              f"clips in split(s) {empty}. Fix: raise num_clips.")
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
            tokens = tokenizer.encode(read_wav(wav_path))
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
def prepare_music_data(data_dir: str = gin.REQUIRED, config_name: str = "demo") -> str:
    """Builds `musicrl_music/<config_name>` (cached); returns its assets directory."""
    builder = MusicrlMusic(config=config_name, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    assets = assets_dir(data_dir, config_name)
    vocab_dir = os.path.join(assets, "vocab")
    if not vocab_lib.caption_vocabulary_is_current(vocab_dir):
        # Captions are tokenised when read, so a cached dataset only needs its vocabulary refitted.
        train = builder.as_dataset(split="train").as_numpy_iterator()
        vocab_lib.train_caption_vocabulary([r["caption"].decode() for r in train], vocab_dir,
                                           vocab_size=builder.builder_config.caption_vocab_size)
    return assets
