"""Feedback collection: tiny LM -> decoded audio -> rater panel -> shards; resumable."""

import dataclasses
import os

import numpy as np
import pytest

from musicrl_jax import collection, raters
from musicrl_jax.data import feedback



@pytest.fixture(scope="module")
def setup(tiny_config, tiny_params, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    captions = np.zeros((3, tiny_config.max_caption_length), np.int32)
    captions[:, :3] = [[5, 6, 1], [7, 8, 1], [9, 1, 0]]
    metas = [{"tempo_bpm": 90, "key_pitch_class": 0, "key_mode": "major",
              "instruments": [{"program": 0, "name": "piano", "role": "melody"}], "drums": False}
             for _ in range(3)]
    prompts = collection.Prompts(captions, ["a", "b", "c"], metas)
    return dict(lm_config=tiny_config, params=tiny_params, tokenizer=tokenizer,
                panel=raters.RaterPanel.sample(6, seed=0), prompts=prompts, batch_size=4,
                show_progress=False)


def test_ratings_are_sharded_and_resume_identically(setup, tmp_path):
    out = str(tmp_path / "ratings")
    collection.collect("ratings", out, num_items=10, **setup)
    shards = sorted(os.listdir(out))
    assert shards == ["ratings-00000.jsonl", "ratings-00001.jsonl", "ratings-00002.jsonl"]
    first = feedback.read_records(out, "ratings")
    assert len(first) == 10
    assert {r["rating"] for r in first} <= {1, 2, 3, 4, 5}
    assert first[0]["audio_codes"].shape == (setup["lm_config"].max_frames, 2)
    # A job killed after two shards resumes with the third, reproducing it exactly.
    with open(os.path.join(out, shards[1])) as f:
        middle = f.read()
    os.remove(os.path.join(out, shards[1]))
    collection.collect("ratings", out, num_items=10, **setup)
    with open(os.path.join(out, shards[1])) as f:
        assert f.read() == middle


def test_preferences_hold_choices_from_the_panel(setup, tmp_path):
    out = str(tmp_path / "preferences")
    collection.collect("preferences", out, num_items=8, **setup)
    records = feedback.read_records(out, "preferences")
    assert 0 < len(records) <= 8  # skipped pairs are dropped
    assert {r["choice"] for r in records} <= {0.0, 1.0, 0.5}
    assert all(r["rater_id"] in setup["panel"].rater_ids for r in records)
    assert not all(np.array_equal(r["tokens_a"], r["tokens_b"]) for r in records)


def test_mismatched_prompts_are_a_clear_error(setup):
    from musicrl_jax.errors import ConfigError
    prompts = setup["prompts"]
    with pytest.raises(ConfigError, match="expected the same non-zero number"):
        dataclasses.replace(prompts, captions=["a"])


def test_a_crash_inside_a_shard_write_loses_only_that_batch(setup, tmp_path, monkeypatch):
    """Killed while batch 1's shard is half written: no shard 1 appears (the half file is a
    .tmp the readers ignore), and the resumed job recomputes batches 1 and 2 only, giving the
    uninterrupted job's shards byte for byte."""
    import json
    import types
    reference = str(tmp_path / "reference")
    collection.collect("preferences", reference, num_items=12, **setup)
    out = str(tmp_path / "crashed")
    written = {"batch 1": 0}

    def dumps_then_die(record, *args, **kwargs):
        if str(record.get("pair_id", "")).startswith("preferences-00001"):
            written["batch 1"] += 1
            if written["batch 1"] == 2:  # after one of batch 1's records reached the file
                raise KeyboardInterrupt("simulated kill inside the write")
        return json.dumps(record, *args, **kwargs)

    monkeypatch.setattr(feedback, "json", types.SimpleNamespace(dumps=dumps_then_die))
    with pytest.raises(KeyboardInterrupt):
        collection.collect("preferences", out, num_items=12, **setup)
    assert sorted(os.listdir(out)) == ["preferences-00000.jsonl", "preferences-00001.jsonl.tmp"]
    with open(os.path.join(out, "preferences-00001.jsonl.tmp")) as half:
        assert half.read().count("\n") == 1  # the kill really was mid-file
    monkeypatch.setattr(feedback, "json", json)
    sampled = []
    real_sample = collection._sample_codes

    def counting_sample(*args, **kwargs):
        sampled.append(len(args[2]))
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(collection, "_sample_codes", counting_sample)
    collection.collect("preferences", out, num_items=12, **setup)
    assert len(sampled) == 2  # batches 1 and 2; the finished shard 0 is not recomputed
    assert len(feedback.read_records(out, "preferences")) == len(
        feedback.read_records(reference, "preferences"))
    for shard in sorted(os.listdir(reference)):
        with open(os.path.join(reference, shard)) as a, open(os.path.join(out, shard)) as b:
            assert a.read() == b.read()


def test_sharded_collection_matches_unsharded(setup, tmp_path):
    from musicrl_jax import partitioning
    plain, sharded = str(tmp_path / "plain"), str(tmp_path / "sharded")
    collection.collect("ratings", plain, num_items=6, **{**setup, "batch_size": 6})
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    with partitioning.mesh_context(mesh):
        collection.collect("ratings", sharded, num_items=6, mesh=mesh,
                           **{**setup, "batch_size": 6})
    a, b = feedback.read_records(plain, "ratings"), feedback.read_records(sharded, "ratings")
    assert [r["rating"] for r in a] == [r["rating"] for r in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["audio_codes"], y["audio_codes"])


def test_the_spectrum_listener_never_runs_griffin_lim(setup, tmp_path, monkeypatch):
    """Collection's default listener judges the decoded magnitude; "waveform" judges the
    Griffin-Lim audio (evaluation's listener) and gives other, equally valid judgements."""
    from musicrl_jax.errors import ConfigError
    tokenizer = setup["tokenizer"]
    waveform = str(tmp_path / "waveform")
    collection.collect("ratings", waveform, num_items=8, listener="waveform", **setup)

    def no_griffin_lim(*args, **kwargs):
        raise AssertionError("the spectrum listener ran Griffin-Lim")

    monkeypatch.setattr(tokenizer, "decode", no_griffin_lim)
    spectrum = str(tmp_path / "spectrum")
    collection.collect("ratings", spectrum, num_items=8, **setup)
    a, b = (feedback.read_records(d, "ratings") for d in (waveform, spectrum))
    for x, y in zip(a, b):  # same clips and raters, heard two ways
        np.testing.assert_array_equal(x["audio_codes"], y["audio_codes"])
        assert x["rater_id"] == y["rater_id"]
    with pytest.raises(ConfigError, match="listener='ears'"):
        collection.collect("ratings", str(tmp_path / "x"), num_items=1, listener="ears", **setup)
