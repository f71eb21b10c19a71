"""A small synthetic token corpus with caption-dependent structure.

Used by tests and by the foundation demo before the rendered corpus exists: each caption names a
"style" (which register codebook 0 plays in) and a "tempo" (the period of its arpeggio); the
other codebooks follow codebook 0 at fixed offsets. A model that reads the caption can predict
most tokens, one that ignores it cannot, so falling validation loss means conditioning works.
"""

from __future__ import annotations

import gin
import numpy as np

from musicrl_jax.data.sources import ArraySource

NUM_STYLES = 16
NUM_TEMPOS = 4
STYLE_TOKEN_OFFSET = 10
TEMPO_TOKEN_OFFSET = 40


def toy_examples(num_examples: int, num_frames: int, num_codebooks: int, codebook_size: int,
                 caption_length: int, noise: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    styles = rng.integers(0, NUM_STYLES, num_examples)
    tempos = rng.integers(0, NUM_TEMPOS, num_examples)
    captions = np.zeros((num_examples, caption_length), np.int32)
    captions[:, 0] = STYLE_TOKEN_OFFSET + styles
    captions[:, 1] = TEMPO_TOKEN_OFFSET + tempos
    captions[:, 2] = 1  # EOS

    register = styles * (codebook_size // NUM_STYLES)
    period = tempos + 2
    phase = rng.integers(0, 8, num_examples)
    frames = np.arange(num_frames)
    melody = register[:, None] + ((frames[None] + phase[:, None]) % period[:, None]) * 3
    codes = np.stack([(melody + 5 * k) % codebook_size for k in range(num_codebooks)], axis=-1)
    noisy = rng.random(codes.shape) < noise
    codes = np.where(noisy, rng.integers(0, codebook_size, codes.shape), codes)
    return {"caption_tokens": captions, "audio_codes": codes.astype(np.int32)}


@gin.configurable
def toy_source(split: str = "train", num_examples: int = 512, num_frames: int = 32,
               num_codebooks: int = 2, codebook_size: int = 256, caption_length: int = 16,
               noise: float = 0.05, seed: int = 0) -> ArraySource:
    split_seed = {"train": 0, "validation": 1, "test": 2}[split]
    arrays = toy_examples(num_examples, num_frames, num_codebooks, codebook_size, caption_length,
                          noise, seed * 10 + split_seed)
    return ArraySource(arrays, seed=seed, name=f"toy_{split}")
