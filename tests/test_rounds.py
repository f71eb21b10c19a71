"""Feedback rounds (musicrl_jax/rounds.py) on the tiny music data: a whole round through the
real listening page (the training raters vote over HTTP), provenance from batch to exported
vote, the refusal of another round's inputs, and a round SIGKILLed while retraining its reward
models and rerun."""

import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import sys

import gin
import numpy as np
import pytest

import killable_runs
from conftest import TINY
from musicrl_jax import registry, rounds  # noqa: F401  (registry: the gin configurables)
from musicrl_jax.data import feedback, tasks, vocab
from musicrl_jax.errors import ConfigError
from musicrl_jax.generate import Artifact
from musicrl_jax.listening.batch import PROVENANCE_FIELDS
from musicrl_jax.training import trainer
from musicrl_jax.training.tasks import MusicLMTask

NUM_RATERS, NUM_PAIRS, VOTES_PER_LISTENER = 6, 6, 4  # 4 voters (2 held out): 16 votes
REWARD_STEPS = 40  # long enough for the kill test to land inside retraining


def _bindings(data_dir: str, pretrained: str, config) -> list[str]:
    reward = [f"reward/MusicLMConfig.{f.name} = {getattr(config, f.name)!r}"
              for f in dataclasses.fields(config)]
    stages = [f"{stage}/train.{setting}" for stage in ("preference_reward", "quality_reward")
              for setting in (f"num_steps = {REWARD_STEPS}", "batch_size = 8",
                              "eval_every = 0",  # a handful of held-out votes
                              "checkpoint_every = 10", "log_every = 1",
                              "show_progress = False")]
    sources = [f"{source}.{setting}" for source in ("ratings_source", "preferences_source")
               for setting in ("caption_length = 48", f"num_frames = {config.max_frames}",
                               "validation_fraction = 0.5")]
    return reward + stages + sources + [
        f"feedback_rounds.pretrained_lm = '{pretrained}'",
        "feedback_rounds.prepare_data = @prepare_music_data",
        f"prepare_music_data.data_dir = '{data_dir}'",
        "prepare_music_data.config_name = 'tiny'",
        "feedback_rounds.register_tasks = @register_tasks",
        f"register_tasks.data_dir = '{data_dir}'", "register_tasks.config_name = 'tiny'",
        "feedback_rounds.preference_reward_task = @PreferenceRewardTask",
        "feedback_rounds.quality_reward_task = @QualityRewardTask",
        "feedback_rounds.reward_weights = {'preference': 1.0, 'quality': 0.5}",
        "PreferenceRewardTask.config = @reward/MusicLMConfig()",
        "PreferenceRewardTask.num_audio_layers = 1",
        "QualityRewardTask.config = @reward/MusicLMConfig()",
        "QualityRewardTask.num_audio_layers = 1",
        f"feedback_rounds.num_raters = {NUM_RATERS}", f"feedback_rounds.num_pairs = {NUM_PAIRS}",
        f"feedback_rounds.votes_per_listener = {VOTES_PER_LISTENER}",
        "feedback_rounds.num_eval_captions = 5", "feedback_rounds.export_batch_size = 8",
        "prompt_source.caption_length = 48", "seqio_source.caption_length = 48",
        f"seqio_source.num_frames = {config.max_frames}",
        "train_rl.num_steps = 2", "train_rl.captions_per_step = 8", "train_rl.eval_every = 0",
        "train_rl.checkpoint_every = 1",
        "train_rl.show_progress = False", "train_rl.audio_every = 0",
        "RLConfig.samples_per_caption = 2"]


@pytest.fixture(scope="module")
def setup(tiny_music_data, tmp_path_factory):
    """The tiny data, a pretrained LM on it (4 steps) and the rounds' gin bindings."""
    data_dir, assets = tiny_music_data
    tasks.register_tasks(data_dir, "tiny")
    size = vocab.load_caption_vocabulary(os.path.join(assets, "vocab")).vocab_size
    config = dataclasses.replace(TINY, caption_vocab_size=size, max_caption_length=48)
    pretrained = str(tmp_path_factory.mktemp("pretrained_lm"))
    task = MusicLMTask(
        train_source=tasks.seqio_source("train", 48, config.max_frames),
        eval_source=tasks.seqio_source("validation", 48, config.max_frames), config=config)
    trainer.train(task=task, workdir=pretrained, num_steps=4, batch_size=8, eval_every=0,
                  checkpoint_every=4, show_progress=False)
    return _bindings(data_dir, pretrained, config)


def _run(bindings, rounds_dir, **kwargs):
    gin.clear_config()
    gin.parse_config(bindings)
    try:
        return rounds.feedback_rounds(rounds_dir=rounds_dir, **kwargs)
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def one_round(setup, tmp_path_factory):
    rounds_dir = str(tmp_path_factory.mktemp("rounds"))
    finished = _run(setup, rounds_dir, num_rounds=1)
    return rounds_dir, finished


def test_a_full_round_runs_through_the_listening_page(one_round):
    rounds_dir, finished = one_round
    directory = rounds.round_dir(rounds_dir, 1)
    assert finished == [1] and rounds.round_finished(directory)
    listen = rounds.read_marker(directory, "listen")["outputs"]["summary"]
    # The admin view's summary, fetched over HTTP: the target reached by the 4 voters.
    assert listen["votes"] == listen["vote_target"] == 4 * VOTES_PER_LISTENER
    assert listen["progress"] == 1.0 and len(listen["votes_per_listener"]) == 4
    with sqlite3.connect(os.path.join(directory, "votes.db")) as db:
        # Every vote came through a logged-in session of an invited listener.
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 4
        assert db.execute("SELECT COUNT(*) FROM issued").fetchone()[0] == 16
    records = feedback.read_records(os.path.join(directory, "feedback", "preferences"),
                                    "preferences")
    assert len(records) == 16
    for step in ("preference_reward", "quality_reward", "policy"):
        assert rounds.read_marker(directory, "rewards" if "reward" in step else "rl")[
            "outputs"][step]["step"] > 0
    rl = rounds.read_marker(directory, "rl")["outputs"]
    assert rl["reference_checkpoint"] == rounds.read_json(
        os.path.join(directory, "round.json"))["inputs"]["pretrained_lm"]["path"]
    evaluation = rounds.read_json(os.path.join(directory, "evaluation.json"))
    assert evaluation["low"] <= evaluation["win_rate"] <= evaluation["high"]
    assert evaluation["wins"] + evaluation["ties"] + evaluation["losses"] > 0
    next_batch = rounds.read_json(os.path.join(directory, "next_batch", "manifest.json"))
    assert {tuple(sorted(c["model_id"] for c in p["clips"])) for p in next_batch["pairs"]} == {
        ("pretrained_lm", "round-001")}
    assert os.path.exists(os.path.join(rounds_dir, "win_rates.png"))
    status = rounds.format_status(rounds.status(rounds_dir))
    assert "round 1" in status and "finished" in status and "[16 / 16 votes]" in status


def test_every_exported_vote_traces_back_to_the_program_that_made_its_clips(one_round):
    rounds_dir, _ = one_round
    directory = rounds.round_dir(rounds_dir, 1)
    records = feedback.read_records(os.path.join(directory, "feedback", "preferences"),
                                    "preferences")
    for record in records[:3]:
        for side in ("a", "b"):
            provenance = record[f"provenance_{side}"]
            assert set(PROVENANCE_FIELDS) <= set(provenance)
            artifact = Artifact(provenance["artifact"])
            assert rounds.sha256_file(os.path.join(artifact.directory, "manifest.json")) == (
                provenance["artifact_sha256"])
            # Remake the clip: the same captions' tokens, seed and sampling.
            tokens = np.zeros((provenance["num_samples"], artifact.max_caption_length),
                              np.int32)
            tokens[provenance["sample_index"], :len(record["caption_tokens"])] = (
                record["caption_tokens"])
            codes = artifact.sample(tokens, seed=provenance["seed"],
                                    temperature=provenance["sampling"]["temperature"],
                                    guidance=provenance["sampling"]["guidance"])["codes"]
            np.testing.assert_array_equal(codes[provenance["sample_index"]],
                                          record[f"tokens_{side}"])
    ratings = feedback.read_records(os.path.join(directory, "feedback", "ratings"), "ratings")
    assert all(set(PROVENANCE_FIELDS) <= set(r["provenance"]) for r in ratings)


def test_a_round_refuses_other_inputs(one_round, setup):
    rounds_dir, _ = one_round
    with pytest.raises(ConfigError, match="settings.kl_anchor was 'pretrained', now 'previous'"):
        _run(setup + ["feedback_rounds.kl_anchor = 'previous'"], rounds_dir, num_rounds=1)
    # A finished step's output replaced: the step that reads it refuses to run.
    directory = rounds.round_dir(rounds_dir, 1)
    marker = rounds.marker_path(directory, "evaluate")
    saved = rounds.read_json(marker)
    manifest = os.path.join(directory, "export", "manifest.json")
    original = open(manifest).read()
    try:
        os.remove(marker)
        with open(manifest, "a") as f:
            f.write(" ")
        with pytest.raises(ConfigError, match="export changed after step 'serve_export'"):
            _run(setup, rounds_dir, num_rounds=1)
    finally:
        with open(manifest, "w") as f:
            f.write(original)
        rounds.write_json_atomic(marker, saved)


def test_a_round_killed_while_retraining_resumes(setup, tmp_path):
    """Round 1 up to its exported votes, copied twice: one copy retrains uninterrupted in this
    process, the other in a subprocess SIGKILLed between two reward-model checkpoints and then
    rerun to the round's end. The retrained models match step for step."""
    base = str(tmp_path / "base")
    _run(setup, base, only_round=1, until="export_votes")
    uninterrupted, killed = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    shutil.copytree(base, uninterrupted)
    shutil.copytree(base, killed)
    _run(setup, uninterrupted, only_round=1, until="rewards")

    gin_file = str(tmp_path / "rounds.gin")
    with open(gin_file, "w") as f:
        f.write("\n".join(setup) + "\n")
    command = [sys.executable, "-m", "musicrl_jax.rounds", "run", f"--gin_file={gin_file}",
               "--rounds_dir", killed, "--round", "1"]
    log = str(tmp_path / "killed.log")
    reward_dir = os.path.join(rounds.round_dir(killed, 1), "preference_reward")

    def between_checkpoints():
        steps = [row["step"] for row in trainer.read_metrics(reward_dir)
                 if "loss" in row] if os.path.exists(reward_dir) else []
        return bool(steps) and 10 < max(steps) < REWARD_STEPS

    process = killable_runs.start(command, log)
    try:
        assert killable_runs.wait_until(process, between_checkpoints, poll=0.02), (
            killable_runs.log_tail(log))
        process.send_signal(signal.SIGKILL)
        process.wait()
        directory = rounds.round_dir(killed, 1)
        assert rounds.read_marker(directory, "rewards") is None
        rerun = killable_runs.start(command, log + ".rerun")
        assert rerun.wait(timeout=900) == 0, killable_runs.log_tail(log + ".rerun")
    finally:
        killable_runs.stop_started()
    assert rounds.round_finished(directory)
    resumed = rounds.read_marker(directory, "rewards")["outputs"]
    reference = rounds.read_marker(rounds.round_dir(uninterrupted, 1), "rewards")["outputs"]
    for stage in ("preference_reward", "quality_reward"):
        assert resumed[stage]["step"] == reference[stage]["step"] == REWARD_STEPS
        assert resumed[f"{stage}_eval"] == reference[f"{stage}_eval"], stage
    losses = {}
    for name, root in (("resumed", killed), ("reference", uninterrupted)):
        rows = trainer.read_metrics(os.path.join(rounds.round_dir(root, 1), "preference_reward"))
        losses[name] = {row["step"]: row["loss"] for row in rows if "loss" in row}
    assert losses["resumed"] == losses["reference"]
    assert json.load(open(os.path.join(directory, "evaluation.json")))["captions"] == 5
