"""Measurable musical attributes of a waveform: what the simulated raters (`musicrl_jax.raters`)
listen for.

`clip_attributes(waveform, sample_rate, caption_meta)` returns a flat dict of floats. Every
attribute is normalised to [0, 1]; the table `ATTRIBUTES` documents each one (its group, what
is measured, and what 0 and 1 mean). Three groups are *judgements* where 1 is better:

  text adherence   tempo_match, key_match, timbre_match   (vs the caption's metadata)
  quality          snr, no_clipping, tonality, non_silence, smoothness
  musicality       rhythmic_regularity, consonance, repetition

and one group is *descriptive* (neither good nor bad; raters' idiosyncratic tastes act on it):

  descriptive      brightness, speed, density, percussiveness, dynamics

`measure(waveform, sample_rate)` gives the raw measurements (Hz, BPM, dB, fractions) that the
scores are computed from; `clip_attributes(..., include_raw=True)` adds them under "raw_*"
keys. Everything is plain numpy on two STFTs of a 16 kHz signal (other rates are resampled),
so one 5 s clip costs a few milliseconds (see `benchmark`); nothing is random.

`caption_meta` is a corpus `ClipSpec.to_dict()` (or any dict with the same fields); the fields
used are tempo_bpm (beats per minute of the caption's tactus), key_pitch_class / key_mode,
instruments ([{"program", "role"}]) and drums. A missing field makes the matching score 0.5
(no evidence either way).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from math import gcd
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.fft

SAMPLE_RATE = 16000
N_FFT, HOP = 1024, 256  # 64 ms window, 16 ms hop: onsets, timbre, quality
CHROMA_N_FFT, CHROMA_HOP = 4096, 1024  # 256 ms window (3.9 Hz bins): pitch classes
N_MELS = 64
FRAME_RATE = SAMPLE_RATE / HOP  # onset-envelope frames per second (62.5)
EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class Attribute:
    name: str
    group: str  # "text" | "quality" | "musicality" | "descriptive"
    doc: str


ATTRIBUTES: tuple[Attribute, ...] = (
    # --- text adherence (1 = the audio matches the caption) -------------------------------------
    Attribute("tempo_match", "text",
              "Estimated tempo (onset-envelope autocorrelation x its DFT magnitude x a log-"
              "normal tapping prior centred on 120 BPM, see _tempo) vs the caption's BPM. d = |log2(est / caption)|: score = exp(-(d/0.06)^2/2) "
              "for the exact tempo; metrical-level errors (est = 2x, 1/2x, 3x, 1/3x caption) get "
              "at most 0.5 (octave-tolerant but preferring the exact tempo); else ~0."),
    Attribute("key_match", "text",
              "Key fit from chroma (55-2000 Hz magnitude) with Aarden-Essen key profiles (see "
              "KEY_PROFILES): exp(-(r_best - r_caption) / 0.1), r = Pearson correlation of the "
              "clip's pitch-class profile with each of the 24 key profiles. 1 when the caption's key (tonic and mode) fits best; a close "
              "rival key (relative minor, dominant) scores ~0.5-0.8; an unrelated key ~0."),
    Attribute("timbre_match", "text",
              "Mean of three Gaussian similarities between measured and expected timbre for "
              "the caption's instruments: sustain index (sigma 0.1), brightness (log2 spectral "
              "centroid, sigma 0.5 octave) vs per-program values fitted on the demo corpus "
              "(_CENTROID_HZ, _SUSTAIN), and percussiveness (drums in the caption or not)."),
    # --- audio quality (1 = clean) ----------------------------------------------------------------
    Attribute("snr", "quality",
              "Noise floor: SNR in dB = mean power / noise floor (median over frequency of the "
              "10th-percentile power over time, bias-corrected for exponential noise), mapped "
              "linearly 0 dB -> 0, 40 dB -> 1, clipped."),
    Attribute("no_clipping", "quality",
              "1 - (fraction of samples at |x| >= 0.99) / 1%, clipped: 0 when 1% of samples or "
              "more sit at full scale."),
    Attribute("tonality", "quality",
              "1 - spectral flatness / 0.3, clipped; flatness is the energy-weighted mean over "
              "frames of geometric/arithmetic mean power (white noise ~0.56, music ~0.01)."),
    Attribute("non_silence", "quality",
              "1 - fraction of 16 ms frames that are silent (below -60 dBFS or 50 dB under the "
              "loudest frame)."),
    Attribute("smoothness", "quality",
              "Harshness inverted: 1 - (share of energy above 4 kHz - 0.05) / 0.3, clipped "
              "(harmonic instruments put < 5% there, white noise ~50%)."),
    # --- musicality (1 = more musical) ------------------------------------------------------------
    Attribute("rhythmic_regularity", "musicality",
              "Peak of the normalised onset-envelope autocorrelation at the estimated beat "
              "period (tempogram peak strength), clipped to [0, 1]."),
    Attribute("consonance", "musicality",
              "Energy-weighted mean over chroma frames of the share of chroma energy on the "
              "best-fitting major/minor triad, rescaled from chance (3/12) -> 0 to 1 -> 1."),
    Attribute("repetition", "musicality",
              "Repetition structure: best mean cosine similarity of chroma+timbre frames one or "
              "two beats/bars apart (lags 0.5-2.5 s) minus the median over lags, x 4, clipped."),
    # --- descriptive (taste, neither good nor bad) --------------------------------------------------
    Attribute("brightness", "descriptive",
              "Spectral centroid on a log scale: 250 Hz -> 0, 4 kHz -> 1."),
    Attribute("speed", "descriptive",
              "Estimated tempo on a log scale: 40 BPM -> 0, 240 BPM -> 1."),
    Attribute("density", "descriptive",
              "Onsets per second on a log scale: 0.5/s -> 0, 16/s -> 1."),
    Attribute("percussiveness", "descriptive",
              "Share of positive spectral flux above 2.5 kHz (broadband transients: drums, "
              "plucks), rescaled 0.1 -> 0, 0.6 -> 1."),
    Attribute("dynamics", "descriptive",
              "Loudness range: 90th - 10th percentile of non-silent frame levels in dB, "
              "0 dB -> 0, 30 dB -> 1."),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)
GROUPS = {g: tuple(a.name for a in ATTRIBUTES if a.group == g)
          for g in ("text", "quality", "musicality", "descriptive")}

# Key profiles, tonic first. Aarden-Essen (Aarden 2003: pitch-class frequencies of the Essen
# folk-song collection; music21's default key finder) is the default: on 200 demo-corpus clips
# it finds the caption's key from audio chroma 70% of the time vs 39% for Krumhansl-Kessler
# (1982), whose flatter profile lets the dominant and mediant, which the 3rd and 5th
# harmonics feed, win too often. Both are kept; `KEY_PROFILES` picks.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
AE_MAJOR = np.array([17.7661, 0.1456, 14.9265, 0.1602, 19.8049, 11.3587, 0.2912, 22.062,
                     0.1456, 8.1549, 0.233, 4.9512])
AE_MINOR = np.array([18.2648, 0.7376, 14.0499, 16.8599, 0.7025, 14.4362, 0.7025, 18.6161,
                     4.5662, 1.9319, 7.3762, 1.7562])
KEY_PROFILES = (AE_MAJOR, AE_MINOR)

# --- timbre expectations per General MIDI program ------------------------------------------------
# Expected spectral centroid (Hz) and sustain index of each program, fitted by least squares
# on 2000 demo-corpus clips without drums (features ~ role-weighted instrument mix; R^2 = 0.71
# for log2 centroid, 0.60 for sustain) from TimGM6mb renders at 16 kHz. Programs outside the
# table fall back to the family defaults below (plucked/struck decay, others sustain).
_CENTROID_HZ = {0: 660, 6: 1058, 15: 768, 19: 991, 21: 1060, 22: 1357, 24: 543, 25: 677,
                40: 1037, 41: 1002, 42: 276, 46: 394, 48: 602, 52: 689, 53: 363, 56: 2326,
                57: 733, 58: 864, 60: 552, 68: 1258, 70: 716, 71: 986, 72: 1600, 73: 691,
                74: 292, 75: 792, 78: 279, 79: 541, 105: 1676, 107: 1726, 109: 2360, 110: 1144}
_SUSTAIN = {0: 0.77, 6: 0.85, 15: 0.72, 19: 0.95, 21: 0.94, 22: 0.9, 24: 0.92, 25: 0.88,
            40: 0.93, 41: 0.91, 42: 0.98, 46: 0.83, 48: 0.87, 52: 0.79, 53: 0.84, 56: 1.0,
            57: 0.86, 58: 0.93, 60: 0.75, 68: 0.9, 70: 0.96, 71: 0.89, 72: 0.89, 73: 0.85,
            74: 0.95, 75: 0.9, 78: 0.74, 79: 0.94, 105: 0.65, 107: 0.78, 109: 0.88, 110: 0.93}
_PLUCKED_OR_STRUCK = set(range(0, 16)) | set(range(24, 40)) | {45, 46, 47} | set(range(104, 109)) \
    | set(range(112, 120))
_DEFAULT_CENTROID_HZ = 750.0
_ROLE_WEIGHT = {"melody": 1.0, "doubling": 0.6, "accompaniment": 0.6, "bass": 0.4}


def _expected_timbre(instruments: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
    """(expected sustain index, expected log2 centroid) of the caption's instrument mix."""
    weights, sustain, log_c = [], [], []
    for inst in instruments or ():
        program = int(inst.get("program", -1))
        if not 0 <= program < 128:
            continue
        weights.append(_ROLE_WEIGHT.get(str(inst.get("role", "melody")), 0.6))
        sustain.append(_SUSTAIN.get(program, 0.75 if program in _PLUCKED_OR_STRUCK else 0.9))
        log_c.append(np.log2(_CENTROID_HZ.get(program, _DEFAULT_CENTROID_HZ)))
    if not weights:
        return None
    w = np.asarray(weights) / np.sum(weights)
    return float(w @ sustain), float(w @ log_c)


# --- DSP helpers ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _filters(sample_rate: int = SAMPLE_RATE) -> dict[str, np.ndarray]:
    import librosa
    mel = librosa.filters.mel(sr=sample_rate, n_fft=N_FFT, n_mels=N_MELS, fmin=30.0,
                              fmax=sample_rate / 2)
    chroma = librosa.filters.chroma(sr=sample_rate, n_fft=CHROMA_N_FFT, tuning=0.0)
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / sample_rate)
    cfreqs = np.fft.rfftfreq(CHROMA_N_FFT, 1.0 / sample_rate)
    chroma[:, (cfreqs < 55.0) | (cfreqs > 2000.0)] = 0.0  # A1..B6: fundamentals, few overtones
    mel_hz = librosa.mel_frequencies(N_MELS + 2, fmin=30.0, fmax=sample_rate / 2)[1:-1]
    return {"mel": mel.astype(np.float32), "chroma": chroma.astype(np.float32),
            "freqs": freqs, "window": np.hanning(N_FFT + 1)[:-1].astype(np.float32),
            "chroma_window": np.hanning(CHROMA_N_FFT + 1)[:-1].astype(np.float32),
            "mel_hf": (mel_hz > 2500.0)}


def _power_stft(y: np.ndarray, n_fft: int, hop: int, window: np.ndarray) -> np.ndarray:
    """[frames, bins] power spectrogram, centred frames (reflect-free zero padding)."""
    y = np.pad(y, (n_fft // 2, n_fft // 2))
    if len(y) < n_fft:
        y = np.pad(y, (0, n_fft - len(y)))
    frames = np.lib.stride_tricks.sliding_window_view(y, n_fft)[::hop]
    spec = scipy.fft.rfft(frames * window, axis=1, workers=1)  # float32 in, complex64 out
    return spec.real ** 2 + spec.imag ** 2


def _to_16k(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    y = np.asarray(waveform, dtype=np.float32)
    if y.ndim == 2:  # [channels, samples] or [samples, channels]: mix down
        y = y.mean(axis=0 if y.shape[0] < y.shape[1] else 1)
    if int(sample_rate) != SAMPLE_RATE:
        from scipy.signal import resample_poly
        step = gcd(int(sample_rate), SAMPLE_RATE)
        y = resample_poly(y, SAMPLE_RATE // step, int(sample_rate) // step).astype(np.float32)
    return np.nan_to_num(y)


def _decile(x: np.ndarray) -> np.ndarray:
    """np.quantile(x, 0.1, axis=0) (linear interpolation) from one partial sort: 5x faster."""
    position = 0.1 * (len(x) - 1)
    lo = int(np.floor(position))
    hi = min(lo + 1, len(x) - 1)
    part = np.partition(x, (lo, hi), axis=0)
    return part[lo] + (part[hi] - part[lo]) * np.float32(position - lo)


def _tempo(onset_env: np.ndarray) -> tuple[float, float]:
    """(tempo in BPM, autocorrelation peak in [0, 1]) of an onset envelope.

    Candidates are local maxima of the normalised autocorrelation (ACF) at lags of 30-300 BPM.
    Each is scored ACF(lag) x |DFT|(1/lag) x prior(lag): the ACF is also high at multiples of
    the beat period (bars) and the DFT magnitude of the envelope at multiples of the beat
    frequency (subdivisions), so their product peaks at the beat itself (Peeters 2007); the
    log-normal "tapping" prior (centre 120 BPM, sigma 1 octave, as in Ellis 2007 / librosa)
    breaks remaining ties. The winner is refined by parabolic interpolation. Returns the ACF
    value at the beat period as the regularity.
    """
    x = onset_env - onset_env.mean()
    n = len(x)
    energy = float(x @ x)
    if n < 8 or energy <= EPS:
        return 0.0, 0.0
    spec = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(spec.real ** 2 + spec.imag ** 2)[:n]
    acf = acf / (energy * (n - np.arange(n)) / n)  # unbiased: each lag's overlap length
    min_lag = max(1, int(np.floor(60.0 * FRAME_RATE / 300.0)))
    max_lag = min(n - 2, int(np.ceil(60.0 * FRAME_RATE / 30.0)), int(0.6 * n))
    if max_lag <= min_lag + 1:
        return 0.0, 0.0
    lags = np.arange(min_lag, max_lag + 1)
    a = acf[lags]
    bpm = 60.0 * FRAME_RATE / lags
    prior = np.exp(-0.5 * np.log2(bpm / 120.0) ** 2)
    mag = np.abs(np.fft.rfft(x, 8 * n))  # bin k <-> frequency k / (8 n) cycles per frame
    dft = np.interp(8.0 * n / lags, np.arange(len(mag)), mag) / (mag.max() + EPS)
    is_peak = np.zeros_like(a, dtype=bool)
    is_peak[1:-1] = (a[1:-1] >= a[:-2]) & (a[1:-1] > a[2:])
    if not is_peak.any():
        return 0.0, 0.0
    score = np.where(is_peak, np.maximum(a, 0.0) * dft * prior, -np.inf)
    i = int(np.argmax(score))
    lag = float(lags[i])
    if 0 < i < len(a) - 1:
        denom = a[i - 1] - 2 * a[i] + a[i + 1]
        if abs(denom) > EPS:
            lag += 0.5 * (a[i - 1] - a[i + 1]) / denom
    return 60.0 * FRAME_RATE / lag, float(np.clip(a[i], 0.0, 1.0))


def measure(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict[str, Any]:
    """Raw measurements of a mono waveform (see `ATTRIBUTES` for how each is scored)."""
    y = _to_16k(waveform, sample_rate)
    f = _filters()
    if len(y) < N_FFT:
        y = np.pad(y, (0, N_FFT - len(y)))
    return _measure_spectra(
        _power_stft(y, N_FFT, HOP, f["window"]),
        _power_stft(y, CHROMA_N_FFT, CHROMA_HOP, f["chroma_window"]),
        seconds=len(y) / SAMPLE_RATE, peak=float(np.max(np.abs(y))) if len(y) else 0.0,
        clip_fraction=float(np.mean(np.abs(y) >= 0.99)))


def _measure_spectra(power: np.ndarray, chroma_power: np.ndarray, *, seconds: float, peak: float,
                     clip_fraction: float) -> dict[str, Any]:
    """`measure` from its two power spectrograms ([frames, bins] on the (N_FFT, HOP) and
    (CHROMA_N_FFT, CHROMA_HOP) grids at 16 kHz) and three waveform statistics."""
    f = _filters()
    frame_power = power.sum(axis=1) + EPS
    level_db = 10 * np.log10(frame_power / (np.sum(f["window"] ** 2) * N_FFT / 2))  # ~dBFS
    loudest = float(level_db.max())
    silent = (level_db < -60.0) | (level_db < loudest - 50.0)
    active = ~silent
    weights = frame_power * active
    wsum = float(weights.sum())

    # quality
    mean_power = float(power.mean())
    floor = float(np.median(_decile(power))) / 0.1054  # E[q10 of Exp(1)] ~ .105
    snr_db = float(np.clip(10 * np.log10((mean_power + EPS) / (floor + EPS)), -20.0, 80.0))
    log_p = np.log(power + EPS)
    flat = np.exp(log_p.mean(axis=1)) / (power.mean(axis=1) + EPS)
    flatness = float((flat * weights).sum() / wsum) if wsum > 0 else 1.0
    hf = power[:, f["freqs"] > 4000.0].sum(axis=1)
    hf_ratio = float(hf.sum() / (frame_power.sum())) if wsum > 0 else 0.0
    centroid = float(((power @ f["freqs"]) / frame_power * weights).sum() / wsum) if wsum else 0.0

    # onsets and rhythm
    mel_db = 10 * np.log10(power @ f["mel"].T + 1e-8)  # [T, mels]
    mel_db = np.maximum(mel_db, mel_db.max() - 80.0)
    flux = np.maximum(0.0, np.diff(mel_db, axis=0))  # [T-1, mels]
    onset_env = flux.mean(axis=1)
    hf_flux = flux[:, f["mel_hf"]].sum()
    perc_share = float(hf_flux / (flux.sum() + EPS)) if flux.size else 0.0
    tempo_bpm, regularity = _tempo(onset_env)
    # onsets: local maxima of the envelope above its mean + 1 std (and a 50 ms refractory gap)
    thr = onset_env.mean() + onset_env.std()
    peaks = np.flatnonzero((onset_env[1:-1] > thr) & (onset_env[1:-1] >= onset_env[:-2])
                           & (onset_env[1:-1] > onset_env[2:])) + 1
    if len(peaks):
        keep = np.concatenate([[True], np.diff(peaks) > 0.05 * FRAME_RATE])
        peaks = peaks[keep]
    onset_rate = len(peaks) / seconds

    # sustain: frame level relative to its running max over the last 300 ms (decay -> low)
    rms_db = level_db
    win = int(0.3 * FRAME_RATE)
    padded = np.pad(rms_db, (win - 1, 0), constant_values=-np.inf)
    run_max = np.lib.stride_tricks.sliding_window_view(padded, win).max(axis=1)
    decay_db = np.clip(run_max - rms_db, 0.0, 30.0)
    sustain = float(1.0 - (decay_db[active].mean() / 15.0)) if active.any() else 0.0
    sustain = float(np.clip(sustain, 0.0, 1.0))
    levels = level_db[active]
    dyn_range = float(np.percentile(levels, 90) - np.percentile(levels, 10)) if len(levels) else 0.

    # harmony
    cmag = np.sqrt(chroma_power)
    chroma = cmag @ f["chroma"].T  # [T, 12] magnitude per pitch class
    c_energy = chroma.sum(axis=1)
    c_active = c_energy > max(EPS, 1e-3 * c_energy.max())
    profile = chroma[c_active].sum(axis=0) if c_active.any() else np.zeros(12)
    key_corr = _key_correlations(profile)
    triad = _triad_share(chroma[c_active])
    repetition = _repetition(chroma, mel_db, CHROMA_HOP)
    return {"tempo_bpm": tempo_bpm, "regularity": regularity, "onset_rate": onset_rate,
            "snr_db": snr_db, "clip_fraction": clip_fraction, "flatness": flatness,
            "silence_fraction": float(silent.mean()), "hf_ratio": hf_ratio,
            "centroid_hz": centroid, "sustain": sustain, "percussive_share": perc_share,
            "dynamic_range_db": dyn_range, "key_correlations": key_corr, "triad_share": triad,
            "repetition": repetition, "peak": peak}


@functools.lru_cache(maxsize=None)
def _bin_regrid(in_bins: int, in_spacing_hz: float, n_fft: int):
    """Sparse [n_fft // 2 + 1, in_bins] map of a power spectrum onto a 16 kHz n_fft grid: each
    input bin's power is shared among the output bins its band overlaps, times the factor by
    which a window of n_fft samples at 16 kHz outgrows the input's (total power ~ length^2)."""
    import scipy.sparse
    out_spacing = SAMPLE_RATE / n_fft
    lo = (np.arange(in_bins) - 0.5) * in_spacing_hz
    rows, cols, vals = [], [], []
    for k in range(n_fft // 2 + 1):
        overlap = (np.minimum(lo + in_spacing_hz, (k + 0.5) * out_spacing)
                   - np.maximum(lo, (k - 0.5) * out_spacing))
        hit = np.flatnonzero(overlap > 0)
        rows += hit.tolist()
        cols += [k] * len(hit)
        vals += (overlap[hit] / in_spacing_hz).tolist()
    scale = (in_spacing_hz / out_spacing) ** 2  # (window duration out / in)^2
    return scipy.sparse.csr_matrix((np.float32(scale) * np.asarray(vals, np.float32),
                                    (cols, rows)), shape=(n_fft // 2 + 1, in_bins))


def _frame_regrid(power: np.ndarray, in_rate: float, hop: int, num_frames: int) -> np.ndarray:
    """[frames, bins] power linearly interpolated in time onto `num_frames` frames `hop`
    samples apart at 16 kHz (frame t centred on t / rate seconds on both grids)."""
    position = np.minimum(np.arange(num_frames) * hop / SAMPLE_RATE * in_rate, len(power) - 1)
    left = np.minimum(position.astype(int), len(power) - 2) if len(power) > 1 else \
        np.zeros(num_frames, int)
    frac = (position - left)[:, None].astype(np.float32)
    right = np.minimum(left + 1, len(power) - 1)
    return power[left] * (1 - frac) + power[right] * frac


def measure_magnitude(magnitude: np.ndarray, sample_rate: int, n_fft: int,
                      hop: int) -> dict[str, Any]:
    """`measure` from an STFT magnitude [n_fft // 2 + 1, frames] (periodic Hann, frames
    centred on t * hop) instead of a waveform: what a spectrogram decoder produces before
    phase reconstruction. The power is regridded onto `measure`'s two analysis grids (bands
    shared by overlap, frames interpolated), and the two waveform statistics are estimated
    from frame levels (peak ~ sqrt(2) x the loudest frame's RMS; clipping = the expected
    share of Gaussian samples at |x| >= 0.99), so the result estimates what `measure` gives on
    the waveform that magnitude describes, without the waveform: ~10x cheaper than
    Griffin-Lim plus `measure`. `tests/test_raters.py` bounds the two paths' disagreement."""
    power_in = np.square(np.asarray(magnitude, np.float32)).T  # [frames, bins]
    rate = sample_rate / hop
    samples = max(round((len(power_in) - 1) * hop * SAMPLE_RATE / sample_rate), N_FFT)
    spacing = sample_rate / n_fft
    grids = [(N_FFT, HOP), (CHROMA_N_FFT, CHROMA_HOP)]
    power, chroma_power = (np.ascontiguousarray(  # row-major: the matmuls after are 10x faster
        _frame_regrid(np.asarray(_bin_regrid(power_in.shape[1], spacing, size)
                                 @ power_in.T).T, rate, step, samples // step + 1))
        for size, step in grids)
    f = _filters()
    mean_square = power.sum(axis=1) / (np.sum(f["window"] ** 2) * N_FFT / 2)
    rms = np.sqrt(mean_square)
    from scipy.special import erfc
    clipping = erfc(0.99 / (np.sqrt(2.0) * np.maximum(rms, 1e-12)))
    return _measure_spectra(power, chroma_power, seconds=samples / SAMPLE_RATE,
                            peak=float(np.sqrt(2.0) * rms.max()) if len(rms) else 0.0,
                            clip_fraction=float(clipping.mean()) if len(rms) else 0.0)


def _key_correlations(profile: np.ndarray) -> np.ndarray:
    """[24] Pearson correlations: index = pitch class (0..11 major, 12..23 minor)."""
    if not np.any(profile > 0) or np.std(profile) < EPS:
        return np.zeros(24)
    out = np.empty(24)
    p = (profile - profile.mean()) / profile.std()
    for m, base in enumerate(KEY_PROFILES):
        for tonic in range(12):
            k = np.roll(base, tonic)
            out[12 * m + tonic] = np.mean(p * (k - k.mean()) / k.std())
    return out


@functools.lru_cache(maxsize=None)
def _triad_templates() -> np.ndarray:
    t = np.zeros((24, 12))
    for root in range(12):
        for m, third in enumerate((4, 3)):
            t[12 * m + root, [root, (root + third) % 12, (root + 7) % 12]] = 1.0
    return t


def _triad_share(chroma: np.ndarray) -> float:
    if len(chroma) == 0:
        return 0.25
    share = (chroma @ _triad_templates().T).max(axis=1) / (chroma.sum(axis=1) + EPS)
    w = chroma.sum(axis=1)
    return float((share * w).sum() / (w.sum() + EPS))


def _repetition(chroma: np.ndarray, mel_db: np.ndarray, chroma_hop: int) -> float:
    """Mean cosine similarity along the best lag-diagonal (0.5-2.5 s) minus its median."""
    rate = SAMPLE_RATE / chroma_hop
    t = len(chroma)
    # timbre: mel frames averaged onto the chroma frame grid
    step = chroma_hop // HOP
    m = mel_db[: (len(mel_db) // step) * step].reshape(-1, step, mel_db.shape[1]).mean(axis=1)
    t = min(t, len(m))
    if t < 4:
        return 0.0
    c = chroma[:t] / (np.linalg.norm(chroma[:t], axis=1, keepdims=True) + EPS)
    mm = m[:t] - m[:t].mean(axis=0)
    mm = mm / (np.linalg.norm(mm, axis=1, keepdims=True) + EPS)
    feats = np.concatenate([c, 0.5 * mm], axis=1)
    lo, hi = max(1, int(0.5 * rate)), min(t - 2, int(2.5 * rate))
    if hi <= lo:
        return 0.0
    sims = np.array([np.mean(np.sum(feats[:-lag] * feats[lag:], axis=1)) for lag in
                     range(1, hi + 1)])
    return float(sims[lo - 1:].max() - np.median(sims))


def _gauss(d: float, sigma: float) -> float:
    return float(np.exp(-0.5 * (d / sigma) ** 2))


def _lin(x: float, lo: float, hi: float) -> float:
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def tempo_score(estimated_bpm: float, caption_bpm: float) -> float:
    """1 at the caption's tempo, <= 0.5 at 2x / 1/2x / 3x / 1/3x of it, ~0 elsewhere."""
    if not estimated_bpm or not caption_bpm:
        return 0.0
    d = np.log2(estimated_bpm / caption_bpm)
    score = _gauss(d, 0.06)
    for factor in (2.0, 0.5, 3.0, 1.0 / 3.0):
        score = max(score, 0.5 * _gauss(d - np.log2(factor), 0.06))
    return score


def key_score(key_correlations: np.ndarray, pitch_class: int, mode: str) -> float:
    corr = np.asarray(key_correlations)
    if not np.any(corr):
        return 0.0
    target = corr[int(pitch_class) % 12 + (12 if str(mode).lower() == "minor" else 0)]
    return float(np.exp(-(corr.max() - target) / 0.1))


def timbre_score(raw: Mapping[str, Any], caption_meta: Mapping[str, Any]) -> float:
    expected = _expected_timbre(caption_meta.get("instruments") or ())
    parts = []
    if expected is not None:
        sustain_exp, log_c_exp = expected
        parts.append(_gauss(raw["sustain"] - sustain_exp, 0.1))
        parts.append(_gauss(np.log2(max(raw["centroid_hz"], 20.0)) - log_c_exp, 0.5))
    if "drums" in caption_meta:
        perc = _lin(raw["percussive_share"], 0.1, 0.6)
        parts.append(_gauss(perc - (0.6 if caption_meta["drums"] else 0.15), 0.25))
    return float(np.mean(parts)) if parts else 0.5


def score(raw: Mapping[str, Any], caption_meta: Mapping[str, Any] | None) -> dict[str, float]:
    """Normalised attributes (see `ATTRIBUTES`) from `measure`'s raw output."""
    meta = caption_meta or {}
    out = {
        "tempo_match": (tempo_score(raw["tempo_bpm"], float(meta["tempo_bpm"]))
                        if meta.get("tempo_bpm") else 0.5),
        "key_match": (key_score(raw["key_correlations"], meta["key_pitch_class"],
                                meta.get("key_mode", "major"))
                      if meta.get("key_pitch_class") is not None else 0.5),
        "timbre_match": timbre_score(raw, meta),
        "snr": _lin(raw["snr_db"], 0.0, 40.0),
        "no_clipping": 1.0 - _lin(raw["clip_fraction"], 0.0, 0.01),
        "tonality": 1.0 - _lin(raw["flatness"], 0.0, 0.3),
        "non_silence": 1.0 - float(raw["silence_fraction"]),
        "smoothness": 1.0 - _lin(raw["hf_ratio"], 0.05, 0.35),
        "rhythmic_regularity": float(np.clip(raw["regularity"], 0.0, 1.0)),
        "consonance": _lin(raw["triad_share"], 0.25, 1.0),
        "repetition": _lin(4.0 * raw["repetition"], 0.0, 1.0),
        "brightness": _lin(np.log2(max(raw["centroid_hz"], 1.0)), 8.0, 12.0),
        "speed": _lin(np.log2(max(raw["tempo_bpm"], 1.0)), np.log2(40.0), np.log2(240.0)),
        "density": _lin(np.log2(max(raw["onset_rate"], 1e-3)), -1.0, 4.0),
        "percussiveness": _lin(raw["percussive_share"], 0.1, 0.6),
        "dynamics": _lin(raw["dynamic_range_db"], 0.0, 30.0),
    }
    if raw["peak"] < 1e-4:  # digital silence: nothing to adhere to, nothing musical
        for name in GROUPS["text"] + GROUPS["musicality"]:
            out[name] = 0.0
    return {k: float(v) for k, v in out.items()}


def clip_attributes(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE,
                    caption_meta: Mapping[str, Any] | None = None,
                    include_raw: bool = False) -> dict[str, float]:
    """All attributes of one clip, each a float in [0, 1] (see `ATTRIBUTES`).

    With include_raw, the raw measurements are added as "raw_<name>" (key correlations as the
    best key's correlation, "raw_key_best" as its index 0..23: pitch class, +12 for minor).
    """
    raw = measure(waveform, sample_rate)
    out = score(raw, caption_meta)
    if include_raw:
        for k, v in raw.items():
            if k == "key_correlations":
                out["raw_key_best"] = float(np.argmax(v))
                out["raw_key_corr"] = float(np.max(v))
            else:
                out[f"raw_{k}"] = float(v)
    return out


def batch_attributes(waveforms: Sequence[np.ndarray] | np.ndarray, sample_rate: int,
                     caption_metas: Sequence[Mapping[str, Any] | None],
                     as_array: bool = False):
    """`clip_attributes` over a batch ([batch, samples] array or a list of 1-D arrays).

    Returns a list of dicts, or with as_array a [batch, len(ATTRIBUTE_NAMES)] float32 array in
    `ATTRIBUTE_NAMES` order.
    """
    if len(waveforms) != len(caption_metas):
        raise ValueError(f"{len(waveforms)} waveforms but {len(caption_metas)} caption_metas")
    out = [clip_attributes(w, sample_rate, m) for w, m in zip(waveforms, caption_metas)]
    if as_array:
        return np.array([[d[n] for n in ATTRIBUTE_NAMES] for d in out], dtype=np.float32)
    return out


def benchmark(num_clips: int = 40, seconds: float = 5.0, seed: int = 0) -> float:
    """Clips per second of `clip_attributes` on synthetic 16 kHz clips (single process)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    clips = [(0.3 * np.sin(2 * np.pi * 220 * (1 + i % 5) * t) * (1 + np.sign(np.sin(
        2 * np.pi * 2 * t))) / 2 + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
        for i in range(num_clips)]
    meta = {"tempo_bpm": 120, "key_pitch_class": 9, "key_mode": "major",
            "instruments": [{"program": 0, "role": "melody"}], "drums": False}
    clip_attributes(clips[0], SAMPLE_RATE, meta)  # warm the filter cache
    start = time.perf_counter()
    for c in clips:
        clip_attributes(c, SAMPLE_RATE, meta)
    return num_clips / (time.perf_counter() - start)
