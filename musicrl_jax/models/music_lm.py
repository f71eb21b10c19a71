"""The music LM: a MusicGen-shaped text-conditioned decoder over K parallel audio codebooks.

Text: caption tokens -> a small bidirectional Transformer encoder.
Audio: codes [batch, frames, K] are laid out with the delay pattern (codebook k shifted right by
k steps), so one decoder step predicts all K codebooks of a delayed frame with K output heads;
each codebook's embedding is summed into one input vector per step.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from musicrl_jax.models.layers import (MLP, Attention, DenseMLP, Embed, RMSNorm, constrain, dense,
                                       make_norm, param_with_axes, relative_position_buckets,
                                       sinusoidal_positions)

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The caption vocabulary's contract with the model (data/vocab.py builds it): every whole number
# of beats per minute in TEMPO_BPMS is one piece, with id TEMPO_FIRST_ID + (bpm - TEMPO_BPMS[0]),
# so the model can read a caption's tempo as a number (`beat_radians`).
TEMPO_BPMS = range(40, 241)
TEMPO_FIRST_ID = 3  # after pad 0, eos 1, unk 2
EOS_ID = 1

_CHOICES = {
    "positions": ("rope", "sinusoidal"),
    "norm": ("rms", "layer"),
    "mlp": ("gated_gelu", "gelu"),
    "text_encoder": ("native", "t5"),
    "text_mlp": ("gated_gelu", "relu", "gelu"),
    "null_caption": ("encode", "mask"),
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MusicLMConfig:
    caption_vocab_size: int = 256
    codebook_size: int = 256
    num_codebooks: int = 2
    embed_dim: int = 64
    num_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 128
    num_encoder_layers: int = 1
    num_decoder_layers: int = 2
    max_caption_length: int = 32
    max_frames: int = 64
    dtype: str = "float32"
    remat: str = "none"  # none | full | dots
    # Tempo-locked rotary dims in decoder self-attention (`layers.beat_rope`): rotation rates as
    # multiples of the caption's beat (e.g. (0.5, 1, 2, 4)); () = off. frames_per_second is the
    # audio tokenizer's frame rate, which turns BPM into radians per decoder step.
    beat_rope_multiples: tuple = ()
    frames_per_second: float = 0.0
    # Architecture options; the defaults are this project's own LM, the alternatives express
    # MusicGen (musicrl_jax.convert writes them). positions: 'rope' in self-attention, or
    # 'sinusoidal' added to the summed codebook embeddings. norm: 'rms' or 'layer' (LayerNorm
    # with bias) in the decoder. mlp: the decoder's feed-forward, 'gated_gelu' or 'gelu'
    # (wi -> exact GELU -> wo).
    positions: str = "rope"
    norm: str = "rms"
    norm_epsilon: float = 1e-6
    mlp: str = "gated_gelu"
    # text_encoder: 'native' (pre-norm layers like the decoder's) or 't5' (T5's encoder:
    # shared relative-position bias from layer 0, unscaled attention, text_mlp feed-forward).
    # text_* sizes: 0 = the decoder's.
    text_encoder: str = "native"
    text_embed_dim: int = 0
    text_num_heads: int = 0
    text_head_dim: int = 0
    text_mlp_dim: int = 0
    text_mlp: str = "gated_gelu"  # t5 only: gated_gelu | relu | gelu
    text_norm_epsilon: float = 1e-6
    relative_attention_buckets: int = 32
    relative_attention_max_distance: int = 128
    # A Linear with bias from the text encoder's width to embed_dim (MusicGen's enc_to_dec_proj).
    encoder_projection: bool = False
    # No gradient reaches the text encoder (MusicGen's T5 is frozen).
    freeze_text_encoder: bool = False
    # The unconditional input of guidance (and caption dropout): a caption of only EOS.
    # 'encode' reads it through the encoder; 'mask' makes it no conditioning at all (zero
    # encoder output, every key masked), as MusicGen does.
    null_caption: str = "encode"

    def __post_init__(self):
        # A config read back from JSON holds a list; jit needs the hashable tuple.
        object.__setattr__(self, "beat_rope_multiples",
                           tuple(float(m) for m in self.beat_rope_multiples))
        if self.beat_rope_multiples:
            if self.frames_per_second <= 0:
                raise ValueError("MusicLMConfig.beat_rope_multiples needs frames_per_second > 0 "
                                 "(the audio tokenizer's frame rate).")
            if 2 * len(self.beat_rope_multiples) >= self.head_dim or self.head_dim % 2:
                raise ValueError(f"MusicLMConfig.beat_rope_multiples: {len(self.beat_rope_multiples)} "
                                 f"pairs do not fit head_dim={self.head_dim} beside plain RoPE.")
        for field, choices in _CHOICES.items():
            if getattr(self, field) not in choices:
                raise ValueError(f"MusicLMConfig.{field}={getattr(self, field)!r}; expected one "
                                 f"of {list(choices)}")
        if self.text_encoder != "t5" and any(
                (self.text_embed_dim, self.text_num_heads, self.text_head_dim, self.text_mlp_dim)):
            raise ValueError("MusicLMConfig.text_* sizes need text_encoder='t5' (the native "
                             "encoder shares the decoder's sizes).")
        if self.beat_rope_multiples and self.positions != "rope":
            raise ValueError("MusicLMConfig.beat_rope_multiples needs positions='rope'.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"MusicLMConfig.dtype={self.dtype!r}; expected one of {list(_DTYPES)}")
        if self.remat not in ("none", *_REMAT_POLICIES):
            raise ValueError(f"MusicLMConfig.remat={self.remat!r}; expected none|full|dots")

    @property
    def special_token(self) -> int:
        """Input-only id used for BOS and for the delay pattern's empty slots."""
        return self.codebook_size

    @property
    def text_dims(self) -> tuple[int, int, int, int]:
        """The text encoder's (embed, heads, head_dim, mlp) sizes."""
        return (self.text_embed_dim or self.embed_dim, self.text_num_heads or self.num_heads,
                self.text_head_dim or self.head_dim, self.text_mlp_dim or self.mlp_dim)

    @property
    def decode_length(self) -> int:
        return self.max_frames + self.num_codebooks - 1

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]


# The text encoder's top-level params (those before the trainable encoder_projection), which
# freeze_text_encoder keeps still (trainer.freeze) and LoRA then leaves alone.
TEXT_ENCODER_PARAMS = re.compile(r"caption_embed|encoder_\d+|encoder_norm|relative_attention_bias")


def frozen_text_encoder(config) -> bool:
    """Whether `config` (a MusicLMConfig; any other task config never) freezes the text
    encoder."""
    return bool(getattr(config, "freeze_text_encoder", False))


def in_text_encoder(name) -> bool:
    """Whether the LM's top-level param `name` belongs to its text encoder."""
    return isinstance(name, str) and TEXT_ENCODER_PARAMS.fullmatch(name) is not None


# --- delay pattern -------------------------------------------------------------------------

def apply_delay(codes: jax.Array, special_token: int) -> jax.Array:
    """codes [batch, frames, K] -> delayed [batch, frames + K - 1, K]; delayed[t, k] = codes[t-k, k]."""
    batch, frames, num_codebooks = codes.shape
    length = frames + num_codebooks - 1
    columns = [
        jnp.pad(codes[:, :, k], ((0, 0), (k, num_codebooks - 1 - k)), constant_values=special_token)
        for k in range(num_codebooks)
    ]
    return jnp.stack(columns, axis=-1).reshape(batch, length, num_codebooks)


def undo_delay(delayed: jax.Array, num_codebooks: int) -> jax.Array:
    """Inverse of `apply_delay`: delayed [batch, frames + K - 1, K] -> codes [batch, frames, K]."""
    frames = delayed.shape[1] - num_codebooks + 1
    return jnp.stack([delayed[:, k:k + frames, k] for k in range(num_codebooks)], axis=-1)


def delay_mask(frames: int, num_codebooks: int) -> jax.Array:
    """[frames + K - 1, K] booleans: True where the delayed layout holds a real code."""
    steps = jnp.arange(frames + num_codebooks - 1)[:, None]
    codebooks = jnp.arange(num_codebooks)[None, :]
    return (steps >= codebooks) & (steps - codebooks < frames)


def decoder_inputs(delayed: jax.Array, special_token: int) -> jax.Array:
    """Teacher-forcing inputs: shift the delayed targets right by one step, BOS = special token."""
    bos = jnp.full_like(delayed[:, :1], special_token)
    return jnp.concatenate([bos, delayed[:, :-1]], axis=1)


# --- modules -------------------------------------------------------------------------------

def caption_mask(caption_tokens):
    """True at real caption tokens (id 0 is padding)."""
    return caption_tokens > 0


def conditioning_mask(config: MusicLMConfig, caption_tokens):
    """[batch, text_length] the caption positions the decoder reads: the real tokens, none of
    an EOS-only caption under null_caption='mask'."""
    mask = caption_mask(caption_tokens)
    if config.null_caption == "mask":
        only_eos = (caption_tokens[:, 0] == EOS_ID) & (mask.sum(-1) == 1)
        mask = mask & ~only_eos[:, None]
    return mask


def caption_bpm(caption_tokens):
    """[batch] the tempo a caption names (its last tempo piece), 0 where it names none."""
    offsets = caption_tokens - TEMPO_FIRST_ID
    is_tempo = (offsets >= 0) & (offsets < len(TEMPO_BPMS))
    last = jnp.max(jnp.where(is_tempo, jnp.arange(caption_tokens.shape[-1]), -1), axis=-1)
    bpm = TEMPO_BPMS[0] + jnp.take_along_axis(offsets, jnp.maximum(last, 0)[:, None], -1)[:, 0]
    return jnp.where(last >= 0, bpm, 0)


def beat_radians(config: MusicLMConfig, caption_tokens):
    """[batch] the caption's beat in radians per decoder step (0 where it names no tempo)."""
    beats_per_second = caption_bpm(caption_tokens).astype(jnp.float32) / 60.0
    return 2 * jnp.pi * beats_per_second / config.frames_per_second


class EncoderLayer(nn.Module):
    config: MusicLMConfig

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        attn = Attention(cfg.num_heads, cfg.head_dim, cfg.compute_dtype, name="self_attention")
        x = x + attn(RMSNorm(dtype=cfg.compute_dtype, name="pre_attention_norm")(x), mask=mask)
        x = x + MLP(cfg.mlp_dim, cfg.compute_dtype, name="mlp")(
            RMSNorm(dtype=cfg.compute_dtype, name="pre_mlp_norm")(x))
        return constrain(x, ("batch", "length", "embed"))


class T5EncoderLayer(nn.Module):
    """T5's encoder block: RMS-normed, unscaled self-attention with the shared relative-position
    bias, then the feed-forward (`text_mlp`)."""
    config: MusicLMConfig

    @nn.compact
    def __call__(self, x, mask, bias):
        cfg = self.config
        dtype = cfg.compute_dtype
        _, heads, head_dim, mlp_dim = cfg.text_dims
        attn = Attention(heads, head_dim, dtype, positions="none", scaled=False,
                         name="self_attention")
        norm = cfg.text_norm_epsilon
        x = x + attn(RMSNorm(norm, dtype, name="pre_attention_norm")(x), mask=mask, bias=bias)
        if cfg.text_mlp == "gated_gelu":  # T5's gated-gelu is tanh GELU, as MLP's
            mlp = MLP(mlp_dim, dtype, name="mlp")
        else:
            mlp = DenseMLP(mlp_dim, dtype, activation=cfg.text_mlp, name="mlp")
        x = x + mlp(RMSNorm(norm, dtype, name="pre_mlp_norm")(x))
        return constrain(x, ("batch", "length", "embed"))


class SinusoidalPositions(nn.Module):
    """MusicGen's sinusoidal table rows for the decoder's positions; while decoding, the step
    index lives in the 'cache' collection beside the attention caches."""
    features: int

    @nn.compact
    def __call__(self, length: int, decode: bool = False):
        if decode:
            index = self.variable("cache", "position_index", lambda: jnp.array(0, jnp.int32))
            positions = index.value + jnp.arange(length)
            index.value = index.value + length
        else:
            positions = jnp.arange(length)
        return sinusoidal_positions(positions, self.features)


class DecoderLayer(nn.Module):
    config: MusicLMConfig

    @nn.compact
    def __call__(self, x, encoded, cross_mask, decode: bool = False, beat=None):
        cfg = self.config
        dtype = cfg.compute_dtype

        def norm(name):
            return make_norm(cfg.norm, cfg.norm_epsilon, dtype, name)

        positions = "rope" if cfg.positions == "rope" else "none"
        x = x + Attention(cfg.num_heads, cfg.head_dim, dtype, positions=positions,
                          beat_multiples=tuple(cfg.beat_rope_multiples), name="self_attention")(
            norm("pre_self_attention_norm")(x), causal=not decode,
            decode=decode, decode_length=cfg.decode_length, beat_radians=beat)
        x = x + Attention(cfg.num_heads, cfg.head_dim, dtype, cross=True, name="cross_attention")(
            norm("pre_cross_attention_norm")(x), encoded, mask=cross_mask, decode=decode)
        if cfg.mlp == "gelu":
            mlp = DenseMLP(cfg.mlp_dim, dtype, activation="gelu", name="mlp")
        else:
            mlp = MLP(cfg.mlp_dim, dtype, name="mlp")
        x = x + mlp(norm("pre_mlp_norm")(x))
        return constrain(x, ("batch", "length", "embed"))


class MusicLM(nn.Module):
    """logits [batch, length, K, codebook_size] for delayed decoder inputs [batch, length, K]."""
    config: MusicLMConfig

    def setup(self):
        cfg = self.config
        text_dim, text_heads = cfg.text_dims[:2]
        self.caption_embed = Embed(cfg.caption_vocab_size, text_dim, cfg.compute_dtype)
        if cfg.text_encoder == "t5":
            self.encoder_layers = [T5EncoderLayer(cfg, name=f"encoder_{i}")
                                   for i in range(cfg.num_encoder_layers)]
            self.encoder_norm = RMSNorm(cfg.text_norm_epsilon, cfg.compute_dtype)
            # T5: one bias table, from the first layer, shared by all layers.
            self.relative_attention_bias = param_with_axes(
                self, "relative_attention_bias", nn.initializers.normal(1.0),
                (cfg.relative_attention_buckets, text_heads), (None, "heads"))
        else:
            self.encoder_layers = [EncoderLayer(cfg, name=f"encoder_{i}")
                                   for i in range(cfg.num_encoder_layers)]
            self.encoder_norm = RMSNorm(dtype=cfg.compute_dtype)
        if cfg.encoder_projection:
            self.encoder_projection = param_with_axes(
                self, "encoder_projection", nn.initializers.lecun_normal(),
                (text_dim, cfg.embed_dim), (None, "embed"))
            self.encoder_projection_bias = param_with_axes(
                self, "encoder_projection_bias", nn.initializers.zeros, (cfg.embed_dim,),
                ("embed",))
        if cfg.positions == "sinusoidal":
            self.positions = SinusoidalPositions(cfg.embed_dim)
        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat],
                                 static_argnums=(4,))
        self.decoder_layers = [layer_cls(cfg, name=f"decoder_{i}")
                               for i in range(cfg.num_decoder_layers)]
        self.decoder_norm = make_norm(cfg.norm, cfg.norm_epsilon, cfg.compute_dtype)
        self.audio_embedding = self.param(
            "audio_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codebooks", "vocab", "embed")),
            (cfg.num_codebooks, cfg.codebook_size + 1, cfg.embed_dim))
        self.heads = self.param(
            "heads",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                                         ("embed", "codebooks", "vocab")),
            (cfg.embed_dim, cfg.num_codebooks, cfg.codebook_size))

    def encode(self, caption_tokens):
        """caption_tokens [batch, text_length] -> encoded [batch, text_length, embed]."""
        cfg = self.config
        mask = caption_mask(caption_tokens)[:, None, None, :]
        x = self.caption_embed(caption_tokens)
        x = constrain(x, ("batch", "length", "embed"))
        if cfg.text_encoder == "t5":
            length = caption_tokens.shape[1]
            buckets = relative_position_buckets(length, length, cfg.relative_attention_buckets,
                                                cfg.relative_attention_max_distance)
            bias = jnp.transpose(self.relative_attention_bias[buckets], (2, 0, 1))[None]
            for layer in self.encoder_layers:
                x = layer(x, mask, bias)
        else:
            for layer in self.encoder_layers:
                x = layer(x, mask)
        x = self.encoder_norm(x)
        if cfg.freeze_text_encoder:
            x = jax.lax.stop_gradient(x)
        if cfg.encoder_projection:
            x = dense(x, self.encoder_projection.astype(cfg.compute_dtype))
            x = (x + self.encoder_projection_bias).astype(cfg.compute_dtype)
            x = constrain(x, ("batch", "length", "embed"))
        if cfg.null_caption == "mask":
            # MusicGen zeroes the encoder output off the mask (after the projection).
            x = x * conditioning_mask(cfg, caption_tokens)[..., None].astype(x.dtype)
        return x

    def decode(self, decoder_input_tokens, encoded, caption_tokens, decode: bool = False):
        """decoder_input_tokens [batch, length, K] (delayed layout, BOS first)."""
        cfg = self.config
        cross_mask = conditioning_mask(cfg, caption_tokens)[:, None, None, :]
        codebook_ids = jnp.arange(cfg.num_codebooks)
        x = self.audio_embedding[codebook_ids, decoder_input_tokens].sum(axis=-2)
        # The residual stream stays float32 (layers take bf16 matmul inputs and accumulate in
        # f32), so the cached sampler and the teacher-forced pass round alike.
        x = x.astype(jnp.float32)
        if cfg.positions == "sinusoidal":
            x = x + self.positions(x.shape[1], decode)[None]
        x = constrain(x, ("batch", "length", "embed"))
        beat = beat_radians(cfg, caption_tokens) if cfg.beat_rope_multiples else None
        for layer in self.decoder_layers:
            x = layer(x, encoded, cross_mask, decode, beat)
        x = self.decoder_norm(x)
        # f32 accumulation and output: bf16-rounded logits would make the sampler's and the
        # teacher-forced log-probs disagree by tenths of a nat per sequence (RL's ratios).
        logits = dense(x, self.heads.astype(cfg.compute_dtype))
        return constrain(logits, ("batch", "length", "codebooks", "vocab"))

    def __call__(self, caption_tokens, decoder_input_tokens):
        return self.decode(decoder_input_tokens, self.encode(caption_tokens), caption_tokens)


def init_params(config: MusicLMConfig, rng: jax.Array, batch: int = 1) -> Any:
    """Boxed (logically annotated) params; wrap in `jax.eval_shape` for abstract init."""
    caption = jnp.ones((batch, config.max_caption_length), jnp.int32)
    audio = jnp.zeros((batch, config.decode_length, config.num_codebooks), jnp.int32)
    return MusicLM(config).init(rng, caption, audio)["params"]


def token_logprobs(config: MusicLMConfig, params, caption_tokens, audio_codes, audio_mask=None,
                   with_entropy: bool = False):
    """Teacher-forced log-probs of `audio_codes` [batch, frames, K] under the model.

    audio_mask [batch, frames] (1 = real frame) excludes padding frames.
    Returns (logprobs [batch, frames + K - 1, K], 0 at delay slots and padding; mask, same shape
    or broadcastable), plus, with `with_entropy`, each position's full-distribution entropy
    (0 off the mask), which RL's entropy bonus needs.
    """
    delayed = apply_delay(audio_codes, config.special_token)
    logits = MusicLM(config).apply({"params": params}, caption_tokens,
                                   decoder_inputs(delayed, config.special_token))
    mask = delay_mask(audio_codes.shape[1], config.num_codebooks)[None]
    if audio_mask is not None:
        frame_mask = jnp.broadcast_to(audio_mask[..., None], audio_codes.shape).astype(jnp.int32)
        mask = mask & (apply_delay(frame_mask, 0) > 0)
    targets = jnp.where(mask, delayed, 0)
    log_probs = jax.nn.log_softmax(logits)
    logprobs = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    out = (jnp.where(mask, logprobs, 0.0), mask)
    if with_entropy:
        out += (jnp.where(mask, -(jnp.exp(log_probs) * log_probs).sum(-1), 0.0),)
    return out


def lm_loss(config: MusicLMConfig, params, caption_tokens, audio_codes, audio_mask=None):
    """Next-token cross-entropy summed over real positions: (loss_sum, token_count)."""
    logprobs, mask = token_logprobs(config, params, caption_tokens, audio_codes, audio_mask)
    return -logprobs.sum(), jnp.broadcast_to(mask, logprobs.shape).sum()
