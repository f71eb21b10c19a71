"""Sampling from the music LM inside one jitted function, and sequence log-probs.

One decode loop (`lax.scan` over delayed steps, KV cache in the 'cache' collection) serves
sampling, the cached-vs-full-forward check and every later caller (RL, rating collection,
evaluation, serving).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import gin
import jax
import jax.numpy as jnp

from musicrl_jax.models.music_lm import (MusicLM, MusicLMConfig, decoder_inputs, apply_delay,
                                         delay_mask, token_logprobs, undo_delay)

EOS_ID = 1  # SentencePiece/seqio convention; an empty caption is just [EOS].


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0 = full distribution
    guidance_weight: float = 1.0  # classifier-free guidance; 1.0 = conditional logits only


def empty_captions_like(caption_tokens: jax.Array) -> jax.Array:
    return jnp.zeros_like(caption_tokens).at[:, 0].set(EOS_ID)


def _with_unconditional(caption_tokens, guidance: bool):
    if not guidance:
        return caption_tokens
    return jnp.concatenate([caption_tokens, empty_captions_like(caption_tokens)], axis=0)


def _guide(logits, guidance_weight: float, guidance: bool):
    """MusicGen's CFG on logits: uncond + w * (cond - uncond)."""
    if not guidance:
        return logits
    cond, uncond = jnp.split(logits, 2, axis=0)
    return uncond + guidance_weight * (cond - uncond)


def _inverse_cdf_sample(keys, log_probs):
    """Draws one token per (example, codebook) from log_probs [batch, K, vocab].

    Inverse-CDF sampling: one uniform per (example, codebook) from that example's key (so a
    sample never depends on its batch neighbours), instead of `jax.random.categorical`'s Gumbel
    noise for every logit. Masked logits (top-k) have zero probability and are never chosen.
    """
    num_codebooks = log_probs.shape[-2]
    # u in [tiny, 1): u > 0 keeps leading zero-probability (masked) tokens from being chosen.
    tiny = jnp.finfo(jnp.float32).tiny
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, (num_codebooks,), jnp.float32,
                                                       minval=tiny))(keys)
    cdf = jnp.cumsum(jnp.exp(log_probs.astype(jnp.float32)), axis=-1)
    # Scaling u by the total mass makes rounding in the sum (cdf[-1] != 1) harmless; the first
    # index whose cdf reaches the threshold always carries positive probability.
    threshold = uniforms[..., None] * cdf[..., -1:]
    tokens = jnp.sum(cdf < threshold, axis=-1, dtype=jnp.int32)
    return jnp.minimum(tokens, log_probs.shape[-1] - 1)


def _decode_loop(config: MusicLMConfig, params, captions, num_steps: int, choose_next: Callable,
                 use_cache: bool = True):
    """Runs the decoder for `num_steps` delayed steps.

    choose_next(step, logits [batch, K, vocab]) -> (tokens [batch, K], per-step output pytree).
    Returns the stacked per-step outputs, leading axis = step.
    """
    model = MusicLM(config)
    variables = {"params": params}
    encoded = model.apply(variables, captions, method=MusicLM.encode)
    bos = jnp.full((captions.shape[0], 1, config.num_codebooks), config.special_token, jnp.int32)

    if use_cache:
        def logits_at(cache, tokens, step):
            del step
            logits, updated = model.apply({**variables, "cache": cache}, tokens, encoded, captions,
                                          True, method=MusicLM.decode, mutable=["cache"])
            return logits[:, 0], updated["cache"]

        # The first step creates the cache (self-attention buffers, projected text keys/values).
        first_logits, updated = model.apply(variables, bos, encoded, captions, True,
                                            method=MusicLM.decode, mutable=["cache"])
        state = updated["cache"]
        first_logits = first_logits[:, 0]
    else:
        # Baseline for benchmarks: recompute the whole causal prefix at every step.
        def logits_at(buffer, tokens, step):
            buffer = jax.lax.dynamic_update_slice(buffer, tokens, (0, step, 0))
            logits = model.apply(variables, buffer, encoded, captions, method=MusicLM.decode)
            return jax.lax.dynamic_index_in_dim(logits, step, axis=1, keepdims=False), buffer

        state = jnp.full((captions.shape[0], num_steps, config.num_codebooks),
                         config.special_token, jnp.int32)
        first_logits, state = logits_at(state, bos, 0)

    first_tokens, first_out = choose_next(0, first_logits)

    def body(carry, step):
        state, tokens = carry
        logits, state = logits_at(state, tokens[:, None, :], step)
        next_tokens, out = choose_next(step, logits)
        return (state, next_tokens), out

    _, outs = jax.lax.scan(body, (state, first_tokens), jnp.arange(1, num_steps))
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b], axis=0), first_out, outs)


def sample(config: MusicLMConfig, params, caption_tokens, rngs, *, num_frames: int,
           sampling: SamplingConfig = SamplingConfig(), use_cache: bool = True):
    """Samples audio codes for each caption.

    caption_tokens [batch, text_length]; rngs [batch] keys (one stream per example, so a clip
    does not depend on its batch neighbours). Returns {"codes": [batch, frames, K] int32,
    "sample_logprobs": [batch] log-prob of the codes under the sampling distribution}.
    Temperature and guidance weight are traced, so settings that differ only in them (a sweep,
    `evaluation.choose_sampling`) share one compiled program.
    """
    return _sample_jit(config, params, caption_tokens, rngs,
                       jnp.float32(sampling.temperature), jnp.float32(sampling.guidance_weight),
                       num_frames=num_frames, top_k=sampling.top_k,
                       guidance=sampling.guidance_weight != 1.0, use_cache=use_cache)


def sample_with_runtime_settings(config: MusicLMConfig, params, caption_tokens, rngs,
                                 temperature, guidance_weight, *, num_frames: int, top_k: int,
                                 guidance: bool, use_cache: bool = True):
    """`sample` (call it under jit) with temperature and guidance_weight as values that may be
    traced, so a serving export can take them at run time. `guidance` (static) decides whether
    the unconditional half of the batch runs at all; top_k stays static (lax.top_k)."""
    if num_frames > config.max_frames:
        raise ValueError(f"num_frames={num_frames} exceeds MusicLMConfig.max_frames="
                         f"{config.max_frames}; raise max_frames or sample fewer frames.")
    captions = _with_unconditional(caption_tokens, guidance)
    num_steps = num_frames + config.num_codebooks - 1
    valid = delay_mask(num_frames, config.num_codebooks)
    batch = caption_tokens.shape[0]

    def choose_next(step, logits):
        logits = _guide(logits, guidance_weight, guidance) / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rngs, step)
        log_probs = jax.nn.log_softmax(logits)  # [batch, K, vocab]
        tokens = _inverse_cdf_sample(keys, log_probs)  # [batch, K]
        logprob = jnp.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
        step_valid = valid[step]
        tokens = jnp.where(step_valid, tokens, config.special_token).astype(jnp.int32)
        logprob = jnp.where(step_valid, logprob, 0.0).sum(-1)
        fed_back = jnp.concatenate([tokens, tokens], axis=0) if guidance else tokens
        return fed_back, (tokens, logprob)

    delayed, logprobs = _decode_loop(config, params, captions, num_steps, choose_next, use_cache)
    delayed = jnp.swapaxes(delayed, 0, 1)[:batch]
    return {"codes": undo_delay(delayed, config.num_codebooks),
            "sample_logprobs": logprobs.sum(0)}


_sample_jit = jax.jit(sample_with_runtime_settings, static_argnames=(
    "config", "num_frames", "top_k", "guidance", "use_cache"))


@functools.partial(jax.jit, static_argnames=("config",))
def cached_logits(config: MusicLMConfig, params, caption_tokens, audio_codes):
    """Teacher-forced logits [batch, frames + K - 1, K, vocab] computed step by step with the
    KV cache; must equal the full forward pass (tested)."""
    delayed = apply_delay(audio_codes, config.special_token)
    inputs = decoder_inputs(delayed, config.special_token)

    def choose_next(step, logits):
        next_step = jnp.minimum(step + 1, inputs.shape[1] - 1)
        return jax.lax.dynamic_index_in_dim(inputs, next_step, 1, keepdims=False), logits

    logits = _decode_loop(config, params, caption_tokens, inputs.shape[1], choose_next)
    return jnp.swapaxes(logits, 0, 1)


@functools.partial(jax.jit, static_argnames=("config",))
def sequence_logprobs(config: MusicLMConfig, params, caption_tokens, audio_codes):
    """Teacher-forced log-probs: (per-token [batch, frames + K - 1, K], per-sequence [batch])."""
    logprobs, _ = token_logprobs(config, params, caption_tokens, audio_codes)
    return logprobs, logprobs.sum(axis=(1, 2))


def example_rngs(rng: jax.Array, batch: int) -> jax.Array:
    return jax.random.split(rng, batch)
