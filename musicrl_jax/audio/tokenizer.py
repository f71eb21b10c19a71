"""Audio tokenizers: 16 kHz mono waveforms <-> K parallel codebooks of tokens.

The music LM (MusicGen-style) predicts K token streams per frame. Anything
that maps audio to ``int32 [frames, K]`` and back can serve as its codec;
``AudioTokenizer`` is that contract, so a neural codec (EnCodec, SoundStream)
can replace the default without touching the LM or the RL code.

The default codec, ``MelRVQTokenizer``, needs no neural training:

  waveform -> log-mel frames -> normalisation (training mean/std) ->
  residual vector quantisation (K k-means codebooks, each fitted on the
  residual left by the ones before it) -> tokens

  tokens -> sum of centroids -> de-normalise -> mel power -> STFT magnitude
  (non-negative least squares) -> Griffin-Lim phase -> waveform

Frame/sample contract (all codecs here): a clip of ``n`` samples gives
``ceil(n / samples_per_frame)`` frames, and ``t`` frames decode to exactly
``t * samples_per_frame`` samples.

Residual quantisation is greedy, so the first k columns of a K-codebook
encoding are exactly the k-codebook encoding: one fitted model serves K=1, 2
and 4 (``encode(..., num_codebooks=k)`` or ``truncated(k)``).
"""

from __future__ import annotations

import abc
import functools
import json
import os
import zipfile
from typing import Any, ClassVar, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import librosa
import numpy as np

from musicrl_jax.errors import ConfigError

__all__ = [
    "AudioTokenizer",
    "MelRVQTokenizer",
    "fit_kmeans",
    "load_tokenizer",
    "load_tokenizer_input",
    "reconstruction_metrics",
]

CONFIG_FILENAME = "config.json"
ARRAYS_FILENAME = "codebooks.npz"
_FORMAT_VERSION = 1
FRAME_MEMO_SIZE = 16384  # decode_magnitude remembers this many frames (4 KB each at n_fft 2048)

# Codec registry so ``AudioTokenizer.load`` can rebuild whichever codec a
# directory holds from the name stored in its config.
_CODECS: dict[str, type["AudioTokenizer"]] = {}


# ---------------------------------------------------------------------------
# Abstract interface
# ---------------------------------------------------------------------------


class AudioTokenizer(abc.ABC):
    """Waveform <-> ``int32 [frames, num_codebooks]`` tokens.

    Subclasses set ``codec_name`` (stored in the saved config) and implement
    the abstract members. ``encode`` accepts ``[samples]`` or
    ``[batch, samples]`` float waveforms at ``sample_rate``; ``decode`` is its
    inverse on ``[frames, K]`` / ``[batch, frames, K]`` integer tokens.
    """

    codec_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.codec_name:
            _CODECS[cls.codec_name] = cls

    # -- properties -------------------------------------------------------

    @property
    @abc.abstractmethod
    def sample_rate(self) -> int:
        """Waveform sample rate (Hz) that encode expects and decode returns."""

    @property
    @abc.abstractmethod
    def samples_per_frame(self) -> int:
        """Audio samples per token frame (the codec's hop)."""

    @property
    @abc.abstractmethod
    def num_codebooks(self) -> int:
        """K: parallel token streams per frame."""

    @property
    @abc.abstractmethod
    def codebook_size(self) -> int:
        """Vocabulary size of each codebook; tokens lie in [0, codebook_size)."""

    @property
    def frame_rate(self) -> float:
        """Token frames per second of audio."""
        return self.sample_rate / self.samples_per_frame

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a clip of ``num_samples`` samples."""
        return -(-int(num_samples) // self.samples_per_frame)

    def num_samples(self, num_frames: int) -> int:
        """Samples produced by decoding ``num_frames`` frames."""
        return int(num_frames) * self.samples_per_frame

    # -- codec ------------------------------------------------------------

    @abc.abstractmethod
    def fit(self, waveforms: Sequence[np.ndarray] | np.ndarray, *,
            sample_rate: int | None = None) -> "AudioTokenizer":
        """Fits the codec on training audio; returns self."""

    @abc.abstractmethod
    def encode(self, waveform: np.ndarray, *, sample_rate: int | None = None,
               num_codebooks: int | None = None) -> np.ndarray:
        """Waveform ``[samples]``/``[batch, samples]`` -> int32 tokens."""

    @abc.abstractmethod
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens ``[frames, K]``/``[batch, frames, K]`` -> float32 audio."""

    # -- persistence ------------------------------------------------------

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``config.json`` (with ``codec``) plus the codec's arrays."""

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "AudioTokenizer":
        """Rebuilds a saved tokenizer. On the base class, dispatches on the
        ``codec`` field of ``config.json``."""
        config = _read_config(directory)
        codec = config.get("codec")
        if codec == "encodec":
            # Registers EncodecTokenizer; not imported above because it imports this module.
            from musicrl_jax.audio import encodec  # noqa: F401
        target = _CODECS.get(codec) if isinstance(codec, str) else None
        config_path = os.path.join(os.fspath(directory), CONFIG_FILENAME)
        if target is None:
            raise ValueError(
                f"{config_path}: unknown codec {codec!r}; known codecs are "
                f"{sorted(_CODECS)}. Re-save the tokenizer with this version "
                "of musicrl_jax.")
        if cls is not AudioTokenizer and not issubclass(target, cls):
            raise ValueError(
                f"{config_path}: holds a {codec!r} tokenizer, not "
                f"{cls.codec_name!r}; load it with AudioTokenizer.load().")
        return target._load(os.fspath(directory), config)

    @classmethod
    @abc.abstractmethod
    def _load(cls, directory: str, config: Mapping[str, Any]) -> "AudioTokenizer":
        """Codec-specific part of ``load`` (config already parsed)."""

    # -- shared input checks ----------------------------------------------

    def _check_waveform(self, waveform: Any, sample_rate: int | None,
                        min_samples: int) -> np.ndarray:
        """Returns a float32 ``[samples]`` / ``[batch, samples]`` array or
        raises ValueError saying what is wrong and what is expected."""
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            raise ValueError(
                f"waveform sample rate is {sample_rate} Hz, expected "
                f"{self.sample_rate} Hz; resample first, e.g. librosa.resample("
                f"y, orig_sr={sample_rate}, target_sr={self.sample_rate}).")
        wav = np.asarray(waveform)
        if not np.issubdtype(wav.dtype, np.floating):
            raise ValueError(
                f"waveform dtype is {wav.dtype}, expected float32 samples in "
                "[-1, 1] (integer PCM must be scaled, e.g. int16 / 32768).")
        if wav.ndim not in (1, 2):
            raise ValueError(
                f"waveform shape is {wav.shape}, expected mono [samples] or "
                "[batch, samples].")
        if wav.ndim == 2 and wav.shape[1] <= 8 < wav.shape[0]:
            raise ValueError(
                f"waveform shape is {wav.shape}, which looks like [samples, "
                "channels]; expected mono [samples] or [batch, samples] "
                "(downmix with y.mean(axis=1)).")
        if wav.shape[-1] < min_samples:
            raise ValueError(
                f"waveform has {wav.shape[-1]} samples, expected at least "
                f"{min_samples} ({min_samples / self.sample_rate * 1e3:.0f} ms "
                f"at {self.sample_rate} Hz).")
        if not np.all(np.isfinite(wav)):
            raise ValueError("waveform contains NaN or Inf samples.")
        return wav.astype(np.float32, copy=False)

    def _check_tokens(self, tokens: Any, num_codebooks: int) -> np.ndarray:
        """Returns int32 ``[frames, K]`` / ``[batch, frames, K]`` tokens or
        raises ValueError naming the problem and the expected value."""
        toks = np.asarray(tokens)
        if toks.dtype == bool or not np.issubdtype(toks.dtype, np.integer):
            raise ValueError(
                f"tokens dtype is {toks.dtype}, expected an integer dtype "
                "(int32 codebook indices).")
        if toks.ndim not in (2, 3):
            raise ValueError(
                f"tokens shape is {toks.shape}, expected [frames, "
                f"{num_codebooks}] or [batch, frames, {num_codebooks}].")
        if toks.shape[-1] != num_codebooks:
            raise ValueError(
                f"tokens have {toks.shape[-1]} codebooks (last axis of shape "
                f"{toks.shape}), expected {num_codebooks}.")
        if toks.shape[-2] < 1:
            raise ValueError(f"tokens shape is {toks.shape}, expected >= 1 frame.")
        low, high = int(toks.min()), int(toks.max())
        if low < 0 or high >= self.codebook_size:
            raise ValueError(
                f"token values span [{low}, {high}], expected values in "
                f"[0, {self.codebook_size}) (codebook_size={self.codebook_size}).")
        return toks.astype(np.int32, copy=False)


def write_saved_tokenizer(directory: str, config: Mapping[str, Any], arrays_filename: str,
                          arrays: Mapping[str, Any]) -> None:
    """A codec's `save`: its arrays (one .npz), then config.json, each written to a temp name
    and renamed, so a crash never leaves half a tokenizer (config.json last: it marks a
    complete one)."""
    arrays_path = os.path.join(directory, arrays_filename)
    with open(arrays_path + ".tmp", "wb") as f:
        np.savez(f, **{name: np.asarray(v) for name, v in arrays.items()})
    os.replace(arrays_path + ".tmp", arrays_path)
    config_path = os.path.join(directory, CONFIG_FILENAME)
    with open(config_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(config_path + ".tmp", config_path)


def load_tokenizer(directory: str | os.PathLike) -> AudioTokenizer:
    """Loads whichever codec ``directory`` holds."""
    return AudioTokenizer.load(directory)


def load_tokenizer_input(directory: str | os.PathLike, source: str) -> AudioTokenizer:
    """`load_tokenizer` of a directory the user named; `source` says where, e.g. "--tokenizer
    DIR". Missing, mistaken or damaged, it is a ConfigError "<source>: <the load's error>",
    which names the file at fault and the fix."""
    try:
        return load_tokenizer(directory)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from err


def _read_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_FILENAME)
    if os.path.isfile(directory):
        raise NotADirectoryError(
            f"{directory!r} is a file, not a tokenizer directory; pass the directory "
            "holding config.json (a dataset's musicrl_music_assets/CONFIG/tokenizer).")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"tokenizer directory {directory!r} does not exist; fit a tokenizer "
            "and call tokenizer.save(directory) first (e.g. python "
            "benchmarks/tokenizer.py --save_dir DIR).")
    nested = os.path.join(directory, "tokenizer")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(nested, CONFIG_FILENAME)):
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_FILENAME}; it looks like a dataset assets folder. "
            f"Fix: pass its tokenizer folder, {nested}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; the directory does not hold a saved "
            "tokenizer. Re-create it with tokenizer.save(directory).")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is corrupt ({err}); re-create it with "
            "tokenizer.save(directory).") from err
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} is corrupt (top level is {type(config).__name__}, "
            "expected a JSON object); re-create it with tokenizer.save(directory).")
    return config


# ---------------------------------------------------------------------------
# K-means in JAX
# ---------------------------------------------------------------------------

_HIGHEST = jax.lax.Precision.HIGHEST  # keep fp32 distances on GPU/TPU too


def _sq_distances(x: jax.Array, centroids: jax.Array,
                  centroid_sq: jax.Array) -> jax.Array:
    """``[n, d] x [c, d] -> [n, c]`` squared Euclidean distances."""
    cross = jnp.matmul(x, centroids.T, precision=_HIGHEST)
    dist = jnp.sum(x * x, axis=-1, keepdims=True) - 2.0 * cross + centroid_sq
    return jnp.maximum(dist, 0.0)  # expansion can dip below zero by rounding


def _nearest(points: jax.Array, centroids: jax.Array,
             chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid and squared distance per point, ``chunk_size`` rows at
    a time so the distance matrix stays ``chunk_size x num_clusters``."""
    n, d = points.shape
    centroid_sq = jnp.sum(centroids * centroids, axis=-1)

    def one_chunk(x):
        dist = _sq_distances(x, centroids, centroid_sq)
        idx = jnp.argmin(dist, axis=-1)
        return idx.astype(jnp.int32), jnp.take_along_axis(dist, idx[:, None], -1)[:, 0]

    idx, d2 = jax.lax.map(one_chunk, points.reshape(n // chunk_size, chunk_size, d))
    return idx.reshape(n), d2.reshape(n)


def _kmeans_plus_plus(points: jax.Array, valid: jax.Array, key: jax.Array,
                      num_clusters: int) -> jax.Array:
    """k-means++ seeding: each new centroid is drawn with probability
    proportional to its squared distance from the nearest chosen one."""
    n, d = points.shape
    point_sq = jnp.sum(points * points, axis=-1)
    uniform_logits = jnp.where(valid > 0, 0.0, -jnp.inf)

    def sq_dist_to(c):
        cross = jnp.matmul(points, c, precision=_HIGHEST)
        return jnp.maximum(point_sq - 2.0 * cross + jnp.sum(c * c), 0.0) * valid

    first_key, key = jax.random.split(key)
    first = points[jax.random.categorical(first_key, uniform_logits)]
    centroids = jnp.zeros((num_clusters, d), points.dtype).at[0].set(first)

    def body(i, state):
        centroids, min_d2 = state
        logits = jnp.where(min_d2 > 0, jnp.log(jnp.maximum(min_d2, 1e-30)), -jnp.inf)
        # Fewer distinct points than clusters: fall back to uniform draws.
        logits = jnp.where(jnp.any(min_d2 > 0), logits, uniform_logits)
        new = points[jax.random.categorical(jax.random.fold_in(key, i), logits)]
        return centroids.at[i].set(new), jnp.minimum(min_d2, sq_dist_to(new))

    centroids, _ = jax.lax.fori_loop(1, num_clusters, body,
                                     (centroids, sq_dist_to(first)))
    return centroids


def _random_sample_init(points: jax.Array, valid: jax.Array, key: jax.Array,
                        num_clusters: int) -> jax.Array:
    """Distinct valid points drawn uniformly (Gumbel top-k)."""
    gumbel = jax.random.gumbel(key, valid.shape)
    scores = jnp.where(valid > 0, gumbel, -jnp.inf)
    _, idx = jax.lax.top_k(scores, num_clusters)
    return points[idx]


@functools.partial(jax.jit, static_argnames=("num_clusters", "chunk_size",
                                             "max_iters", "init"))
def _kmeans_jit(points, valid, key, tolerance, *, num_clusters, chunk_size,
                max_iters, init):
    if init == "kmeans++":
        centroids = _kmeans_plus_plus(points, valid, key, num_clusters)
    else:
        centroids = _random_sample_init(points, valid, key, num_clusters)

    def lloyd_step(state):
        it, c, _, inertia = state
        idx, d2 = _nearest(points, c, chunk_size)
        d2 = d2 * valid
        new_inertia = jnp.sum(d2)
        sums = jax.ops.segment_sum(points * valid[:, None], idx, num_clusters)
        counts = jax.ops.segment_sum(valid, idx, num_clusters)
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        # An empty cluster is wasted vocabulary: move the j-th empty one onto
        # the j-th worst-served point (largest distance to its centroid).
        empty = counts == 0
        _, farthest = jax.lax.top_k(d2, num_clusters)
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, num_clusters - 1)
        c = jnp.where(empty[:, None], points[farthest[rank]], means)
        return it + 1, c, inertia, new_inertia

    def keep_going(state):
        it, _, prev, cur = state
        improving = (prev - cur) > tolerance * jnp.maximum(cur, 1e-30)
        return (it < max_iters) & ((it == 0) | improving)

    inf = jnp.asarray(jnp.inf, points.dtype)
    iters, centroids, _, _ = jax.lax.while_loop(
        keep_going, lloyd_step, (jnp.asarray(0), centroids, inf, inf))
    idx, d2 = _nearest(points, centroids, chunk_size)
    return centroids, idx, d2 * valid, iters


def fit_kmeans(points: np.ndarray, num_clusters: int, *, seed: int = 0,
               max_iters: int = 50, tolerance: float = 1e-4,
               init: str = "kmeans++", chunk_size: int = 4096
               ) -> dict[str, np.ndarray | float | int]:
    """Lloyd's k-means (jit-compiled) on ``points [n, d]``.

    Returns ``centroids [num_clusters, d]``, ``assignments [n]``, ``mse``
    (mean squared distance per point) and ``iterations``. Deterministic for a
    fixed seed. Stops after ``max_iters`` Lloyd steps or when the total
    squared error improves by less than ``tolerance`` (relative).
    """
    points = np.asarray(points, np.float32)
    if points.ndim != 2:
        raise ValueError(f"points shape is {points.shape}, expected [n, d].")
    n = points.shape[0]
    if n < num_clusters:
        raise ValueError(
            f"k-means needs at least num_clusters={num_clusters} points, got "
            f"{n}; give more training audio or a smaller codebook_size.")
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init is {init!r}, expected 'kmeans++' or 'random'.")
    # Chunk rows in multiples of 256 so compiled shapes repeat across calls.
    chunk = min(int(chunk_size), -(-n // 256) * 256)
    padded = -(-n // chunk) * chunk
    x = np.zeros((padded, points.shape[1]), np.float32)
    x[:n] = points
    valid = np.zeros((padded,), np.float32)
    valid[:n] = 1.0
    centroids, idx, d2, iters = _kmeans_jit(
        jnp.asarray(x), jnp.asarray(valid), jax.random.PRNGKey(seed),
        jnp.float32(tolerance), num_clusters=int(num_clusters),
        chunk_size=chunk, max_iters=int(max_iters), init=init)
    return {
        "centroids": np.asarray(centroids),
        "assignments": np.asarray(idx)[:n],
        "mse": float(np.sum(np.asarray(d2, np.float64)) / n),
        "iterations": int(iters),
    }


@jax.jit
def _rvq_encode_jit(x: jax.Array, codebooks: jax.Array) -> jax.Array:
    """Greedy residual quantisation: ``[n, d]`` x ``[K, C, d]`` -> ``[n, K]``."""

    def one_codebook(residual, codebook):
        dist = _sq_distances(residual, codebook, jnp.sum(codebook * codebook, -1))
        idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)
        return residual - codebook[idx], idx

    _, idx = jax.lax.scan(one_codebook, x, codebooks)
    return idx.T


def sparse_columns(basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows [c, f], weights [c, f]): the nonzero entries of each column of ``basis [m, f]``,
    c the most any column holds (padding repeats the column's last row with weight 0, so a
    banded basis like a mel filterbank, c <= 2, keeps every rows[j] sorted)."""
    nonzero = basis != 0
    count = max(int(nonzero.sum(0).max()), 1)
    rows = np.zeros((count, basis.shape[1]), np.int32)
    weights = np.zeros((count, basis.shape[1]), np.float32)
    for column in range(basis.shape[1]):
        hits = np.flatnonzero(nonzero[:, column])
        last = hits[-1] if len(hits) else (rows[-1, column - 1] if column else 0)
        rows[:, column] = last
        rows[:len(hits), column] = hits
        weights[:len(hits), column] = basis[hits, column]
    return rows, weights


@functools.partial(jax.jit, static_argnames=("num_rows", "iters", "sorted_rows"))
def _nnls_multiplicative(rows: jax.Array, weights: jax.Array, target: jax.Array, *,
                         num_rows: int, iters: int, sorted_rows: bool = False) -> jax.Array:
    """min ||basis @ x - target||^2 s.t. x >= 0, by Lee-Seung multiplicative
    updates from a flat start (each step keeps x >= 0 and never raises the
    error). The basis ``[m, f] >= 0`` is given by its column nonzeros
    (`sparse_columns`), so each product costs O(c f n), not O(m f n): a mel
    filterbank's columns hold <= 2 entries. ``target [m, n] >= 0`` ->
    ``x [f, n]``. Bins no filter covers get 0."""
    def forward(x):  # basis @ x
        return sum(jax.ops.segment_sum(weights[j][:, None] * x, rows[j], num_segments=num_rows,
                                       indices_are_sorted=sorted_rows)
                   for j in range(rows.shape[0]))

    def backward(y):  # basis.T @ y
        return sum(weights[j][:, None] * y[rows[j]] for j in range(rows.shape[0]))

    at_b = backward(target)

    def step(_, x):
        return x * at_b / jnp.maximum(backward(forward(x)), 1e-30)

    return jax.lax.fori_loop(0, iters, step, jnp.ones_like(at_b))


def _hann(n_fft: int) -> np.ndarray:
    """The periodic Hann window (librosa's and scipy's `get_window('hann', n, fftbins=True)`)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


def _frames(y, n_fft: int, hop: int, num_frames: int):
    """Centred, zero-padded frames ``[batch, num_frames, n_fft]`` of ``y [batch, samples]``,
    cut from hop-sized chunks (dense slices, no gather)."""
    chunks_per_frame = -(-n_fft // hop)
    total = (num_frames + chunks_per_frame - 1) * hop
    padded = jnp.pad(y, ((0, 0), (n_fft // 2, total - y.shape[1] - n_fft // 2)))
    chunks = padded.reshape(y.shape[0], -1, hop)
    stacked = jnp.stack([chunks[:, j:j + num_frames] for j in range(chunks_per_frame)], axis=2)
    return stacked.reshape(y.shape[0], num_frames, -1)[..., :n_fft]


def _overlap_add(frames, n_fft: int, hop: int):
    """Inverse of `_frames` without normalisation: ``[batch, T, n_fft]`` -> the padded
    signal ``[batch, (T + chunks_per_frame - 1) * hop]``."""
    batch, num_frames, _ = frames.shape
    chunks_per_frame = -(-n_fft // hop)
    frames = jnp.pad(frames, ((0, 0), (0, 0), (0, chunks_per_frame * hop - n_fft)))
    frames = frames.reshape(batch, num_frames, chunks_per_frame, hop)
    out = jnp.zeros((batch, num_frames + chunks_per_frame - 1, hop), frames.dtype)
    for j in range(chunks_per_frame):
        out = out.at[:, j:j + num_frames].add(frames[:, :, j])
    return out.reshape(batch, -1)


@functools.partial(jax.jit, static_argnames=("n_fft", "hop", "iters", "seed"))
def griffin_lim(magnitude: jax.Array, *, n_fft: int, hop: int, iters: int,
                seed: int = 0) -> jax.Array:
    """Fast Griffin-Lim (momentum 0.99, as librosa's) for ``magnitude [batch, n_fft//2+1, T]``
    -> ``[batch, (T - 1) * hop]`` float32, batched and jitted. The initial phases are drawn
    from `seed` once per (bin, frame) and shared by the batch, so a clip's audio does not depend
    on its batch neighbours (up to float rounding). Centred Hann frames, zero padding,
    window-sum normalisation: librosa.griffinlim's algorithm."""
    batch, _, num_frames = magnitude.shape
    length = (num_frames - 1) * hop
    window = jnp.asarray(_hann(n_fft))
    wss = _overlap_add(jnp.broadcast_to(window ** 2, (1, num_frames, n_fft)), n_fft, hop)[0]
    wss = wss[n_fft // 2:n_fft // 2 + length]
    magnitude = jnp.swapaxes(magnitude, 1, 2).astype(jnp.float32)  # [batch, T, bins]

    def istft(spectrum):
        frames = jnp.fft.irfft(spectrum, n=n_fft, axis=-1) * window
        y = _overlap_add(frames, n_fft, hop)[:, n_fft // 2:n_fft // 2 + length]
        return y / jnp.maximum(wss, 1e-8)

    def stft(y):
        return jnp.fft.rfft(_frames(y, n_fft, hop, num_frames) * window, axis=-1)

    phase = jax.random.uniform(jax.random.PRNGKey(seed), magnitude.shape[1:])
    angles = jnp.broadcast_to(jnp.exp(2j * jnp.pi * phase), magnitude.shape)
    momentum = 0.99 / 1.99

    def step(carry, _):
        angles, previous = carry
        rebuilt = stft(istft(magnitude * angles))
        angles = rebuilt - momentum * previous
        return (angles / (jnp.abs(angles) + 1e-16), rebuilt), None

    (angles, _), _ = jax.lax.scan(step, (angles.astype(jnp.complex64),
                                         jnp.zeros(magnitude.shape, jnp.complex64)),
                                  None, length=iters)
    return istft(magnitude * angles)


# ---------------------------------------------------------------------------
# Default codec: log-mel + residual vector quantisation
# ---------------------------------------------------------------------------


@gin.configurable
class MelRVQTokenizer(AudioTokenizer):
    """Log-mel frames quantised by a K-stage residual k-means codebook stack.

    Args:
      sample_rate: waveform rate in Hz.
      n_fft: STFT size (samples) for the mel analysis and Griffin-Lim.
      hop_length: samples per token frame (320 at 16 kHz -> 50 frames/s).
      n_mels: mel bands, i.e. the dimension of the quantised vectors.
      fmin, fmax: mel filterbank edges in Hz (fmax None -> sample_rate / 2).
      num_codebooks: K, residual stages fitted (encode may use a prefix).
      codebook_size: entries per codebook (token vocabulary per stream).
      normalize: how log-mel frames are standardised before quantisation,
        with training statistics: 'per_bin' (each band's mean/std, so every
        band weighs the same in the k-means distance), 'global' (per-band
        mean, one std for all bands, so the k-means distance is the log-mel
        distance the mel SNR measures) or 'none'.
      log_floor: mel power added before the log (features are
        log(mel + log_floor)); levels well below it are flattened, so it sets
        how far down the quantiser spends precision. Decode subtracts it
        again, so silence decodes to silence.
      griffin_lim_iters: phase-reconstruction iterations in decode (fast Griffin-Lim). 16
        instead of 32 moves the rater panel's attributes of 64 round-tripped validation clips
        by 0.007 on average (at most 0.026, tempo_match) in 0.7x the decode time.
      mel_inversion: how decode maps mel power back to STFT power:
        'multiplicative' (non-negative least squares by multiplicative
        updates, jit-compiled) or 'librosa_nnls' (librosa's mel_to_stft, the
        first half of librosa.feature.inverse.mel_to_audio). On our test
        audio librosa's L-BFGS solver stopped at 8-12% relative residual and
        took ~0.3-3 s per 3 s clip; 100 multiplicative steps reach 1-4% in
        tens of ms and gave a several dB better round-trip mel SNR.
      mel_inversion_iters: multiplicative-update steps.
      kmeans_max_iters, kmeans_tolerance: Lloyd stopping rule.
      kmeans_init: 'kmeans++' or 'random' (distinct random frames).
      kmeans_chunk_size: rows per distance block (memory bound).
      max_fit_frames: random subset of training frames used by k-means.
      seed: drives the frame subset, k-means init and Griffin-Lim phases.
    """

    codec_name = "mel_rvq"
    _CONFIG_KEYS = ("sample_rate", "n_fft", "hop_length", "n_mels", "fmin",
                    "fmax", "num_codebooks", "codebook_size", "normalize",
                    "log_floor", "griffin_lim_iters", "mel_inversion",
                    "mel_inversion_iters", "kmeans_max_iters",
                    "kmeans_tolerance", "kmeans_init", "kmeans_chunk_size",
                    "max_fit_frames", "seed")
    # Largest frame block quantised per jit call; blocks are padded to powers
    # of two so repeated clip lengths reuse compiled code.
    _ENCODE_BLOCK = 16384

    def __init__(self, sample_rate: int = 16000, n_fft: int = 1024,
                 hop_length: int = 320, n_mels: int = 80, fmin: float = 0.0,
                 fmax: float | None = None, num_codebooks: int = 4,
                 codebook_size: int = 256, normalize: str = "global",
                 log_floor: float = 1e-4, griffin_lim_iters: int = 16,
                 mel_inversion: str = "multiplicative",
                 mel_inversion_iters: int = 100,
                 kmeans_max_iters: int = 50, kmeans_tolerance: float = 1e-4,
                 kmeans_init: str = "kmeans++", kmeans_chunk_size: int = 4096,
                 max_fit_frames: int = 250_000, seed: int = 0):
        checks = {
            "sample_rate": sample_rate > 0, "n_fft": n_fft >= 16,
            "hop_length": 0 < hop_length <= n_fft, "n_mels": n_mels >= 1,
            "num_codebooks": num_codebooks >= 1,
            "codebook_size": codebook_size >= 2, "log_floor": log_floor > 0,
            "griffin_lim_iters": griffin_lim_iters >= 0,
            "mel_inversion_iters": mel_inversion_iters >= 1,
            "kmeans_max_iters": kmeans_max_iters >= 1,
            "kmeans_tolerance": kmeans_tolerance >= 0,
            "kmeans_chunk_size": kmeans_chunk_size >= 1,
            "max_fit_frames": max_fit_frames >= codebook_size,
            "fmin": 0 <= fmin < (fmax if fmax is not None else sample_rate / 2),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={locals()[name]!r}" for name in bad)
            raise ValueError(f"invalid MelRVQTokenizer arguments: {values}.")
        if kmeans_init not in ("kmeans++", "random"):
            raise ValueError(
                f"kmeans_init is {kmeans_init!r}, expected 'kmeans++' or 'random'.")
        if mel_inversion not in ("multiplicative", "librosa_nnls"):
            raise ValueError(f"mel_inversion is {mel_inversion!r}, expected "
                             "'multiplicative' or 'librosa_nnls'.")
        if normalize not in ("per_bin", "global", "none"):
            raise ValueError(
                f"normalize is {normalize!r}, expected 'per_bin', 'global' or 'none'.")
        self._sample_rate = int(sample_rate)
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.n_mels = int(n_mels)
        self.fmin = float(fmin)
        self.fmax = None if fmax is None else float(fmax)
        self._num_codebooks = int(num_codebooks)
        self._codebook_size = int(codebook_size)
        self.normalize = normalize
        self.log_floor = float(log_floor)
        self.griffin_lim_iters = int(griffin_lim_iters)
        self.mel_inversion = mel_inversion
        self.mel_inversion_iters = int(mel_inversion_iters)
        self.kmeans_max_iters = int(kmeans_max_iters)
        self.kmeans_tolerance = float(kmeans_tolerance)
        self.kmeans_init = kmeans_init
        self.kmeans_chunk_size = int(kmeans_chunk_size)
        self.max_fit_frames = int(max_fit_frames)
        self.seed = int(seed)
        # Fitted state.
        self.codebooks: np.ndarray | None = None  # [K, C, n_mels]
        self.mel_mean = np.zeros((self.n_mels,), np.float32)
        self.mel_std = np.ones((self.n_mels,), np.float32)
        self.fit_stats: list[dict[str, float]] = []
        self._codebooks_device: jax.Array | None = None
        self._mel_basis_cache: np.ndarray | None = None
        self._mel_basis_columns_cache = None
        self._frame_magnitudes: dict[bytes, np.ndarray] = {}  # decode_magnitude's memo

    # -- properties -------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def samples_per_frame(self) -> int:
        return self.hop_length

    @property
    def num_codebooks(self) -> int:
        return self._num_codebooks

    @property
    def codebook_size(self) -> int:
        return self._codebook_size

    @property
    def is_fitted(self) -> bool:
        return self.codebooks is not None

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable)."""
        return {key: getattr(self, key) for key in self._CONFIG_KEYS}

    def __repr__(self) -> str:
        return (f"MelRVQTokenizer(K={self.num_codebooks}, C={self.codebook_size}, "
                f"{self.frame_rate:g} frames/s, n_mels={self.n_mels}, "
                f"fitted={self.is_fitted})")

    # -- features ---------------------------------------------------------

    def _mel_kwargs(self) -> dict[str, Any]:
        return {"sr": self.sample_rate, "n_fft": self.n_fft, "n_mels": self.n_mels,
                "fmin": self.fmin, "fmax": self.fmax}

    def log_mel(self, waveform: np.ndarray, *,
                sample_rate: int | None = None) -> np.ndarray:
        """Natural-log mel power, ``[frames, n_mels]`` (or batched), one frame
        per token; frame t is centred on sample ``t * hop_length``."""
        wav = self._check_waveform(waveform, sample_rate, self.n_fft)
        frames = self.num_frames(wav.shape[-1])
        pad = frames * self.hop_length - wav.shape[-1]
        wav = np.pad(wav, [(0, 0)] * (wav.ndim - 1) + [(0, pad)])
        power = np.abs(librosa.stft(wav, n_fft=self.n_fft, hop_length=self.hop_length,
                                    window="hann", center=True, pad_mode="constant")) ** 2
        # librosa.feature.melspectrogram's own product, with the filterbank built once per
        # tokenizer instead of on every call (~1.6 ms a clip).
        mel = np.einsum("...ft,mf->...mt", power, self._mel_basis(), optimize=True)
        # center=True adds a frame centred on the padded end; drop it so the
        # count is exactly ceil(samples / hop).
        mel = mel[..., :frames]
        return np.log(mel + self.log_floor).swapaxes(-1, -2).astype(np.float32)

    def log_mel_to_power(self, log_mel: np.ndarray) -> np.ndarray:
        """Inverse of the log map: mel power, ``[..., n_mels]`` (>= 0)."""
        return np.maximum(np.exp(np.asarray(log_mel, np.float32)) - self.log_floor, 0.0)

    def mel_power_to_linear_power(self, mel_power: np.ndarray) -> np.ndarray:
        """Non-negative least-squares STFT power ``[..., n_fft//2+1, frames]``
        whose mel projection matches ``mel_power [..., n_mels, frames]``."""
        mel_power = np.asarray(mel_power, np.float32)
        if self.mel_inversion == "librosa_nnls":
            filterbank = {k: v for k, v in self._mel_kwargs().items() if k != "n_mels"}
            return librosa.feature.inverse.mel_to_stft(mel_power, power=1.0, **filterbank)
        lead, (n_mels, frames) = mel_power.shape[:-2], mel_power.shape[-2:]
        # Frames are independent: flatten batch x time into columns and pad to
        # a power of two so repeated lengths reuse the compiled solver.
        columns = np.moveaxis(mel_power, -2, 0).reshape(n_mels, -1)
        width = max(64, 1 << (columns.shape[1] - 1).bit_length())
        columns = np.pad(columns, [(0, 0), (0, width - columns.shape[1])])
        rows, weights, sorted_rows = self._mel_basis_columns()
        linear = np.asarray(_nnls_multiplicative(
            rows, weights, jnp.asarray(columns), num_rows=n_mels,
            iters=self.mel_inversion_iters, sorted_rows=sorted_rows))[:, :columns.shape[1]]
        linear = linear[:, :int(np.prod(lead, dtype=int)) * frames]
        return np.moveaxis(linear.reshape(-1, *lead, frames), 0, -2)

    def _mel_basis_columns(self):
        """The filterbank's column nonzeros for the NNLS, built once per tokenizer (decode's
        hot path would otherwise loop over every bin on each call)."""
        if self._mel_basis_columns_cache is None:
            rows, weights = sparse_columns(self._mel_basis())
            self._mel_basis_columns_cache = (jnp.asarray(rows), jnp.asarray(weights),
                                             bool((np.diff(rows, axis=1) >= 0).all()))
        return self._mel_basis_columns_cache

    def _mel_basis(self) -> np.ndarray:
        if self._mel_basis_cache is None:
            self._mel_basis_cache = librosa.filters.mel(dtype=np.float32,
                                                        **self._mel_kwargs())
        return self._mel_basis_cache

    def log_mel_to_magnitude(self, log_mel: np.ndarray) -> np.ndarray:
        """``[frames, n_mels]`` (or batched) log-mel power -> STFT magnitude
        ``[..., n_fft//2+1, frames]`` (non-negative least squares)."""
        mel = self.log_mel_to_power(np.asarray(log_mel, np.float32)).swapaxes(-1, -2)
        return np.sqrt(self.mel_power_to_linear_power(mel)).astype(np.float32)

    def decode_magnitude(self, tokens: np.ndarray, *,
                         num_codebooks: int | None = None) -> np.ndarray:
        """int tokens ``[frames, K]`` (or batched) -> the decoded audio's STFT magnitude
        ``[..., n_fft//2+1, frames + 1]`` (`n_fft`, `hop_length`, periodic Hann, centred
        frames): `decode` without its phase reconstruction."""
        k = self._resolve_num_codebooks(num_codebooks)
        toks = self._check_tokens(tokens, k)
        # A frame's magnitude depends on its K codes only (the mel inversion is per frame),
        # and an LM's clips repeat frames (half of a demo batch's are repeats, more across
        # batches): invert each distinct frame once and remember it.
        distinct, where = np.unique(toks.reshape(-1, k).astype(np.int32), axis=0,
                                    return_inverse=True)
        keys = [row.tobytes() for row in distinct]
        memo = self._frame_magnitudes
        missing = [i for i, key in enumerate(keys) if key not in memo]
        if missing:
            if len(memo) + len(missing) > FRAME_MEMO_SIZE:
                memo.clear()  # then it refills with what the current clips use
                missing = list(range(len(keys)))
            columns = self.log_mel_to_magnitude(self.tokens_to_log_mel(distinct[missing],
                                                                       num_codebooks=k))
            memo.update(zip((keys[i] for i in missing), columns.T))
        columns = np.stack([memo[key] for key in keys], axis=1)
        magnitude = columns[:, where.reshape(toks.shape[:-1])]  # [bins, ..., frames]
        magnitude = np.moveaxis(magnitude, 0, -2)
        return np.concatenate([magnitude, magnitude[..., -1:]], axis=-1)

    def log_mel_to_waveform(self, log_mel: np.ndarray) -> np.ndarray:
        """Inverts ``[frames, n_mels]`` (or batched) log-mel power to
        ``frames * hop_length`` float32 samples: mel power -> STFT magnitude
        (non-negative least squares) -> Griffin-Lim phase."""
        magnitude = self.log_mel_to_magnitude(log_mel)
        # Repeat the last frame: T+1 centred frames span exactly T*hop samples,
        # which keeps Griffin-Lim's STFT/iSTFT shapes consistent without a
        # length argument.
        return self._phase(np.concatenate([magnitude, magnitude[..., -1:]], axis=-1))

    def _phase(self, magnitude: np.ndarray) -> np.ndarray:
        """``[..., n_fft//2+1, T+1]`` STFT magnitude -> ``[..., T * hop]`` waveform."""
        lead = magnitude.shape[:-2]
        # One jitted, batched Griffin-Lim (seeded, so decode is reproducible); ~2.6x faster
        # than librosa's at the same spectral convergence (benchmarks/collection.py).
        audio = griffin_lim(magnitude.reshape((-1,) + magnitude.shape[-2:]), n_fft=self.n_fft,
                            hop=self.hop_length, iters=self.griffin_lim_iters, seed=self.seed)
        return np.asarray(audio, np.float32).reshape(lead + (-1,))

    # -- fitting ----------------------------------------------------------

    def fit(self, waveforms: Sequence[np.ndarray] | np.ndarray, *,
            sample_rate: int | None = None) -> "MelRVQTokenizer":
        """Fits normalisation stats and K residual codebooks.

        ``waveforms``: a list of mono clips (any lengths) or a
        ``[batch, samples]`` array.
        """
        self._frame_magnitudes.clear()
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
            waveforms = [waveforms]
        clips = list(waveforms)
        if not clips:
            raise ValueError("fit() got no waveforms; expected >= 1 training clip.")
        frames = np.concatenate(
            [self.log_mel(np.asarray(w), sample_rate=sample_rate).reshape(-1, self.n_mels)
             for w in clips], axis=0)
        if frames.shape[0] < self.codebook_size:
            raise ValueError(
                f"training audio gives {frames.shape[0]} frames, expected at "
                f"least codebook_size={self.codebook_size} "
                f"({self.codebook_size / self.frame_rate:.1f} s of audio).")
        if self.normalize != "none":
            self.mel_mean = frames.mean(axis=0, dtype=np.float64).astype(np.float32)
            centred = frames - self.mel_mean
            if self.normalize == "per_bin":
                std = np.sqrt(np.mean(centred.astype(np.float64) ** 2, axis=0))
            else:
                std = np.full((self.n_mels,), np.sqrt(np.mean(centred.astype(np.float64) ** 2)))
            # Floor the std: bins that sit at log_floor (e.g. above the band
            # limit of the training audio) would otherwise blow up.
            self.mel_std = np.maximum(std, 1e-2).astype(np.float32)
        x = (frames - self.mel_mean) / self.mel_std
        rng = np.random.default_rng(self.seed)
        if x.shape[0] > self.max_fit_frames:
            keep = np.sort(rng.choice(x.shape[0], self.max_fit_frames, replace=False))
            x = x[keep]
        codebooks = []
        self.fit_stats = []
        residual = x
        for k in range(self.num_codebooks):
            result = fit_kmeans(
                residual, self.codebook_size, seed=self.seed * 1009 + k,
                max_iters=self.kmeans_max_iters, tolerance=self.kmeans_tolerance,
                init=self.kmeans_init, chunk_size=self.kmeans_chunk_size)
            centroids = result["centroids"]
            residual = residual - centroids[result["assignments"]]
            codebooks.append(centroids)
            used = np.unique(result["assignments"]).size
            self.fit_stats.append({
                "codebook": k, "iterations": result["iterations"],
                # Mean squared residual per frame (normalised units) after
                # this stage: the training quantisation error with k+1 books.
                "residual_mse": float(np.mean(np.sum(residual ** 2, axis=-1))),
                "used_entries": int(used),
            })
        self._set_codebooks(np.stack(codebooks).astype(np.float32))
        return self

    def _set_codebooks(self, codebooks: np.ndarray) -> None:
        self.codebooks = codebooks
        self._codebooks_device = jnp.asarray(codebooks)

    def _require_fitted(self) -> np.ndarray:
        if self.codebooks is None:
            raise RuntimeError(
                "MelRVQTokenizer is not fitted; call fit(waveforms) or "
                "MelRVQTokenizer.load(directory) first.")
        return self.codebooks

    def _resolve_num_codebooks(self, num_codebooks: int | None) -> int:
        if num_codebooks is None:
            return self.num_codebooks
        if not 1 <= int(num_codebooks) <= self.num_codebooks:
            raise ValueError(
                f"num_codebooks={num_codebooks}, expected 1..{self.num_codebooks} "
                "(a prefix of the fitted residual stack).")
        return int(num_codebooks)

    def truncated(self, num_codebooks: int) -> "MelRVQTokenizer":
        """A tokenizer using the first ``num_codebooks`` residual stages; its
        tokens equal the first columns of this tokenizer's tokens."""
        codebooks = self._require_fitted()
        k = self._resolve_num_codebooks(num_codebooks)
        config = self.config()
        config["num_codebooks"] = k
        other = MelRVQTokenizer(**config)
        other.mel_mean, other.mel_std = self.mel_mean.copy(), self.mel_std.copy()
        other.fit_stats = [dict(s) for s in self.fit_stats[:k]]
        other._set_codebooks(codebooks[:k].copy())
        return other

    # -- codec ------------------------------------------------------------

    def encode_log_mel(self, log_mel: np.ndarray, *,
                       num_codebooks: int | None = None) -> np.ndarray:
        """Quantises ``[..., n_mels]`` log-mel frames -> int32 ``[..., K]``."""
        self._require_fitted()
        k = self._resolve_num_codebooks(num_codebooks)
        log_mel = np.asarray(log_mel, np.float32)
        if log_mel.shape[-1] != self.n_mels:
            raise ValueError(
                f"log-mel last axis is {log_mel.shape[-1]}, expected n_mels={self.n_mels}.")
        x = ((log_mel - self.mel_mean) / self.mel_std).reshape(-1, self.n_mels)
        codebooks = self._codebooks_device[:k]
        out = np.empty((x.shape[0], k), np.int32)
        for start in range(0, x.shape[0], self._ENCODE_BLOCK):
            block = x[start:start + self._ENCODE_BLOCK]
            rows = block.shape[0]
            padded = max(256, 1 << (rows - 1).bit_length())
            block = np.pad(block, [(0, padded - rows), (0, 0)])
            out[start:start + rows] = np.asarray(
                _rvq_encode_jit(jnp.asarray(block), codebooks))[:rows]
        return out.reshape(*log_mel.shape[:-1], k)

    def encode(self, waveform: np.ndarray, *, sample_rate: int | None = None,
               num_codebooks: int | None = None) -> np.ndarray:
        """float waveform ``[samples]`` -> int32 ``[ceil(samples/hop), K]``
        (``[batch, samples]`` -> ``[batch, frames, K]``). ``num_codebooks``
        selects a prefix of the residual stack (default: all K)."""
        self._require_fitted()
        return self.encode_log_mel(self.log_mel(waveform, sample_rate=sample_rate),
                                   num_codebooks=num_codebooks)

    def tokens_to_log_mel(self, tokens: np.ndarray, *,
                          num_codebooks: int | None = None) -> np.ndarray:
        """Sum of the selected centroids, de-normalised: ``[..., frames, n_mels]``."""
        codebooks = self._require_fitted()
        k = self._resolve_num_codebooks(num_codebooks)
        toks = self._check_tokens(tokens, k)
        x = np.zeros(toks.shape[:-1] + (self.n_mels,), np.float32)
        for i in range(k):
            x += codebooks[i][toks[..., i]]
        return x * self.mel_std + self.mel_mean

    def decode(self, tokens: np.ndarray, *,
               num_codebooks: int | None = None) -> np.ndarray:
        """int tokens ``[frames, K]`` -> float32 ``[frames * hop]`` audio
        (batched ``[batch, frames, K]`` -> ``[batch, frames * hop]``).
        ``num_codebooks`` (default K) is the number of columns expected."""
        return self._phase(self.decode_magnitude(tokens, num_codebooks=num_codebooks))

    # -- persistence ------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        codebooks = self._require_fitted()
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        config = {"codec": self.codec_name, "format_version": _FORMAT_VERSION,
                  **self.config(), "fit_stats": self.fit_stats}
        write_saved_tokenizer(directory, config, ARRAYS_FILENAME,
                              {"codebooks": codebooks, "mel_mean": self.mel_mean,
                               "mel_std": self.mel_std})

    @classmethod
    def _load(cls, directory: str, config: Mapping[str, Any]) -> "MelRVQTokenizer":
        config_path = os.path.join(directory, CONFIG_FILENAME)
        fix = "re-fit the tokenizer and save it again with tokenizer.save(directory)"
        missing = [k for k in cls._CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"{config_path} is corrupt: missing keys {missing}; {fix}.")
        if config.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: format_version is {config.get('format_version')!r}, "
                f"expected {_FORMAT_VERSION}; {fix}.")
        try:
            tokenizer = cls(**{k: config[k] for k in cls._CONFIG_KEYS})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_path} is corrupt ({err}); {fix}.") from err
        arrays_path = os.path.join(directory, ARRAYS_FILENAME)
        if not os.path.isfile(arrays_path):
            raise FileNotFoundError(f"{arrays_path} is missing; {fix}.")
        try:
            with np.load(arrays_path, allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k], np.float32)
                          for k in ("codebooks", "mel_mean", "mel_std")}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{arrays_path} is corrupt ({err}); {fix}.") from err
        expected = {
            "codebooks": (tokenizer.num_codebooks, tokenizer.codebook_size,
                          tokenizer.n_mels),
            "mel_mean": (tokenizer.n_mels,), "mel_std": (tokenizer.n_mels,)}
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise ValueError(
                    f"{arrays_path} is corrupt: {name} has shape "
                    f"{arrays[name].shape}, expected {shape} from {config_path}; {fix}.")
            if not np.all(np.isfinite(arrays[name])):
                raise ValueError(f"{arrays_path} is corrupt: {name} holds NaN/Inf; {fix}.")
        tokenizer.mel_mean, tokenizer.mel_std = arrays["mel_mean"], arrays["mel_std"]
        tokenizer.fit_stats = list(config.get("fit_stats", []))
        tokenizer._set_codebooks(arrays["codebooks"])
        return tokenizer


# ---------------------------------------------------------------------------
# Reconstruction quality
# ---------------------------------------------------------------------------

# Fixed analysis for the audio round-trip metrics, independent of any codec's
# own features, so figures compare across codecs.
METRIC_N_FFT = 1024
METRIC_HOP_LENGTH = 256
METRIC_N_MELS = 80
# Mel levels more than this far below the reference clip's loudest bin are
# clamped before the SNR: such errors are masked by the loud content, and
# without the clamp the figure is ruled by how empty bands (e.g. above a
# synth's last harmonic) are filled at inaudible levels.
METRIC_TOP_DB = 60.0


def _power_db(power: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(np.asarray(power, np.float64), 1e-12))


def _mel_snr_db(reference_db: np.ndarray, estimate_db: np.ndarray) -> float:
    """SNR (dB) of an estimated log-mel against the reference, both in dB.

    Both are clamped at ``max(reference) - METRIC_TOP_DB``. The signal power
    is the clamped reference's variance around its own mean, because a log
    spectrum carries an arbitrary offset that must not inflate the figure:
    0 dB is as good as predicting the clip's mean level everywhere.
    """
    floor = float(np.max(reference_db)) - METRIC_TOP_DB
    reference = np.maximum(reference_db, floor)
    estimate = np.maximum(estimate_db, floor)
    signal = np.sum((reference - reference.mean()) ** 2)
    noise = np.sum((reference - estimate) ** 2)
    return float(10.0 * np.log10(max(signal, 1e-20) / max(noise, 1e-20)))


def _spectral_convergence(reference: np.ndarray, estimate: np.ndarray) -> float:
    """||S - S_hat||_F / ||S||_F on linear magnitudes (0 is perfect)."""
    reference = np.asarray(reference, np.float64)
    diff = np.linalg.norm(reference - np.asarray(estimate, np.float64))
    return float(diff / max(np.linalg.norm(reference), 1e-20))


def _metric_spectra(waveform: np.ndarray, sample_rate: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(mel power in dB, linear STFT magnitude) with the fixed analysis."""
    magnitude = np.abs(librosa.stft(waveform, n_fft=METRIC_N_FFT,
                                    hop_length=METRIC_HOP_LENGTH, window="hann",
                                    center=True, pad_mode="constant"))
    mel = librosa.feature.melspectrogram(S=magnitude ** 2, sr=sample_rate,
                                         n_fft=METRIC_N_FFT, n_mels=METRIC_N_MELS)
    return _power_db(mel), magnitude


def reconstruction_metrics(reference_waveform: np.ndarray,
                           reconstruction: np.ndarray, *,
                           tokenizer: AudioTokenizer) -> dict[str, float]:
    """Reconstruction quality of a clip (or a batch, averaged over clips).

    ``reconstruction`` is either tokens (integer ``[frames, K]``, decoded with
    ``tokenizer``; K may be a prefix of a MelRVQ stack) or an already
    reconstructed float waveform.

    Returned keys:
      quantiser_mel_snr_db: (tokens for a MelRVQTokenizer only) mel SNR of
        the token-reconstructed mel (sum of centroids, no audio synthesis)
        against the reference clip's mel, in the tokenizer's own mel
        analysis. Measures the quantiser alone.
      quantiser_mel_spectral_convergence: same pair, spectral convergence of
        mel magnitudes (sqrt of mel power).
      resynth_mel_snr_db: mel SNR of the reconstructed *audio* against the
        reference audio, both analysed with a fixed 80-band mel (n_fft 1024,
        hop 256). For MelRVQ this is the full round trip: quantiser +
        mel inversion + Griffin-Lim phase reconstruction.
      resynth_spectral_convergence: ||S - S_hat||_F / ||S||_F of linear STFT
        magnitudes, reference vs reconstructed audio (same analysis).
    Mel SNRs are on dB spectra, clamped METRIC_TOP_DB below the reference's
    peak (see ``_mel_snr_db``); higher is better. Spectral convergence is
    dominated by the loudest bins; lower is better.
    """
    reference = tokenizer._check_waveform(reference_waveform, None, 1)
    recon = np.asarray(reconstruction)
    is_tokens = np.issubdtype(recon.dtype, np.integer)
    batched = reference.ndim == 2
    if batched != (recon.ndim == (3 if is_tokens else 2)):
        raise ValueError(
            f"reference shape {reference.shape} and reconstruction shape "
            f"{recon.shape} disagree on batching; expected both single clips "
            "or both batched.")
    if not batched:
        reference, recon = reference[None], recon[None]
    metrics: dict[str, list[float]] = {}
    for ref_clip, rec_clip in zip(reference, recon):
        clip_metrics = {}
        if is_tokens:
            if isinstance(tokenizer, MelRVQTokenizer):
                k = rec_clip.shape[-1]
                ref_power = tokenizer.log_mel_to_power(tokenizer.log_mel(ref_clip))
                est_power = tokenizer.log_mel_to_power(
                    tokenizer.tokens_to_log_mel(rec_clip, num_codebooks=k))
                frames = min(len(ref_power), len(est_power))
                ref_power, est_power = ref_power[:frames], est_power[:frames]
                clip_metrics["quantiser_mel_snr_db"] = _mel_snr_db(
                    _power_db(ref_power), _power_db(est_power))
                clip_metrics["quantiser_mel_spectral_convergence"] = _spectral_convergence(
                    np.sqrt(ref_power), np.sqrt(est_power))
                audio = tokenizer.decode(rec_clip, num_codebooks=k)
            else:
                audio = tokenizer.decode(rec_clip)
        else:
            audio = tokenizer._check_waveform(rec_clip, None, 1)
        n = min(len(ref_clip), len(audio))
        ref_db, ref_mag = _metric_spectra(ref_clip[:n], tokenizer.sample_rate)
        est_db, est_mag = _metric_spectra(np.asarray(audio[:n], np.float32),
                                          tokenizer.sample_rate)
        clip_metrics["resynth_mel_snr_db"] = _mel_snr_db(ref_db, est_db)
        clip_metrics["resynth_spectral_convergence"] = _spectral_convergence(
            ref_mag, est_mag)
        for key, value in clip_metrics.items():
            metrics.setdefault(key, []).append(value)
    return {key: float(np.mean(values)) for key, values in metrics.items()}
