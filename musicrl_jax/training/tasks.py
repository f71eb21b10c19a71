"""Supervised tasks: what the one training loop trains.

A task bundles a model's parameter initialiser, its loss and its data sources:
  init_params(rng) -> params boxed with logical axis names
  loss(params, batch, rng) -> (loss_sum, weight, {metric_name: sum})  (the loop divides by weight)
  train_source / eval_source: `ArraySource`-like (train_batch(step, n), eval_batches(n))
  kind: the checkpoint kind, so a stage cannot restore another model's checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp

from musicrl_jax.decoding import empty_captions_like
from musicrl_jax.models import music_lm
from musicrl_jax.models.music_lm import MusicLMConfig


@gin.configurable
@dataclasses.dataclass
class MusicLMTask:
    """Next-token prediction of audio codes given the caption (MusicLM/MusicGen pretraining)."""
    train_source: Any = gin.REQUIRED
    eval_source: Any = gin.REQUIRED
    config: MusicLMConfig = dataclasses.field(default_factory=MusicLMConfig)
    # Drop the caption for this fraction of examples so the model also learns the unconditional
    # distribution that classifier-free guidance needs.
    caption_dropout: float = 0.1
    kind: str = "music_lm"

    def init_params(self, rng):
        return music_lm.init_params(self.config, rng)

    def loss(self, params, batch, rng):
        captions = batch["caption_tokens"]
        if self.caption_dropout > 0:
            drop = jax.random.bernoulli(rng, self.caption_dropout, (captions.shape[0], 1))
            captions = jnp.where(drop, empty_captions_like(captions), captions)
        loss_sum, count = music_lm.lm_loss(self.config, params, captions, batch["audio_codes"],
                                           batch.get("audio_mask"))
        return loss_sum, count, {"loss": loss_sum}

    def flops_per_example(self, batch) -> float:
        """Training FLOPs per example (3 x forward): matmuls plus attention scores/values."""
        cfg = self.config
        length = batch["audio_codes"].shape[1] + cfg.num_codebooks - 1
        text = batch["caption_tokens"].shape[1]
        attn_width = cfg.num_heads * cfg.head_dim
        mlp = 3 * cfg.embed_dim * cfg.mlp_dim
        encoder = text * (4 * cfg.embed_dim * attn_width + mlp) + 2 * text * text * attn_width
        decoder = (length * (6 * cfg.embed_dim * attn_width + mlp)
                   + text * 2 * cfg.embed_dim * attn_width  # cross-attention keys/values
                   + 2 * length * (length + text) * attn_width)
        heads = length * cfg.embed_dim * cfg.num_codebooks * cfg.codebook_size
        forward = 2 * (cfg.num_encoder_layers * encoder + cfg.num_decoder_layers * decoder + heads)
        return 3.0 * forward
