"""Caption words and wordings for a rendered clip.

Turns what was rendered into text: tempo words from the BPM, key names, beat-unit names,
instrument phrases ("two violins, viola and cello"), mood words by tempo and mode, drum phrases,
and the six caption templates of `compose_caption`. `draw_caption` makes one clip's seeded
choices (moods, drum phrase, template) and writes its caption.
"""

from __future__ import annotations

import collections as _collections
from typing import Sequence

import numpy as np

from musicrl_jax.data.orchestration import GM_INSTRUMENTS, _pick

# Names that already denote a group (or a keyboard playing all voices): never "four organs".
ENSEMBLE_NAMES = {"piano", "harpsichord", "church organ", "strings", "choir", "wordless vocals",
                  "accordion", "harp", "dulcimer", "koto"}
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

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


def draw_caption(rng: np.random.Generator, *, style: str, sacred: bool, programs: Sequence[int],
                 bpm: int, tonic: int, mode: str, metre: str, drum_kit: str | None
                 ) -> tuple[str, str, list[str]]:
    """(caption, tempo word, moods) of one clip, drawing its moods, drum phrase and wording from
    `rng`; `programs` are its melodic parts in playing order."""
    word = tempo_word(bpm)
    mood_pool = list(MOODS[(word, mode)])
    if sacred and word != "fast":
        mood_pool = list(dict.fromkeys(mood_pool + list(SACRED_MOODS)))
    moods = [str(m) for m in rng.choice(mood_pool, size=1 + int(rng.random() < 0.4),
                                        replace=False)]
    drum_phrase = str(_pick(rng, DRUM_PHRASES[drum_kit])) if drum_kit else None
    key_text = f"{key_name(tonic, mode)} {mode}"
    caption = compose_caption(
        int(rng.integers(NUM_CAPTION_TEMPLATES)), style=style,
        instruments=instrument_phrase(programs),
        bpm=bpm, key=key_text, metre=metre, tempo=word, moods=moods, drums=drum_phrase)
    return caption, word, moods
