"""Side-by-side evaluation: tiny LM -> clips -> held-out panel win rates, rewards, KL, report."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicrl_jax import collection, decoding, evaluation, raters
from musicrl_jax.errors import ConfigError
from musicrl_jax.evaluation import ModelUnderTest

import lm_by_hand  # tests/lm_by_hand.py

NUM_CAPTIONS = 24


def MODELS(setup):
    return [setup["reference"], setup["perturbed"], setup["cool"], setup["noisy"]]


def _code_mean_reward(params, caption_tokens, audio_codes):
    """A stand-in reward model: scale * mean code id."""
    return params["scale"] * jnp.mean(audio_codes.astype(jnp.float32), axis=(1, 2))


@pytest.fixture(scope="module")
def setup(tiny_config, tiny_params, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    rng = np.random.default_rng(0)
    captions = np.zeros((NUM_CAPTIONS, tiny_config.max_caption_length), np.int32)
    for i in range(NUM_CAPTIONS):
        length = 2 + i % 4
        captions[i, :length] = rng.integers(2, tiny_config.caption_vocab_size, length)
        captions[i, length] = 1
    metas = [{"tempo_bpm": 80 + 10 * (i % 5), "key_pitch_class": i % 12, "key_mode": "major",
              "instruments": [{"program": 0, "name": "piano", "role": "melody"}],
              "drums": False} for i in range(NUM_CAPTIONS)]
    prompts = collection.Prompts(captions, [f"caption {i}" for i in range(NUM_CAPTIONS)], metas)
    _, eval_panel = raters.split_raters(raters.RaterPanel.sample(100, seed=0), 0.3, seed=0)
    leaves, treedef = jax.tree.flatten(tiny_params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    perturbed = jax.tree.unflatten(treedef, [
        leaf + 0.3 * jnp.std(leaf) * jax.random.normal(k, leaf.shape, leaf.dtype)
        for leaf, k in zip(leaves, keys)])
    reference = ModelUnderTest("pretrained", tiny_config, tiny_params)
    return dict(tiny_config=tiny_config, tiny_params=tiny_params, tokenizer=tokenizer,
                prompts=prompts, eval_panel=eval_panel, reference=reference,
                perturbed=ModelUnderTest("perturbed", tiny_config, perturbed),
                cool=ModelUnderTest("pretrained@T0.7", tiny_config, tiny_params,
                                    decoding.SamplingConfig(temperature=0.7)),
                noisy=ModelUnderTest("pretrained+noise", tiny_config, tiny_params,
                                     audio_transform=evaluation.add_noise(snr_db=-10.0)))


@pytest.fixture(scope="module")
def evaluated(setup, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evaluation"))
    result = evaluation.evaluate_models(
        MODELS(setup), setup["reference"],
        setup["prompts"], setup["tokenizer"], setup["eval_panel"], out,
        num_captions=NUM_CAPTIONS, seed=0, num_audio_examples=2,
        reward_models={"code_mean": (jax.jit(_code_mean_reward), {"scale": 2.0})})
    return out, result


def test_report_files_list_win_rates_with_cis(evaluated):
    out, result = evaluated
    for name in ("report.md", "report.html", "results.json", "win_rates.png",
                 "reward_vs_kl.png", "attribute_breakdown.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    md = open(os.path.join(out, "report.md")).read()
    page = open(os.path.join(out, "report.html")).read()
    assert result["models"] == ["pretrained", "perturbed", "pretrained@T0.7", "pretrained+noise"]
    for name in result["models"]:
        assert f"vs {name}" in md and name in page
    # "rate [low, high] (n=...)" cells, one per ordered pair.
    assert len([line for line in md.splitlines() if line.startswith("| pretrained")]) >= 2
    assert md.count("] (n=") == 12 and page.count("] (n=") == 12
    assert "reward: code_mean" in md and "KL (params)" in md
    # Audio players for the first captions of every model, pointing at written WAVs.
    assert page.count("<audio controls src=") == 2 * 4
    for paths in result["paths"]["audio"].values():
        assert len(paths) == 2 and all(os.path.exists(p) for p in paths)
    loaded = json.load(open(os.path.join(out, "results.json")))
    assert loaded["models"] == result["models"]


Z95 = 1.959963984540054  # the normal's 97.5% quantile


def _recount_win_rates(result, eval_panel):
    """Every cell of the matrix, its counts and its Wilson interval, recounted from the
    judgement records (choice 0 = a won, 1 = b won, 0.5 = tie, None = skip) with the interval
    written out here: a transposed matrix, a misrecorded choice or a tie counted as a win fails.
    Returns how many decisive judgements the recount saw."""
    names, w = result["models"], np.array(result["win_rate"])
    low, high = np.array(result["win_rate_low"]), np.array(result["win_rate_high"])
    assert w.shape == (len(names),) * 2 and np.all(np.isnan(np.diag(w)))
    by_pair = {}
    for record in result["judgements"]:
        by_pair.setdefault((record["a"], record["b"]), []).append(record)
    pairs = len(names) * (len(names) - 1) // 2  # each unordered pair judged once per caption
    assert len(by_pair) == pairs and len(result["judgements"]) == pairs * NUM_CAPTIONS
    panel_ids = set(eval_panel.rater_ids)
    decisive = 0
    for (a, b), records in by_pair.items():
        assert sorted(r["caption_index"] for r in records) == list(range(NUM_CAPTIONS))
        assert {r["rater_id"] for r in records} <= panel_ids  # held-out raters only
        values = [r["choice"] for r in records]
        wins, losses, ties = values.count(0.0), values.count(1.0), values.count(0.5)
        skips = values.count(None)
        assert wins + losses + ties + skips == NUM_CAPTIONS
        decisive += wins + losses
        n = wins + losses + ties
        for x, y, won, lost in ((a, b, wins, losses), (b, a, losses, wins)):
            stored = result["win_rates"][f"{x}|{y}"]
            assert (stored["wins"], stored["ties"], stored["losses"], stored["skips"]) == (
                won, ties, lost, skips), (x, y)
            p = (won + ties / 2) / n
            # Wilson: the p the score test |p_hat - p| <= z sqrt(p (1 - p) / n) accepts.
            roots = np.sort(np.roots([1 + Z95 ** 2 / n, -(2 * p + Z95 ** 2 / n), p ** 2]).real)
            i, j = names.index(x), names.index(y)
            assert w[i, j] == pytest.approx(p, abs=1e-12), (x, y)
            assert (low[i, j], high[i, j]) == pytest.approx(tuple(np.clip(roots, 0, 1)),
                                                             abs=1e-9), (x, y)
    return decisive


def test_win_rate_matrix_is_recomputed_from_the_stored_judgements(evaluated, setup):
    decisive = _recount_win_rates(evaluated[1], setup["eval_panel"])
    assert decisive > 0  # the recount saw real choices, not only skips


def test_kl_is_recomputed_by_hand_from_each_models_own_samples(evaluated, setup):
    """KL(pi || pi_ref) of the perturbed model and KL(q || pi_ref) of the reference sampled at
    temperature 0.7, recomputed from the models' samples (the same per-caption keys) with
    teacher-forced log-probs done by hand (tests/lm_by_hand.py): mean and standard error over
    the captions. The reference's own kl is 0 by construction, so it is not checked."""
    _, result = evaluated
    config, ref_params = setup["tiny_config"], setup["tiny_params"]
    captions = np.asarray(setup["prompts"].caption_tokens)[:NUM_CAPTIONS]
    keys = decoding.example_rngs(jax.random.PRNGKey(0), NUM_CAPTIONS)  # evaluate_models' seed

    def samples(model):
        return np.asarray(decoding.sample(config, model.params, captions, keys,
                                          num_frames=config.max_frames,
                                          sampling=model.sampling)["codes"])

    def mean_se(terms):
        return terms.mean(), terms.std(ddof=1) / np.sqrt(len(terms))

    perturbed = setup["perturbed"]
    codes = samples(perturbed)
    terms = (lm_by_hand.sequence_logprobs(config, perturbed.params, captions, codes)
             - lm_by_hand.sequence_logprobs(config, ref_params, captions, codes))
    kl, se = mean_se(terms)
    assert kl > 3 * se > 0, (kl, se)  # the perturbation moved pi measurably
    assert result["kl"]["perturbed"] == pytest.approx(kl, rel=1e-4, abs=1e-4)
    assert result["kl_stderr"]["perturbed"] == pytest.approx(se, rel=1e-3, abs=1e-4)
    # log q of the temperature-0.7 samples is log_softmax(logits / 0.7) of their tokens.
    codes = samples(setup["cool"])
    terms = (lm_by_hand.sequence_logprobs(config, ref_params, captions, codes, temperature=0.7)
             - lm_by_hand.sequence_logprobs(config, ref_params, captions, codes))
    kl, se = mean_se(terms)
    assert kl > 3 * se > 0, (kl, se)
    assert result["kl_sampling"]["pretrained@T0.7"] == pytest.approx(kl, rel=1e-4, abs=1e-4)
    assert result["kl_sampling_stderr"]["pretrained@T0.7"] == pytest.approx(se, rel=1e-3,
                                                                            abs=1e-4)
    # Sampling settings and audio transforms are not part of pi: these share the reference's
    # parameters, and their log-probs are computed apart from the reference's.
    assert result["kl"]["pretrained@T0.7"] == result["kl"]["pretrained+noise"] == 0.0
    assert result["kl_sampling"]["pretrained"] == pytest.approx(0.0, abs=1e-3)


def test_panel_prefers_a_model_over_its_noise_corrupted_self(evaluated):
    _, result = evaluated
    names = result["models"]
    i, j = names.index("pretrained"), names.index("pretrained+noise")
    assert result["win_rate_low"][i][j] > 0.5
    attrs = result["mean_attributes"]
    assert attrs["pretrained"]["snr"] > attrs["pretrained+noise"]["snr"]
    # The breakdown sees that the panel picks the cleaner clip.
    bd = result["attribute_breakdown"]
    k = bd["attributes"].index("snr")
    assert bd["agreement"][k] > 0.5 and bd["num_judgements"] > 0


def test_rewards_have_means_and_standard_errors(evaluated, setup):
    _, result = evaluated
    mean, se = result["rewards"]["pretrained"]["code_mean"]
    assert 0.0 <= mean <= 2.0 * setup["tiny_config"].codebook_size and se > 0
    # Rewards score tokens: the noise transform does not change them.
    assert result["rewards"]["pretrained+noise"]["code_mean"] == [mean, se]


def test_is_deterministic(setup, evaluated, tmp_path):
    _, first = evaluated
    again = evaluation.evaluate_models(
        MODELS(setup), setup["reference"],
        setup["prompts"], setup["tokenizer"], setup["eval_panel"], str(tmp_path),
        num_captions=NUM_CAPTIONS, seed=0, num_audio_examples=0,
        reward_models={"code_mean": (jax.jit(_code_mean_reward), {"scale": 2.0})})
    for key in ("win_rate", "kl", "rewards", "judgements", "mean_attributes"):
        assert json.dumps(again[key]) == json.dumps(first[key]), key


def test_bad_input_is_a_clear_error(setup, tmp_path):
    ref, common = setup["reference"], (setup["prompts"], setup["tokenizer"], setup["eval_panel"],
                                       str(tmp_path))
    with pytest.raises(ConfigError, match="at least 2"):
        evaluation.evaluate_models([ref], ref, *common, num_captions=2)
    with pytest.raises(ConfigError, match="num_captions"):
        evaluation.evaluate_models([ref, setup["perturbed"]], ref, *common,
                                   num_captions=NUM_CAPTIONS + 1)
    wide = ModelUnderTest("wide", setup["tiny_config"].__class__(
        **{**vars(setup["tiny_config"]), "num_codebooks": 3}), setup["tiny_params"])
    with pytest.raises(ConfigError, match="tokenizer"):
        evaluation.evaluate_models([ref, wide], ref, *common, num_captions=2)
    with pytest.raises(ConfigError, match="more than once"):
        evaluation.evaluate_models([ref, setup["perturbed"], setup["perturbed"]], ref, *common,
                                   num_captions=2)
    with pytest.raises(ConfigError, match="score_fn"):
        evaluation.evaluate_models([ref, setup["perturbed"]], ref, *common, num_captions=2,
                                   reward_models={"r": _code_mean_reward})
    with pytest.raises(ConfigError, match="eval_panel"):
        evaluation.evaluate_models([ref, setup["perturbed"]], ref, *common[:2], None,
                                   str(tmp_path), num_captions=2)


# --- reference systems ("original", "tokenized"), the chance baseline, spectrograms ------------


def _click_track(bpm, num_samples, sample_rate):
    """1 kHz clicks on every beat at `bpm`: a render whose tempo the features can measure."""
    t = np.arange(int(0.03 * sample_rate)) / sample_rate
    click = np.sin(2 * np.pi * 1000 * t) * np.exp(-t / 0.008)
    y = np.zeros(num_samples, np.float32)
    for start in (np.arange(0, num_samples / sample_rate, 60.0 / bpm) * sample_rate).astype(int):
        y[start:start + len(click)] += click[:num_samples - start]
    return 0.5 * y


def _renders(prompts, tokenizer, seconds):
    return [_click_track(m["tempo_bpm"], int(seconds * tokenizer.sample_rate),
                         tokenizer.sample_rate) for m in prompts.metas]


@pytest.fixture(scope="module")
def with_references(setup, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evaluation_references"))
    result = evaluation.evaluate_models(
        [setup["reference"], setup["perturbed"]], setup["reference"], setup["prompts"],
        setup["tokenizer"], setup["eval_panel"], out, num_captions=NUM_CAPTIONS, seed=0,
        num_audio_examples=2, reference_audio=_renders(setup["prompts"], setup["tokenizer"], 1.0),
        reward_models={"code_mean": (jax.jit(_code_mean_reward), {"scale": 2.0})})
    return out, result


def test_references_are_judged_like_models_and_listed_first(with_references, setup):
    out, result = with_references
    assert result["models"] == ["original", "tokenized", "pretrained", "perturbed"]
    assert result["references"] == ["original", "tokenized"]
    assert _recount_win_rates(result, setup["eval_panel"]) > 0  # rows, columns in table order
    for name in ("original", "tokenized"):
        assert np.isnan(result["kl"][name]) and np.isnan(result["kl_sampling"][name])
        mean, se = result["rewards"][name]["code_mean"]
        assert np.isfinite(mean) and np.isfinite(se)
        assert set(result["mean_attributes"][name]) == set(evaluation.features.ATTRIBUTE_NAMES)
        assert len(result["paths"]["audio"][name]) == 2
    # Rewards see tokens: the render's tokens are its round trip's.
    assert result["rewards"]["original"] == result["rewards"]["tokenized"]
    assert os.path.getsize(result["paths"]["spectrograms_png"]) > 0
    assert result["paths"]["spectrograms_png"] == os.path.join(out, "spectrograms.png")
    md = open(os.path.join(out, "report.md")).read()
    page = open(os.path.join(out, "report.html")).read()
    for text in (md, page):
        assert "Reference systems (not models)" in text and "spectrograms.png" in text
        assert "Text adherence against chance" in text and "caption 0" in text
    assert md.count("] (n=") == 12 and page.count("<audio controls src=") == 2 * 4
    assert "| original (reference) | - | " in md
    assert md.split("| tokenized (reference) |")[1].split("\n")[0].endswith("| - | - |")
    loaded = json.load(open(os.path.join(out, "results.json")))
    assert loaded["models"] == result["models"] and np.isnan(loaded["kl"]["tokenized"])


def test_references_leave_the_model_comparison_unchanged(evaluated, with_references):
    (_, alone), (_, together) = evaluated, with_references
    for a, b in (("pretrained", "perturbed"), ("perturbed", "pretrained")):
        assert together["win_rates"][f"{a}|{b}"] == alone["win_rates"][f"{a}|{b}"]
    for name in ("pretrained", "perturbed"):
        assert together["mean_attributes"][name] == alone["mean_attributes"][name]
        assert together["kl"][name] == alone["kl"][name]


def test_caption_derangement_has_no_fixed_point():
    for n in range(2, 40):
        for seed in range(4):
            perm = evaluation.caption_derangement(n, seed)
            assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))
            np.testing.assert_array_equal(perm, evaluation.caption_derangement(n, seed))
    assert evaluation.caption_derangement(1, 0) is None


TEMPOS = (75, 84, 93, 104, 116, 130)  # no two within the tempo score's width or an octave apart


@pytest.fixture(scope="module")
def chance_run(setup, tmp_path_factory):
    """References that follow their captions' tempo vs a system that plays another caption's
    render (ignores its caption), on clips long enough to measure a tempo."""
    import dataclasses
    tokenizer = setup["tokenizer"]
    n = len(TEMPOS)
    metas = [{**setup["prompts"].metas[i], "tempo_bpm": bpm} for i, bpm in enumerate(TEMPOS)]
    prompts = collection.Prompts(setup["prompts"].caption_tokens[:n],
                                 [f"clicks at {bpm} BPM" for bpm in TEMPOS], metas)
    renders = _renders(prompts, tokenizer, 2.5)
    config = dataclasses.replace(setup["tiny_config"], max_frames=100)
    lm = ModelUnderTest("lm", config, setup["tiny_params"])

    def other_captions_render(waveforms, sample_rate):
        return np.stack([renders[(i + 1) % n][:waveforms.shape[1]]
                         for i in range(len(waveforms))])

    ignores = ModelUnderTest("ignores caption", config, setup["tiny_params"],
                             audio_transform=other_captions_render)
    out = str(tmp_path_factory.mktemp("evaluation_chance"))
    return evaluation.evaluate_models([lm, ignores], lm, prompts, tokenizer, setup["eval_panel"],
                                      out, num_captions=n, seed=3, num_audio_examples=0,
                                      reference_audio=renders)


def test_chance_baseline_and_headroom(chance_run):
    result = chance_run
    perm = np.array(result["caption_derangement"])
    assert not np.any(perm == np.arange(len(TEMPOS)))
    mean, chance = result["mean_attributes"], result["chance_attributes"]
    for name in ("original", "tokenized"):
        assert mean[name]["tempo_match"] > 0.9
        assert mean[name]["tempo_match"] > chance[name]["tempo_match"] + 0.7
    text = set(evaluation.features.GROUPS["text"])
    assert set(result["chance"]) == text and set(result["headroom"]["lm"]) == text
    assert result["chance"] == chance["tokenized"]
    assert result["headroom"]["tokenized"]["tempo_match"] == pytest.approx(1.0)
    assert result["headroom"]["original"]["tempo_match"] == pytest.approx(1.0, abs=0.1)
    assert abs(result["headroom"]["ignores caption"]["tempo_match"]) < 0.15
    md = open(result["paths"]["report_md"]).read()
    assert "tempo_match: mean (vs other caption) headroom" in md


def test_chance_without_references_is_the_mean_over_systems(evaluated):
    out, result = evaluated
    assert result["references"] == [] and result["headroom"] == {}
    assert "spectrograms_png" not in result["paths"]
    for attr, value in result["chance"].items():
        assert value == pytest.approx(np.mean([result["chance_attributes"][n][attr]
                                               for n in result["models"]]))
    assert "Text adherence against chance" in open(os.path.join(out, "report.md")).read()


def test_bad_reference_audio_is_a_clear_error(setup, tmp_path):
    ref = setup["reference"]
    common = (setup["prompts"], setup["tokenizer"], setup["eval_panel"], str(tmp_path))
    good = _renders(setup["prompts"], setup["tokenizer"], 0.5)

    def evaluate(models, audio):
        evaluation.evaluate_models(models, ref, *common, num_captions=4, reference_audio=audio)

    with pytest.raises(ConfigError, match=r"reference_audio has 3 clip\(s\) but num_captions=4"):
        evaluate([ref, setup["perturbed"]], good[:3])
    with pytest.raises(ConfigError, match=r"reference_audio\[2\] has shape \(2, 8000\).*1-D"):
        evaluate([ref, setup["perturbed"]], good[:2] + [np.stack([good[2]] * 2)] + good[3:])
    nan_clip = good[1].copy()
    nan_clip[10] = np.nan
    with pytest.raises(ConfigError, match=r"reference_audio\[1\] has 1 non-finite"):
        evaluate([ref, setup["perturbed"]], [good[0], nan_clip] + good[2:])
    tokenized = ModelUnderTest("tokenized", setup["tiny_config"], setup["tiny_params"])
    with pytest.raises(ConfigError, match=r"\['tokenized'\] are taken by the reference"):
        evaluate([ref, tokenized], good)


def test_choose_sampling_picks_the_setting_the_panel_likes_best(setup):
    from musicrl_jax.audio import features
    candidates = [decoding.SamplingConfig(), decoding.SamplingConfig(temperature=0.3),
                  decoding.SamplingConfig()]
    num = 8
    best, rows = evaluation.choose_sampling(setup["reference"], candidates, setup["prompts"],
                                            setup["tokenizer"], setup["eval_panel"],
                                            num_captions=num, seed=3)
    assert len(rows) == 3 and rows[0] == rows[2]  # same keys: same clips, same utility
    assert rows[0]["utility"] != rows[1]["utility"]
    assert best is candidates[int(np.argmax([r["utility"] for r in rows]))]
    # The utility is the panel's mean over exactly these clips.
    config, params = setup["tiny_config"], setup["tiny_params"]
    codes = decoding.sample(config, params, np.asarray(setup["prompts"].caption_tokens)[:num],
                            decoding.example_rngs(jax.random.PRNGKey(3), num),
                            num_frames=config.max_frames, sampling=candidates[1])["codes"]
    waveforms = setup["tokenizer"].decode(np.asarray(codes))
    attributes = features.batch_attributes(list(waveforms), setup["tokenizer"].sample_rate,
                                           setup["prompts"].metas[:num])
    assert rows[1]["utility"] == pytest.approx(
        float(setup["eval_panel"].utilities(attributes).mean()), rel=1e-6)
    assert rows[1]["key_match"] == pytest.approx(np.mean([a["key_match"] for a in attributes]))
    with pytest.raises(ConfigError, match="no candidate"):
        evaluation.choose_sampling(setup["reference"], [], setup["prompts"], setup["tokenizer"],
                                   setup["eval_panel"], num_captions=num)
