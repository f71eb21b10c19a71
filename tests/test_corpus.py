"""Tests of the captioned music corpus (music21 scores rendered with FluidSynth)."""

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from musicrl_jax.audio import synthesis
from musicrl_jax.data import captions, clips, corpus, orchestration, scores

pytestmark = pytest.mark.skipif(
    shutil.which("fluidsynth") is None or not os.path.isfile(synthesis.DEFAULT_SOUNDFONT),
    reason="needs FluidSynth and the TimGM6mb soundfont (make install)")

TINY = dict(num_clips=30, clip_seconds=5.0, seed=3, num_workers=2, progress=False,
            collections=["bach_chorales", "ryans_mammoth", "oneills1850"])
BEAT_QL = {name: ql for ql, name in captions.BEAT_NAMES.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("corpus"))
    return corpus.build_corpus(out_dir, **TINY)


def _tempo_estimates(audio, sample_rate):
    import librosa
    onset_env = librosa.onset.onset_strength(y=audio, sr=sample_rate)
    tempo, _ = librosa.beat.beat_track(onset_envelope=onset_env, sr=sample_rate)
    return float(np.atleast_1d(tempo)[0])


def _octave_match(estimate, bpm, tolerance=0.06):
    """Beat trackers may lock onto half or double the beat; accept those octave errors only."""
    return any(abs(estimate - bpm * f) <= tolerance * bpm * f for f in (1.0, 2.0, 0.5))


@pytest.mark.parametrize("bpm,beat_ql", [(72, 1.0), (104, 1.0), (132, 1.0), (110, 1.5)])
def test_metronome_renders_at_caption_bpm(tmp_path, bpm, beat_ql):
    """A regular rhythm written and rendered by the corpus code runs at the requested BPM."""
    seconds = 10.0
    length = seconds * bpm / 60 * beat_ql
    bar = beat_ql * (2 if beat_ql == 1.5 else 4)
    step = beat_ql / (3 if beat_ql == 1.5 else 2)
    melody = [(t, step * 0.9, (72 if abs(t / beat_ql - round(t / beat_ql)) < 1e-6 else 67,),
               100 if abs(t / beat_ql - round(t / beat_ql)) < 1e-6 else 60)
              for t in np.arange(0, length - 1e-6, step)]
    voices = [clips.MidiVoice(0, "melody", melody),
              clips._drum_voice("folk", length, beat_ql, bar)]
    data, starts = clips.midi_bytes([clips.MidiSegment(voices, bpm, beat_ql, length, "4/4")])
    assert starts == [0.0]
    midi_path = tmp_path / "metronome.mid"
    midi_path.write_bytes(data)
    audio = synthesis.render_midi(str(midi_path), str(tmp_path / "metronome.wav"),
                                  duration_seconds=seconds)
    assert len(audio) == seconds * synthesis.DEFAULT_SAMPLE_RATE
    estimate = _tempo_estimates(audio, synthesis.DEFAULT_SAMPLE_RATE)
    assert _octave_match(estimate, bpm), (estimate, bpm)
    # The tempo meta-event itself is exact: quarter-note BPM = caption BPM * beat length.
    info = clips.read_midi_programs(str(midi_path))
    assert info["quarter_bpm"][0] == pytest.approx(bpm * beat_ql, rel=1e-4)


def test_corpus_clips_with_drums_keep_tempo(tiny):
    """Beat tracking on rendered corpus clips with a drum pattern finds the caption's BPM."""
    drummed = [c for c in tiny.clips if c.drums]
    if not drummed:
        pytest.skip("no clip of the tiny corpus drew a drum pattern")
    hits = 0
    for clip in drummed:
        audio, rate = sf.read(os.path.join(tiny.out_dir, clip.wav), dtype="float32")
        hits += _octave_match(_tempo_estimates(audio, rate), clip.tempo_bpm, tolerance=0.08)
    # 5 s is short for a beat tracker; most clips, not all, must agree.
    assert hits >= 0.6 * len(drummed), (hits, len(drummed))


def test_written_midi_matches_metadata(tiny):
    from music21 import converter, tempo
    for clip in tiny.clips:
        info = clips.read_midi_programs(os.path.join(tiny.out_dir, clip.midi))
        assert info["programs"] == set(clip.programs), clip.clip_id
        assert (info["drum_notes"] > 0) == clip.drums, clip.clip_id
        quarter_bpm = clip.tempo_bpm * BEAT_QL[clip.tempo_beat]
        assert info["quarter_bpm"][0] == pytest.approx(quarter_bpm, rel=1e-4)
        for inst in clip.instruments:
            assert orchestration.GM_INSTRUMENTS[inst["program"]][0] == inst["name"]
    # music21 reads the tempo back as a MetronomeMark at the caption's BPM.
    clip = tiny.clips[0]
    score = converter.parse(os.path.join(tiny.out_dir, clip.midi))
    mark = score.flatten().getElementsByClass(tempo.MetronomeMark)[0]
    assert mark.getQuarterBPM() == pytest.approx(clip.tempo_bpm * BEAT_QL[clip.tempo_beat],
                                                 rel=1e-3)


def test_captions_name_instruments_tempo_and_key(tiny):
    assert len(tiny.clips) == TINY["num_clips"]
    for clip in tiny.clips:
        text = clip.caption
        assert f"{clip.tempo_bpm} BPM" in text
        assert f"{clip.key_tonic} {clip.key_mode}" in text
        assert clip.style.lower() in text.lower()
        for inst in clip.instruments:
            assert inst["name"] in text.lower(), (inst, text)
        assert clip.tempo_word in text.lower()
        assert all(m in text.lower() for m in clip.moods)
    assert len({c.caption for c in tiny.clips}) == len(tiny.clips)


def test_caption_templates_vary():
    kwargs = dict(style="Irish reel", instruments="fiddle and acoustic guitar", bpm=118,
                  key="D major", metre="2/2", tempo="fast", moods=["cheerful"], drums=None)
    texts = [captions.compose_caption(t, **kwargs) for t in range(captions.NUM_CAPTION_TEMPLATES)]
    assert len(set(texts)) == captions.NUM_CAPTION_TEMPLATES >= 4
    for text in texts:
        assert "118 BPM" in text and "D major" in text
        assert "fiddle and acoustic guitar" in text.lower()
    assert captions.instrument_phrase([40, 40, 41, 42]) == "two violins, viola and cello"
    assert captions.instrument_phrase([19, 19, 19, 19]) == "church organ"


def test_wavs_are_16k_mono_and_exact_length(tiny):
    for clip in tiny.clips:
        info = sf.info(os.path.join(tiny.out_dir, clip.wav))
        assert (info.samplerate, info.channels) == (16000, 1)
        assert info.frames == int(clip.duration_seconds * 16000)
        audio, _ = sf.read(os.path.join(tiny.out_dir, clip.wav), dtype="float32")
        assert 0.85 <= np.abs(audio).max() <= 0.91  # peak-normalised, not silent


def test_batched_render_matches_rendering_the_clip_alone(tiny, tmp_path):
    """Clips are cut from one FluidSynth run per score; the cut must line up sample-exactly
    with rendering that clip's own MIDI file."""
    for clip in tiny.clips[:4]:
        alone = synthesis.render_midi(os.path.join(tiny.out_dir, clip.midi),
                                      str(tmp_path / "alone.wav"),
                                      duration_seconds=clip.duration_seconds)
        batched, _ = sf.read(os.path.join(tiny.out_dir, clip.wav), dtype="float32")
        assert np.corrcoef(alone, batched)[0, 1] > 0.99, clip.clip_id


def test_key_estimate_agrees_with_music21_and_follows_transposition():
    from music21 import corpus as m21_corpus
    for path, transpose in (("bach/bwv66.6", 0), ("bach/bwv66.6", 3), ("bach/bwv57.8", -5)):
        score = m21_corpus.parse(path)
        notes = scores._read_score(score, path)
        voices = [clips.MidiVoice(0, "voice", [(o, d, (int(p) + transpose,), 80)
                                                for o, d, p in v]) for v in notes.voices]
        tonic, mode, _ = clips.estimate_key(voices)
        expected = score.transpose(transpose).analyze("key")
        assert (tonic, mode) == (expected.tonic.pitchClass, expected.mode), path


def test_tie_merging_matches_music21_strip_ties():
    from music21 import corpus as m21_corpus
    score = m21_corpus.parse("bach/bwv66.6")
    for part in score.parts:
        ours = sorted(scores._tied_notes(part.flatten().notes))
        theirs = sorted((float(n.offset), float(n.quarterLength), n.pitch.midi)
                        for n in part.stripTies().flatten().notes)
        assert ours == theirs


def test_splits_are_disjoint_by_work(tiny):
    split_of_work, split_of_score = {}, {}
    for clip in tiny.clips:
        assert split_of_work.setdefault(clip.split_key, clip.split) == clip.split
        score = (clip.score_path, clip.score_number)
        assert split_of_score.setdefault(score, clip.split) == clip.split
    keys = [f"score:synthetic/{i}.mxl" for i in range(20000)]
    fractions = np.mean([[corpus.split_for(k) == s for s in corpus.SPLITS] for k in keys], axis=0)
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.015)


def test_same_tune_in_two_files_shares_a_split():
    unit_a = {"path": "oneills1850/0732-0758_bs.abc", "number": 732, "t": "The Kerry Cobbler"}
    unit_b = {"path": "oneills1850/0732-0758_mh.abc", "number": 732, "t": "Kerry Cobbler, The"}
    assert corpus._split_key("oneills1850", unit_a) == corpus._split_key("oneills1850", unit_b)


def test_rerun_is_a_cache_hit(tiny):
    again = corpus.build_corpus(tiny.out_dir, **TINY)
    assert again.cache_hit
    assert [c.clip_id for c in again.clips] == [c.clip_id for c in tiny.clips]


def test_resume_rerenders_only_missing_wavs(tiny, tmp_path):
    out_dir = str(tmp_path / "resume")
    shutil.copytree(tiny.out_dir, out_dir)
    os.remove(os.path.join(out_dir, corpus.BUILD_LOG_NAME))  # as if the build was cut short
    victim = tiny.clips[5]
    os.remove(os.path.join(out_dir, victim.wav))
    kept = {c.wav: os.path.getmtime(os.path.join(out_dir, c.wav)) for c in tiny.clips
            if c is not victim}
    rebuilt = corpus.build_corpus(out_dir, **TINY)
    assert not rebuilt.cache_hit
    assert [c.to_dict() for c in rebuilt.clips] == [c.to_dict() for c in tiny.clips]
    assert os.path.isfile(os.path.join(out_dir, victim.wav))
    assert all(os.path.getmtime(os.path.join(out_dir, w)) == t for w, t in kept.items())


def test_clip_choice_does_not_depend_on_worker_count_or_corpus_size(tiny, tmp_path):
    small = corpus.build_corpus(str(tmp_path / "small"), **{**TINY, "num_clips": 7,
                                                            "num_workers": 1})
    assert [c.to_dict() for c in small.clips] == [c.to_dict() for c in tiny.clips[:7]]


def test_build_log_counts(tiny):
    with open(os.path.join(tiny.out_dir, corpus.BUILD_LOG_NAME)) as f:
        log = json.load(f)
    assert log["clips"] == len(tiny.clips)
    assert sum(log["clips_per_split"].values()) == len(tiny.clips)
    assert set(log["collections"]) <= set(TINY["collections"])
    assert sum(log["styles"].values()) == len(tiny.clips)
    assert isinstance(log["skipped_scores"], list)


def test_bad_soundfont_path_gives_a_clear_error(tmp_path):
    missing = str(tmp_path / "no_such_font.sf2")
    with pytest.raises(FileNotFoundError, match="no_such_font.sf2.*apt-get install fluidsynth"):
        synthesis.find_soundfont(missing)
    with pytest.raises(synthesis.SynthesisUnavailableError, match="timgm6mb-soundfont"):
        corpus.build_corpus(str(tmp_path / "c"), num_clips=2, soundfont=missing, progress=False)


def test_missing_fluidsynth_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(synthesis.shutil, "which", lambda name: None)
    monkeypatch.setattr(synthesis.os, "access", lambda path, mode: False)
    with pytest.raises(synthesis.SynthesisUnavailableError, match="fluidsynth.*apt-get install"):
        synthesis.find_fluidsynth()


def test_malformed_manifest_line_is_named(tiny, tmp_path):
    out_dir = tmp_path / "broken"
    out_dir.mkdir()
    lines = open(os.path.join(tiny.out_dir, corpus.MANIFEST_NAME)).read().splitlines()
    lines[2] = lines[2][:40]  # truncated JSON on line 3
    (out_dir / corpus.MANIFEST_NAME).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:3: malformed"):
        corpus.load_manifest(str(out_dir))
    record = json.loads(lines[0])
    del record["caption"]
    lines[2] = json.dumps(record)
    (out_dir / corpus.MANIFEST_NAME).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:3: .*caption"):
        corpus.load_manifest(str(out_dir))


def test_load_manifest_by_split(tiny):
    every = corpus.load_manifest(tiny.out_dir)
    assert [c.clip_id for c in every] == [c.clip_id for c in tiny.clips]
    by_split = sum(len(corpus.load_manifest(tiny.out_dir, s)) for s in corpus.SPLITS)
    assert by_split == len(every)
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.load_manifest(tiny.out_dir, "dev")


def test_no_usable_clip_is_a_clear_runtime_error(tmp_path):
    with pytest.raises(RuntimeError, match="No usable clips.*shorter than one"):
        corpus.build_corpus(str(tmp_path / "none"), num_clips=1, clip_seconds=20000.0,
                            collections=["josquin"], num_workers=1, progress=False)
