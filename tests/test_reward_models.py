"""Reward models train with the one loop at tiny scale and beat trivial baselines held out.

Data are simulated (musicrl_jax/data/feedback.py): captions determine the toy tokens; ratings
and preferences are known functions of the tokens plus noise.
"""

import dataclasses
import json
import os

import gin
import jax
import numpy as np
import pytest

from conftest import TINY, toy_task
from musicrl_jax import partitioning
from musicrl_jax.checkpoints import Checkpointer
from musicrl_jax.data import feedback
from musicrl_jax.errors import ConfigError
from musicrl_jax.models import reward_models
from musicrl_jax.training import reward_tasks, trainer
from musicrl_jax.training.reward_tasks import (PreferenceRewardTask, QualityRewardTask,
                                               TextRewardTask)

DIMS = dict(num_frames=TINY.max_frames, num_codebooks=TINY.num_codebooks,
            codebook_size=TINY.codebook_size, caption_length=TINY.max_caption_length)


def _sources(kind, num_train, num_eval):
    return (feedback.simulated_source(kind, "train", num_train, **DIMS),
            feedback.simulated_source(kind, "validation", num_eval, **DIMS))


def _train(task, workdir, num_steps, learning_rate=3e-3):
    # One device: on a 2-core CPU the 8 virtual devices only add overhead; sharding is
    # covered by test_rewards.py.
    mesh = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    gin.bind_parameter("make_optimizer.learning_rate", learning_rate)
    gin.bind_parameter("make_optimizer.warmup_steps", 10)
    result = trainer.train(task, str(workdir), num_steps=num_steps, batch_size=32, eval_every=0,
                           log_every=num_steps, checkpoint_every=10 ** 6, show_progress=False,
                           mesh=mesh)
    return result["state"].params


def test_text_reward_retrieves_the_right_clip(tmp_path):
    train, evaluation = _sources("captioned_clips", 384, 128)
    task = TextRewardTask(train, evaluation, TINY, num_audio_layers=1, projection_dim=16)
    metrics = task.heldout_metrics(_train(task, tmp_path, 50))
    print("text reward", json.dumps(metrics))
    for direction in ("text_to_audio", "audio_to_text"):
        assert metrics[f"{direction}_recall@1"] > 0.5 > 10 * metrics[f"{direction}_chance@1"]
        assert metrics[f"{direction}_recall@10"] >= max(metrics[f"{direction}_recall@1"], 0.9)
    assert metrics["mean_cosine_matched"] > metrics["mean_cosine_all"] + 0.3


def test_quality_reward_correlates_with_held_out_ratings(tmp_path):
    train, evaluation = _sources("ratings", 512, 128)
    task = QualityRewardTask(train, evaluation, TINY, num_audio_layers=1)
    metrics = task.heldout_metrics(_train(task, tmp_path, 100))
    print("quality reward", json.dumps(metrics))
    assert metrics["pearson"] > 0.5 and metrics["spearman"] > 0.5
    assert metrics["rmse"] < 0.8 * metrics["rmse_constant_baseline"]


def test_preference_reward_beats_the_majority_class(tmp_path):
    train, evaluation = _sources("preferences", 2048, 256)
    task = PreferenceRewardTask(train, evaluation, TINY, num_audio_layers=1, use_caption=False)
    metrics = task.heldout_metrics(_train(task, tmp_path, 150))
    print("preference reward", json.dumps(metrics))
    assert metrics["accuracy"] > metrics["majority_rate"] + 0.08
    assert metrics["ece"] < 0.2 and metrics["num_pairs"] == 256


def test_held_out_metric_helpers():
    assert reward_tasks.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert reward_tasks.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Ties get their average rank.
    assert reward_tasks.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2)
    # Confident and right: no calibration error; always 0.9 but right half the time: 0.4.
    assert reward_tasks.expected_calibration_error([0.99, 0.01], [1, 0]) == pytest.approx(0.01)
    assert reward_tasks.expected_calibration_error([0.9] * 4, [1, 0, 1, 0]) == pytest.approx(0.4)


def test_preference_trunk_starts_from_a_pretrained_music_lm(tmp_path):
    # A music_lm checkpoint laid out as trainer.train writes it, filled with random values
    # (shapes from tracing alone: no compile needed).
    lm_task = toy_task(num_train=8, num_eval=8)
    tx, _ = trainer.make_optimizer(total_steps=1)

    def lm_state(rng):
        params = partitioning.unbox(lm_task.init_params(rng))
        return trainer.TrainState(step=jax.numpy.zeros((), "int32"), params=params,
                                  opt_state=tx.init(params))

    values = np.random.default_rng(0)
    state = jax.tree.map(lambda s: values.standard_normal(s.shape).astype(s.dtype),
                         jax.eval_shape(lm_state, jax.random.PRNGKey(0)))
    checkpointer = Checkpointer(str(tmp_path / "lm" / "checkpoints"), kind="music_lm")
    checkpointer.save(1, state, force=True)
    checkpointer.close()
    lm_params = state.params

    task = PreferenceRewardTask(config=TINY, num_audio_layers=1, use_caption=True,
                                init_from_music_lm=str(tmp_path / "lm"))
    # Jitted, as the trainer's sharded init runs it (the LM params enter as closed-over values).
    params = jax.jit(lambda rng: partitioning.unbox(task.init_params(rng)))(
        jax.random.PRNGKey(0))
    np.testing.assert_array_equal(params["audio_tower"]["audio_embedding"],
                                  lm_params["audio_embedding"])
    for name in ("caption_embed", "encoder_0", "encoder_norm"):
        jax.tree.map(np.testing.assert_array_equal, params["text_tower"][name], lm_params[name])

    # A checkpoint of another model is refused with the kinds named.
    wrong = QualityRewardTask(config=TINY, init_from_music_lm=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="No music_lm checkpoint directory"):
        # Jitted like the trainer's init: refused while tracing, no eager init compiled first.
        jax.jit(wrong.init_params)(jax.random.PRNGKey(0))


def _rating(i, **overrides):
    record = {"clip_id": f"clip{i}", "caption": f"caption {i % 7}",
              "caption_tokens": [10 + i % 7, 1],
              "audio_codes": [[i % 32, (i + 1) % 32]] * (5 + i % 4), "rating": 1 + i % 5,
              "rater_id": "r1"}
    return {**record, **overrides}


def test_feedback_shards_round_trip_and_split_by_caption(tmp_path):
    directory = str(tmp_path / "ratings")
    feedback.write_jsonl(os.path.join(directory, "web.jsonl"), [_rating(i) for i in range(20)])
    simulated = feedback.simulated_ratings(12, seed=1, **DIMS)
    simulated.pop("clean_rating")
    simulated.update(clip_id=np.array([f"sim{i}" for i in range(12)]),
                     caption=np.array([f"sim caption {i}" for i in range(12)]),
                     rater_id=np.array(["panel"] * 12))
    feedback.write_npz(os.path.join(directory, "panel.npz"), simulated)

    records = feedback.read_records(directory, "ratings")
    assert len(records) == 32
    splits = {name: feedback.ratings_source(directory, name, caption_length=8, num_frames=12,
                                            validation_fraction=0.3)
              for name in ("train", "validation")}
    assert len(splits["train"]) + len(splits["validation"]) == 32
    captions = {name: {tuple(row) for row in source.arrays["caption_tokens"]}
                for name, source in splits.items()}
    assert not captions["train"] & captions["validation"]  # no caption in both splits
    arrays = feedback.to_arrays(records, "ratings", caption_length=8, num_frames=12)
    # Shards are read in name order: panel.npz, then web.jsonl.
    np.testing.assert_array_equal(arrays["audio_codes"][:12], simulated["audio_codes"])
    np.testing.assert_array_equal(arrays["audio_mask"][12 + 3], [1] * 8 + [0] * 4)
    assert arrays["rating"][12:17].tolist() == [1, 2, 3, 4, 5]
    assert arrays["clip_id"][12] == "clip0"
    # max_records: a prefix in shard order, before the split (learning curves' subsets).
    first = feedback.ratings_source(directory, "train", caption_length=8, num_frames=12,
                                    validation_fraction=0.0, max_records=14)
    np.testing.assert_array_equal(first.arrays["audio_codes"], arrays["audio_codes"][:14])
    with pytest.raises(ConfigError, match="32 ratings records, fewer than .*max_records=40"):
        feedback.ratings_source(directory, "train", max_records=40)


@pytest.mark.parametrize("bad, message", [
    (dict(rating=7), "line 2: field 'rating' must be a number in \\[1, 5\\]"),
    (dict(audio_codes=[[1, 2], [3]]), "line 2: field 'audio_codes' is ragged"),
    (dict(caption_tokens=[-4, 1]), "line 2: field 'caption_tokens' holds a negative id"),
    (dict(rater_id=None), "line 2: field 'rater_id' must be a string"),
])
def test_malformed_feedback_names_file_line_and_field(tmp_path, bad, message):
    feedback.write_jsonl(str(tmp_path / "bad.jsonl"), [_rating(0), _rating(1, **bad)])
    with pytest.raises(ConfigError, match=f"bad.jsonl, {message}"):
        feedback.read_records(str(tmp_path), "ratings")


def test_malformed_preferences_and_missing_directory(tmp_path):
    pair = {"caption": "c", "caption_tokens": [5, 1], "tokens_a": [[1, 2]], "tokens_b": [[3, 4]],
            "choice": 2, "rater_id": "u"}
    feedback.write_jsonl(str(tmp_path / "prefs.jsonl"), [pair])
    with pytest.raises(ConfigError, match="prefs.jsonl, line 1: field 'choice' must be 0"):
        feedback.read_records(str(tmp_path), "preferences")
    (tmp_path / "prefs.jsonl").write_text('{"caption": "c"\n')
    with pytest.raises(ConfigError, match="prefs.jsonl, line 1: not valid JSON"):
        feedback.read_records(str(tmp_path), "preferences")
    with pytest.raises(ConfigError, match="No preferences directory"):
        feedback.preferences_source(str(tmp_path / "missing"))


def test_spectral_summary_hears_the_tokenizers_decoded_log_mel(tiny_tokenizer, tmp_path):
    """With spectral_tokenizer, the audio tower starts from the tokenizer's codebooks, so its
    statistics are those of tokens_to_log_mel over the real frames (padding is not heard)."""
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    task = PreferenceRewardTask(config=TINY, num_audio_layers=1,
                                spectral_tokenizer=str(tmp_path / "tokenizer"))
    params = jax.jit(lambda rng: partitioning.unbox(task.init_params(rng)))(
        jax.random.PRNGKey(0))
    summary = reward_models.SpectralSummary(TINY.num_codebooks, TINY.codebook_size,
                                            tiny_tokenizer.n_mels)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, TINY.codebook_size, (3, TINY.max_frames, TINY.num_codebooks))
    mask = np.ones(codes.shape[:2], np.int32)
    mask[1, 9:] = 0
    out = np.asarray(summary.apply({"params": params["audio_tower"]["spectral"]}, codes, mask))
    noisy = codes.copy()
    noisy[1, 9:] = rng.integers(0, TINY.codebook_size, noisy[1, 9:].shape)
    np.testing.assert_array_equal(
        out, summary.apply({"params": params["audio_tower"]["spectral"]}, noisy, mask))

    bins = tiny_tokenizer.n_mels
    for row, frames in ((0, TINY.max_frames), (1, 9)):
        log_mel = tiny_tokenizer.tokens_to_log_mel(codes[row, :frames])  # [frames, bins]
        np.testing.assert_allclose(out[row, :bins], log_mel.mean(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out[row, bins:2 * bins], log_mel.std(0), rtol=1e-3,
                                   atol=1e-3)
        np.testing.assert_allclose(out[row, 2 * bins:3 * bins], log_mel.max(0), rtol=1e-4,
                                   atol=1e-4)
        energy = np.log(np.exp(log_mel).sum(-1))
        np.testing.assert_allclose(out[row, 4 * bins:4 * bins + 3],
                                   [energy.mean(), energy.std(), energy.max()], rtol=1e-4,
                                   atol=1e-4)
        onset = np.maximum(np.diff(log_mel, axis=0), 0).mean(-1)
        onset -= onset.mean()
        lag4 = (onset[4:] * onset[:-4]).sum() / (onset * onset).sum()
        np.testing.assert_allclose(out[row, 4 * bins + 3], lag4, rtol=1e-4, atol=1e-5)

    # A tokenizer of another shape is refused, naming the parameter and the fix.
    other = PreferenceRewardTask(config=dataclasses.replace(TINY, codebook_size=16),
                                 spectral_tokenizer=str(tmp_path / "tokenizer"))
    with pytest.raises(ConfigError, match="log_mel_codebooks.*Fix: size the reward model"):
        jax.jit(other.init_params)(jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="spectral_tokenizer=.*nowhere"):
        PreferenceRewardTask(config=TINY, spectral_tokenizer=str(tmp_path / "nowhere")).model()
