"""The caption vocabulary: SentencePiece trained on the training captions, used through seqio."""

from __future__ import annotations

import io
import os
from typing import Iterable

import gin
import seqio
import sentencepiece as spm

from musicrl_jax.errors import ConfigError

VOCAB_FILE = "captions.model"


@gin.configurable
def train_caption_vocabulary(captions: Iterable[str], out_dir: str, vocab_size: int = 512) -> str:
    """Trains (or reuses) a unigram SentencePiece model; ids follow seqio/T5: pad 0, eos 1, unk 2."""
    path = os.path.join(out_dir, VOCAB_FILE)
    if os.path.exists(path):
        return path
    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ConfigError("train_caption_vocabulary: no captions to train on.")
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False,  # templated captions may hold fewer pieces than asked for
        character_coverage=1.0, num_threads=os.cpu_count() or 1, minloglevel=2)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)
    return path


def load_caption_vocabulary(out_dir: str) -> seqio.SentencePieceVocabulary:
    path = os.path.join(out_dir, VOCAB_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"Caption vocabulary {path} is missing. Fix: build the music dataset "
                          "first (python -m musicrl_jax.data.build --data_dir ...).")
    return seqio.SentencePieceVocabulary(path)
