"""Captioned music clips rendered from the real scores bundled with music21.

Each clip is a few seconds of a real score (Bach chorales, Palestrina masses, Josquin, trecento
songs, Monteverdi madrigals, Classical string quartets, O'Neill's and Ryan's fiddle tunes, Aird's
Scottish airs, Essen folk songs, fife tunes) re-orchestrated for General MIDI instruments at a
drawn tempo and transposition, rendered with FluidSynth, and captioned from exactly what was
rendered: instruments, tempo in BPM, key of the transposed audio, metre, style and mood words.
This module is the build: it orders the scores, splits them, makes each clip's record and renders
it, and writes the manifest and build log. The music comes from `scores` (collections, parsing),
`clips` and `orchestration` (arrangement and MIDI) and `captions` (the text).

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
from musicrl_jax.data.captions import BEAT_NAMES, draw_caption, key_name
from musicrl_jax.data.clips import (CLIP_INDEX_BLOCK, ClipPlan, MidiSegment, _plan_clips,
                                    arrange_clip, choose_tactus, midi_bytes)
from musicrl_jax.data.orchestration import GM_INSTRUMENTS
from musicrl_jax.data.scores import (COLLECTIONS, STYLES, TUNE_COLLECTIONS, Collection, ScoreNotes,
                                     Style, _cached_index, _parse_unit, _predominant_signature,
                                     _read_score, _style_name, corpus_root)
from musicrl_jax.errors import ConfigError, make_output_dir, report_user_errors

INDEX_FORMAT_VERSION = 1  # layout of corpus_index.json
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
DEFAULT_CLIP_SECONDS = 5.0
# About 30 s of music per score: enough clips to amortise a parse and a FluidSynth start,
# few enough to keep the corpus varied (2,000 clips of 5 s come from ~550 scores).
SECONDS_PER_SCORE = 30.0
# Silence between clips rendered in one FluidSynth run: long enough for release and reverb
# tails to fade out before the next clip begins.
RENDER_GAP_SECONDS = 2.0

MANIFEST_NAME = "manifest.jsonl"
BUILD_LOG_NAME = "build_log.json"
INDEX_NAME = "corpus_index.json"
PROG = "python -m musicrl_jax.data.corpus"


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

    A missing manifest or a malformed line raises ConfigError (a ValueError) naming the file
    and the line number.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} is missing: {out_dir} is not a built corpus. Fix: build it "
                          f"with `python -m musicrl_jax.data.corpus --out_dir {out_dir}`, or "
                          "pass the directory that holds manifest.jsonl.")
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
                raise ConfigError(f"{path}:{line_no}: malformed manifest record ({err}). Fix: "
                                  "rebuild the corpus.") from err
            if split is None or spec.split == split:
                clips.append(spec)
    return clips


# ---------------------------------------------------------------------------------------------
# Corpus index, cached beside the corpus; units in collection-share order
# ---------------------------------------------------------------------------------------------
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
# Splits
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Clip records and rendering (worker side)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ClipDraft:
    """A composed clip before rendering: its record and the MIDI that will be rendered."""
    spec: ClipSpec
    segment: MidiSegment


def _compose_clip(plan: ClipPlan, notes: ScoreNotes, unit: dict[str, Any],
                  collection: Collection, style: Style, tactus: float, bar_ql: float,
                  cfg: dict[str, Any]) -> tuple[ClipDraft | None, str | None]:
    """Arrange and caption one clip, write its MIDI file and make its manifest record.

    Returns (draft, None), or (None, reason) when the excerpt is unusable.
    """
    arranged, reason = arrange_clip(plan, notes, collection.name, style, tactus, bar_ql)
    if arranged is None:
        return None, reason
    segment, tonic, mode = arranged.segment, arranged.tonic, arranged.mode
    metre, drum_kit = segment.time_signature, arranged.drum_kit
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
    for voice in segment.voices:
        if voice.drums or voice.program in seen:
            continue
        seen.add(voice.program)
        instruments.append({"program": voice.program,
                            "name": GM_INSTRUMENTS[voice.program][0], "role": voice.role})
    caption, word, moods = draw_caption(
        plan.rng, style=style.name, sacred=style.sacred,
        programs=[v.program for v in segment.voices if not v.drums], bpm=plan.bpm, tonic=tonic,
        mode=mode, metre=metre, drum_kit=drum_kit)
    split_key = _split_key(collection.name, unit)
    spec = ClipSpec(
        clip_id=clip_id, clip_index=plan.clip_index, score_path=unit["path"],
        score_number=unit.get("number"), score_title=notes.title, collection=collection.name,
        style=style.name, instruments=instruments, drums=drum_kit is not None,
        drum_pattern=drum_kit, tempo_bpm=plan.bpm, tempo_beat=BEAT_NAMES[tactus],
        tempo_word=word, key_tonic=key_name(tonic, mode), key_mode=mode,
        key_pitch_class=int(tonic), key_source=arranged.key_source, time_signature=metre,
        transpose_semitones=arranged.transpose, moods=moods, start_quarter=round(plan.start, 4),
        length_quarters=round(plan.length, 4), duration_seconds=float(cfg["clip_seconds"]),
        num_notes=int(arranged.num_notes), split=split_for(split_key), split_key=split_key,
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
    # Imported here: a module-level `clips` would be shadowed by the build's lists of clips.
    from musicrl_jax.data import captions, clips, orchestration, scores
    digest = hashlib.sha256()
    for path in (__file__, scores.__file__, orchestration.__file__, captions.__file__,
                 clips.__file__, synthesis.__file__):
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
        raise ConfigError(f"num_clips must be positive, got {num_clips}")
    if clip_seconds <= 0:
        raise ConfigError(f"clip_seconds must be positive, got {clip_seconds}")
    names = list(collections) if collections else list(COLLECTIONS)
    unknown = [n for n in names if n not in COLLECTIONS]
    if unknown:
        raise ConfigError(f"unknown collections {unknown}; available: {sorted(COLLECTIONS)}")
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
# A missing FluidSynth or soundfont is the user's to install, as its message says.
@report_user_errors(PROG, synthesis.SynthesisUnavailableError)
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
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
    make_output_dir(args.out_dir, "--out_dir")
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
