"""Transformer building blocks whose parameters and activations carry logical axis names."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
_MASKED = -1e9  # finite so a fully masked row (empty caption) gives uniform weights, not NaN
# Queries per block of causal attention (`Attention._causal_attend`); chosen with
# benchmarks/attention.py on the CPU.
CAUSAL_BLOCK = 64


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype=jnp.float32):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


def dense(x, kernel):
    """x [..., in] times kernel [in, *out] -> [..., *out] in float32, x's leading axes flattened
    into one. XLA:CPU computes the kernel's gradient of a [batch, length, in] matmul in a
    strided loop that transposes (and recomputes) the whole activation; with one leading axis
    that gradient is a plain dot (the demo LM's MLP forward + backward 2.2x faster, same
    values). The kernel keeps its axes, so its sharding (e.g. the heads' vocab) carries over."""
    out = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return out.reshape(*x.shape[:-1], *kernel.shape[1:])


class RMSNorm(nn.Module):
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (normed * scale).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias (MusicGen's decoder norm), computed in float32."""
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        scale = param_with_axes(self, "scale", nn.initializers.ones, features, ("embed",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, features, ("embed",))
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        return (centred * jax.lax.rsqrt(variance + self.epsilon) * scale + bias).astype(self.dtype)


def make_norm(kind: str, epsilon: float, dtype, name: str | None = None) -> nn.Module:
    """'rms' (RMSNorm, also T5's LayerNorm) or 'layer' (LayerNorm with bias)."""
    if kind == "layer":
        return LayerNorm(epsilon=epsilon, dtype=dtype, name=name)
    return RMSNorm(epsilon=epsilon, dtype=dtype, name=name)


class Embed(nn.Module):
    vocab_size: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        table = param_with_axes(self, "embedding", nn.initializers.normal(1.0),
                                (self.vocab_size, self.features), ("vocab", "embed"))
        return jnp.take(table, tokens, axis=0).astype(self.dtype)


def _rotate(x, angles):
    """Rotates the pairs (x[..., i], x[..., half + i]) of x [..., head_dim] by angles [..., half]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope(x, positions, max_wavelength: float = 10_000.0):
    """Rotary position embedding. x: [batch, length, heads, head_dim]; positions: [length]."""
    half = x.shape[-1] // 2
    inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [length, half]
    return _rotate(x, angles[None, :, None, :])


def beat_rope(x, positions, beat_radians, multiples: tuple[float, ...]):
    """RoPE on the last 2 * len(multiples) dims of each head at the caption's beat frequency
    times each multiple, standard RoPE on the rest. x: [batch, length, heads, head_dim];
    positions: [length]; beat_radians: [batch] radians per step (0 = no tempo: no rotation).

    Query-key products then carry cos(beat phase difference): "one beat ago" is a direction
    attention can find at any tempo, which the LM cannot learn from the caption's digits alone.
    """
    if not multiples:
        return rope(x, positions)
    width = 2 * len(multiples)
    plain, beat = x[..., :-width], x[..., -width:]
    angles = (positions.astype(jnp.float32)[None, :, None]
              * beat_radians.astype(jnp.float32)[:, None, None]
              * jnp.asarray(multiples, jnp.float32)[None, None, :])  # [batch, length, pairs]
    return jnp.concatenate([rope(plain, positions), _rotate(beat, angles[:, :, None, :])],
                           axis=-1)


def sinusoidal_positions(positions, features: int):
    """[length, features] MusicGen's (tensor2tensor) table: cos in the first half, sin in the
    second, frequencies 10000 ** (-i / (half - 1))."""
    half = features // 2
    inv_freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(jnp.log(10_000.0) / (half - 1)))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    table = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    return jnp.pad(table, ((0, 0), (0, features % 2)))


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """[query_length, key_length] T5's bidirectional relative-position buckets: half the
    buckets per direction (keys after the query in the upper half), exact below half of that,
    log-spaced up to max_distance. numpy float32 at trace time, rounding like torch's float32
    ops, so bucket edges (e.g. distance 16 of T5-base) fall the same way."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = np.where(relative > 0, half, 0)
    distance = np.abs(relative)
    max_exact = half // 2
    # max(distance, 1): log(0) is only taken where the exact branch wins.
    scaled = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
    large = max_exact + (np.log(scaled) / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class Attention(nn.Module):
    """Multi-head attention; self-attention (RoPE, optional KV cache) or cross-attention.

    In decode mode a self-attention layer keeps `cached_key/cached_value: [batch, heads,
    max_length, head_dim]` and a step index in the 'cache' collection; a cross-attention layer
    keeps the projected text keys/values (`cross_key/cross_value: [batch, heads, text_length,
    head_dim]`, computed once when the cache is created) so each step projects only its one new
    query. The heads-major cache layout is what the per-step attention einsums consume directly,
    so the compiled decode step neither transposes the caches nor copies the output kernel.
    """
    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    cross: bool = False
    beat_multiples: tuple[float, ...] = ()  # self-attention only; see `beat_rope`
    positions: str = "rope"  # self-attention: rope | none (positions enter elsewhere)
    scaled: bool = True  # False: no 1/sqrt(head_dim) on the logits (T5)

    def _kernel(self, name, features):
        return param_with_axes(self, name, nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                               (features, self.num_heads, self.head_dim),
                               ("embed", "heads", "kv")).astype(self.dtype)

    def _project(self, name, x):
        """[batch, length, heads, head_dim] (full-sequence path)."""
        out = dense(x, self._kernel(name, x.shape[-1])).astype(self.dtype)
        return constrain(out, ("batch", "length", "heads", "kv"))

    def _project_heads_major(self, name, x):
        """[batch, heads, length, head_dim] (decode caches)."""
        out = jnp.swapaxes(dense(x, self._kernel(name, x.shape[-1])), 1, 2).astype(self.dtype)
        return constrain(out, ("batch", "heads", "length", "kv"))

    def _output(self, attended, features):
        """[batch, heads, length, head_dim] -> [batch, length, embed]: heads concatenated, then
        one matmul with the [heads * head_dim, embed] view of the kernel. In a decode step
        (length 1) the swap only moves a unit axis (a bitcast)."""
        attended = constrain(attended, ("batch", "heads", "length", "kv"))
        batch, _, length, _ = attended.shape
        kernel = param_with_axes(
            self, "out", nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
            (self.num_heads, self.head_dim, features), ("heads", "kv", "embed")).astype(self.dtype)
        out = dense(jnp.swapaxes(attended, 1, 2).reshape(batch, length, -1),
                    kernel.reshape(-1, features))
        return constrain(out, ("batch", "length", "embed"))

    @nn.compact
    def __call__(self, x, kv_input=None, mask=None, *, causal: bool = False, decode: bool = False,
                 decode_length: int | None = None, beat_radians=None, bias=None):
        """x: [batch, q_len, embed]. mask: [batch, 1|heads, q_len, kv_len] booleans (True = attend).
        causal: self-attention where each position sees itself and earlier ones (instead of a mask).
        beat_radians [batch]: the beat frequency `beat_rope` needs when `beat_multiples` is set.
        bias: [1|batch, heads, q_len, kv_len] added to the logits (T5's relative positions;
        full-sequence path only).

        For decoding self-attention, q_len == 1 and the mask is derived from the cache index.
        """
        x = x.astype(self.dtype)
        if self.beat_multiples and beat_radians is None:
            raise ValueError("Attention with beat_multiples needs beat_radians.")
        if decode:
            return self._decode(x, kv_input, mask, decode_length, beat_radians)
        query = self._project("query", x)
        if self.cross:
            key, value = self._project("key", kv_input), self._project("value", kv_input)
        else:
            key, value = self._project("key", x), self._project("value", x)
            positions = jnp.arange(x.shape[1])
            query, key = self._position(query, positions, beat_radians), self._position(
                key, positions, beat_radians)

        # Heads-major operands make both attention products plain batched matmuls: with the
        # length-major layout XLA:CPU fuses the softmax into a strided product, 2.5x slower.
        query, key, value = (constrain(jnp.swapaxes(t, 1, 2), ("batch", "heads", "length", "kv"))
                             for t in (query, key, value))
        if causal:
            if mask is not None or bias is not None:
                raise ValueError("Attention(causal=True) takes no mask or bias: causal masking "
                                 "is built in. Fix: pass one of causal=True or mask=/bias=.")
            attended = self._causal_attend(query, key, value)
        else:
            attended = self._attend(query, key, value, mask, bias)
        return self._output(attended, x.shape[-1])

    def _position(self, x, positions, beat_radians):
        if self.positions == "none":
            return x
        return beat_rope(x, positions, beat_radians, self.beat_multiples)

    def _attend(self, query, key, value, mask=None, bias=None):
        """Scaled, masked softmax attention over [batch, heads, length, head_dim] operands, the
        softmax in float32. It divides by the softmax's sum after the product with the values
        ([.., q, head_dim]) instead of normalising the [.., q, k] weights: a pass fewer over
        the largest tensor."""
        logits = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
        if self.scaled:
            logits = logits * self.head_dim ** -0.5
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, _MASKED)
        unnormalised = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        attended = jnp.einsum("bhqk,bhkd->bhqd", unnormalised.astype(self.dtype), value,
                              preferred_element_type=jnp.float32)
        return (attended / unnormalised.sum(-1, keepdims=True)).astype(self.dtype)

    def _causal_attend(self, query, key, value):
        """Causal `_attend` by blocks of `CAUSAL_BLOCK` queries, each against the keys up to its
        last position: the keys after a block are never scored (about half the work at long
        lengths), and a block's scores stay small enough to remain in the CPU's cache."""
        length = query.shape[2]
        pieces = []
        for start in range(0, length, CAUSAL_BLOCK):
            stop = min(start + CAUSAL_BLOCK, length)
            mask = (np.arange(stop)[None, :] <= np.arange(start, stop)[:, None])[None, None]
            pieces.append(self._attend(query[:, :, start:stop], key[:, :, :stop],
                                       value[:, :, :stop], mask))
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=2)

    def _decode(self, x, kv_input, mask, decode_length, beat_radians):
        """One decode step (or the cache-creating first step); x: [batch, 1, embed]."""
        features = x.shape[-1]
        query = self._project("query", x)  # [batch, 1, heads, head_dim]
        if self.cross:
            key = self.variable("cache", "cross_key", self._project_heads_major, "key",
                                kv_input).value
            value = self.variable("cache", "cross_value", self._project_heads_major, "value",
                                  kv_input).value
        else:
            query, key, value, mask = self._update_cache(
                query, self._project("key", x), self._project("value", x), decode_length,
                beat_radians)
        # q_len == 1, so [b, 1, h, d] -> [b, h, 1, d] only moves a unit axis (a bitcast).
        query = constrain(jnp.swapaxes(query, 1, 2), ("batch", "heads", "length", "kv"))

        return self._output(self._attend(query, key, value, mask), features)

    def _update_cache(self, query, key, value, decode_length, beat_radians):
        """query/key/value: [batch, 1, heads, head_dim] for the current position. Returns the
        RoPE'd query (same layout), the caches [batch, heads, max_length, head_dim] and the
        causal mask over cache slots."""
        batch, _, heads, head_dim = key.shape
        shape = (batch, heads, decode_length, head_dim)
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        position = index.value
        query = self._position(query, position[None], beat_radians)
        key = self._position(key, position[None], beat_radians)
        # The single new position: [b, 1, h, d] -> [b, h, 1, d] (unit-axis move, a bitcast).
        key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, 0, position, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value,
                                                          (0, 0, position, 0))
        index.value = position + 1
        mask = (jnp.arange(decode_length) <= position)[None, None, None, :]
        key = constrain(cached_key.value, ("batch", "heads", "length", "kv"))
        value = constrain(cached_value.value, ("batch", "heads", "length", "kv"))
        return query, key, value, mask


class MLP(nn.Module):
    """Gated-GELU feed-forward."""
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        embed = x.shape[-1]
        init = nn.initializers.lecun_normal()
        gate = param_with_axes(self, "wi_gate", init, (embed, self.mlp_dim), ("embed", "mlp"))
        up = param_with_axes(self, "wi_up", init, (embed, self.mlp_dim), ("embed", "mlp"))
        down = param_with_axes(self, "wo", init, (self.mlp_dim, embed), ("mlp", "embed"))
        x = x.astype(self.dtype)
        hidden = nn.gelu(dense(x, gate.astype(self.dtype))) * dense(x, up.astype(self.dtype))
        hidden = constrain(hidden.astype(self.dtype), ("batch", "length", "mlp"))
        return constrain(dense(hidden, down.astype(self.dtype)), ("batch", "length", "embed"))


_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # torch's default GELU (erf)
    "relu": nn.relu,
}


class DenseMLP(nn.Module):
    """Ungated feed-forward wi -> activation -> wo, no biases (MusicGen's fc1/fc2, T5's relu)."""
    mlp_dim: int
    dtype: Dtype = jnp.float32
    activation: str = "gelu"  # gelu (exact) | relu

    @nn.compact
    def __call__(self, x):
        embed = x.shape[-1]
        init = nn.initializers.lecun_normal()
        wi = param_with_axes(self, "wi", init, (embed, self.mlp_dim), ("embed", "mlp"))
        wo = param_with_axes(self, "wo", init, (self.mlp_dim, embed), ("mlp", "embed"))
        hidden = _ACTIVATIONS[self.activation](dense(x.astype(self.dtype), wi.astype(self.dtype)))
        hidden = constrain(hidden.astype(self.dtype), ("batch", "length", "mlp"))
        return constrain(dense(hidden, wo.astype(self.dtype)), ("batch", "length", "embed"))
