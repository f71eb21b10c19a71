"""Study helpers of evidence/ (make evidence): the gold panel reward and the learning curves'
statistics."""

import math

import jax
import numpy as np
import pytest

from evidence import gold_reward, headline, reward_scaling
from musicrl_jax import collection, raters, rewards
from musicrl_jax.audio import features
from musicrl_jax.errors import ConfigError


@pytest.fixture(scope="module")
def panel_reward(tiny_config, tiny_tokenizer):
    captions = np.zeros((3, tiny_config.max_caption_length), np.int32)
    captions[:, :3] = [[5, 6, 1], [7, 8, 1], [9, 1, 0]]
    metas = [{"tempo_bpm": bpm, "key_pitch_class": key, "key_mode": "major", "drums": drums,
              "instruments": [{"program": 0, "role": "melody"}]}
             for bpm, key, drums in ((60, 0, False), (120, 4, True), (180, 7, False))]
    prompts = collection.Prompts(captions, ["a", "b", "c"], metas)
    panel = raters.RaterPanel.sample(5, seed=0)
    return gold_reward.PanelReward.from_prompts(tiny_config, tiny_tokenizer, panel, [prompts])


def _codes(config, batch, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.codebook_size, (batch, config.max_frames,
                                                  config.num_codebooks)).astype(np.int32)


def test_the_panel_reward_is_the_panels_mean_utility_inside_jit(panel_reward, tiny_config):
    captions = np.zeros((4, tiny_config.max_caption_length), np.int32)
    captions[:, :3] = [[5, 6, 0], [7, 8, 1], [9, 1, 0], [5, 6, 1]]  # EOS or not: one caption
    codes = _codes(tiny_config, 4)
    scored = jax.jit(panel_reward.score)({}, captions, codes)
    tokenizer = panel_reward.tokenizer
    metas = [panel_reward.metas[k] for k in ((5, 6), (7, 8), (9,), (5, 6))]
    by_hand = [features.score(features.measure_magnitude(m, tokenizer.sample_rate,
                                                         tokenizer.n_fft, tokenizer.hop_length),
                              meta) for m, meta in zip(tokenizer.decode_magnitude(codes), metas)]
    np.testing.assert_allclose(scored, panel_reward.panel.utilities(by_hand).mean(axis=0),
                               rtol=1e-6)
    # The caption enters the reward: the same clip scores differently per caption.
    same_clip = np.repeat(codes[:1], 3, axis=0)
    assert len(set(np.round(np.asarray(jax.jit(panel_reward.score)(
        {}, captions[:3], same_clip)), 6))) > 1


def test_the_panel_reward_normalises_and_refuses_unknown_captions(panel_reward, tiny_config):
    from musicrl_jax.data.sources import ArraySource
    captions = np.zeros((6, tiny_config.max_caption_length), np.int32)
    captions[:, :2] = [[5, 6], [7, 8], [9, 1]] * 2
    reference = ArraySource({"caption_tokens": captions,
                             "audio_codes": _codes(tiny_config, 6, seed=1)})
    combination = rewards.RewardCombination(rewards={"gold": panel_reward},
                                            weights={"gold": 1.0}, reference_source=reference)
    total, raw = jax.jit(combination.reward_fn)(combination.params, captions,
                                                reference.arrays["audio_codes"])
    stats = combination.stats["gold"]
    np.testing.assert_allclose(total, (raw["gold"] - stats["mean"]) / stats["std"], rtol=1e-5)
    assert abs(float(np.mean(total))) < 1e-4  # normalised on this very set
    unknown = captions.copy()
    unknown[0, :2] = [11, 12]
    with pytest.raises(ConfigError, match="1 caption\\(s\\) without metadata"):
        combination.check_policy(tiny_config, unknown)


def test_pearson_interval_is_fisher_z():
    low, high = reward_scaling.pearson_interval(0.5, 103)
    assert low == pytest.approx(math.tanh(math.atanh(0.5) - 1.96 / 10), rel=1e-9)
    assert high == pytest.approx(math.tanh(math.atanh(0.5) + 1.96 / 10), rel=1e-9)
    assert reward_scaling._steps(16384, 3.0, 32, 100, 3000) == 1536
    assert reward_scaling._steps(256, 3.0, 32, 100, 3000) == 100


def test_the_headline_pools_the_seeds_judgements():
    seed_0 = {"wins": 120, "ties": 10, "losses": 70}
    seed_1 = {"wins": 90, "ties": 20, "losses": 100}
    pooled = headline.pooled_win_rate([seed_0, seed_1])
    assert pooled.n == 410 and (pooled.wins, pooled.ties, pooled.losses) == (210, 30, 170)
    assert pooled.rate == pytest.approx((210 + 15) / 410)
    alone = raters.win_rate([0] * 120 + [0.5] * 10 + [1] * 70)
    assert pooled.high - pooled.low < alone.high - alone.low  # twice the judgements


def test_the_headline_gin_file_names_a_job_with_its_studies_inputs():
    import gin
    from musicrl_jax import main as main_lib
    main_lib.parse_gin(["evidence/headline.gin"], [])
    dirs = gin.query_parameter("headline.reward_dirs")
    assert set(dirs) == {"quality", "preference"}
    assert all(d.startswith("runs/evidence/reward_scaling/") for d in dirs.values())
    assert gin.query_parameter("PreferenceRewardTask.use_caption") is True
