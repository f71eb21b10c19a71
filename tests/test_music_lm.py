import dataclasses
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lm_params
from musicrl_jax.models import layers, music_lm
from musicrl_jax.models.music_lm import MusicLM, MusicLMConfig

GIN_DIR = os.path.join(os.path.dirname(__file__), "..", "gin_configs")


def test_delay_pattern_round_trip():
    codes = jnp.arange(2 * 5 * 3).reshape(2, 5, 3)
    delayed = music_lm.apply_delay(codes, special_token=-1)
    assert delayed.shape == (2, 7, 3)
    # Codebook k is shifted right by k steps.
    np.testing.assert_array_equal(delayed[0, :, 0], [0, 3, 6, 9, 12, -1, -1])
    np.testing.assert_array_equal(delayed[0, :, 2], [-1, -1, 2, 5, 8, 11, 14])
    np.testing.assert_array_equal(music_lm.undo_delay(delayed, 3), codes)
    mask = music_lm.delay_mask(5, 3)
    np.testing.assert_array_equal(mask, delayed[0] != -1)


def test_single_codebook_has_no_delay():
    codes = jnp.arange(6).reshape(1, 6, 1)
    np.testing.assert_array_equal(music_lm.apply_delay(codes, 99), codes)


def _inputs(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    captions = np.zeros((batch, config.max_caption_length), np.int32)
    captions[:, :3] = rng.integers(2, config.caption_vocab_size, (batch, 3))
    codes = rng.integers(0, config.codebook_size, (batch, config.max_frames, config.num_codebooks))
    return jnp.asarray(captions), jnp.asarray(codes, jnp.int32)


def test_decoder_is_causal_and_uses_caption(tiny_config, tiny_params):
    captions, codes = _inputs(tiny_config)
    inputs = music_lm.decoder_inputs(music_lm.apply_delay(codes, 32), 32)
    apply = jax.jit(MusicLM(tiny_config).apply)  # one compile for the three passes
    logits = apply({"params": tiny_params}, captions, inputs)
    assert logits.shape == (2, 13, 2, 32)
    changed = inputs.at[:, 6:].set(5)
    logits_changed = apply({"params": tiny_params}, captions, changed)
    np.testing.assert_allclose(logits[:, :6], logits_changed[:, :6], atol=1e-5)
    assert not np.allclose(logits[:, 6:], logits_changed[:, 6:], atol=1e-3)
    other_caption = apply({"params": tiny_params}, captions.at[:, 0].add(1), inputs)
    assert not np.allclose(logits, other_caption, atol=1e-3)


def test_causal_attention_by_blocks_equals_the_masked_softmax_by_hand():
    """Causal self-attention scores its queries by blocks of CAUSAL_BLOCK against the keys up to
    each block's end; over several blocks and a ragged last one it must equal the whole masked
    softmax written out in float64, and its gradient the masked path's."""
    length, heads, head_dim = 2 * layers.CAUSAL_BLOCK + 21, 3, 8
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, length, 24)), jnp.float32)
    attention = layers.Attention(heads, head_dim, positions="none")
    variables = nn.meta.unbox(attention.init(jax.random.PRNGKey(0), x, causal=True))
    p = {name: np.asarray(value, np.float64) for name, value in variables["params"].items()}
    xs = np.asarray(x, np.float64)
    q, k, v = (np.einsum("ble,ehd->bhld", xs, p[name]) for name in ("query", "key", "value"))
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(head_dim)
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bhkd,hde->bqe", weights, v, p["out"])
    np.testing.assert_allclose(attention.apply(variables, x, causal=True), expected,
                               rtol=1e-4, atol=1e-5)

    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    by_blocks, masked = (jax.grad(lambda x, **kw: (attention.apply(variables, x, **kw) ** 2).sum())(
        x, **kw) for kw in ({"causal": True}, {"mask": mask}))
    np.testing.assert_allclose(by_blocks, masked, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="takes no mask or bias"):
        attention.apply(variables, x, mask=mask, causal=True)


def test_empty_caption_gives_finite_logits(tiny_config, tiny_params):
    _, codes = _inputs(tiny_config)
    empty = jnp.zeros((2, tiny_config.max_caption_length), jnp.int32)
    loss, count = jax.jit(music_lm.lm_loss, static_argnums=0)(tiny_config, tiny_params, empty,
                                                              codes)
    assert np.isfinite(loss) and int(count) == 2 * 12 * 2


def test_remat_and_bfloat16_match_float32(tiny_config, tiny_params):
    captions, codes = _inputs(tiny_config)

    def loss_and_grads(config):  # jitted: one compile per config, not one per eager op
        return jax.jit(jax.value_and_grad(
            lambda p: music_lm.lm_loss(config, p, captions, codes)[0]))(tiny_params)

    loss, grads = loss_and_grads(tiny_config)
    remat_loss, remat_grads = loss_and_grads(dataclasses.replace(tiny_config, remat="full"))
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 remat_grads, grads)
    bf16_loss, _ = loss_and_grads(dataclasses.replace(tiny_config, dtype="bfloat16"))
    np.testing.assert_allclose(bf16_loss, loss, rtol=0.03)


def _config_from_gin(size):
    gin.clear_config()
    gin.add_config_file_search_path(GIN_DIR)
    gin.parse_config_files_and_bindings(
        [f"models/{size}.gin"],
        ["CAPTION_VOCAB_SIZE=1024", "CAPTION_LENGTH=64", "CODEBOOK_SIZE=1024",
         "NUM_CODEBOOKS=4", "MAX_FRAMES=500"])
    return MusicLMConfig()


@pytest.mark.parametrize("size,low,high", [("tiny", 1e4, 1e6), ("small", 3e7, 1.2e8),
                                           ("base", 2.5e8, 4e8), ("large", 1.2e9, 2e9)])
def test_model_sizes_initialise_abstractly(size, low, high):
    config = _config_from_gin(size)
    shapes = jax.eval_shape(lambda r: music_lm.init_params(config, r), jax.random.PRNGKey(0))
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert low < count < high, f"{size}: {count / 1e6:.1f}M params"
    axes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in axes), "unannotated parameter"


BEAT = dict(beat_rope_multiples=(0.5, 1.0), frames_per_second=25.0)


def test_beat_rope_turns_once_per_beat():
    """150 BPM at 25 frames/s is 10 decoder steps per beat: the 1x pair comes back after 10
    steps and is reversed after 5; the 0.5x pair needs 20; the plain dims are standard RoPE."""
    from musicrl_jax.models.layers import beat_rope, rope
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 16))
    x = jnp.broadcast_to(x, (1, 21, 1, 16))
    positions = jnp.arange(21)
    radians = 2 * jnp.pi * (150 / 60) / 25 * jnp.ones((1,))
    out = np.asarray(beat_rope(x, positions, radians, (0.5, 1.0)))
    # Pairs are (d, d + half) within the 4 beat dims: index 0/2 turns at 0.5x, 1/3 at 1x.
    beat = out[0, :, 0, -4:]
    np.testing.assert_allclose(beat[10][[1, 3]], beat[0][[1, 3]], atol=1e-5)
    np.testing.assert_allclose(beat[5][[1, 3]], -beat[0][[1, 3]], atol=1e-5)
    np.testing.assert_allclose(beat[20][[0, 2]], beat[0][[0, 2]], atol=1e-5)
    np.testing.assert_allclose(beat[10][[0, 2]], -beat[0][[0, 2]], atol=1e-5)
    np.testing.assert_allclose(out[..., :-4], rope(x[..., :-4], positions), atol=1e-6)
    # No tempo in the caption: the beat dims are not rotated at all.
    still = np.asarray(beat_rope(x, positions, jnp.zeros((1,)), (0.5, 1.0)))
    np.testing.assert_allclose(still[0, :, 0, -4:], np.asarray(x)[0, :, 0, -4:], atol=1e-6)


def test_caption_tempo_is_read_from_its_tempo_piece():
    first = music_lm.TEMPO_FIRST_ID
    captions = jnp.array([[300, first + 116 - 40, 301, 1, 0],  # "... 116 BPM"
                          [300, 301, 302, 1, 0],  # no tempo
                          [first, 300, first + 200, 1, 0]])  # 40, then 240: the last one
    np.testing.assert_array_equal(music_lm.caption_bpm(captions), [116, 0, 240])
    config = MusicLMConfig(caption_vocab_size=400, head_dim=16, **BEAT)
    np.testing.assert_allclose(music_lm.beat_radians(config, captions[:1]),
                               [2 * np.pi * 116 / 60 / 25], rtol=1e-6)


def test_the_caption_tempo_changes_only_beat_rope_models(tiny_config):
    """Two captions equal but for their tempo pieces' ids: with the tempo's embedding rows set
    equal, only the beat-locked rotation can tell them apart."""
    first = music_lm.TEMPO_FIRST_ID
    captions = jnp.array([[60, first + 80, 1, 0], [60, first + 40, 1, 0]])
    codes = jax.random.randint(jax.random.PRNGKey(2), (1, 12, 2), 0, 32)
    inputs = music_lm.decoder_inputs(music_lm.apply_delay(codes, 32), 32)
    for beat, differs in ((BEAT, True), ({}, False)):
        config = dataclasses.replace(tiny_config, caption_vocab_size=400, **beat)
        params = lm_params(config, 1)
        table = params["caption_embed"]["embedding"]
        params["caption_embed"]["embedding"] = table.at[first + 40].set(table[first + 80])
        logits = jax.jit(MusicLM(config).apply)({"params": params}, captions,
                                                jnp.concatenate([inputs, inputs]))
        gap = float(jnp.abs(logits[0] - logits[1]).max())
        assert (gap > 1e-3) == differs, (beat, gap)


def test_beat_rope_config_is_checked_and_round_trips_json():
    with pytest.raises(ValueError, match="frames_per_second"):
        MusicLMConfig(beat_rope_multiples=(1.0,))
    with pytest.raises(ValueError, match="head_dim"):
        MusicLMConfig(head_dim=8, beat_rope_multiples=(1.0, 2.0, 4.0, 8.0),
                      frames_per_second=25.0)
    # A config read back from checkpoint JSON holds a list; it must stay usable as a jit key.
    restored = MusicLMConfig(head_dim=16, beat_rope_multiples=[0.5, 1], frames_per_second=25.0)
    assert restored.beat_rope_multiples == (0.5, 1.0) and hash(restored)
