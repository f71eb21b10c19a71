"""Captioned music clips rendered from the real scores bundled with music21.

Each clip is a few seconds of a real score (Bach chorales, Palestrina masses, Josquin, trecento
songs, Monteverdi madrigals, Classical string quartets, O'Neill's and Ryan's fiddle tunes, Aird's
Scottish airs, Essen folk songs, fife tunes) re-orchestrated for General MIDI instruments at a
drawn tempo and transposition, rendered with FluidSynth, and captioned from exactly what was
rendered: instruments, tempo in BPM, key of the transposed audio, metre, style and mood words.

Layout of a built corpus directory::

    wav/<clip_id>.wav      16 kHz mono PCM-16, exactly `clip_seconds` long
    midi/<clip_id>.mid     the MIDI that was rendered (tempo, programs, notes)
    manifest.jsonl         one ClipSpec record per clip (written last, atomically)
    build_log.json         config fingerprint, counts, skipped scores with reasons, timings
    corpus_index.json      cached list of the music21 scores/tunes each collection offers

Determinism: clip k of score unit u draws everything from
``np.random.default_rng([seed, u * CLIP_INDEX_BLOCK + k])`` and the kept clips are the first
`num_clips` in unit order, so the corpus does not depend on the number of workers. Splits hold
out whole works: a stable hash of each score's identity (its path, or for folk and fiddle tunes
its normalised title, which also catches the same tune printed in two files) picks
train/validation/test.
"""

from __future__ import annotations

import argparse
import collections as _collections
import dataclasses
import functools
import glob
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
import warnings
import zlib
from typing import Any, Iterable, Sequence

import numpy as np

from musicrl_jax.audio import synthesis

INDEX_FORMAT_VERSION = 1  # layout of corpus_index.json
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
DEFAULT_CLIP_SECONDS = 5.0
# Clip indices reserved per score unit; clip k of unit u has index u * CLIP_INDEX_BLOCK + k.
CLIP_INDEX_BLOCK = 64
# About 30 s of music per score: enough clips to amortise a parse and a FluidSynth start,
# few enough to keep the corpus varied (2,000 clips of 5 s come from ~550 scores).
SECONDS_PER_SCORE = 30.0
# At most this many voices of a score are orchestrated: each needs its own MIDI channel, as do
# a doubling and an accompaniment, and channel 10 is kept for drums.
MAX_VOICES = 6
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
# Silence between clips rendered in one FluidSynth run: long enough for release and reverb
# tails to fade out before the next clip begins.
RENDER_GAP_SECONDS = 2.0

MANIFEST_NAME = "manifest.jsonl"
BUILD_LOG_NAME = "build_log.json"
INDEX_NAME = "corpus_index.json"

# ---------------------------------------------------------------------------------------------
# General MIDI instruments: program -> (caption name, lowest, highest comfortable MIDI pitch).
# Ranges drive octave placement so e.g. a bass line given to a flute is moved up an octave.
# ---------------------------------------------------------------------------------------------
GM_INSTRUMENTS: dict[int, tuple[str, int, int]] = {
    0: ("piano", 21, 108),
    6: ("harpsichord", 29, 89),
    15: ("dulcimer", 50, 86),
    19: ("church organ", 24, 96),
    21: ("accordion", 48, 89),
    22: ("harmonica", 60, 96),
    24: ("acoustic guitar", 40, 84),
    25: ("steel-string guitar", 40, 84),
    40: ("violin", 55, 100),
    41: ("viola", 48, 88),
    42: ("cello", 36, 76),
    46: ("harp", 24, 103),
    48: ("strings", 28, 96),
    52: ("choir", 40, 81),
    53: ("wordless vocals", 40, 81),
    56: ("trumpet", 55, 82),
    57: ("trombone", 40, 72),
    58: ("tuba", 28, 58),
    60: ("french horn", 41, 77),
    68: ("oboe", 58, 91),
    70: ("bassoon", 34, 72),
    71: ("clarinet", 50, 91),
    72: ("piccolo", 74, 108),
    73: ("flute", 60, 96),
    74: ("recorder", 55, 93),
    75: ("pan flute", 60, 93),
    78: ("whistle", 62, 98),
    79: ("ocarina", 60, 91),
    105: ("banjo", 48, 84),
    107: ("koto", 48, 88),
    109: ("bagpipe", 55, 81),
    110: ("fiddle", 55, 100),
}
# Names that already denote a group (or a keyboard playing all voices): never "four organs".
ENSEMBLE_NAMES = {"piano", "harpsichord", "church organ", "strings", "choir", "wordless vocals",
                  "accordion", "harp", "dulcimer", "koto"}
# Accompaniment programs that sustain chords rather than strum/oom-pah them.
PAD_PROGRAMS = {19, 48, 52, 53}
DRUM_CHANNEL = 9  # 0-based: General MIDI channel 10
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


@dataclasses.dataclass(frozen=True)
class Style:
    """How a kind of piece is tempo'd and drummed.

    `bpm` is the range of the tactus (felt beat) in beats per minute; `notes_per_beat` is the
    typical number of the score's predominant note value per tactus (a reel has four running
    quavers per beat, a chorale one crotchet), used to find the tactus whatever the notation.
    """
    name: str
    bpm: tuple[int, int]
    notes_per_beat: float
    drum_probability: float = 0.0
    drum_kit: str | None = None
    sacred: bool = False


def _tune_styles(prefix: str) -> dict[str, Style]:
    """Dance and air styles of the fiddle/folk-tune collections, named with a regional prefix."""
    table = {
        "reel": ((88, 124), 4, 0.5, "folk"),
        "jig": ((92, 126), 3, 0.5, "folk"),
        "slip jig": ((96, 126), 3, 0.4, "folk"),
        "hornpipe": ((72, 100), 4, 0.5, "folk"),
        "set dance": ((72, 100), 4, 0.3, "folk"),
        "clog": ((72, 100), 4, 0.5, "folk"),
        "strathspey": ((100, 132), 2, 0.4, "folk"),
        "highland fling": ((100, 132), 2, 0.4, "folk"),
        "schottische": ((100, 132), 2, 0.4, "folk"),
        "polka": ((100, 132), 2, 0.5, "folk"),
        "march": ((96, 124), 2, 0.6, "march"),
        "waltz": ((120, 168), 1, 0.4, "waltz"),
        "air": ((50, 80), 2, 0.0, None),
        "fiddle tune": ((80, 120), 2, 0.2, "folk"),
    }
    styles = {}
    for kind, (bpm, npb, p_drums, kit) in table.items():
        if kind == "fiddle tune" and prefix:
            name = f"{prefix} fiddle tune"
        else:
            name = f"{prefix} {kind}".strip()
        styles[name] = Style(name, bpm, npb, p_drums, kit)
    return styles


STYLES: dict[str, Style] = {
    "Bach chorale": Style("Bach chorale", (54, 96), 1, sacred=True),
    "Renaissance mass": Style("Renaissance mass", (48, 80), 1, sacred=True),
    "Renaissance motet": Style("Renaissance motet", (50, 84), 1, sacred=True),
    "Renaissance chanson": Style("Renaissance chanson", (52, 88), 1),
    "medieval Italian song": Style("medieval Italian song", (56, 100), 1),
    "Italian madrigal": Style("Italian madrigal", (56, 96), 1),
    "Classical string quartet": Style("Classical string quartet", (56, 144), 2),
    "German folk song": Style("German folk song", (66, 112), 2),
    "German folk ballad": Style("German folk ballad", (60, 100), 2),
    "German children's song": Style("German children's song", (80, 120), 2),
    "Swiss folk song": Style("Swiss folk song", (66, 112), 2),
    "Austrian folk song": Style("Austrian folk song", (66, 112), 2),
    "Dutch folk song": Style("Dutch folk song", (66, 112), 2),
    "Lorraine folk song": Style("Lorraine folk song", (66, 112), 2),
    "Luxembourgish folk song": Style("Luxembourgish folk song", (66, 112), 2),
    "Chinese folk song": Style("Chinese folk song", (60, 108), 2),
    "Irish folk song": Style("Irish folk song", (60, 104), 2),
    "American fife tune": Style("American fife tune", (96, 124), 2, 0.8, "march"),
    "Northumbrian pipe tune": Style("Northumbrian pipe tune", (84, 120), 2, 0.2, "folk"),
    **_tune_styles("Irish"),
    **_tune_styles("Scottish"),
    **_tune_styles(""),
}

# ---------------------------------------------------------------------------------------------
# Orchestration palettes. Polyphonic families list arrangements (programs from the top voice
# down; a score with a different voice count is mapped onto them by register). Tune families
# list melody, doubling and accompaniment instruments.
# ---------------------------------------------------------------------------------------------
POLYPHONIC_ARRANGEMENTS: dict[str, list[tuple[int, ...]]] = {
    "chorale": [(19,), (52,), (40, 40, 41, 42), (48,), (56, 56, 57, 58), (60, 60, 57, 58),
                (73, 68, 71, 70), (0,), (6,), (52, 52, 52, 19)],
    "renaissance": [(52,), (53,), (74, 74, 74, 70), (41, 41, 42, 42), (56, 57, 57, 57),
                    (19,), (52, 52, 57, 57), (48,)],
    "medieval": [(74, 24, 42), (73, 46, 41), (53, 74, 24), (19,), (68, 74, 70), (40, 24, 42),
                 (75, 46, 42)],
    "madrigal": [(52,), (53,), (40, 40, 41, 42, 42), (48,), (74, 74, 41, 42, 6),
                 (73, 68, 71, 60, 70), (52, 52, 52, 52, 19)],
    "quartet": [(40, 40, 41, 42), (48,), (0,), (73, 68, 71, 70), (73, 40, 41, 42),
                (71, 40, 41, 42)],
}


@dataclasses.dataclass(frozen=True)
class TunePalette:
    melody: tuple[int, ...]
    doubling: tuple[int, ...]
    accompaniment: tuple[int, ...]
    p_doubling: float
    p_accompaniment: float


TUNE_PALETTES: dict[str, TunePalette] = {
    "irish": TunePalette((110, 40, 73, 78, 21, 105), (73, 110, 21, 78, 40), (24, 25, 0, 46),
                         0.3, 0.65),
    "fiddle": TunePalette((110, 40, 73, 105, 22, 21, 0), (73, 110, 105), (24, 25, 0),
                          0.3, 0.65),
    "scottish": TunePalette((110, 40, 73, 109, 46), (73, 110), (46, 24, 0, 48), 0.25, 0.6),
    "fife": TunePalette((72, 73), (72, 73), (), 0.5, 0.0),
    "northumbrian": TunePalette((109, 110, 40, 73), (73, 110), (24, 46, 0), 0.25, 0.5),
    "german_folk": TunePalette((0, 73, 68, 71, 40, 60, 21, 52), (73, 40, 71, 68),
                               (0, 24, 21, 46, 48), 0.25, 0.7),
    "chinese": TunePalette((73, 75, 79, 40, 15, 107), (73, 75, 40), (46, 48, 107), 0.3, 0.45),
}


@dataclasses.dataclass(frozen=True)
class Collection:
    """A group of music21 corpus files that share a kind of music.

    `share` is the intended fraction of clips; `clips_per_score` the typical number of clips a
    score yields at 5 s (short folk songs give 2-3, long works are capped), used to turn the
    clip share into a score sampling rate.
    """
    name: str
    patterns: tuple[str, ...]
    family: str
    share: float
    clips_per_score: float
    multi_tune: bool = False  # ABC files holding many tunes, each its own score
    merge_voices: bool = False  # ABC files whose tunes are the voices of one piece
    exclude: str | None = None  # regex on the relative path
    max_file_kb: int | None = None  # larger files take seconds to parse for a few clips


COLLECTIONS: dict[str, Collection] = {c.name: c for c in [
    Collection("bach_chorales", ("bach/bwv*.mxl",), "chorale", 0.13, 5.0),
    Collection("palestrina", ("palestrina/*_[0-9]*.krn",), "renaissance", 0.08, 6.0),
    Collection("josquin", ("josquin/*.abc",), "renaissance", 0.03, 6.0, merge_voices=True),
    Collection("trecento", ("trecento/*.xml", "trecento/*.mxl"), "medieval", 0.06, 6.0),
    Collection("monteverdi", ("monteverdi/madrigal.*.mxl",), "madrigal", 0.06, 6.0,
               exclude=r"_old\."),
    Collection("string_quartets", ("beethoven/**/*.mxl", "mozart/**/*.mxl", "haydn/**/*.mxl"),
               "quartet", 0.08, 6.0, exclude=r"k545", max_file_kb=100),
    Collection("oneills1850", ("oneills1850/*.abc",), "irish", 0.13, 3.0, multi_tune=True),
    Collection("ryans_mammoth", ("ryansMammoth/*.abc",), "fiddle", 0.13, 3.0, multi_tune=True),
    Collection("essen_german", ("essenFolksong/*.abc",), "german_folk", 0.08, 2.5,
               multi_tune=True, exclude=r"/(han\d|irl|lot|lux|test\w*)\.abc$"),
    Collection("essen_chinese", ("essenFolksong/han*.abc",), "chinese", 0.06, 2.5,
               multi_tune=True),
    Collection("essen_regional", ("essenFolksong/irl.abc", "essenFolksong/lot.abc",
                                  "essenFolksong/lux.abc"), "german_folk", 0.05, 2.5,
               multi_tune=True),
    Collection("airds_airs", ("airdsAirs/*.abc",), "scottish", 0.05, 3.0, multi_tune=True),
    Collection("misc_folk", ("miscFolk/*.abc",), "fife", 0.06, 3.0, multi_tune=True),
]}
# Collections whose works are identified by tune title (the same tune recurs across files).
TUNE_COLLECTIONS = {"oneills1850", "ryans_mammoth", "essen_german", "essen_chinese",
                    "essen_regional", "airds_airs", "misc_folk"}

TEMPO_WORDS = ((76, "slow"), (105, "moderate"))  # below 76 slow, below 105 moderate, else fast
MOODS: dict[tuple[str, str], tuple[str, ...]] = {
    ("fast", "major"): ("cheerful", "lively", "bright", "joyful", "upbeat", "spirited"),
    ("moderate", "major"): ("warm", "graceful", "pleasant", "gentle", "easygoing", "sunny"),
    ("slow", "major"): ("calm", "serene", "peaceful", "tender", "stately", "reflective"),
    ("fast", "minor"): ("driving", "restless", "urgent", "fiery", "dark"),
    ("moderate", "minor"): ("wistful", "plaintive", "pensive", "bittersweet", "brooding"),
    ("slow", "minor"): ("sombre", "melancholic", "mournful", "sorrowful", "solemn"),
}
SACRED_MOODS = ("solemn", "reverent", "devotional", "prayerful")
DRUM_PHRASES = {
    "folk": ("a light drum beat", "hand-drum style percussion", "a steady drum groove"),
    "march": ("marching snare and bass drum", "a snare-drum march beat"),
    "waltz": ("a light waltz beat on drums", "soft drums keeping the waltz time"),
}
MAJOR_NAMES = ("C", "D-flat", "D", "E-flat", "E", "F", "F-sharp", "G", "A-flat", "A", "B-flat",
               "B")
MINOR_NAMES = ("C", "C-sharp", "D", "E-flat", "E", "F", "F-sharp", "G", "G-sharp", "A", "B-flat",
               "B")
BEAT_NAMES = {1.0: "quarter note", 1.5: "dotted quarter note", 2.0: "half note",
              3.0: "dotted half note"}
TACTUS_UNITS = tuple(BEAT_NAMES)
TUNE_KINDS = (  # (regex on R:/T:/N: text, kind); first match wins
    (r"slip[\s-]?jig", "slip jig"), (r"\bjig", "jig"), (r"set dance", "set dance"),
    (r"hornpipe", "hornpipe"), (r"\breel", "reel"), (r"strathspey", "strathspey"),
    (r"\bfling", "highland fling"), (r"\bclog", "clog"), (r"polka", "polka"),
    (r"schottische", "schottische"), (r"march|quick\s*step", "march"), (r"waltz", "waltz"),
    (r"\bair\b|lament|\bslow\b|planxty", "air"),
)
ESSEN_ORIGINS = (  # (regex on the O: field, style); first match wins
    (r"china|taiwan", "Chinese folk song"), (r"irland", "Irish folk song"),
    (r"lothringen", "Lorraine folk song"), (r"luxemburg", "Luxembourgish folk song"),
    (r"deutschland|gottschee|schlesien", "German folk song"), (r"schweiz", "Swiss folk song"),
    (r"oesterreich", "Austrian folk song"), (r"niederlande", "Dutch folk song"),
)


# ---------------------------------------------------------------------------------------------
# Clip metadata
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ClipSpec:
    """Everything known about one rendered clip; one manifest record."""
    clip_id: str
    clip_index: int
    score_path: str  # relative to the music21 corpus root
    score_number: int | None  # tune number (ABC X:) inside a multi-tune file
    score_title: str
    collection: str
    style: str
    instruments: list[dict[str, Any]]  # {"program", "name", "role"}, distinct programs
    drums: bool
    drum_pattern: str | None
    tempo_bpm: int
    tempo_beat: str  # note value the BPM counts
    tempo_word: str
    key_tonic: str
    key_mode: str
    key_pitch_class: int
    key_source: str  # "clip" analysis or the whole "score" when the clip is ambiguous
    time_signature: str
    transpose_semitones: int
    moods: list[str]
    start_quarter: float  # offset of the clip in the score, in quarter notes
    length_quarters: float
    duration_seconds: float
    num_notes: int
    split: str
    split_key: str
    caption: str
    wav: str  # relative to the corpus directory
    midi: str
    sample_rate: int
    seed: int

    @property
    def programs(self) -> list[int]:
        return [inst["program"] for inst in self.instruments]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "ClipSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(record))
        if missing:
            raise ValueError(f"missing fields {missing}")
        spec = cls(**{k: record[k] for k in names})
        if spec.split not in SPLITS:
            raise ValueError(f"unknown split {spec.split!r}")
        return spec


@dataclasses.dataclass
class CorpusBuild:
    """Result of build_corpus: the clips in the manifest and the build log."""
    out_dir: str
    manifest_path: str
    clips: list[ClipSpec]
    log: dict[str, Any]
    cache_hit: bool


def load_manifest(out_dir: str, split: str | None = None) -> list[ClipSpec]:
    """Clip records of a built corpus, optionally only one split.

    A malformed line raises ValueError naming the file and the line number.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; build the corpus with "
                                f"`python -m musicrl_jax.data.corpus --out_dir {out_dir}`.")
    clips = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("record is not a JSON object")
                spec = ClipSpec.from_dict(record)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: malformed manifest record ({err}).") from err
            if split is None or spec.split == split:
                clips.append(spec)
    return clips


# ---------------------------------------------------------------------------------------------
# Corpus index: which scores/tunes each collection offers (cheap: ABC headers only, no parsing)
# ---------------------------------------------------------------------------------------------
def corpus_root() -> str:
    import music21.corpus
    return os.path.dirname(os.path.abspath(music21.corpus.__file__))


def _abc_tunes(text: str) -> Iterable[dict[str, Any]]:
    """Header fields of each X: tune of an ABC file."""
    tune: dict[str, Any] | None = None
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z]):\s*(.*?)\s*$", line)
        if not match:
            continue
        field, value = match.groups()
        if field == "X":
            if tune is not None:
                yield tune
            digits = re.match(r"\d+", value)
            tune = {"number": int(digits.group())} if digits else None
        elif tune is not None and field in "TRMONK" and field.lower() not in tune:
            tune[field.lower()] = value  # first T: is the title, later ones alternates
    if tune is not None:
        yield tune


def _index_collection(collection: Collection, root: str) -> list[dict[str, Any]]:
    paths = set()
    for pattern in collection.patterns:
        paths.update(glob.glob(os.path.join(root, pattern), recursive=True))
    rel_paths = sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in paths)
    if collection.exclude:
        rel_paths = [p for p in rel_paths if not re.search(collection.exclude, "/" + p)]
    if collection.max_file_kb:
        rel_paths = [p for p in rel_paths
                     if os.path.getsize(os.path.join(root, p)) <= collection.max_file_kb * 1024]
    units, seen = [], set()
    for rel in rel_paths:
        if not collection.multi_tune:
            units.append({"path": rel, "number": None})
            continue
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        for tune in _abc_tunes(text):
            if tune.get("number") is None:
                continue
            # O'Neill's X: numbers are the book's tune numbers; overlapping files reprint tunes.
            dedupe = (tune["number"] if collection.name == "oneills1850"
                      else (rel, tune["number"]))
            if dedupe in seen:
                continue
            seen.add(dedupe)
            units.append({"path": rel, **tune})
    return units


@functools.lru_cache(maxsize=None)
def _cached_index(name: str, root: str) -> tuple[dict[str, Any], ...]:
    return tuple(_index_collection(COLLECTIONS[name], root))


def index_corpus(names: Sequence[str], cache_path: str | None = None) -> dict[str, list[dict]]:
    """Score units per collection, cached in memory and (optionally) in a JSON file."""
    import music21
    root = corpus_root()
    cached: dict[str, Any] = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path, encoding="utf-8") as f:
                cached = json.load(f)
        except (OSError, json.JSONDecodeError):
            cached = {}
    valid = (cached.get("music21_version") == music21.__version__
             and cached.get("corpus_root") == root
             and cached.get("format") == INDEX_FORMAT_VERSION)
    units = dict(cached.get("collections", {})) if valid else {}
    changed = False
    for name in names:
        if name not in units:
            units[name] = [dict(u) for u in _cached_index(name, root)]
            changed = True
    if cache_path and changed:
        _atomic_write_text(cache_path, json.dumps({
            "music21_version": music21.__version__, "corpus_root": root,
            "format": INDEX_FORMAT_VERSION, "collections": units}))
    return {name: units[name] for name in names}


def _interleave_units(index: dict[str, list[dict]], seed: int) -> list[tuple[str, dict]]:
    """All units in a deterministic order whose every prefix follows the collection shares.

    Each collection is shuffled on its own, then a smooth weighted round robin draws from them
    at rate share / clips_per_score, so the clip mix is right however many clips are kept.
    """
    queues, rates = {}, {}
    for name, units in index.items():
        if not units:
            continue
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(units))
        queues[name] = _collections.deque(units[i] for i in order)
        collection = COLLECTIONS[name]
        rates[name] = collection.share / collection.clips_per_score
    credit = {name: 0.0 for name in queues}
    ordered = []
    while queues:
        total = sum(rates[n] for n in queues)
        for name in queues:
            credit[name] += rates[name]
        pick = max(queues, key=lambda n: (credit[n], n))
        credit[pick] -= total
        ordered.append((pick, queues[pick].popleft()))
        if not queues[pick]:
            del queues[pick]
    return ordered


# ---------------------------------------------------------------------------------------------
# Styles, splits and naming
# ---------------------------------------------------------------------------------------------
def _tune_kind(unit: dict[str, Any]) -> str | None:
    text = " ".join(str(unit.get(k, "")) for k in ("r", "t", "n")).lower()
    for pattern, kind in TUNE_KINDS:
        if re.search(pattern, text):
            return kind
    meter = str(unit.get("m", "")).replace(" ", "")
    if meter == "9/8":
        return "slip jig"
    if meter == "6/8":
        return "jig"
    return None


def _style_name(collection: str, unit: dict[str, Any]) -> str:
    path = unit["path"]
    if collection == "bach_chorales":
        return "Bach chorale"
    if collection == "palestrina":
        return "Renaissance mass"
    if collection == "josquin":
        return "Renaissance motet" if "PerIllud" in path else "Renaissance chanson"
    if collection == "trecento":
        return "medieval Italian song"
    if collection == "monteverdi":
        return "Italian madrigal"
    if collection == "string_quartets":
        return "Classical string quartet"
    if collection == "oneills1850":
        return f"Irish {_tune_kind(unit) or 'fiddle tune'}"
    if collection == "ryans_mammoth":
        return _tune_kind(unit) or "fiddle tune"
    if collection == "airds_airs":
        return f"Scottish {_tune_kind(unit) or 'air'}"
    if collection == "misc_folk":
        return "American fife tune" if "fife" in path else "Northumbrian pipe tune"
    # Essen folk songs: the O: field names the region.
    origin = str(unit.get("o", "")).lower()
    style = next((s for pattern, s in ESSEN_ORIGINS if re.search(pattern, origin)),
                 "German folk song")
    if style == "German folk song" and "kinder" in path:
        return "German children's song"
    if style == "German folk song" and "ballad" in path:
        return "German folk ballad"
    return style


def _normalise_title(title: str) -> str:
    title = re.sub(r"\(.*?\)|\[.*?\]", " ", title.lower())
    title = re.sub(r"[^a-z0-9äöüß ]+", " ", title)
    kinds = (r"\b(the|a|an|reel|jig|double|single|slip|hornpipe|strathspey|polka|march|waltz|"
             r"clog|air|highland|fling|set|dance|quick|step|no|tune)\b")
    return " ".join(re.sub(kinds, " ", title).split())


def _split_key(collection: str, unit: dict[str, Any]) -> str:
    """Identity of the work a unit belongs to; all clips of a work share one split."""
    path = unit["path"]
    if collection in TUNE_COLLECTIONS:
        title = _normalise_title(str(unit.get("t", "")))
        if len(title) >= 4:
            return f"tune:{title}"
        return f"score:{path}#{unit.get('number')}"
    if collection == "bach_chorales":
        # bwv248.23-2 / bwv248.23-s / bwv112.5-sc are versions of one chorale.
        return "score:" + re.sub(r"-[^.]*\.mxl$", ".mxl", path)
    return f"score:{path}"


def split_for(split_key: str) -> str:
    """train/validation/test from a stable hash (independent of Python's hash seed)."""
    value = int(hashlib.sha256(split_key.encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12
    if value < SPLIT_FRACTIONS["train"]:
        return "train"
    if value < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["validation"]:
        return "validation"
    return "test"


def tempo_word(bpm: float) -> str:
    for limit, word in TEMPO_WORDS:
        if bpm < limit:
            return word
    return "fast"


def key_name(pitch_class: int, mode: str) -> str:
    names = MAJOR_NAMES if mode == "major" else MINOR_NAMES
    return names[pitch_class % 12]


def instrument_phrase(programs: Sequence[int]) -> str:
    """'two violins, viola and cello' from programs in playing order (repeats counted)."""
    counts = _collections.Counter(programs)
    words = []
    for program in dict.fromkeys(programs):
        name = GM_INSTRUMENTS[program][0]
        n = counts[program]
        if n > 1 and name not in ENSEMBLE_NAMES:
            name = f"{COUNT_WORDS.get(n, str(n))} {name}s"
        words.append(name)
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def compose_caption(template: int, *, style: str, instruments: str, bpm: int, key: str,
                    metre: str, tempo: str, moods: Sequence[str], drums: str | None) -> str:
    """One of six caption wordings; every one names instruments, BPM, key and style."""
    mood = " and ".join(moods) if len(moods) > 1 else moods[0]
    mood_list = ", ".join(moods)
    with_drums = f" with {drums}" if drums else ""
    if template == 0:
        text = (f"{_with_article(f'{tempo}, {mood_list} {style}')} played on "
                f"{instruments}{with_drums}, {bpm} BPM, in {key}")
    elif template == 1:
        text = (f"{tempo} {mood_list} {style} for {instruments}{with_drums} in {key}, "
                f"{metre} time, {bpm} BPM")
    elif template == 2:
        text = (f"{instruments}{with_drums} performing {_with_article(f'{mood} {style}')} "
                f"in {key} at {bpm} BPM; {tempo} tempo, {metre} metre")
    elif template == 3:
        text = (f"{_with_article(style)} in {key} ({metre}, {bpm} BPM) arranged for "
                f"{instruments}{with_drums}, {mood_list} and {tempo}")
    elif template == 4:
        text = (f"{_with_article(style)} rendition for {instruments}{with_drums}: {tempo} at "
                f"{bpm} BPM, {mood}, in {key}")
    elif template == 5:
        text = (f"{mood_list} {tempo} {style} in {key}, {bpm} BPM in {metre}, performed by "
                f"{instruments}{with_drums}")
    else:
        raise ValueError(f"caption template {template} does not exist")
    return _capitalise(text) + "."


NUM_CAPTION_TEMPLATES = 6


# ---------------------------------------------------------------------------------------------
# Score reading (worker side)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScoreNotes:
    """What the clip recipe needs from a parsed score, as plain numbers."""
    voices: list[np.ndarray]  # per part: float array (n, 3) of onset_ql, duration_ql, midi
    measure_starts: np.ndarray
    time_signatures: list[tuple[float, str, float, float]]  # offset, "3/4", beat_ql, bar_ql
    end_ql: float
    median_note_ql: float
    title: str
    score: Any = dataclasses.field(default=None, repr=False)
    _key: tuple[int, str] | None = dataclasses.field(default=None, repr=False)

    def score_key(self) -> tuple[int, str] | None:
        """Whole-score key (tonic pitch class, mode); analysed on first use since it takes ~1 s
        on a quartet movement and only ambiguous clips need it."""
        if self._key is None and self.score is not None:
            try:
                key = self.score.analyze("key")
                self._key = (int(key.tonic.pitchClass), str(key.mode))
            except Exception:  # noqa: BLE001 - an unanalysable score has no fallback key
                self.score = None
        return self._key


def _parse_unit(unit: dict[str, Any], collection: Collection, root: str):
    import music21
    from music21 import corpus
    path = os.path.join(root, unit["path"])
    # forceSource: parse the file itself rather than music21's pickle cache, which parallel
    # workers would race to write into its scratch directory.
    if collection.multi_tune:
        score = corpus.parse(path, number=unit["number"], forceSource=True)
    else:
        score = corpus.parse(path, forceSource=True)
    if isinstance(score, music21.stream.Opus):
        score = score.mergeScores() if collection.merge_voices else score.scores[0]
        if isinstance(score, music21.stream.Opus):
            score = score.scores[0]
    return score


def _tied_notes(elements) -> list[tuple[float, float, int]]:
    """(onset, duration, midi) rows with tied notes merged into one.

    Does what music21's stripTies does, in one pass: stripTies is quadratic and takes
    seconds per part on a quartet movement.
    """
    from music21 import note
    rows: list[list[float]] = []
    open_ties: dict[int, int] = {}
    for element in elements:
        ql = float(element.quarterLength)
        if ql <= 0:  # grace notes have no written duration
            continue
        onset = float(element.offset)
        if element.isChord:
            items = [(p.midi, element.getTie(p) or element.tie) for p in element.pitches]
        elif isinstance(element, note.Note):
            items = [(element.pitch.midi, element.tie)]
        else:
            continue
        for midi_pitch, tie in items:
            tie_type = tie.type if tie is not None else None
            if tie_type in ("continue", "stop") and midi_pitch in open_ties:
                row = rows[open_ties[midi_pitch]]
                row[1] = max(row[1], onset + ql - row[0])
                if tie_type == "stop":
                    del open_ties[midi_pitch]
                continue
            rows.append([onset, ql, midi_pitch])
            if tie_type == "start":
                open_ties[midi_pitch] = len(rows) - 1
    return [tuple(r) for r in rows]


def _read_score(score, fallback_title: str) -> ScoreNotes:
    from music21 import meter, stream
    parts = list(score.parts) or [score]
    voices = []
    for part in parts:
        rows = _tied_notes(part.flatten().notes)
        if rows:
            voices.append(np.array(sorted(rows), dtype=np.float64))
        if len(voices) == MAX_VOICES:
            break
    if not voices:
        raise ValueError("no pitched notes")
    first = parts[0]
    measure_starts = np.array(sorted({float(m.offset)
                                      for m in first.getElementsByClass(stream.Measure)}))
    signatures = []
    for ts in first.flatten().getElementsByClass(meter.TimeSignature):
        signatures.append((float(ts.offset), ts.ratioString,
                           float(ts.beatDuration.quarterLength),
                           float(ts.barDuration.quarterLength)))
    if not signatures:
        signatures = [(0.0, "4/4", 1.0, 4.0)]
    all_notes = np.concatenate(voices)
    end_ql = float(np.max(all_notes[:, 0] + all_notes[:, 1]))
    title = fallback_title
    if score.metadata is not None and score.metadata.title:
        title = str(score.metadata.title)
    return ScoreNotes(voices, measure_starts, signatures, end_ql,
                      float(np.median(all_notes[:, 1])), title.strip(), score)


def _predominant_signature(notes: ScoreNotes) -> tuple[str, float, float]:
    """Time signature covering most of the score: (ratio, beat_ql, bar_ql)."""
    spans: dict[tuple[str, float, float], float] = _collections.defaultdict(float)
    sigs = sorted(notes.time_signatures)
    for i, (offset, ratio, beat, bar) in enumerate(sigs):
        end = sigs[i + 1][0] if i + 1 < len(sigs) else notes.end_ql
        spans[(ratio, beat, bar)] += max(0.0, end - offset)
    return max(spans, key=lambda k: (spans[k], k))


def _signature_at(notes: ScoreNotes, offset: float) -> str:
    ratio = sorted(notes.time_signatures)[0][1]
    for sig_offset, sig_ratio, _, _ in sorted(notes.time_signatures):
        if sig_offset <= offset + 1e-6:
            ratio = sig_ratio
    return ratio


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
# Clip realisation
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


def _octave_fit(pitches: np.ndarray, program: int) -> int:
    """Octave shift (in semitones) that puts most of a line inside the instrument's range."""
    _, low, high = GM_INSTRUMENTS[program]
    best, best_cost = 0, float("inf")
    for octaves in range(-3, 4):
        shifted = pitches + 12 * octaves
        cost = np.sum(shifted < low) + np.sum(shifted > high) + 0.01 * abs(octaves)
        if cost < best_cost:
            best, best_cost = 12 * octaves, cost
    return best


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


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def palette_family(collection: str, style: str) -> str:
    """Instrument family of a score: its collection's, except where one collection mixes
    traditions (fife tunes and Northumbrian pipe tunes; Irish songs among the Essen ones)."""
    if style == "Northumbrian pipe tune":
        return "northumbrian"
    if style == "Irish folk song":
        return "irish"
    return COLLECTIONS[collection].family


def _orchestrate(rng: np.random.Generator, family: str,
                 voices: list[np.ndarray]) -> list[tuple[int, str, int]]:
    """(program, role, voice index) for each MIDI part made from the score's voices."""
    if family in POLYPHONIC_ARRANGEMENTS:
        arrangement = _pick(rng, POLYPHONIC_ARRANGEMENTS[family])
        n = len(voices)
        parts = []
        for i in range(n):
            pos = 0 if len(arrangement) == 1 or n == 1 else round(
                i * (len(arrangement) - 1) / (n - 1))
            parts.append((arrangement[pos], "voice", i))
        return parts
    palette = TUNE_PALETTES[family]
    melody = int(_pick(rng, palette.melody))
    parts = [(melody, "melody", 0)]
    if rng.random() < palette.p_doubling:
        # Fiddle and violin are one instrument in two GM patches: never "fiddle and violin".
        same = {melody} | ({40, 110} if melody in (40, 110) else set())
        doubles = [p for p in palette.doubling if p not in same]
        if doubles:
            parts.append((int(_pick(rng, doubles)), "doubling", 0))
    return parts


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
class ClipDraft:
    """A composed clip before rendering: its record and the MIDI that will be rendered."""
    spec: ClipSpec
    segment: MidiSegment


def _compose_clip(plan: ClipPlan, notes: ScoreNotes, unit: dict[str, Any],
                  collection: Collection, style: Style, tactus: float, bar_ql: float,
                  cfg: dict[str, Any]) -> tuple[ClipDraft | None, str | None]:
    """Orchestrate, analyse and caption one clip and write its MIDI file.

    Returns (draft, None), or (None, reason) when the excerpt is unusable.
    """
    rng = plan.rng
    end = plan.start + plan.length
    sliced = [_slice_voice(v, plan.start, end) for v in notes.voices]
    voices_in = [v for v in sliced if len(v)]
    family = palette_family(collection.name, style.name)
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
    data, _ = midi_bytes([segment])
    # The id hashes the exact MIDI and render settings: an existing WAV with this id is this
    # clip, which is what makes reruns resumable.
    digest = hashlib.sha1(data + cfg["render_identity"].encode()).hexdigest()[:10]
    clip_id = f"{collection.name}-{plan.clip_index // CLIP_INDEX_BLOCK:05d}-{plan.k:02d}-{digest}"
    midi_rel, wav_rel = f"midi/{clip_id}.mid", f"wav/{clip_id}.wav"
    midi_path = os.path.join(cfg["out_dir"], midi_rel)
    if not os.path.isfile(midi_path):
        _atomic_write_bytes(midi_path, data)

    instruments, seen = [], set()
    for voice in midi_voices:
        if voice.drums or voice.program in seen:
            continue
        seen.add(voice.program)
        instruments.append({"program": voice.program,
                            "name": GM_INSTRUMENTS[voice.program][0], "role": voice.role})
    word = tempo_word(plan.bpm)
    mood_pool = list(MOODS[(word, mode)])
    if style.sacred and word != "fast":
        mood_pool = list(dict.fromkeys(mood_pool + list(SACRED_MOODS)))
    moods = [str(m) for m in rng.choice(mood_pool, size=1 + int(rng.random() < 0.4),
                                        replace=False)]
    drum_phrase = str(_pick(rng, DRUM_PHRASES[drum_kit])) if drum_kit else None
    key_text = f"{key_name(tonic, mode)} {mode}"
    caption = compose_caption(
        int(rng.integers(NUM_CAPTION_TEMPLATES)), style=style.name,
        instruments=instrument_phrase([v.program for v in midi_voices if not v.drums]),
        bpm=plan.bpm, key=key_text, metre=metre, tempo=word, moods=moods, drums=drum_phrase)
    split_key = _split_key(collection.name, unit)
    spec = ClipSpec(
        clip_id=clip_id, clip_index=plan.clip_index, score_path=unit["path"],
        score_number=unit.get("number"), score_title=notes.title, collection=collection.name,
        style=style.name, instruments=instruments, drums=drum_kit is not None,
        drum_pattern=drum_kit, tempo_bpm=plan.bpm, tempo_beat=BEAT_NAMES[tactus],
        tempo_word=word, key_tonic=key_name(tonic, mode), key_mode=mode,
        key_pitch_class=int(tonic), key_source=key_source, time_signature=metre,
        transpose_semitones=transpose, moods=moods, start_quarter=round(plan.start, 4),
        length_quarters=round(plan.length, 4), duration_seconds=float(cfg["clip_seconds"]),
        num_notes=int(num_notes), split=split_for(split_key), split_key=split_key,
        caption=caption, wav=wav_rel, midi=midi_rel, sample_rate=int(cfg["sample_rate"]),
        seed=int(cfg["seed"]))
    return ClipDraft(spec, segment), None


def _render_drafts(drafts: list[ClipDraft], cfg: dict[str, Any], name: str) -> None:
    """Render the clips of one score that have no WAV yet with a single FluidSynth run.

    FluidSynth spends ~0.1 s loading before it renders anything, ten times the cost of a 5 s
    clip, so the clips are laid end to end (with silent gaps) in one MIDI file, rendered once
    and cut apart at the segment start times the MIDI tempo map fixes.
    """
    todo = [d for d in drafts if not os.path.isfile(os.path.join(cfg["out_dir"], d.spec.wav))]
    if not todo:
        return
    data, starts = midi_bytes([d.segment for d in todo], gap_seconds=RENDER_GAP_SECONDS)
    batch_path = os.path.join(cfg["out_dir"], "midi", f".batch-{name}-{os.getpid()}.mid")
    _atomic_write_bytes(batch_path, data)
    try:
        audio = synthesis.synthesize(batch_path, cfg["sample_rate"], cfg["soundfont"])
    finally:
        os.remove(batch_path)
    rate, seconds = cfg["sample_rate"], cfg["clip_seconds"]
    for draft, start in zip(todo, starts):
        first = int(round(start * rate))
        clip = synthesis.finish_clip(audio[first:first + int(round(seconds * rate)) + 1], rate,
                                     seconds)
        synthesis.write_wav(os.path.join(cfg["out_dir"], draft.spec.wav), clip, rate)


def _process_unit(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: parse one score (or tune) and realise its clips. Never raises for bad music."""
    unit, unit_index, name, cfg = task["unit"], task["unit_index"], task["collection"], task["cfg"]
    collection = COLLECTIONS[name]
    score_id = unit["path"] + (f"#{unit['number']}" if unit.get("number") is not None else "")
    result: dict[str, Any] = {"unit_index": unit_index, "score": score_id, "collection": name,
                              "clips": [], "skipped": None, "dropped": [], "parse_s": 0.0,
                              "clip_s": 0.0}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            score = _parse_unit(unit, collection, cfg["corpus_root"])
            notes = _read_score(score, str(unit.get("t") or os.path.basename(unit["path"])))
        except Exception as err:  # noqa: BLE001 - unparsable scores are skipped and counted
            result["skipped"] = f"music21 could not read it: {type(err).__name__}: {err}"[:300]
            return result
        result["parse_s"] = time.perf_counter() - t0
        style = STYLES[_style_name(name, unit)]
        _, beat_ql, bar_ql = _predominant_signature(notes)
        tactus = choose_tactus(beat_ql, bar_ql, notes.median_note_ql, style.notes_per_beat)
        plans = _plan_clips(notes, style, tactus, cfg["clip_seconds"], cfg["seed"], unit_index,
                            cfg["max_clips_per_score"])
        if not plans:
            result["skipped"] = (f"shorter than one {cfg['clip_seconds']:g} s clip "
                                 f"({notes.end_ql:g} quarter notes)")
            return result
        t1 = time.perf_counter()
        drafts = []
        for plan in plans:
            try:
                draft, reason = _compose_clip(plan, notes, unit, collection, style, tactus,
                                              bar_ql, cfg)
            except Exception as err:  # noqa: BLE001 - a quirk of one excerpt skips only it
                draft, reason = None, f"clip failed: {type(err).__name__}: {err}"[:300]
            if draft is not None:
                drafts.append(draft)
            else:
                result["dropped"].append(reason)
    try:
        _render_drafts(drafts, cfg, f"{name}-{unit_index}")
    except synthesis.SynthesisUnavailableError:
        raise
    except Exception as err:  # noqa: BLE001 - a score FluidSynth cannot render is skipped
        result["skipped"] = f"FluidSynth could not render it: {type(err).__name__}: {err}"[:300]
        return result
    result["clips"] = [d.spec.to_dict() for d in drafts]
    result["clip_s"] = time.perf_counter() - t1
    if not result["clips"]:
        result["skipped"] = "no usable clip: " + "; ".join(sorted(set(result["dropped"])))[:300]
    return result


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (workers, FluidSynth)."""
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _recipe_digest() -> str:
    """Hash of the code that turns scores into clips and captions.

    Part of the cache fingerprint, so editing the recipe never serves a stale manifest; the
    rebuild is cheap because WAVs are keyed by their MIDI bytes and reused when unchanged.
    """
    digest = hashlib.sha256()
    for path in (__file__, synthesis.__file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _config_fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _soundfont_identity(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.basename(path)}:{stat.st_size}"


def _summarise(clips: list[ClipSpec]) -> dict[str, Any]:
    instruments = _collections.Counter(i["name"] for c in clips for i in c.instruments)
    return {
        "clips": len(clips),
        "distinct_captions": len({c.caption for c in clips}),
        "clips_per_split": {s: sum(c.split == s for c in clips) for s in SPLITS},
        "scores_per_split": {s: len({c.split_key for c in clips if c.split == s})
                             for s in SPLITS},
        "styles": dict(_collections.Counter(c.style for c in clips).most_common()),
        "collections": dict(_collections.Counter(c.collection for c in clips).most_common()),
        "instruments": dict(instruments.most_common()),
        "programs": sorted({p for c in clips for p in c.programs}),
        "clips_with_drums": sum(c.drums for c in clips),
        "tempo_words": dict(_collections.Counter(c.tempo_word for c in clips)),
        "key_modes": dict(_collections.Counter(c.key_mode for c in clips)),
        "key_from_score_fallback": sum(c.key_source == "score" for c in clips),
    }


def _cached_build(out_dir: str, fingerprint: str) -> CorpusBuild | None:
    log_path = os.path.join(out_dir, BUILD_LOG_NAME)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if not (os.path.isfile(log_path) and os.path.isfile(manifest_path)):
        return None
    try:
        with open(log_path, encoding="utf-8") as f:
            log = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if log.get("config_fingerprint") != fingerprint or not log.get("complete"):
        return None
    clips = load_manifest(out_dir)
    if not all(os.path.isfile(os.path.join(out_dir, c.wav)) for c in clips):
        return None
    return CorpusBuild(out_dir, manifest_path, clips, log, cache_hit=True)


def build_corpus(out_dir: str, num_clips: int = 2000, clip_seconds: float = DEFAULT_CLIP_SECONDS,
                 seed: int = 0, num_workers: int | None = os.cpu_count(),
                 soundfont: str | None = None, collections: Sequence[str] | None = None, *,
                 sample_rate: int = synthesis.DEFAULT_SAMPLE_RATE,
                 max_clips_per_score: int | None = None, progress: bool = True) -> CorpusBuild:
    """Build (or reuse) a captioned clip corpus in `out_dir`; see the module docstring.

    Returns immediately when `out_dir` already holds a finished build of the same config.
    Otherwise renders what is missing (WAVs of identical clips are reused), then writes the
    manifest and build log atomically. Scores music21 cannot parse and clips FluidSynth cannot
    render are skipped and listed in the build log; no usable clip at all is a RuntimeError.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be positive, got {num_clips}")
    if clip_seconds <= 0:
        raise ValueError(f"clip_seconds must be positive, got {clip_seconds}")
    names = list(collections) if collections else list(COLLECTIONS)
    unknown = [n for n in names if n not in COLLECTIONS]
    if unknown:
        raise ValueError(f"unknown collections {unknown}; available: {sorted(COLLECTIONS)}")
    sf2 = synthesis.find_soundfont(soundfont)
    synthesis.find_fluidsynth()
    if max_clips_per_score is None:
        max_clips_per_score = max(1, round(SECONDS_PER_SCORE / clip_seconds))
    max_clips_per_score = min(int(max_clips_per_score), CLIP_INDEX_BLOCK)
    import music21
    config = {"num_clips": int(num_clips), "clip_seconds": float(clip_seconds),
              "seed": int(seed), "collections": names, "sample_rate": int(sample_rate),
              "soundfont": _soundfont_identity(sf2), "max_clips_per_score": max_clips_per_score,
              "recipe": _recipe_digest(), "music21": music21.__version__}
    fingerprint = _config_fingerprint(config)
    out_dir = os.path.abspath(out_dir)
    cached = _cached_build(out_dir, fingerprint)
    if cached is not None:
        return cached

    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    log_path = os.path.join(out_dir, BUILD_LOG_NAME)
    if os.path.exists(log_path):
        # The log marks a finished build; remove it first so a crash below can never leave an
        # old "complete" log beside a new manifest.
        os.remove(log_path)
    os.makedirs(os.path.join(out_dir, "wav"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "midi"), exist_ok=True)
    index = index_corpus(names, os.path.join(out_dir, INDEX_NAME))
    units = _interleave_units(index, seed)
    t_index = time.perf_counter() - t_start
    cfg = {"seed": int(seed), "clip_seconds": float(clip_seconds), "sample_rate": int(sample_rate),
           "soundfont": sf2, "render_identity": f"{_soundfont_identity(sf2)}@{sample_rate}",
           "out_dir": out_dir, "corpus_root": corpus_root(),
           "max_clips_per_score": max_clips_per_score}
    tasks = ({"unit": unit, "unit_index": i, "collection": name, "cfg": cfg}
             for i, (name, unit) in enumerate(units))
    results = _run_tasks(tasks, num_clips, num_workers or 1, progress)

    clips: list[ClipSpec] = []
    skipped, dropped = [], _collections.Counter()
    parse_s = clip_s = 0.0
    for result in results:
        parse_s += result["parse_s"]
        clip_s += result["clip_s"]
        dropped.update(result["dropped"])
        if result["skipped"]:
            skipped.append({"score": result["score"], "collection": result["collection"],
                            "reason": result["skipped"]})
        for record in result["clips"]:
            if len(clips) < num_clips:
                clips.append(ClipSpec.from_dict(record))
    if not clips:
        reasons = _collections.Counter(s["reason"].split(":")[0] for s in skipped)
        raise RuntimeError(
            f"No usable clips: tried {len(results)} scores from collections {names} "
            f"(music21 corpus at {corpus_root()}), soundfont {sf2}. Skip reasons: "
            f"{dict(reasons.most_common(5)) or 'none (the collections are empty)'}; "
            f"first skipped: {skipped[:3]}.")
    if len(clips) < num_clips:
        warnings.warn(f"Only {len(clips)} of {num_clips} clips: the collections {names} ran out "
                      f"of scores at {clip_seconds:g} s per clip.", stacklevel=2)

    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    _atomic_write_text(manifest_path, "".join(
        json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in clips))
    pruned = _prune_unreferenced(out_dir, clips)
    elapsed = time.perf_counter() - t_start
    log = {
        "complete": True,
        "config_fingerprint": fingerprint,
        "config": config,
        "requested_clips": int(num_clips),
        **_summarise(clips),
        "scores_tried": len(results),
        "skipped_scores": skipped,
        "skip_reasons": dict(_collections.Counter(
            s["reason"].split(":")[0].split(" (")[0] for s in skipped).most_common()),
        "dropped_clips": dict(dropped.most_common()),
        "pruned_stale_files": pruned,
        "workers": int(num_workers or 1),
        # Wall time; cpu sums this process, the workers and FluidSynth; the per-stage figures
        # are wall time summed over workers.
        "seconds": {"total": round(elapsed, 2), "cpu": round(_cpu_seconds() - cpu_start, 2),
                    "index": round(t_index, 2), "parse_in_workers": round(parse_s, 2),
                    "clips_in_workers": round(clip_s, 2)},
    }
    _atomic_write_text(log_path, json.dumps(log, indent=1))
    return CorpusBuild(out_dir, manifest_path, clips, log, cache_hit=False)


def _run_tasks(tasks: Iterable[dict[str, Any]], num_clips: int, num_workers: int,
               progress: bool) -> list[dict[str, Any]]:
    """Process score units in order until the completed prefix holds `num_clips` clips.

    Workers run ahead by a bounded window; results are consumed in submission order, so the
    kept clips are the same for any worker count (a few look-ahead renders may go unused).
    """
    from tqdm import tqdm
    done: list[dict[str, Any]] = []
    bar = tqdm(total=num_clips, unit="clip", desc="corpus", disable=not progress,
               file=sys.stderr)
    clips = 0
    task_iter = iter(tasks)
    try:
        if num_workers <= 1:
            for task in task_iter:
                result = _process_unit(task)
                done.append(result)
                new = min(len(result["clips"]), num_clips - clips)
                clips += new
                bar.update(new)
                if clips >= num_clips:
                    break
            return done
        # spawn: workers must not inherit a parent that may hold JAX/XLA threads.
        ctx = mp.get_context("spawn")
        with ctx.Pool(num_workers, initializer=_worker_init) as pool:
            pending: _collections.deque = _collections.deque()
            exhausted = False
            while True:
                while not exhausted and clips < num_clips and len(pending) < 2 * num_workers:
                    task = next(task_iter, None)
                    if task is None:
                        exhausted = True
                        break
                    pending.append(pool.apply_async(_process_unit, (task,)))
                if not pending:
                    break
                result = pending.popleft().get()
                if clips >= num_clips:
                    continue  # look-ahead beyond the target: finished, not kept
                done.append(result)
                new = min(len(result["clips"]), num_clips - clips)
                clips += new
                bar.update(new)
    finally:
        bar.close()
    return done


def _worker_init() -> None:
    warnings.simplefilter("ignore")


def _prune_unreferenced(out_dir: str, clips: list[ClipSpec]) -> int:
    """Delete WAV/MIDI files (and stale temporaries) no manifest record points to."""
    keep = {c.wav for c in clips} | {c.midi for c in clips}
    removed = 0
    for sub in ("wav", "midi"):
        folder = os.path.join(out_dir, sub)
        for name in os.listdir(folder):
            if f"{sub}/{name}" not in keep:
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m musicrl_jax.data.corpus",
        description="Render captioned clips from the music21 corpus with FluidSynth.")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--num_clips", type=int, default=2000)
    parser.add_argument("--clip_seconds", type=float, default=DEFAULT_CLIP_SECONDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=os.cpu_count())
    parser.add_argument("--soundfont", default=None)
    parser.add_argument("--collections", nargs="+", default=None, choices=sorted(COLLECTIONS))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    build = build_corpus(args.out_dir, num_clips=args.num_clips, clip_seconds=args.clip_seconds,
                         seed=args.seed, num_workers=args.num_workers, soundfont=args.soundfont,
                         collections=args.collections)
    wall = time.perf_counter() - t0
    summary = _summarise(build.clips)
    print(f"corpus: {build.out_dir} ({'cached, ' if build.cache_hit else ''}"
          f"{wall:.1f} s this run; the build took {build.log['seconds']['total']:.1f} s wall, "
          f"{build.log['seconds']['cpu']:.0f} CPU-s, with {build.log['workers']} workers)")
    print(f"clips: {summary['clips']} x {args.clip_seconds:g} s   distinct captions: "
          f"{summary['distinct_captions']}   with drums: {summary['clips_with_drums']}")
    for split in SPLITS:
        print(f"  {split:<10} {summary['clips_per_split'][split]:>5} clips from "
              f"{summary['scores_per_split'][split]:>4} works")
    print(f"instruments ({len(summary['instruments'])}): " + ", ".join(
        f"{k} {v}" for k, v in summary["instruments"].items()))
    print(f"styles ({len(summary['styles'])}): " + ", ".join(
        f"{k} {v}" for k, v in summary["styles"].items()))
    print(f"collections ({len(summary['collections'])}): " + ", ".join(
        f"{k} {v}" for k, v in summary["collections"].items()))
    print(f"scores tried: {build.log['scores_tried']}, skipped: "
          f"{len(build.log['skipped_scores'])} {build.log['skip_reasons']}")
    print(f"example: {build.clips[0].caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
