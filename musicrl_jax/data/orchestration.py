"""General MIDI instruments and how a score's voices are given to them.

`GM_INSTRUMENTS` names each program the corpus uses and gives its comfortable range. Each
collection has an instrument family (`palette_family`) whose palette either arranges every voice
of a polyphonic score (`POLYPHONIC_ARRANGEMENTS`) or supplies melody, doubling and accompaniment
instruments for a tune (`TUNE_PALETTES`); `_orchestrate` draws the parts of one clip and
`_octave_fit` moves a line into its instrument's range.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from musicrl_jax.data.scores import COLLECTIONS

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
# Accompaniment programs that sustain chords rather than strum/oom-pah them.
PAD_PROGRAMS = {19, 48, 52, 53}


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
