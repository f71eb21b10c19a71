"""`pipeline.demo`'s wiring on the tiny music data: which raters and which captions each stage
gets. The demo itself runs; only the heavy stages (training, RL, evaluation, sampling choice)
are replaced by recorders of what they were given. Feedback collection runs for real."""

import dataclasses
import os
import types

import gin
import numpy as np
import pytest

from conftest import TINY, lm_params
from musicrl_jax import collection, decoding, evaluation, pipeline, raters, rewards
from musicrl_jax.data import corpus, feedback, musicrl_music, tasks, vocab
from musicrl_jax.training import rl_finetune as rl_finetune_lib

NUM_RATERS, SEED = 10, 0
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def tiny_music(tiny_music_data):
    """The `tiny` data (53 / 5 / 2 clips, built once per session) and an untrained LM."""
    data_dir, assets = tiny_music_data
    tasks.register_tasks(data_dir, "tiny")
    size = vocab.load_caption_vocabulary(os.path.join(assets, "vocab")).vocab_size
    config = dataclasses.replace(TINY, caption_vocab_size=size, max_caption_length=48)
    params = lm_params(config, 0)
    return data_dir, assets, config, params


def _run_demo(tiny_music, run_dir, monkeypatch, **kwargs):
    """Runs `demo` with recorders in place of the heavy stages; returns what they got."""
    data_dir, assets, config, params = tiny_music
    seen = {"collect": [], "train_stage": {}, "rl": {}, "combination": []}
    real_collect = collection.collect

    def collect(kind, out_dir, **kw):
        seen["collect"].append(dict(kw, kind=kind, out_dir=out_dir))
        return real_collect(kind, out_dir, **{**kw, "show_progress": False})

    def train_stage(name, task_factory, run_dir):
        # Not trained: the factory is kept so the test can read the sources it would get.
        seen["train_stage"][name] = result = {
            "task": types.SimpleNamespace(score=lambda *a: 0.0),
            "state": types.SimpleNamespace(params=None), "eval": {}, "step": 0,
            "factory": task_factory}
        return result

    def fake_rl_finetune(**kw):
        seen["rl"][os.path.basename(kw["workdir"])] = kw
        kw["rewards"]()  # builds the reward combination (recorded below)
        return {"policy_params": params, "summary": {
            "step": 1, "init_checkpoint": kw["init_checkpoint"], "rewards": [],
            "eval_first": {}, "eval_last": {}, "train": {}}}

    def choose_sampling(model, candidates, prompts, tokenizer, panel, **kw):
        seen["choose_sampling"] = dict(kw, prompts=prompts, panel=panel)
        return candidates[0], []

    def evaluate_models(models, reference, prompts, tokenizer, eval_panel, out_dir, **kw):
        seen["evaluate"] = dict(kw, prompts=prompts, panel=eval_panel)
        return None  # no report section to write

    monkeypatch.setattr(collection, "collect", collect)
    monkeypatch.setattr(pipeline, "train_stage", train_stage)
    monkeypatch.setattr(pipeline, "pretrained_lm_stage", lambda task, run_dir, lm: (
        os.path.join(run_dir, "pretrain"), config, params, 1))
    monkeypatch.setattr(pipeline, "eval_history", lambda directory: {1: {"loss": 1.0}})
    monkeypatch.setattr(pipeline, "_write_audio", lambda assets, codes, run_dir: [])
    monkeypatch.setattr(rl_finetune_lib, "rl_finetune", fake_rl_finetune)
    monkeypatch.setattr(rewards, "load_reward_model", lambda task, checkpoint_dir: task)
    monkeypatch.setattr(rewards, "RewardCombination",
                        lambda **kw: seen["combination"].append(kw))
    monkeypatch.setattr(evaluation, "choose_sampling", choose_sampling)
    monkeypatch.setattr(evaluation, "evaluate_models", evaluate_models)
    pipeline.demo(
        run_dir=run_dir, pretrain_task=None,
        prepare_data=lambda: musicrl_music.prepare_music_data(data_dir, "tiny"),
        register_tasks=lambda: tasks.register_tasks(data_dir, "tiny"),
        num_raters=NUM_RATERS, num_sample_captions=2, export_policy="", seed=SEED, **kwargs)
    return seen


@pytest.fixture(scope="module")
def demo_run(tiny_music, tmp_path_factory):
    """One full demo (feedback, RL, sampling choice, evaluation) on the default eval split."""
    run_dir = str(tmp_path_factory.mktemp("demo"))
    # A larger validation share, so that 8 feedback records give both feedback splits.
    gin.parse_config([f"{source}.{setting}" for source in ("ratings_source", "preferences_source")
                      for setting in ("validation_fraction = 0.5", "caption_length = 48")])
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = _run_demo(
            tiny_music, run_dir, monkeypatch, quality_reward_task=lambda **kw: kw,
            preference_reward_task=lambda **kw: kw, num_ratings=8, num_preference_pairs=8,
            collect_batch_size=8, rl_experiments={"musicrl_u": {"rewards": {"preference": 1.0}}},
            sampling_candidates=(decoding.SamplingConfig(),))
        # The reward stages' sources, read as the real stage would (the gin binding above).
        seen["reward_sources"] = {name: stage["factory"]() for name, stage in
                                  seen["train_stage"].items()}
    gin.clear_config()
    return run_dir, seen


def _panel_halves():
    """(training, held-out) rater ids as `raters.split_raters` partitions the demo's panel."""
    train, held_out = raters.split_raters(raters.RaterPanel.sample(NUM_RATERS, SEED), 0.3, SEED)
    return set(train.rater_ids), set(held_out.rater_ids)


def _split(tiny_music, name):
    """One split's clip ids and captions, as the built corpus's manifest says."""
    clips = corpus.load_manifest(os.path.join(tiny_music[1], "corpus"), name)
    return {c.clip_id for c in clips}, {c.caption for c in clips}


def _rows(tokens):
    """Caption token rows without their padding, as hashable tuples."""
    return {tuple(int(t) for t in row if t) for row in np.asarray(tokens)}


def test_feedback_comes_from_the_training_raters_only(demo_run):
    run_dir, seen = demo_run
    train_ids, held_out_ids = _panel_halves()
    assert train_ids and held_out_ids and not train_ids & held_out_ids
    assert [c["kind"] for c in seen["collect"]] == ["ratings", "preferences"]
    for call in seen["collect"]:
        assert set(call["panel"].rater_ids) == train_ids, call["kind"]
        # What the collection wrote: every judgement is a training rater's.
        assert call["out_dir"] == os.path.join(run_dir, "feedback", call["kind"])
        records = feedback.read_records(call["out_dir"], call["kind"])
        assert records and {r["rater_id"] for r in records} <= train_ids, call["kind"]


def test_evaluation_hears_the_held_out_raters_and_sampling_the_training_ones(demo_run):
    _, seen = demo_run
    train_ids, held_out_ids = _panel_halves()
    assert set(seen["evaluate"]["panel"].rater_ids) == held_out_ids
    assert set(seen["choose_sampling"]["panel"].rater_ids) == train_ids


def test_the_data_splits_share_no_clip_caption_or_work(tiny_music):
    _, assets, _, _ = tiny_music
    manifest = corpus.load_manifest(os.path.join(assets, "corpus"))
    by_split = {s: [c for c in manifest if c.split == s] for s in SPLITS}
    assert all(by_split.values())
    for i, a in enumerate(SPLITS):
        prompts = tasks.prompts(a, 48)  # what every stage reads: the seqio task's split
        assert set(prompts["clip_id"]) == {c.clip_id for c in by_split[a]}
        for b in SPLITS[i + 1:]:
            for field in ("clip_id", "caption", "split_key"):
                assert not ({getattr(c, field) for c in by_split[a]}
                            & {getattr(c, field) for c in by_split[b]}), (a, b, field)


def test_training_stages_read_train_captions_and_evaluation_the_eval_split(tiny_music,
                                                                          demo_run):
    run_dir, seen = demo_run
    train_clips, train_captions = _split(tiny_music, "train")
    validation_clips, validation_captions = _split(tiny_music, "validation")
    test_clips, test_captions = _split(tiny_music, "test")
    held_out_captions = validation_captions | test_captions
    # Feedback: collected on training captions only.
    for call in seen["collect"]:
        prompts = call["prompts"]
        assert {m["clip_id"] for m in prompts.metas} == train_clips, call["kind"]
        assert not set(prompts.captions) & held_out_captions, call["kind"]
        records = feedback.read_records(call["out_dir"], call["kind"])
        assert {r["caption"] for r in records} <= train_captions, call["kind"]
    # The reward models' held-out metrics: the shards' validation captions are not trained on.
    for stage in ("quality_reward", "preference_reward"):
        sources = seen["reward_sources"][stage]
        assert sources["train_source"].name.endswith("/train"), stage
        assert sources["eval_source"].name.endswith("/validation"), stage
        assert not (_rows(sources["train_source"].arrays["caption_tokens"])
                    & _rows(sources["eval_source"].arrays["caption_tokens"])), stage
    # RL: prompted with training captions; its eval and reward statistics on validation.
    rl = seen["rl"]["musicrl_u"]
    split_rows = {s: _rows(tasks.prompts(s, 48)["caption_tokens"]) for s in SPLITS}
    assert _rows(rl["caption_source"]().arrays["caption_tokens"]) == split_rows["train"]
    assert _rows(rl["eval_source"]().arrays["caption_tokens"]) == split_rows["validation"]
    assert not split_rows["train"] & (split_rows["validation"] | split_rows["test"])
    (combination,) = seen["combination"]
    assert combination["reference_source"].name.endswith("/validation")
    # Sampling settings: chosen on validation captions, never the evaluation's.
    assert {m["clip_id"] for m in seen["choose_sampling"]["prompts"].metas} == validation_clips
    # Evaluation and the report's samples: the eval split (default "test").
    assert {m["clip_id"] for m in seen["evaluate"]["prompts"].metas} == test_clips
    assert not set(seen["evaluate"]["prompts"].captions) & train_captions
    samples = np.load(os.path.join(run_dir, "samples", "pretrained_lm.npz"))
    assert set(samples["captions"]) == test_captions


def test_evaluation_follows_eval_split(tiny_music, tmp_path, monkeypatch):
    seen = _run_demo(tiny_music, str(tmp_path), monkeypatch, eval_split="validation")
    validation_clips, validation_captions = _split(tiny_music, "validation")
    assert {m["clip_id"] for m in seen["evaluate"]["prompts"].metas} == validation_clips
    samples = np.load(os.path.join(tmp_path, "samples", "pretrained_lm.npz"))
    assert set(samples["captions"]) <= validation_captions
    assert not seen["collect"] and not seen["rl"]  # no feedback or RL stage asked for
