"""Clips as music: where they sit in a score, how they are arranged, and their MIDI.

`_plan_clips` lays a score's clips out (bar-aligned, each with its own seeded tempo and random
generator) and `arrange_clip` turns one into General MIDI parts: the score's voices sliced,
transposed and orchestrated, a chord accompaniment and drums for tunes, and the key of what will
sound (`estimate_key`). `choose_tactus` finds the felt beat the tempo counts, and `midi_bytes`
writes the Standard MIDI File that FluidSynth renders. Captions and manifest records are made
elsewhere from the returned `Arrangement`.
"""

from __future__ import annotations

import collections as _collections
import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from musicrl_jax.data.captions import BEAT_NAMES
from musicrl_jax.data.orchestration import (PAD_PROGRAMS, TUNE_PALETTES, _octave_fit,
                                            _orchestrate, _pick, palette_family)
from musicrl_jax.data.scores import ScoreNotes, Style, _signature_at

# Clip indices reserved per score unit; clip k of unit u has index u * CLIP_INDEX_BLOCK + k.
CLIP_INDEX_BLOCK = 64
# A clip must have notes sounding for this fraction of its length (skips rests and endings).
MIN_SOUNDING_FRACTION = 0.6
MIN_NOTES_PER_CLIP = 4
# Clip key analysis below this key-profile correlation is too ambiguous for a caption; the
# whole score's key (transposed with the clip) is used instead.
MIN_KEY_CORRELATION = 0.5
TRANSPOSE_RANGE = (-5, 6)
# Onsets and durations are snapped to 1/96 quarter: exact for duplets and triplets, a whole
# number of MIDI ticks, and far below audible timing differences otherwise.
QUANTUM = 1.0 / 96.0
TICKS_PER_QUARTER = 480  # a multiple of 96, so every quantised onset is a whole tick
DRUM_CHANNEL = 9  # 0-based: General MIDI channel 10
TACTUS_UNITS = tuple(BEAT_NAMES)  # a beat the caption cannot name is never the tactus


def choose_tactus(beat_ql: float, bar_ql: float, median_note_ql: float,
                  notes_per_beat: float) -> float:
    """Felt beat (in quarter notes) for a score, independent of how it was notated.

    Candidates are the time signature's beat, its half and its double, if they divide the bar
    and are a quarter, dotted quarter, half or dotted half note (quavers and whole notes are
    not felt as the beat at these tempi; quarter notes are the fallback);
    the one whose note density is closest to the style's (log scale) wins, with a small bias
    toward the notated beat. A reel in 4/4 quavers and one in 2/4 semiquavers both get a beat
    of four running notes.
    """
    best, best_cost = 1.0, float("inf")
    for factor in (1.0, 0.5, 2.0):
        candidate = beat_ql * factor
        divides_bar = abs(bar_ql / candidate - round(bar_ql / candidate)) < 1e-6
        if candidate not in TACTUS_UNITS or not divides_bar:
            continue
        density = candidate / max(median_note_ql, QUANTUM)
        cost = abs(np.log2(density / notes_per_beat)) + 0.5 * abs(np.log2(factor))
        if cost < best_cost:
            best, best_cost = candidate, cost
    return best


# ---------------------------------------------------------------------------------------------
# MIDI
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MidiVoice:
    """One MIDI part: a GM program (or drums) and notes (onset_ql, dur_ql, pitches, velocity)."""
    program: int
    role: str
    events: list[tuple[float, float, tuple[int, ...], int]]
    drums: bool = False


@dataclasses.dataclass
class MidiSegment:
    """Voices sounding for `length_ql` quarter notes at `bpm` beats of `beat_ql` quarters."""
    voices: Sequence[MidiVoice]
    bpm: int
    beat_ql: float
    length_ql: float
    time_signature: str | None = None


def _varlen(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def _track_chunk(events: list[tuple[int, int, bytes]]) -> bytes:
    """MTrk chunk from (tick, order, message) events; `order` breaks ties within a tick
    (program changes, then note-offs, then note-ons, so repeated notes retrigger)."""
    data, now = bytearray(), 0
    for tick, _, message in sorted(events, key=lambda e: (e[0], e[1])):
        data += _varlen(tick - now) + message
        now = tick
    return b"MTrk" + len(data).to_bytes(4, "big") + bytes(data)


def tempo_microseconds(bpm: float, beat_ql: float) -> int:
    """MIDI tempo (microseconds per quarter note) for `bpm` beats of `beat_ql` quarters."""
    return int(round(60e6 / (bpm * beat_ql)))


def midi_bytes(segments: Sequence[MidiSegment], gap_seconds: float = 0.0
               ) -> tuple[bytes, list[float]]:
    """A type-1 Standard MIDI File playing the segments one after another, and the start time
    (seconds) of each.

    The segment's tempo meta-event (what music21 reads back as a MetronomeMark) makes every
    segment last exactly length_ql * 60 / (bpm * beat_ql) seconds, so the rendered audio runs at
    the caption's BPM in the caption's beat unit. Each voice gets its own channel (drums on GM
    channel 10) with its program set at the segment start; `gap_seconds` of silence separate
    segments so one clip's release and reverb tails die away before the next one starts.
    """
    conductor: list[tuple[int, int, bytes]] = []
    channel_events: dict[int, list[tuple[int, int, bytes]]] = _collections.defaultdict(list)
    melodic_channels = [c for c in range(16) if c != DRUM_CHANNEL]
    starts, tick, seconds = [], 0, 0.0
    for segment in segments:
        tempo = tempo_microseconds(segment.bpm, segment.beat_ql)
        starts.append(seconds)
        conductor.append((tick, 0, b"\xff\x51\x03" + tempo.to_bytes(3, "big")))
        if segment.time_signature:
            numerator, denominator = (int(x) for x in segment.time_signature.split("/"))
            if denominator & (denominator - 1) == 0:  # SMF can only store powers of two
                conductor.append((tick, 0, bytes([0xFF, 0x58, 4, numerator,
                                                  denominator.bit_length() - 1, 24, 8])))
        free = iter(melodic_channels)
        for voice in segment.voices:
            channel = DRUM_CHANNEL if voice.drums else next(free)
            events = channel_events[channel]
            if not voice.drums:
                events.append((tick, 0, bytes([0xC0 | channel, voice.program & 0x7F])))
            for onset, dur, pitches, velocity in voice.events:
                on = tick + int(round(onset * TICKS_PER_QUARTER))
                off = max(on + 1, tick + int(round((onset + dur) * TICKS_PER_QUARTER)))
                velocity = int(min(127, max(1, velocity)))
                for p in dict.fromkeys(int(min(127, max(0, p))) for p in pitches):
                    events.append((on, 2, bytes([0x90 | channel, p, velocity])))
                    events.append((off, 1, bytes([0x80 | channel, p, 0])))
        length = int(round(segment.length_ql * TICKS_PER_QUARTER))
        gap = int(round(gap_seconds * 1e6 / tempo * TICKS_PER_QUARTER))
        seconds += (length + gap) * tempo / (TICKS_PER_QUARTER * 1e6)
        tick += length + gap
    end = (tick, 9, b"\xff\x2f\x00")
    tracks = [_track_chunk(conductor + [end])]
    tracks += [_track_chunk(channel_events[c] + [end]) for c in sorted(channel_events)]
    header = (b"MThd" + (6).to_bytes(4, "big") + (1).to_bytes(2, "big")
              + len(tracks).to_bytes(2, "big") + TICKS_PER_QUARTER.to_bytes(2, "big"))
    return header + b"".join(tracks), starts


def read_midi_programs(path: str) -> dict[str, Any]:
    """Program changes (non-drum channels), drum-channel note count and tempi of a MIDI file,
    read back with music21's MIDI parser."""
    from music21 import midi
    mf = midi.MidiFile()
    mf.open(path)
    try:
        mf.read()
    finally:
        mf.close()
    programs, drum_notes, tempos = set(), 0, []
    for track in mf.tracks:
        for event in track.events:
            if isinstance(event, midi.DeltaTime):
                continue
            if (event.type == midi.ChannelVoiceMessages.PROGRAM_CHANGE
                    and event.channel != DRUM_CHANNEL + 1):  # music21 counts channels from 1
                programs.add(int(event.data))
            elif (event.type == midi.ChannelVoiceMessages.NOTE_ON
                  and event.channel == DRUM_CHANNEL + 1 and event.velocity):
                drum_notes += 1
            elif event.type == midi.MetaEvents.SET_TEMPO:
                tempos.append(int.from_bytes(event.data, "big"))
    return {"programs": programs, "drum_notes": drum_notes,
            "quarter_bpm": [60e6 / t for t in tempos]}


# ---------------------------------------------------------------------------------------------
# Clip realisation
# ---------------------------------------------------------------------------------------------
def _slice_voice(voice: np.ndarray, start: float, end: float) -> np.ndarray:
    onsets, ends = voice[:, 0], voice[:, 0] + voice[:, 1]
    keep = (onsets < end - 1e-6) & (ends > start + 1e-6)
    part = voice[keep].copy()
    clipped_on = np.maximum(part[:, 0], start)
    clipped_end = np.minimum(part[:, 0] + part[:, 1], end)
    part[:, 0] = np.round((clipped_on - start) / QUANTUM) * QUANTUM
    part[:, 1] = np.round((clipped_end - clipped_on) / QUANTUM) * QUANTUM
    return part[part[:, 1] > 0]


def _sounding_fraction(voices: Sequence[np.ndarray], length: float) -> float:
    intervals = sorted((float(r[0]), float(r[0] + r[1])) for v in voices for r in v)
    covered, cursor = 0.0, 0.0
    for lo, hi in intervals:
        lo = max(lo, cursor)
        if hi > lo:
            covered += hi - lo
            cursor = hi
    return covered / length


@functools.lru_cache(maxsize=None)
def _key_profiles() -> np.ndarray:
    """music21's default key-finding profiles (Aarden-Essen), major then minor, as (2, 12)."""
    from music21.analysis.discrete import AardenEssen
    weights = AardenEssen()
    return np.array([weights.getWeights("major"), weights.getWeights("minor")], dtype=np.float64)


def estimate_key(voices: Sequence[MidiVoice]) -> tuple[int, str, float]:
    """(tonic pitch class, mode, correlation) of the notes, as `Stream.analyze('key')` finds it.

    Same method as music21's default: Pearson correlation of the duration-weighted pitch-class
    histogram with each rotation of the Aarden-Essen major and minor profiles. Done in numpy
    because building a music21 stream per clip and analysing it costs ~85 ms; the test suite
    checks this agrees with music21 on real clips.
    """
    histogram = np.zeros(12)
    for voice in voices:
        if voice.drums:
            continue
        for _, dur, pitches, _ in voice.events:
            for p in pitches:
                histogram[int(p) % 12] += dur
    if not histogram.any():
        return 0, "major", 0.0
    profiles = _key_profiles()
    h = histogram - histogram.mean()
    best = (-2.0, 0, "major")
    for m, mode in enumerate(("major", "minor")):
        for tonic in range(12):
            w = np.roll(profiles[m], tonic) - profiles[m].mean()
            denom = np.sqrt((w ** 2).sum() * (h ** 2).sum())
            r = float((w * h).sum() / denom) if denom else 0.0
            if r > best[0]:
                best = (r, tonic, mode)
    return best[1], best[2], best[0]


def _triads(tonic: int, mode: str) -> list[tuple[int, tuple[int, ...], float]]:
    """Diatonic triads (root pc, chord pcs, prior) to harmonise a tune with."""
    if mode == "major":
        degrees = ((0, 4, 0.15), (2, 3, 0.0), (5, 4, 0.05), (7, 4, 0.08), (9, 3, 0.0))
    else:  # natural-minor chords plus the major dominant; also fits dorian/aeolian fiddle tunes
        degrees = ((0, 3, 0.15), (3, 4, 0.0), (5, 3, 0.05), (7, 4, 0.05), (8, 4, 0.0),
                   (10, 4, 0.05))
    triads = []
    for step, third, prior in degrees:
        root = (tonic + step) % 12
        triads.append((root, (root, (root + third) % 12, (root + 7) % 12), prior))
    return triads


def _accompaniment(melody: np.ndarray, length: float, beat: float, bar: float, tonic: int,
                   mode: str, program: int, rng: np.random.Generator) -> MidiVoice:
    """Chords guessed from the melody (one per bar, or per two beats in long bars), played as
    bass-then-chords (guitar, piano, harp, accordion) or sustained (strings, organ)."""
    beats_per_bar = max(1, round(bar / beat))
    window = beat * (beats_per_bar if 2 <= beats_per_bar <= 3 else 2)
    triads = _triads(tonic, mode)
    events: list[tuple[float, float, tuple[int, ...], int]] = []
    previous = triads[0]
    pad = program in PAD_PROGRAMS
    base_velocity = int(rng.integers(56, 68))
    t = 0.0
    while t < length - 1e-6:
        w_end = min(t + window, length)
        weights = np.zeros(12)
        for onset, dur, midi_pitch in melody:
            overlap = min(onset + dur, w_end) - max(onset, t)
            if overlap > 0:
                accent = 1.5 if abs(onset - t) < 1e-6 else 1.0
                weights[int(midi_pitch) % 12] += overlap * accent
        if weights.sum() > 0:
            def fit(triad):
                inside = sum(weights[pc] for pc in triad[1])
                return inside - 0.5 * (weights.sum() - inside) + triad[2] * weights.sum()
            previous = max(triads, key=lambda tr: (fit(tr), tr is previous))
        root, chord_pcs, _ = previous
        bass = 40 + (root - 40) % 12  # E2..D#3
        upper = tuple(sorted(55 + (pc - 55) % 12 for pc in chord_pcs))  # G3..F#4, close
        if pad:
            events.append((t, w_end - t, (bass,) + upper, base_velocity - 6))
        else:
            events.append((t, min(beat, w_end - t), (bass,), base_velocity + 6))
            b = t + beat
            while b < w_end - 1e-6:
                events.append((b, min(beat * 0.9, w_end - b), upper, base_velocity))
                b += beat
        t += window
    return MidiVoice(program, "accompaniment", events)


def _drum_voice(kit: str, length: float, beat: float, bar: float) -> MidiVoice:
    """A General MIDI drum pattern on the clip's beat grid (the clip starts on a bar line)."""
    compound = abs(beat - 1.5) < 1e-6 or abs(beat - 3.0) < 1e-6
    sub = beat / 3 if compound else beat / 2
    beats_per_bar = max(1, round(bar / beat))
    events = []
    n_beats = int(np.ceil(length / beat - 1e-6))
    for b in range(n_beats):
        t = b * beat
        pos = b % beats_per_bar
        strong = pos == 0 or (beats_per_bar == 4 and pos == 2)
        if kit == "folk":  # bass drum on strong beats, low tom on the others, hi-hat between
            events.append((t, 0.1, (36,) if strong else (45,), 92 if pos == 0 else 74))
            events.append((t, 0.1, (42,), 60))
            s = sub
            while s < beat - 1e-6:
                events.append((t + s, 0.1, (42,), 52))
                s += sub
        elif kit == "march":  # bass drum on strong beats, snare backbeat, soft snare taps
            events.append((t, 0.1, (36,) if strong else (38,), 92 if strong else 86))
            s = sub
            while s < beat - 1e-6:
                events.append((t + s, 0.1, (38,), 44))
                s += sub
        else:  # waltz: bass drum on one, side stick on the other beats
            events.append((t, 0.1, (36,) if pos == 0 else (37,), 88 if pos == 0 else 64))
    events = [e for e in events if e[0] < length - 1e-6]
    return MidiVoice(0, "drums", events, drums=True)


@dataclasses.dataclass
class ClipPlan:
    clip_index: int
    k: int
    start: float
    length: float
    bpm: int
    rng: np.random.Generator


def _plan_clips(notes: ScoreNotes, style: Style, tactus: float, seconds: float, seed: int,
                unit_index: int, max_clips: int) -> list[ClipPlan]:
    """Non-overlapping clips spread over the score, each starting on a bar line if possible."""
    draws = []
    for k in range(max_clips):
        clip_index = unit_index * CLIP_INDEX_BLOCK + k
        rng = np.random.default_rng([seed, clip_index])
        bpm = int(rng.integers(style.bpm[0], style.bpm[1] + 1))
        draws.append((clip_index, k, bpm, seconds * bpm / 60.0 * tactus, rng))
    count = len(draws)
    while count and sum(d[3] for d in draws[:count]) > notes.end_ql:
        count -= 1
    if not count:
        return []
    gap = (notes.end_ql - sum(d[3] for d in draws[:count])) / count
    plans, cursor = [], gap / 2
    for clip_index, k, bpm, length, rng in draws[:count]:
        later = notes.measure_starts[notes.measure_starts >= cursor - 1e-6]
        start = float(later[0]) if len(later) and later[0] + length <= notes.end_ql else cursor
        if start + length > notes.end_ql + 1e-6:
            break
        plans.append(ClipPlan(clip_index, k, start, length, bpm, rng))
        cursor = start + length + gap
    return plans


@dataclasses.dataclass
class Arrangement:
    """One clip's music as it will be rendered, and what its caption and record need."""
    segment: MidiSegment
    transpose: int
    tonic: int
    mode: str
    key_source: str
    drum_kit: str | None
    num_notes: int


def arrange_clip(plan: ClipPlan, notes: ScoreNotes, collection: str, style: Style, tactus: float,
                 bar_ql: float) -> tuple[Arrangement | None, str | None]:
    """Slice, transpose, orchestrate and analyse one planned clip.

    Returns (arrangement, None), or (None, reason) when the excerpt is unusable.
    """
    rng = plan.rng
    end = plan.start + plan.length
    sliced = [_slice_voice(v, plan.start, end) for v in notes.voices]
    voices_in = [v for v in sliced if len(v)]
    family = palette_family(collection, style.name)
    if family in TUNE_PALETTES:
        voices_in = voices_in[:1]  # a tune is its melody; the accompaniment is made here
    num_notes = sum(len(v) for v in voices_in)
    if num_notes < MIN_NOTES_PER_CLIP:
        return None, "clip has too few notes"
    if _sounding_fraction(voices_in, plan.length) < MIN_SOUNDING_FRACTION:
        return None, "clip is mostly rests"
    transpose = int(rng.integers(TRANSPOSE_RANGE[0], TRANSPOSE_RANGE[1] + 1))
    midi_voices: list[MidiVoice] = []
    for program, role, idx in _orchestrate(rng, family, voices_in):
        line = voices_in[idx].copy()
        line[:, 2] += transpose
        line[:, 2] += _octave_fit(line[:, 2], program)
        base = 92 if role == "melody" else 80 if role == "doubling" else 84 - 4 * min(idx, 3)
        velocities = np.clip(base + rng.integers(-5, 6, size=len(line)), 30, 120)
        events = [(float(o), float(d), (int(p),), int(v))
                  for (o, d, p), v in zip(line, velocities)]
        midi_voices.append(MidiVoice(program, role, events))

    # Key of the rendered (transposed) notes: the clip's own analysis, or, when a few seconds
    # of music are too ambiguous, the whole score's key moved by the same transposition.
    tonic, mode, correlation = estimate_key(midi_voices)
    key_source = "clip"
    if correlation < MIN_KEY_CORRELATION or num_notes < 8:
        score_key = notes.score_key()
        if score_key is not None:
            tonic, mode, key_source = (score_key[0] + transpose) % 12, score_key[1], "score"
    mode = "minor" if mode == "minor" else "major"

    palette = TUNE_PALETTES.get(family)
    if palette and palette.accompaniment and rng.random() < palette.p_accompaniment:
        melody_program = midi_voices[0].program
        options = [p for p in palette.accompaniment if p != melody_program or p == 0]
        program = int(_pick(rng, options))
        melody = np.array([(e[0], e[1], e[2][0]) for e in midi_voices[0].events])
        midi_voices.append(_accompaniment(melody, plan.length, tactus, bar_ql, tonic, mode,
                                          program, rng))
    drum_kit = None
    if style.drum_kit and rng.random() < style.drum_probability:
        drum_kit = style.drum_kit
        midi_voices.append(_drum_voice(drum_kit, plan.length, tactus, bar_ql))

    metre = _signature_at(notes, plan.start)
    segment = MidiSegment(midi_voices, plan.bpm, tactus, plan.length, metre)
    return Arrangement(segment, transpose, tonic, mode, key_source, drum_kit, num_notes), None
