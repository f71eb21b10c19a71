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


class SpectralSummary(nn.Module):
    """What a listener hears first, as statistics of the decoded log-mel. The tokenizer's RVQ
    codebooks (`log_mel_codebooks`, scaled to natural-log mel power, plus `log_mel_mean`;
    copied in by `init_from_tokenizer`) sum to each frame's log-mel. Over real frames: per band
    mean, std, max and mean positive flux; frame energy (log of summed mel power: loudness,
    clipping) mean, std and max; and the autocorrelation of the onset envelope (band-mean
    flux) at lags `min_lag`..`max_lag` frames (tempo, regularity).

    A linear probe on these statistics predicts held-out preferences that the token-embedding
    Transformer alone does not learn from 16k pairs.
    """
    num_codebooks: int
    codebook_size: int
    num_bins: int
    min_lag: int = 4
    max_lag: int = 40

    @nn.compact
    def __call__(self, audio_codes, audio_mask=None):
        table = param_with_axes(self, "log_mel_codebooks", nn.initializers.normal(1.0),
                                (self.num_codebooks, self.codebook_size, self.num_bins),
                                ("codebooks", "vocab", None))
        offset = param_with_axes(self, "log_mel_mean", nn.initializers.zeros, (self.num_bins,),
                                 (None,))
        codes = jnp.clip(audio_codes, 0, self.codebook_size - 1)
        x = table[jnp.arange(self.num_codebooks), codes].sum(axis=-2) + offset
        if audio_mask is None:
            audio_mask = jnp.ones(codes.shape[:2], jnp.int32)
        real = audio_mask > 0

        def mean_std_max(values, mask):  # [batch, frames, n] -> 3 x [batch, n]
            mean = masked_mean(values, mask)
            std = jnp.sqrt(masked_mean(jnp.square(values - mean[:, None]), mask) + 1e-6)
            peak = jnp.where(mask[..., None], values, -jnp.inf).max(axis=1)
            return mean, std, jnp.where(mask.any(axis=1)[:, None], peak, 0.0)

        energy = jax.nn.logsumexp(x, axis=-1, keepdims=True)
        pairs = real[:, 1:] & real[:, :-1]
        flux = jax.nn.relu(x[:, 1:] - x[:, :-1])
        onset = flux.mean(axis=-1)
        onset = jnp.where(pairs, onset - masked_mean(onset[..., None], pairs), 0.0)
        variance = jnp.maximum((onset * onset).sum(axis=1), 1e-6)
        lags = range(self.min_lag, min(self.max_lag, onset.shape[1] - 1) + 1)
        autocorrelation = jnp.stack([(onset[:, lag:] * onset[:, :-lag]).sum(axis=1) / variance
                                     for lag in lags], axis=-1)
        return jnp.concatenate([*mean_std_max(x, real), masked_mean(flux, pairs),
                                *mean_std_max(energy, real), autocorrelation], axis=-1)


class AudioTower(nn.Module):
    """Summed codebook embeddings (the LM's table) + bidirectional Transformer, mean-pooled;
    with `spectral_bins`, plus a learnt projection of the clip's `SpectralSummary`."""
    config: MusicLMConfig
    num_layers: int = 2
    spectral_bins: int = 0

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
        pooled = masked_mean(x, steps)
        if self.spectral_bins:
            summary = SpectralSummary(cfg.num_codebooks, cfg.codebook_size, self.spectral_bins,
                                      name="spectral")(audio_codes, audio_mask)
            pooled = pooled + _dense(self, "spectral_projection", summary, cfg.embed_dim,
                                     in_axis=None, out_axis="embed")
        return pooled


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
    spectral_bins: int = 0

    def setup(self):
        self.text_tower = TextTower(self.config)
        self.audio_tower = AudioTower(self.config, self.num_audio_layers, self.spectral_bins)
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
    spectral_bins: int = 0

    @nn.compact
    def __call__(self, audio_codes, audio_mask=None):
        pooled = AudioTower(self.config, self.num_audio_layers, self.spectral_bins,
                            name="audio_tower")(audio_codes, audio_mask)
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
    spectral_bins: int = 0

    @nn.compact
    def __call__(self, caption_tokens, audio_codes, audio_mask=None):
        pooled = AudioTower(self.config, self.num_audio_layers, self.spectral_bins,
                            name="audio_tower")(audio_codes, audio_mask)
        if self.use_caption:
            text = TextTower(self.config, name="text_tower")(caption_tokens)
            pooled = jnp.concatenate([pooled, text], axis=-1)
        return ScalarHead(self.config.mlp_dim, name="head")(pooled)

    def score(self, caption_tokens, audio_codes, audio_mask=None):
        return self(caption_tokens, audio_codes, audio_mask)


# --- initialisation from a pretrained music LM or the audio tokenizer ------------------------

def init_from_tokenizer(params, codebooks, mean):
    """Copies a mel-RVQ tokenizer's codebooks [K, codebook_size, bins] and band means [bins]
    (in natural-log mel power: log-mel = sum of codes' rows + mean) into the audio tower's
    `SpectralSummary`; a shape mismatch raises ConfigError."""
    from musicrl_jax.errors import ConfigError

    tower = params["audio_tower"]
    target = tower.get("spectral", {}).get("log_mel_codebooks")
    if target is None or target.shape != codebooks.shape:
        raise ConfigError(
            "init_from_tokenizer: the reward model's audio_tower/spectral/log_mel_codebooks "
            f"has shape {None if target is None else target.shape} but the tokenizer's "
            f"codebooks are {codebooks.shape}. Fix: size the reward model with the tokenizer "
            "that made its audio codes (same codebooks, codebook size and mel bands).")
    spectral = {**tower["spectral"], "log_mel_codebooks": jnp.asarray(codebooks, target.dtype),
                "log_mel_mean": jnp.asarray(mean, target.dtype)}
    return {**params, "audio_tower": {**tower, "spectral": spectral}}


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
