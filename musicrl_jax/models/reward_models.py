"""Reward models over discrete audio tokens: MuLan-like text adherence, quality, user preference.

All three share two towers built from the music LM's layers and sized by a `MusicLMConfig`, so
their parameter trees line up with a pretrained LM's and can start from it
(`init_from_music_lm`):
  TextTower:  caption_tokens [batch, text_length] -> caption_embed, encoder_{i}, encoder_norm
              (the LM's text encoder, same names and shapes) -> mean over real tokens [batch, embed]
  AudioTower: audio_codes [batch, frames, K] in the LM's delayed layout -> audio_embedding
              [K, codebook_size + 1, embed] summed over codebooks (same table as the LM) ->
              bidirectional Transformer -> mean over real steps [batch, embed]

  TextAudioDualEncoder: both towers projected to a shared L2-normalised space; reward = cosine.
  QualityModel:        audio only -> predicted mean opinion score in [1, 5] (1 + 4 sigmoid).
  PreferenceModel:     audio (and, with `use_caption`, the caption) -> Bradley-Terry score.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from musicrl_jax.models.layers import Embed, RMSNorm, constrain, param_with_axes
from musicrl_jax.models.music_lm import EncoderLayer, MusicLMConfig, apply_delay, caption_mask


def masked_mean(x, mask):
    """x [batch, length, embed], mask [batch, length] -> [batch, embed]; an empty row gives 0."""
    weights = mask.astype(jnp.float32)[..., None]
    total = (x.astype(jnp.float32) * weights).sum(axis=1)
    return total / jnp.maximum(weights.sum(axis=1), 1.0)


def delayed_audio(codes, audio_mask, config: MusicLMConfig):
    """codes [batch, frames, K] (+ mask [batch, frames]) -> the LM's delayed layout
    [batch, frames + K - 1, K] with padding frames and delay slots set to the special id, and
    a step mask [batch, frames + K - 1] (True where any codebook holds a real code)."""
    if audio_mask is None:
        audio_mask = jnp.ones(codes.shape[:2], jnp.int32)
    frame_mask = jnp.broadcast_to(audio_mask[..., None] > 0, codes.shape).astype(jnp.int32)
    real = apply_delay(frame_mask, 0) > 0
    delayed = jnp.where(real, apply_delay(codes, config.special_token), config.special_token)
    return delayed, real.any(axis=-1)


class TextTower(nn.Module):
    """The music LM's text encoder (identical parameter names), mean-pooled over real tokens."""
    config: MusicLMConfig

    @nn.compact
    def __call__(self, caption_tokens):
        cfg = self.config
        mask = caption_mask(caption_tokens)
        x = Embed(cfg.caption_vocab_size, cfg.embed_dim, cfg.compute_dtype,
                  name="caption_embed")(caption_tokens)
        x = constrain(x, ("batch", "length", "embed"))
        for i in range(cfg.num_encoder_layers):
            x = EncoderLayer(cfg, name=f"encoder_{i}")(x, mask[:, None, None, :])
        x = RMSNorm(dtype=cfg.compute_dtype, name="encoder_norm")(x)
        return masked_mean(x, mask)


class AudioTower(nn.Module):
    """Summed codebook embeddings (the LM's table) + bidirectional Transformer, mean-pooled."""
    config: MusicLMConfig
    num_layers: int = 2

    @nn.compact
    def __call__(self, audio_codes, audio_mask=None):
        cfg = self.config
        delayed, steps = delayed_audio(audio_codes, audio_mask, cfg)
        table = param_with_axes(self, "audio_embedding", nn.initializers.normal(1.0),
                                (cfg.num_codebooks, cfg.codebook_size + 1, cfg.embed_dim),
                                ("codebooks", "vocab", "embed"))
        x = table[jnp.arange(cfg.num_codebooks), delayed].sum(axis=-2)
        # Sum of K unit-variance embeddings: rescale so the residual stream starts at unit scale.
        x = constrain((x * cfg.num_codebooks ** -0.5).astype(cfg.compute_dtype),
                      ("batch", "length", "embed"))
        for i in range(self.num_layers):
            x = EncoderLayer(cfg, name=f"layer_{i}")(x, steps[:, None, None, :])
        x = RMSNorm(dtype=cfg.compute_dtype, name="norm")(x)
        return masked_mean(x, steps)


def _dense(module, name, x, features, in_axis="embed", out_axis=None):
    kernel = param_with_axes(module, name, nn.initializers.lecun_normal(),
                             (x.shape[-1], features), (in_axis, out_axis))
    return x @ kernel


def _l2_normalize(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class _Projection(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return _dense(self, "kernel", x, self.features)


class TextAudioDualEncoder(nn.Module):
    """MuLan-like contrastive dual encoder. `__call__` -> (text_emb, audio_emb, logit_scale)."""
    config: MusicLMConfig
    num_audio_layers: int = 2
    projection_dim: int = 64
    initial_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def setup(self):
        self.text_tower = TextTower(self.config)
        self.audio_tower = AudioTower(self.config, self.num_audio_layers)
        self.text_projection = _Projection(self.projection_dim)
        self.audio_projection = _Projection(self.projection_dim)
        self.log_logit_scale = self.param(
            "log_logit_scale", nn.with_logical_partitioning(
                nn.initializers.constant(-jnp.log(self.initial_temperature)), ()), ())

    def embed_text(self, caption_tokens):
        pooled = self.text_tower(caption_tokens)
        return _l2_normalize(self.text_projection(pooled))

    def embed_audio(self, audio_codes, audio_mask=None):
        pooled = self.audio_tower(audio_codes, audio_mask)
        return _l2_normalize(self.audio_projection(pooled))

    def logit_scale(self):
        # Clipped as in CLIP, so the softmax cannot become arbitrarily sharp.
        return jnp.exp(jnp.minimum(self.log_logit_scale, jnp.log(self.max_logit_scale)))

    def __call__(self, caption_tokens, audio_codes, audio_mask=None):
        return (self.embed_text(caption_tokens), self.embed_audio(audio_codes, audio_mask),
                self.logit_scale())

    def score(self, caption_tokens, audio_codes, audio_mask=None):
        """Text-adherence reward: cosine similarity [batch]."""
        text, audio, _ = self(caption_tokens, audio_codes, audio_mask)
        return jnp.sum(text * audio, axis=-1)


class ScalarHead(nn.Module):
    """pooled [batch, features] -> [batch]: RMSNorm, a gated-GELU hidden layer, then linear."""
    hidden_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled):
        x = RMSNorm(dtype=self.dtype, name="norm")(pooled)
        hidden = nn.gelu(_dense(self, "hidden", x, self.hidden_dim, out_axis="mlp"))
        out = param_with_axes(self, "out", nn.initializers.normal(0.02), (self.hidden_dim,),
                              ("mlp",))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), ())
        return hidden @ out + bias


class QualityModel(nn.Module):
    """Audio-only mean-opinion-score regressor: predicted rating in [1, 5]."""
    config: MusicLMConfig
    num_audio_layers: int = 2

    @nn.compact
    def __call__(self, audio_codes, audio_mask=None):
        pooled = AudioTower(self.config, self.num_audio_layers, name="audio_tower")(
            audio_codes, audio_mask)
        logit = ScalarHead(self.config.mlp_dim, name="head")(pooled)
        return 1.0 + 4.0 * jax.nn.sigmoid(logit)

    def score(self, caption_tokens, audio_codes, audio_mask=None):
        del caption_tokens  # quality judges the audio alone
        return self(audio_codes, audio_mask)


class PreferenceModel(nn.Module):
    """Bradley-Terry score s(caption, clip) [batch]; P(a preferred to b) = sigmoid(s_a - s_b).

    With `use_caption`, the pooled caption is concatenated to the pooled audio before the head
    (its nonlinearity lets caption-audio interactions survive the difference s_a - s_b); without
    it the model has no text tower at all.
    """
    config: MusicLMConfig
    num_audio_layers: int = 2
    use_caption: bool = False

    @nn.compact
    def __call__(self, caption_tokens, audio_codes, audio_mask=None):
        pooled = AudioTower(self.config, self.num_audio_layers, name="audio_tower")(
            audio_codes, audio_mask)
        if self.use_caption:
            text = TextTower(self.config, name="text_tower")(caption_tokens)
            pooled = jnp.concatenate([pooled, text], axis=-1)
        return ScalarHead(self.config.mlp_dim, name="head")(pooled)

    def score(self, caption_tokens, audio_codes, audio_mask=None):
        return self(caption_tokens, audio_codes, audio_mask)


# --- initialisation from a pretrained music LM -----------------------------------------------

def init_from_music_lm(params, lm_params):
    """Copies the pretrained LM's matching parameters into a reward model's (unboxed) params.

    Copied, wherever the reward model has the tower:
      lm `audio_embedding`                           -> `audio_tower/audio_embedding`
      lm `caption_embed`, `encoder_{i}`, `encoder_norm` -> `text_tower/` (same names)
    The audio tower's Transformer layers, the projections and the heads stay freshly
    initialised: the LM's decoder layers are causal and cross-attend, so they are not the same
    function. Shapes must agree (same MusicLMConfig); a mismatch raises ConfigError.
    """
    from musicrl_jax.errors import ConfigError

    params = jax.tree.map(lambda x: x, dict(params))  # shallow copies; leaves are shared
    copied = []

    def put(tower, name, value):
        target = params[tower][name]
        same = jax.tree.map(lambda a, b: a.shape == b.shape, target, value)
        if jax.tree.structure(target) != jax.tree.structure(value) or not all(
                jax.tree.leaves(same)):
            raise ConfigError(
                f"init_from_music_lm: the LM's {name!r} does not match the reward model's "
                f"{tower}/{name} (shapes {jax.tree.map(jnp.shape, value)} vs "
                f"{jax.tree.map(jnp.shape, target)}). Fix: size the reward model with the "
                "pretrained LM's MusicLMConfig.")
        params[tower] = {**params[tower], name: value}
        copied.append(f"{tower}/{name}")

    if "audio_tower" in params:
        put("audio_tower", "audio_embedding", lm_params["audio_embedding"])
    if "text_tower" in params:
        for name in params["text_tower"]:
            put("text_tower", name, lm_params[name])
    return params, copied
