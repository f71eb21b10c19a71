"""Where the corpus's music comes from: music21 score collections, their styles, and parsing.

`COLLECTIONS` lists the groups of music21 corpus files the corpus draws on (Bach chorales,
Palestrina, fiddle tunes, Essen folk songs, ...) and `STYLES` how each kind of piece is tempo'd
and drummed; `_style_name` says which style a score or tune is. Indexing finds the score units a
collection offers (whole files, or the X: tunes of multi-tune ABC files, from headers alone),
and reading turns one parsed unit into `ScoreNotes`: per-voice note arrays, bar lines and time
signatures, with tied notes merged. Nothing here chooses clips, instruments or captions.
"""

from __future__ import annotations

import collections as _collections
import dataclasses
import functools
import glob
import os
import re
from typing import Any, Iterable

import numpy as np

# At most this many voices of a score are orchestrated: each needs its own MIDI channel, as do
# a doubling and an accompaniment, and channel 10 is kept for drums.
MAX_VOICES = 6


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


# ---------------------------------------------------------------------------------------------
# Which style a score unit is (collection, path and ABC header fields)
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
