"""Simulated rater panel: consistency with the caption, quality sensitivity, subjectivity,
determinism, disjoint train/eval raters and win-rate statistics.

Clips are rendered on the fly with FluidSynth from small MIDI pieces (no corpus needed): each
piece is rendered at the caption's tempo and at double tempo (the same notes, twice the BPM,
so the 5 s window holds twice as much music rather than silence).
"""

import os

import numpy as np
import pytest

from musicrl_jax import raters
from musicrl_jax.audio import features, synthesis
from musicrl_jax.data.clips import MidiSegment, MidiVoice, midi_bytes

try:
    synthesis.find_fluidsynth()
    synthesis.find_soundfont()
    HAVE_SYNTH = True
except synthesis.SynthesisUnavailableError:
    HAVE_SYNTH = False
needs_synth = pytest.mark.skipif(not HAVE_SYNTH, reason="FluidSynth/soundfont not installed")

SR = 16000
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
PIECES = (
    dict(name="piano_c", tonic=0, mode="major", bpm=100, melody=0, accomp=0, drums=False),
    dict(name="flute_am", tonic=9, mode="minor", bpm=80, melody=73, accomp=48, drums=False),
    dict(name="guitar_g", tonic=7, mode="major", bpm=112, melody=24, accomp=24, drums=False),
    dict(name="violin_d", tonic=2, mode="major", bpm=92, melody=40, accomp=42, drums=True),
)


def _voices(piece, bars=6):
    scale = SCALES[piece["mode"]]
    base = 60 + piece["tonic"] - (12 if piece["tonic"] > 6 else 0)
    degrees = (0, 2, 4, 2, 3, 1, 4, 4, 5, 4, 3, 2, 1, 2, 0, 0)
    rhythm = (0.5, 0.5, 1.0, 0.5, 0.5, 1.0)
    melody, t, i = [], 0.0, 0
    while t < 4 * bars:
        d, deg = rhythm[i % len(rhythm)], degrees[i % len(degrees)]
        melody.append((t, 0.95 * d, (base + 12 + scale[deg % 7],), 96))
        t, i = t + d, i + 1
    chords = []
    for bar in range(bars):
        root = (0, 3, 4, 0)[bar % 4]  # I IV V I
        pitches = tuple(base - 12 + scale[(root + k) % 7] + (12 if root + k >= 7 else 0)
                        for k in (0, 2, 4))
        chords += [(4.0 * bar + beat, 0.9, pitches, 70) for beat in range(4)]
    voices = [MidiVoice(piece["melody"], "melody", melody),
              MidiVoice(piece["accomp"], "accompaniment", chords)]
    if piece["drums"]:
        hits = [(float(b), 0.25, (36 if b % 2 == 0 else 38,), 100) for b in range(4 * bars)]
        hits += [(b + 0.5, 0.2, (42,), 70) for b in range(4 * bars)]
        voices.append(MidiVoice(0, "drums", hits, drums=True))
    return voices


def _meta(piece):
    instruments = [{"program": piece["melody"], "name": "", "role": "melody"}]
    if piece["accomp"] != piece["melody"]:
        instruments.append({"program": piece["accomp"], "name": "", "role": "accompaniment"})
    return {"tempo_bpm": piece["bpm"], "tempo_beat": "quarter note",
            "key_pitch_class": piece["tonic"], "key_mode": piece["mode"],
            "instruments": instruments, "drums": piece["drums"], "time_signature": "4/4"}


def _render(piece, tempo_factor, out_dir):
    segment = MidiSegment(_voices(piece), int(round(piece["bpm"] * tempo_factor)), 1.0, 24.0,
                          "4/4")
    data, _ = midi_bytes([segment])
    path = os.path.join(out_dir, f"{piece['name']}_x{tempo_factor:g}.mid")
    with open(path, "wb") as f:
        f.write(data)
    return synthesis.render_midi(path, path[:-4] + ".wav", duration_seconds=5.0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """{(name, tempo_factor): (waveform, caption_meta)} for every piece at 1x and 2x tempo."""
    if not HAVE_SYNTH:
        pytest.skip("FluidSynth/soundfont not installed")
    out = str(tmp_path_factory.mktemp("rater_clips"))
    return {(p["name"], f): (_render(p, f, out), _meta(p)) for p in PIECES for f in (1.0, 2.0)}


@pytest.fixture(scope="module")
def attrs(clips):
    return {k: features.clip_attributes(w, SR, m) for k, (w, m) in clips.items()}


def _noisy(waveform, snr_db, seed=0):
    rng = np.random.default_rng(seed)
    rms = np.sqrt(np.mean(waveform ** 2))
    noise = rng.standard_normal(len(waveform)) * rms * 10 ** (-snr_db / 20)
    return np.clip(waveform + noise, -1, 1).astype(np.float32)


# --- features -------------------------------------------------------------------------------------
def test_attributes_are_documented_and_normalised(attrs):
    for a in attrs.values():
        assert set(a) == set(features.ATTRIBUTE_NAMES)
        assert all(0.0 <= v <= 1.0 and np.isfinite(v) for v in a.values()), a
    assert len(features.ATTRIBUTES) == len(set(features.ATTRIBUTE_NAMES))


@needs_synth
def test_text_adherence_attributes_track_the_caption(clips, attrs):
    for p in PIECES:
        a = attrs[(p["name"], 1.0)]
        assert a["key_match"] > 0.8, (p["name"], a["key_match"])
        assert a["tempo_match"] > 0.8, (p["name"], a["tempo_match"])
        # the same audio against a caption in a distant key (tritone away) and half the BPM
        wrong = dict(_meta(p), key_pitch_class=(p["tonic"] + 6) % 12, tempo_bpm=p["bpm"] * 0.7)
        b = features.clip_attributes(clips[(p["name"], 1.0)][0], SR, wrong)
        assert b["key_match"] < a["key_match"] - 0.5 and b["tempo_match"] < 0.2


def test_quality_attributes_see_noise_clipping_and_silence(clips):
    wave = clips[("piano_c", 1.0)][0]
    meta = clips[("piano_c", 1.0)][1]
    clean = features.clip_attributes(wave, SR, meta)
    noisy = features.clip_attributes(_noisy(wave, 5.0), SR, meta)
    clipped = features.clip_attributes(np.clip(wave * 8, -1, 1), SR, meta)
    silent = features.clip_attributes(np.concatenate([wave[:SR], np.zeros(4 * SR, np.float32)]),
                                      SR, meta)
    assert noisy["snr"] < clean["snr"] - 0.3 and noisy["tonality"] < clean["tonality"]
    assert noisy["smoothness"] < clean["smoothness"]
    assert clipped["no_clipping"] < 0.5 < clean["no_clipping"]
    assert silent["non_silence"] < 0.4 < clean["non_silence"]
    zeros = features.clip_attributes(np.zeros(5 * SR, np.float32), SR, meta)
    assert zeros["tempo_match"] == 0.0 and zeros["non_silence"] == 0.0
    # other sample rates are resampled to 16 kHz first; batched helper matches
    from scipy.signal import resample_poly
    at_32k = features.clip_attributes(resample_poly(wave, 2, 1), 32000, meta)
    assert abs(at_32k["key_match"] - clean["key_match"]) < 0.1
    batch = features.batch_attributes([wave, wave], SR, [meta, meta], as_array=True)
    assert batch.shape == (2, len(features.ATTRIBUTE_NAMES))
    np.testing.assert_allclose(batch[0], [clean[n] for n in features.ATTRIBUTE_NAMES], atol=1e-6)


# --- consistency ----------------------------------------------------------------------------------
def test_caption_tempo_beats_double_tempo_for_most_raters(attrs):
    panel = raters.RaterPanel.sample(50, seed=0)
    choices = []
    for i, p in enumerate(PIECES):
        choices += raters.compare_all(panel, attrs[(p["name"], 1.0)], attrs[(p["name"], 2.0)],
                                      seed=i)
    result = raters.win_rate(choices)  # pooled sampled choices: 50 raters x 4 pieces
    assert result.rate > 0.6 and result.low > 0.5, result
    # per rater: the Bradley-Terry probability of preferring the caption tempo, averaged over
    # the pieces; "most raters" = more than 70% of them prefer it on average
    p_a = np.array([[raters.preference_probability(r, attrs[(p["name"], 1.0)],
                                                   attrs[(p["name"], 2.0)]) for p in PIECES]
                    for r in panel])
    assert np.mean(p_a.mean(axis=1) > 0.5) > 0.7, p_a.mean(axis=1)


def test_added_noise_lowers_ratings(clips, attrs):
    panel = raters.RaterPanel.sample(50, seed=1)
    for p in PIECES[:2]:
        wave, meta = clips[(p["name"], 1.0)]
        clean = np.mean(raters.rate_all(panel, attrs[(p["name"], 1.0)]))
        noisy, noisier = (np.mean(raters.rate_all(panel, features.clip_attributes(
            _noisy(wave, snr_db), SR, meta))) for snr_db in (10.0, 0.0))
        assert noisier < noisy < clean - 0.25, (p["name"], clean, noisy, noisier)


# --- subjectivity ----------------------------------------------------------------------------------
def test_raters_disagree_on_random_pairs_but_agree_on_clear_ones(clips, attrs):
    panel = raters.RaterPanel.sample(40, seed=2)
    keys = sorted(attrs)
    rng = np.random.default_rng(0)
    pairs = [(attrs[keys[i]], attrs[keys[j]])
             for i, j in (rng.choice(len(keys), 2, replace=False) for _ in range(20))]
    random_agreement = raters.agreement(panel, pairs, seed=0)
    assert 0.5 < random_agreement < 0.9, random_agreement
    clear = []
    for p in PIECES[:2]:
        wave, meta = clips[(p["name"], 1.0)]
        clear.append((attrs[(p["name"], 1.0)],
                      features.clip_attributes(_noisy(wave, 0.0), SR, meta)))
    clear_agreement = raters.agreement(panel, clear, seed=0)
    assert clear_agreement > 0.75 and clear_agreement > random_agreement, clear_agreement


def test_panel_is_diverse_and_idiosyncratic():
    panel = raters.RaterPanel.sample(200, seed=3)
    kinds = {r.archetype for r in panel}
    assert {"tempo", "timbre", "quality", "noisy", "balanced"} <= kinds
    tempo_fans = [r.group_weights["tempo"] for r in panel if r.archetype == "tempo"]
    others = [r.group_weights["tempo"] for r in panel if r.archetype != "tempo"]
    assert np.mean(tempo_fans) > 2 * np.mean(others)
    noisy = [r.temperature for r in panel if r.archetype == "noisy"]
    calm = [r.temperature for r in panel if r.archetype != "noisy"]
    assert np.median(noisy) > 2 * np.median(calm)
    for r in panel:  # judgement weights form a distribution; taste weights are signed
        judged = sum(r.taste[n] for g in raters.TASTE_GROUPS for n in raters.GROUP_ATTRIBUTES[g])
        assert abs(judged - 1.0) < 1e-9
    signs = np.sign([[r.taste[d] for d in raters.DESCRIPTIVE] for r in panel])
    assert 0.3 < np.mean(signs > 0) < 0.7


# --- determinism, splits, statistics ---------------------------------------------------------------
def test_seeded_panels_and_choices_are_deterministic(attrs):
    a, b = attrs[("piano_c", 1.0)], attrs[("flute_am", 1.0)]
    p1, p2 = raters.RaterPanel.sample(30, seed=7), raters.RaterPanel.sample(30, seed=7)
    assert p1 == p2 and p1 != raters.RaterPanel.sample(30, seed=8)
    assert raters.RaterPanel.sample(10, seed=7).raters == p1.raters[:10]  # prefix-stable
    assert raters.compare_all(p1, a, b, seed=3) == raters.compare_all(p2, a, b, seed=3)
    assert raters.rate_all(p1, a) == raters.rate_all(p2, a)
    assert all(1 <= r <= 5 for r in raters.rate_all(p1, a, seed=0))
    ids = p1.rater_ids
    assert len(set(ids)) == len(ids)


def test_split_raters_is_disjoint_and_seeded():
    panel = raters.RaterPanel.sample(40, seed=0)
    train, evaluation = raters.split_raters(panel, held_out_fraction=0.25, seed=1)
    assert len(train) == 30 and len(evaluation) == 10
    assert not set(train.rater_ids) & set(evaluation.rater_ids)
    assert set(train.rater_ids) | set(evaluation.rater_ids) == set(panel.rater_ids)
    again = raters.split_raters(panel, held_out_fraction=0.25, seed=1)
    assert again[1].rater_ids == evaluation.rater_ids
    with pytest.raises(ValueError):
        raters.split_raters(panel, held_out_fraction=1.0)


def test_win_rate_counts_ties_as_half_and_skips_as_nothing():
    result = raters.win_rate([0, 0, 1, "tie", 0.5, "skip", None])
    assert (result.wins, result.losses, result.ties, result.skips) == (2, 1, 2, 2)
    assert result.rate == pytest.approx(3 / 5)
    assert result.low < result.rate < result.high
    assert raters.choice_value("tie") == 0.5 and raters.choice_value("skip") is None
    with pytest.raises(ValueError):
        raters.win_rate([0, 1], method="magic")


Z95 = 1.959963984540054  # the normal's 97.5% quantile


def _wilson_by_definition(p_hat, n, z=Z95):
    """The p that the score test |p_hat - p| <= z sqrt(p (1 - p) / n) accepts: the roots of
    (1 + z^2 / n) p^2 - (2 p_hat + z^2 / n) p + p_hat^2 = 0 (not the closed form raters uses)."""
    roots = np.roots([1 + z * z / n, -(2 * p_hat + z * z / n), p_hat ** 2]).real
    return tuple(np.clip(np.sort(roots), 0.0, 1.0))


def _choices(wins, ties, losses):
    return [0] * wins + ["tie"] * ties + [1] * losses  # choice 0: "a" won


def test_wilson_interval_matches_its_definition_and_a_textbook_value():
    r = raters.win_rate(_choices(5, 0, 5))
    assert (r.low, r.high) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # 5 of 10, 95%
    for wins, ties, losses in ((0, 0, 10), (3, 0, 7), (10, 0, 0), (81, 0, 182), (6, 4, 10)):
        n = wins + ties + losses
        r = raters.win_rate(_choices(wins, ties, losses))
        expected = _wilson_by_definition((wins + ties / 2) / n, n)
        assert (r.low, r.high) == pytest.approx(expected, abs=1e-9), (wins, ties, losses)
    r = raters.win_rate(_choices(30, 0, 70), confidence=0.9)
    assert (r.low, r.high) == pytest.approx(_wilson_by_definition(0.3, 100, 1.6448536269514722),
                                            abs=1e-9)


def test_bootstrap_interval_is_the_binomial_quantiles_and_shrinks_with_n():
    """Without ties a resampled win count is exactly Binomial(n, p_hat): the percentile
    interval must be its 2.5% and 97.5% quantiles / n (up to a lattice step), and half as wide
    at 4x the judgements. With ties the scores 1 / 0.5 / 0 vary less than 0/1 outcomes, and the
    interval must follow their standard deviation (narrower than Wilson's)."""
    from scipy.stats import binom
    widths = {}
    for n in (100, 400):
        wins = int(0.3 * n)
        r = raters.win_rate(_choices(wins, 0, n - wins), method="bootstrap",
                            num_bootstrap=10_000, seed=0)
        expected = binom.ppf([0.025, 0.975], n, wins / n) / n
        assert (r.low, r.high) == pytest.approx(tuple(expected), abs=1.5 / n), (n, r)
        widths[n] = r.high - r.low
    assert widths[100] / widths[400] == pytest.approx(2.0, rel=0.15), widths
    choices = _choices(160, 80, 160)
    scores = np.array([1.0] * 160 + [0.5] * 80 + [0.0] * 160)
    r = raters.win_rate(choices, method="bootstrap", num_bootstrap=10_000, seed=0)
    half = Z95 * scores.std() / np.sqrt(len(scores))
    assert (r.rate, r.low, r.high) == pytest.approx((0.5, 0.5 - half, 0.5 + half), abs=0.004)
    assert r.high - r.low < raters.win_rate(choices).high - raters.win_rate(choices).low


@pytest.mark.parametrize("method, true_tie, trials, coverage_range", [
    ("wilson", 0.0, 1000, (0.935, 0.965)),
    # With ties Wilson is conservative (as its docstring says): about 97%.
    ("wilson", 0.2, 1000, (0.955, 0.985)),
    ("bootstrap", 0.2, 300, (0.925, 0.975)),
])
def test_win_rate_interval_covers_the_true_rate_95_percent_of_the_time(
        method, true_tie, trials, coverage_range):
    """Seeded trials: coverage near the nominal 95%, with misses on both sides (an interval
    of [0, 1], or a one-sided one, fails)."""
    rng = np.random.default_rng(0)
    true_win, n = 0.55, 200
    truth = true_win + true_tie / 2
    below = above = 0
    for t in range(trials):
        u = rng.random(n)
        choices = np.where(u < true_win, 0, np.where(u < true_win + true_tie, 2, 1))
        choices = [("tie" if c == 2 else int(c)) for c in choices]
        r = raters.win_rate(choices, method=method, num_bootstrap=400, seed=t)
        below += truth < r.low
        above += truth > r.high
    coverage = 1 - (below + above) / trials
    assert coverage_range[0] <= coverage <= coverage_range[1], (coverage, below, above)
    assert min(below, above) >= 0.004 * trials, (below, above)


def test_calibrate_spreads_ratings(attrs):
    panel = raters.RaterPanel.sample(30, seed=4)
    reference = list(attrs.values())
    calibrated = panel.calibrate(reference, proportions=(0.2, 0.2, 0.2, 0.2, 0.2))
    ratings = [raters.rate(r, a) for r in calibrated for a in reference]
    counts = np.bincount(ratings, minlength=6)[1:]
    assert np.all(counts > 0.08 * len(ratings)), counts
    u = panel.utilities(reference)
    assert u.shape == (30, len(reference))
    assert u[0, 0] == pytest.approx(panel.raters[0].utility(reference[0]))


def test_panel_config_is_gin_configurable():
    import gin
    gin.parse_config("PanelConfig.taste_scale = 0.0\nPanelConfig.skip_prob = 0.0")
    panel = raters.RaterPanel.sample(5, seed=0)
    assert all(r.taste[d] == 0.0 for r in panel for d in raters.DESCRIPTIVE)
    assert all(r.skip_prob == 0.0 for r in panel)


def _stft_magnitude(waveform, n_fft=2048, hop=640):
    import librosa
    return np.abs(librosa.stft(np.asarray(waveform, np.float32), n_fft=n_fft, hop_length=hop,
                               window="hann", center=True, pad_mode="constant"))


@needs_synth
def test_the_spectrum_listener_hears_what_the_waveform_listener_hears(clips):
    """Collection's listener (measure_magnitude on the decoded STFT magnitude) and
    evaluation's (measure on the Griffin-Lim waveform) judge the same decoded clips alike:
    attributes close on average (benchmarks/collection.py measures the panel's agreement)."""
    from musicrl_jax.audio.tokenizer import MelRVQTokenizer
    keys = sorted(clips)
    waves = np.stack([clips[k][0][:5 * SR] for k in keys])
    metas = [clips[k][1] for k in keys]
    tokenizer = MelRVQTokenizer(num_codebooks=2, codebook_size=64, n_fft=2048, hop_length=640,
                                griffin_lim_iters=16, kmeans_max_iters=10).fit(list(waves))
    codes = tokenizer.encode(waves)
    heard = features.batch_attributes(tokenizer.decode(codes), SR, metas, as_array=True)
    seen = np.array([[features.score(features.measure_magnitude(m, SR, 2048, 640), meta)[n]
                      for n in features.ATTRIBUTE_NAMES]
                     for m, meta in zip(tokenizer.decode_magnitude(codes), metas)])
    gaps = dict(zip(features.ATTRIBUTE_NAMES, np.abs(heard - seen).mean(axis=0)))
    # Pitch and spectral shape agree closely; onset-based attributes less so, as Griffin-Lim's
    # inconsistent phases add high-frequency flux the magnitude does not have.
    for tolerance, names in ((0.03, ("key_match", "brightness", "consonance", "repetition",
                                     "speed", "tonality", "smoothness")),
                             (0.1, ("snr", "no_clipping", "dynamics", "rhythmic_regularity",
                                    "density", "non_silence")),
                             (0.2, ("tempo_match", "timbre_match", "percussiveness"))):
        for name in names:
            assert gaps[name] < tolerance, (name, gaps[name])


def test_the_spectrum_listener_estimates_level_and_clipping():
    """Peak (sqrt 2 x the loudest frame's RMS) and clipping (Gaussian tail at 0.99) come from
    the magnitude alone (Griffin-Lim's random phases make its output near-Gaussian): a
    regridding with the wrong power scale fails both."""
    t = np.arange(5 * SR) / SR
    for amplitude in (0.05, 0.5):
        sine = (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        raw = features.measure_magnitude(_stft_magnitude(sine), SR, 2048, 640)
        assert raw["peak"] == pytest.approx(amplitude, rel=0.05)
    assert raw["clip_fraction"] < 0.01  # a Gaussian at the sine's RMS; quiet ones: none
    quiet = (0.05 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    assert features.measure_magnitude(_stft_magnitude(quiet), SR, 2048, 640)[
        "clip_fraction"] < 1e-12
    noise = np.random.default_rng(0).standard_normal(5 * SR).astype(np.float32)  # RMS 1
    raw = features.measure_magnitude(_stft_magnitude(noise), SR, 2048, 640)
    assert raw["clip_fraction"] == pytest.approx(np.mean(np.abs(noise) >= 0.99), abs=0.03)
    silent = features.score(features.measure_magnitude(np.zeros((1025, 126), np.float32), SR,
                                                       2048, 640), None)
    assert silent["tempo_match"] == 0.0 and silent["non_silence"] == 0.0


def test_population_preference_and_expected_ratings_match_the_raters_own_draws():
    """The panel ceilings of evidence/reward_scaling.py: the mean Bradley-Terry preference and
    the mean expected rating equal Monte-Carlo averages of `compare` and `rate`."""
    panel = raters.RaterPanel.sample(6, seed=3)
    rng = np.random.default_rng(0)
    clips = rng.uniform(0.2, 0.9, (4, len(features.ATTRIBUTE_NAMES)))
    as_dicts = [dict(zip(features.ATTRIBUTE_NAMES, c)) for c in clips]
    expected = raters.expected_ratings(panel, clips)
    draws = np.random.default_rng(1)
    monte_carlo = [np.mean([raters.rate(r, a, draws) for r in panel for _ in range(400)])
                   for a in as_dicts]
    np.testing.assert_allclose(expected, monte_carlo, atol=0.05)
    assert np.ptp(expected) > 0.2  # the clips differ, so a constant would fail
    p = raters.population_preference(panel, clips[:2], clips[2:])
    for k, (a, b) in enumerate(zip(as_dicts[:2], as_dicts[2:])):
        mean = np.mean([raters.preference_probability(r, a, b) for r in panel])
        assert p[k] == pytest.approx(mean, rel=1e-9)
        # Decisive draws of `compare` pick a at that rate once ties and skips are removed.
        picks = [raters.compare(r, a, b, draws) for r in panel for _ in range(300)]
        decisive = [c for c in picks if c in (0, 1)]
        own = np.mean([[raters.preference_probability(r, a, b)] * 300 for r in panel])
        assert np.mean([c == 0 for c in decisive]) == pytest.approx(own, abs=0.06)
