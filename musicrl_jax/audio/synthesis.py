"""MIDI -> waveform rendering with the FluidSynth command-line synthesiser.

FluidSynth renders faster than real time from a General MIDI soundfont, needs no audio device
(`-F` fast-render to a file) and runs fully offline, so every clip of the corpus is reproducible
from its MIDI file and the soundfont alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from math import gcd

import numpy as np
import soundfile as sf

DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/TimGM6mb.sf2"
SOUNDFONT_ENV_VAR = "MUSICRL_SOUNDFONT"
DEFAULT_SAMPLE_RATE = 16000
# Peak level after normalisation: leaves headroom so later resampling or mixing cannot clip.
PEAK_LEVEL = 0.9
# Below this peak a render counts as silent and is left unscaled (scaling noise would only
# amplify it to full level).
SILENCE_PEAK = 1e-4
# Short linear fade where a clip is cut so the cut does not click.
FADE_SECONDS = 0.03

_INSTALL_HINT = ("install it with `apt-get install fluidsynth timgm6mb-soundfont` "
                 "(or `make install`, which does the same)")


class SynthesisUnavailableError(FileNotFoundError):
    """FluidSynth or its soundfont is missing; the message names what and how to fix it."""


def find_soundfont(soundfont: str | None = None) -> str:
    """Absolute path of the soundfont to render with.

    `soundfont` wins when given; otherwise $MUSICRL_SOUNDFONT, otherwise the TimGM6mb General
    MIDI soundfont that Debian/Ubuntu install under /usr/share/sounds/sf2.
    """
    path = soundfont or os.environ.get(SOUNDFONT_ENV_VAR) or DEFAULT_SOUNDFONT
    if not os.path.isfile(path):
        raise SynthesisUnavailableError(
            f"Soundfont {path!r} not found; {_INSTALL_HINT}, or pass the path of any General "
            f"MIDI .sf2 file (soundfont=... or ${SOUNDFONT_ENV_VAR}).")
    return os.path.abspath(path)


def find_fluidsynth() -> str:
    """Path of the fluidsynth executable, or a clear error saying how to install it."""
    path = shutil.which("fluidsynth") or ("/usr/bin/fluidsynth"
                                          if os.access("/usr/bin/fluidsynth", os.X_OK) else None)
    if path is None:
        raise SynthesisUnavailableError(f"The `fluidsynth` program was not found on PATH; "
                                        f"{_INSTALL_HINT}.")
    return path


def fit_length(audio: np.ndarray, num_samples: int, sample_rate: int) -> np.ndarray:
    """Zero-pad or cut `audio` to exactly `num_samples`, fading out where it is cut."""
    if len(audio) < num_samples:
        return np.pad(audio, (0, num_samples - len(audio)))
    audio = audio[:num_samples].copy()
    fade = min(num_samples, int(FADE_SECONDS * sample_rate))
    if fade > 1:
        audio[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=audio.dtype)
    return audio


def synthesize(midi_path: str, sample_rate: int = DEFAULT_SAMPLE_RATE,
               soundfont: str | None = DEFAULT_SOUNDFONT, gain: float = 0.5) -> np.ndarray:
    """Raw FluidSynth render of `midi_path`: mono float32 at `sample_rate`, not normalised,
    including the release/reverb tail FluidSynth renders after the last event."""
    if not os.path.isfile(midi_path):
        raise FileNotFoundError(f"MIDI file {midi_path!r} does not exist.")
    sf2 = find_soundfont(soundfont)
    binary = find_fluidsynth()
    raw_path = f"{os.path.abspath(midi_path)}.{os.getpid()}.fluidsynth.wav"
    # Float output: FluidSynth's own 16-bit conversion would clip loud chords before we can
    # normalise them.
    cmd = [binary, "-ni", "-q", "-g", f"{gain:g}", "-r", str(int(sample_rate)), "-O", "float",
           "-F", raw_path, sf2, midi_path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not os.path.isfile(raw_path):
            raise RuntimeError(f"fluidsynth failed on {midi_path} (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        audio, rendered_rate = sf.read(raw_path, dtype="float32", always_2d=True)
    finally:
        if os.path.exists(raw_path):
            os.remove(raw_path)
    audio = audio.mean(axis=1)
    if rendered_rate != sample_rate:
        from scipy.signal import resample_poly
        step = gcd(int(rendered_rate), int(sample_rate))
        audio = resample_poly(audio, sample_rate // step, rendered_rate // step)
    return np.asarray(audio, dtype=np.float32)


def finish_clip(audio: np.ndarray, sample_rate: int = DEFAULT_SAMPLE_RATE,
                duration_seconds: float | None = None) -> np.ndarray:
    """Cut/pad to `duration_seconds` (if given) and peak-normalise to 0.9 unless silent."""
    audio = np.asarray(audio, dtype=np.float32)
    if duration_seconds is not None:
        audio = fit_length(audio, int(round(duration_seconds * sample_rate)), sample_rate)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > SILENCE_PEAK:
        audio = audio * np.float32(PEAK_LEVEL / peak)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def write_wav(wav_path: str, audio: np.ndarray, sample_rate: int = DEFAULT_SAMPLE_RATE) -> None:
    """Mono PCM-16 WAV, written atomically (an existing file is always complete)."""
    os.makedirs(os.path.dirname(os.path.abspath(wav_path)), exist_ok=True)
    tmp = f"{wav_path}.{os.getpid()}.tmp.wav"
    try:
        sf.write(tmp, audio, int(sample_rate), subtype="PCM_16", format="WAV")
        os.replace(tmp, wav_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def render_midi(midi_path: str, wav_path: str, sample_rate: int = DEFAULT_SAMPLE_RATE,
                soundfont: str | None = DEFAULT_SOUNDFONT, gain: float = 0.5,
                duration_seconds: float | None = None) -> np.ndarray:
    """Render `midi_path` with FluidSynth and write a mono PCM-16 WAV at `sample_rate`.

    Returns the written waveform as float32 in [-1, 1], peak-normalised to 0.9 unless silent.
    With `duration_seconds` the audio is cut (with a short fade) or zero-padded to exactly that
    length, which drops FluidSynth's release/reverb tail past the end of the MIDI.
    """
    audio = finish_clip(synthesize(midi_path, sample_rate, soundfont, gain), sample_rate,
                        duration_seconds)
    write_wav(wav_path, audio, sample_rate)
    return audio
