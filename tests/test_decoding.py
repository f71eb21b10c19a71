import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lm_params
from musicrl_jax import decoding, partitioning
from musicrl_jax.decoding import SamplingConfig
from musicrl_jax.models import music_lm


def _captions(config, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    captions = np.zeros((batch, config.max_caption_length), np.int32)
    captions[:, :4] = rng.integers(2, config.caption_vocab_size, (batch, 4))
    return jnp.asarray(captions)


def test_sampler_logprobs_equal_teacher_forced_logprobs_in_bfloat16():
    """RL scores its samples teacher-forced; in bf16 both passes must agree. Sharp logits (the
    head scaled up, like a trained LM's) expose rounding that differs between the cached step
    and the full pass: attention's softmax sum in bf16 gives 0.29 nats per 256-token clip (mean
    of 24 clips); float32 sums, logits and residual keep it ~0.15. One clip's gap varies with
    its sampled tokens, hence the mean over 24."""
    config = music_lm.MusicLMConfig(caption_vocab_size=64, codebook_size=256, num_codebooks=2,
                                    embed_dim=128, num_heads=4, head_dim=32, mlp_dim=256,
                                    num_encoder_layers=1, num_decoder_layers=2, max_frames=128,
                                    dtype="bfloat16")
    params = dict(lm_params(config, 0))
    params["heads"] = params["heads"] * 8.0
    captions = jax.random.randint(jax.random.PRNGKey(1), (24, 32), 2, 64)
    out = decoding.sample(config, params, captions,
                          decoding.example_rngs(jax.random.PRNGKey(2), 24), num_frames=128)
    _, teacher_forced = decoding.sequence_logprobs(config, params, captions, out["codes"])
    gap = np.abs(np.asarray(out["sample_logprobs"]) - np.asarray(teacher_forced))
    assert np.asarray(teacher_forced).mean() > -300  # sharp: < 1.2 nats per token
    assert gap.mean() < 0.2 and gap.max() < 0.6, gap


@pytest.mark.parametrize("num_codebooks,beat", [(1, False), (3, False), (2, True)])
def test_cached_decoding_equals_full_forward_at_every_step(tiny_config, num_codebooks, beat):
    config = dataclasses.replace(tiny_config, num_codebooks=num_codebooks)
    if beat:  # tempo-locked rotary dims, with a tempo piece (id 3 + bpm - 40) in the caption
        config = dataclasses.replace(config, beat_rope_multiples=(0.5, 1.0, 2.0),
                                     frames_per_second=25.0)
    params = lm_params(config, 1)
    captions = _captions(config, 2)
    if beat:
        captions = captions.at[:, 1].set(jnp.array([music_lm.TEMPO_FIRST_ID + 80, 0]))
    codes = jax.random.randint(jax.random.PRNGKey(2), (2, config.max_frames, num_codebooks), 0,
                               config.codebook_size)
    delayed = music_lm.apply_delay(codes, config.special_token)
    full = jax.jit(music_lm.MusicLM(config).apply)(  # one compile, not one per eager op
        {"params": params}, captions, music_lm.decoder_inputs(delayed, config.special_token))
    cached = decoding.cached_logits(config, params, captions, codes)
    assert cached.shape == full.shape == (2, config.max_frames + num_codebooks - 1,
                                          num_codebooks, config.codebook_size)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)


def test_sampling_is_reproducible_and_per_example(tiny_config, tiny_params):
    captions = _captions(tiny_config)
    rngs = decoding.example_rngs(jax.random.PRNGKey(7), 4)
    first = decoding.sample(tiny_config, tiny_params, captions, rngs, num_frames=10)
    again = decoding.sample(tiny_config, tiny_params, captions, rngs, num_frames=10)
    np.testing.assert_array_equal(first["codes"], again["codes"])
    assert first["codes"].shape == (4, 10, 2)
    assert first["codes"].min() >= 0 and first["codes"].max() < tiny_config.codebook_size
    other = decoding.sample(tiny_config, tiny_params, captions,
                            decoding.example_rngs(jax.random.PRNGKey(8), 4), num_frames=10)
    assert not np.array_equal(first["codes"], other["codes"])
    # An example's clip depends on its own key and caption only, not on its batch neighbours.
    alone = decoding.sample(tiny_config, tiny_params, captions[1:2], rngs[1:2], num_frames=10)
    np.testing.assert_array_equal(alone["codes"][0], first["codes"][1])


def test_cache_and_full_prefix_sampling_agree(tiny_config, tiny_params):
    captions = _captions(tiny_config)
    rngs = decoding.example_rngs(jax.random.PRNGKey(3), 4)
    cached = decoding.sample(tiny_config, tiny_params, captions, rngs, num_frames=12)
    recomputed = decoding.sample(tiny_config, tiny_params, captions, rngs, num_frames=12,
                                 use_cache=False)
    np.testing.assert_array_equal(cached["codes"], recomputed["codes"])
    np.testing.assert_allclose(cached["sample_logprobs"], recomputed["sample_logprobs"], rtol=1e-5)


def test_sample_logprobs_match_teacher_forcing(tiny_config, tiny_params):
    captions = _captions(tiny_config)
    rngs = decoding.example_rngs(jax.random.PRNGKey(4), 4)
    out = decoding.sample(tiny_config, tiny_params, captions, rngs, num_frames=12)
    per_token, per_sequence = decoding.sequence_logprobs(tiny_config, tiny_params, captions,
                                                         out["codes"])
    np.testing.assert_allclose(per_sequence, out["sample_logprobs"], rtol=1e-5)
    np.testing.assert_allclose(per_token.sum(axis=(1, 2)), per_sequence, rtol=1e-6)
    assert per_token.shape == (4, 13, 2)
    np.testing.assert_array_equal(per_token[:, 0, 1], 0.0)  # delay slot carries no log-prob


def test_top_k_one_is_greedy(tiny_config, tiny_params):
    captions = _captions(tiny_config, 2)
    greedy = SamplingConfig(top_k=1)
    a = decoding.sample(tiny_config, tiny_params, captions,
                        decoding.example_rngs(jax.random.PRNGKey(0), 2), num_frames=8,
                        sampling=greedy)
    b = decoding.sample(tiny_config, tiny_params, captions,
                        decoding.example_rngs(jax.random.PRNGKey(1), 2), num_frames=8,
                        sampling=greedy)
    np.testing.assert_array_equal(a["codes"], b["codes"])
    logits = decoding.cached_logits(tiny_config, tiny_params, captions, a["codes"])
    delayed = music_lm.apply_delay(a["codes"], tiny_config.special_token)
    valid = music_lm.delay_mask(8, 2)
    argmax = np.asarray(jnp.argmax(logits, -1))
    np.testing.assert_array_equal(np.where(valid, argmax, -1), np.where(valid, delayed, -1))


def test_classifier_free_guidance_changes_distribution(tiny_config, tiny_params):
    captions = _captions(tiny_config)
    rngs = decoding.example_rngs(jax.random.PRNGKey(5), 4)
    plain = decoding.sample(tiny_config, tiny_params, captions, rngs, num_frames=12)
    guided = decoding.sample(tiny_config, tiny_params, captions, rngs, num_frames=12,
                             sampling=SamplingConfig(guidance_weight=3.0))
    assert guided["codes"].shape == plain["codes"].shape
    assert not np.array_equal(guided["codes"], plain["codes"])
    # Weight 0 means the unconditional model: equals sampling with empty captions.
    uncond = decoding.sample(tiny_config, tiny_params, captions, rngs, num_frames=12,
                             sampling=SamplingConfig(guidance_weight=0.0))
    empty = decoding.sample(tiny_config, tiny_params, decoding.empty_captions_like(captions),
                            rngs, num_frames=12)
    np.testing.assert_array_equal(uncond["codes"], empty["codes"])


def test_guided_sampling_follows_the_guidance_formula_at_weight_3(tiny_config, tiny_params):
    """The sampler's log-probs at weight 3 are those of log_softmax(u + 3 (c - u)), with c and u
    the teacher-forced logits given the caption and given the empty caption."""
    captions = _captions(tiny_config)
    rngs = decoding.example_rngs(jax.random.PRNGKey(6), 4)
    guided = decoding.sample(tiny_config, tiny_params, captions, rngs, num_frames=12,
                             sampling=SamplingConfig(guidance_weight=3.0))
    codes = guided["codes"]
    cond = decoding.cached_logits(tiny_config, tiny_params, captions, codes)
    uncond = decoding.cached_logits(tiny_config, tiny_params,
                                    decoding.empty_captions_like(captions), codes)
    log_probs = jax.nn.log_softmax(uncond + 3.0 * (cond - uncond))
    delayed = music_lm.apply_delay(codes, tiny_config.special_token)
    mask = music_lm.delay_mask(12, tiny_config.num_codebooks)[None]
    picked = jnp.take_along_axis(log_probs, jnp.where(mask, delayed, 0)[..., None], -1)[..., 0]
    expected = jnp.where(mask, picked, 0.0).sum(axis=(1, 2))
    np.testing.assert_allclose(guided["sample_logprobs"], expected, rtol=1e-4, atol=1e-3)
    # Weight 3 is not weight 1: the guided and conditional log-probs of these codes differ.
    plain = jax.nn.log_softmax(cond)
    plain = jnp.where(mask, jnp.take_along_axis(plain, jnp.where(mask, delayed, 0)[..., None],
                                                -1)[..., 0], 0.0).sum(axis=(1, 2))
    assert float(jnp.abs(plain - expected).max()) > 0.1


def test_sharded_sampling_matches_unsharded(tiny_config, tiny_params):
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = partitioning.tree_shardings(
        jax.eval_shape(lambda r: music_lm.init_params(tiny_config, r), jax.random.PRNGKey(0)),
        mesh)
    sharded_params = jax.device_put(tiny_params, shardings)
    captions = _captions(tiny_config, 8)
    rngs = decoding.example_rngs(jax.random.PRNGKey(6), 8)
    expected = decoding.sample(tiny_config, tiny_params, captions, rngs, num_frames=12)
    with partitioning.mesh_context(mesh):
        batch = partitioning.shard_batch({"captions": np.asarray(captions)}, mesh)
        got = decoding.sample(tiny_config, sharded_params, batch["captions"], rngs, num_frames=12)
    np.testing.assert_array_equal(got["codes"], expected["codes"])


def test_too_many_frames_is_a_clear_error(tiny_config, tiny_params):
    with pytest.raises(ValueError, match="max_frames"):
        decoding.sample(tiny_config, tiny_params, _captions(tiny_config),
                        decoding.example_rngs(jax.random.PRNGKey(0), 4), num_frames=99)


def test_inverse_cdf_sampling_matches_the_distribution():
    logits = jnp.log(jnp.array([[[0.1, 0.0, 0.6, 0.3]]]))  # token 1 has zero probability
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    tokens = jax.vmap(lambda k: decoding._inverse_cdf_sample(k[None], jax.nn.log_softmax(logits))
                      )(keys)[:, 0, 0]
    frequencies = np.bincount(np.asarray(tokens), minlength=4) / len(tokens)
    np.testing.assert_allclose(frequencies, [0.1, 0.0, 0.6, 0.3], atol=0.015)
