"""The caption vocabulary: SentencePiece trained on the training captions, used through seqio."""

from __future__ import annotations

import io
import os
import sys
from typing import Iterable

import gin
import seqio
import sentencepiece as spm

from musicrl_jax.errors import ConfigError
from musicrl_jax.models.music_lm import TEMPO_BPMS, TEMPO_FIRST_ID

VOCAB_FILE = "captions.model"


def _has_tempo_pieces(model_proto: bytes) -> bool:
    """Whether every tempo in TEMPO_BPMS is one piece with the id the model reads it by."""
    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    return all(processor.piece_to_id(str(bpm)) == TEMPO_FIRST_ID + i
               for i, bpm in enumerate(TEMPO_BPMS))


def caption_vocabulary_is_current(out_dir: str) -> bool:
    """Whether `out_dir` holds a caption vocabulary with the tempo pieces the LM reads."""
    path = os.path.join(out_dir, VOCAB_FILE)
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        return _has_tempo_pieces(f.read())


@gin.configurable
def train_caption_vocabulary(captions: Iterable[str], out_dir: str, vocab_size: int = 512,
                             tempo_pieces: bool = True) -> str:
    """Trains (or reuses) a unigram SentencePiece model; ids follow seqio/T5: pad 0, eos 1, unk 2,
    then (with `tempo_pieces`) one piece per tempo in TEMPO_BPMS (see music_lm.TEMPO_FIRST_ID),
    then up to `vocab_size` learnt pieces."""
    path = os.path.join(out_dir, VOCAB_FILE)
    if os.path.exists(path):
        if not tempo_pieces or caption_vocabulary_is_current(out_dir):
            return path
        print(f"train_caption_vocabulary: {path} predates the tempo pieces; retraining.",
              file=sys.stderr)
    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ConfigError("train_caption_vocabulary: no captions to train on.")
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    symbols = [str(bpm) for bpm in TEMPO_BPMS] if tempo_pieces else []
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size + len(symbols),
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        user_defined_symbols=symbols,
        hard_vocab_limit=False,  # templated captions may hold fewer pieces than asked for
        character_coverage=1.0, num_threads=os.cpu_count() or 1, minloglevel=2)
    if tempo_pieces and not _has_tempo_pieces(model.getvalue()):
        raise ConfigError(f"train_caption_vocabulary: SentencePiece did not give the tempo pieces "
                          f"ids {TEMPO_FIRST_ID}.. in order; the LM could not read tempos.")
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
