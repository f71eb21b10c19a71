"""Teacher-forced log-probs of the music LM rebuilt by hand for tests (issue 20, item 7).

Only the network's raw logits come from the library (`MusicLM.apply`); the delay pattern, the
one-step shift with its BOS, the log-softmax (float64) and the gather are written out here, so
tests can check `music_lm.token_logprobs` and everything built on it against values it does
not compute itself.
"""

import functools

import jax
import numpy as np

from musicrl_jax.models import music_lm


@functools.lru_cache(maxsize=None)
def _raw_logits(config):
    """`MusicLM(config).apply`, jitted: one compile per shape, not one per eager op."""
    return jax.jit(music_lm.MusicLM(config).apply)


def delayed_targets(codes, special):
    """codes [B, F, K] -> (targets [B, F + K - 1, K], mask [F + K - 1, K]) with
    targets[:, t, k] = codes[:, t - k, k] where 0 <= t - k < F, else `special`."""
    b, f, k = codes.shape
    targets = np.full((b, f + k - 1, k), special, np.int32)
    mask = np.zeros((f + k - 1, k), bool)
    for j in range(k):
        targets[:, j:j + f, j] = codes[:, :, j]
        mask[j:j + f, j] = True
    return targets, mask


def log_softmax_by_hand(config, params, captions, codes, temperature=1.0):
    """(log-probs [B, L, K, V] float64 of logits / temperature, targets [B, L, K], mask
    [L, K]) from one teacher-forced forward pass."""
    targets, mask = delayed_targets(np.asarray(codes), config.special_token)
    bos = np.full_like(targets[:, :1], config.special_token)
    inputs = np.concatenate([bos, targets[:, :-1]], axis=1)  # input t is target t - 1
    logits = np.asarray(_raw_logits(config)(
        {"params": params}, np.asarray(captions, np.int32), inputs), np.float64) / temperature
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)), targets, mask


def picked(log_probs, targets, mask):
    """Each target's log-prob [B, L, K], 0 off the mask."""
    safe = np.where(mask, targets, 0)
    return np.where(mask, np.take_along_axis(log_probs, safe[..., None], -1)[..., 0], 0.0)


def sequence_logprobs(config, params, captions, codes, temperature=1.0):
    """[B] float64: log p(codes | caption) summed over the real (masked) positions."""
    return picked(*log_softmax_by_hand(config, params, captions, codes, temperature)).sum((1, 2))
