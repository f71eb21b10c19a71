"""Simulated listeners: a seeded panel of raters who judge decoded audio.

MusicRL (Cideron et al. 2024) trains its reward models on human 1-5 ratings and pairwise
preferences and evaluates with human side-by-side comparisons. We have no humans, so raters
are simulated from measurable attributes of the audio (`musicrl_jax.audio.features`; raters
hear waveforms, never tokens):

  utility u(clip) = sum_g w_g * judgement_g(clip)            (what any careful rater checks)
                  + sum_d v_d * (descriptive_d(clip) - 0.5)    (idiosyncratic taste)

* judgement groups g: tempo (tempo_match), key (key_match), timbre (timbre_match), quality
  (snr, no_clipping, tonality, non_silence, smoothness) and musicality (rhythmic_regularity,
  consonance, repetition); every attribute is in [0, 1], 1 = better. A group's value is a
  per-rater weighted mean of its attributes (weights ~ Dirichlet(2, ..., 2)); geometric for
  quality, so one defect is enough to spoil a clip.
* Group weights w ~ Dirichlet(alpha), alpha_g = c * prior_g * (1 + focus_boost * [g is the
  rater's focus]), with a per-rater concentration c = concentration * exp(N(0, concentration_spread)),
  so some raters spread their attention and others fixate. Each rater has an archetype drawn
  from `archetype_probs`: "tempo", "key", "timbre", "quality" or "musicality" (that group is
  the focus), "balanced" (no focus) or "noisy" (no focus, and noise/temperature multiplied by
  `noisy_factor`).
* Idiosyncratic taste v_d ~ N(0, taste_scale^2) on the descriptive attributes brightness,
  speed, density, percussiveness and dynamics: one rater likes bright fast music, another dark
  slow music, so text adherence and quality explain only part of a rater's utility and raters
  disagree (see `agreement`).

Ratings (`rate`): u + rater bias + N(0, noise_scale^2) through four cut-points -> 1..5 (MOS).
Cut-points default to values that spread the demo corpus's clean renders 10/20/35/25/10% over
1..5 (see PanelConfig.cutpoints);
`RaterPanel.calibrate` sets them from reference clips' utilities instead.

Preferences (`compare`): with probability skip_prob the rater skips; otherwise with
probability tie_prob * exp(-|u_a - u_b| / tie_width) (similar clips tie more often) it is a
tie; otherwise a Bradley-Terry draw: P(a) = sigmoid((u_a - u_b) / temperature).

Everything is seeded: a panel is a pure function of (num_raters, seed, config), and `rate`
without an rng derives its noise from the rater's seed and the attribute values.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Iterable, Mapping, Sequence

import gin
import numpy as np

from musicrl_jax.audio import features

GROUP_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "tempo": ("tempo_match",),
    "key": ("key_match",),
    "timbre": ("timbre_match",),
    "quality": features.GROUPS["quality"],
    "musicality": features.GROUPS["musicality"],
}
TASTE_GROUPS = tuple(GROUP_ATTRIBUTES)
DESCRIPTIVE = features.GROUPS["descriptive"]
ARCHETYPES = TASTE_GROUPS + ("balanced", "noisy")
TIE, SKIP = "tie", "skip"
Choice = Any  # 0 (a preferred), 1 (b preferred), "tie" or "skip"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PanelConfig:
    """Population distribution of raters (all fields gin-bindable: PanelConfig.noise_scale=...).

    archetype_probs: (archetype, probability) pairs; probabilities are renormalised.
    group_prior: relative Dirichlet mass per judgement group (quality x2 by default: on average
      a third of a rater's judgement weight goes to audio quality).
    concentration / concentration_spread: Dirichlet concentration c (alpha_g = c * prior_g *
      (1 + focus_boost * [focus])) and the std of log c across raters (low c -> a rater fixates
      on one or two groups).
    focus_boost: the focus group's alpha is multiplied by 1 + focus_boost.
    taste_scale: std of idiosyncratic weights on the descriptive attributes.
    noise_scale: std of the Gaussian added to utility before rating (per rater x LogNormal(0,
      0.3)); temperature: Bradley-Terry temperature (same jitter); noisy raters x noisy_factor.
    tie_prob / skip_prob: mean per-rater propensities (each rater's drawn from a Beta with this
      mean and concentration 20); tie_width: utility gap at which ties become e times rarer.
    bias_scale: std of a rater's leniency (added to utility before the cut-points).
    cutpoints: utility thresholds between ratings 1|2, 2|3, 3|4, 4|5.
    """
    archetype_probs: tuple[tuple[str, float], ...] = (
        ("tempo", 0.15), ("key", 0.1), ("timbre", 0.15), ("quality", 0.15),
        ("musicality", 0.1), ("balanced", 0.2), ("noisy", 0.15))
    group_prior: tuple[tuple[str, float], ...] = (
        ("tempo", 1.0), ("key", 1.0), ("timbre", 1.0), ("quality", 2.0), ("musicality", 1.0))
    concentration: float = 2.0
    concentration_spread: float = 0.5
    focus_boost: float = 4.0
    taste_scale: float = 0.25
    noise_scale: float = 0.05
    temperature: float = 0.04
    noisy_factor: float = 3.0
    tie_prob: float = 0.1
    tie_width: float = 0.05
    skip_prob: float = 0.03
    bias_scale: float = 0.04
    # From RaterPanel.sample(100, 0).calibrate(400 demo-corpus clips): 10/20/35/25/10% of
    # clean corpus renders get 1/2/3/4/5.
    cutpoints: tuple[float, float, float, float] = (0.53, 0.71, 0.88, 1.01)


@dataclasses.dataclass(frozen=True)
class Rater:
    """One simulated listener.

    taste: weight per attribute name (judgement attributes: w_group * within-group weight, all
      >= 0, summing to 1; descriptive attributes: signed idiosyncratic weights applied to
      attribute - 0.5).
    """
    rater_id: str
    archetype: str
    group_weights: Mapping[str, float]
    taste: Mapping[str, float]
    noise_scale: float
    temperature: float
    tie_prob: float
    tie_width: float
    skip_prob: float
    bias: float
    cutpoints: tuple[float, ...]
    seed: int

    def utility(self, attributes: Mapping[str, float]) -> float:
        """Noise-free utility of a clip's attributes (see module docstring)."""
        x = np.array([[float(attributes[n]) for n in features.ATTRIBUTE_NAMES]])
        return float(_utility_matrix(_weights_vector(self)[None], x)[0, 0])


def _weights_vector(rater: Rater) -> np.ndarray:
    return np.array([rater.taste.get(n, 0.0) for n in features.ATTRIBUTE_NAMES])


_INDEX = {n: i for i, n in enumerate(features.ATTRIBUTE_NAMES)}
_GROUP_INDEX = {g: np.array([_INDEX[a] for a in attrs]) for g, attrs in GROUP_ATTRIBUTES.items()}
_DESCRIPTIVE_INDEX = np.array([_INDEX[a] for a in DESCRIPTIVE])
QUALITY_FLOOR = 0.02  # log(0) guard of the quality group's geometric mean


def _utility_matrix(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[raters, clips] utilities from [raters, attrs] taste weights and [clips, attrs] values.

    A group's value is the within-group weighted arithmetic mean of its attributes, except
    quality, whose value is the weighted *geometric* mean: one defect (noise, clipping,
    silence) spoils a clip however clean it is otherwise, as listeners report.
    """
    u = np.zeros((weights.shape[0], x.shape[0]))
    for g, idx in _GROUP_INDEX.items():
        w = weights[:, idx]  # [R, k]
        if g == "quality":
            u += np.exp(w @ np.log(np.maximum(x[:, idx], QUALITY_FLOOR)).T
                        / np.maximum(w.sum(1, keepdims=True), 1e-12)) * w.sum(1, keepdims=True)
        else:
            u += w @ x[:, idx].T
    return u + weights[:, _DESCRIPTIVE_INDEX] @ (x[:, _DESCRIPTIVE_INDEX] - 0.5).T


def _sample_rater(index: int, seed: int, config: PanelConfig) -> Rater:
    # Each rater has its own stream, so rater i is the same whatever num_raters is.
    rng = np.random.default_rng([seed, index])
    names = [a for a, _ in config.archetype_probs]
    probs = np.array([p for _, p in config.archetype_probs], dtype=np.float64)
    unknown = set(names) - set(ARCHETYPES)
    if unknown:
        raise ValueError(f"unknown archetypes {sorted(unknown)}; choose from {ARCHETYPES}")
    archetype = names[int(rng.choice(len(names), p=probs / probs.sum()))]
    c = config.concentration * math.exp(config.concentration_spread * rng.standard_normal())
    prior = dict(config.group_prior)
    alpha = np.array([c * float(prior.get(g, 1.0)) for g in TASTE_GROUPS])
    if archetype in TASTE_GROUPS:
        alpha[TASTE_GROUPS.index(archetype)] *= 1.0 + config.focus_boost
    group_w = rng.dirichlet(alpha)
    taste: dict[str, float] = {}
    for g, wg in zip(TASTE_GROUPS, group_w):
        attrs = GROUP_ATTRIBUTES[g]
        within = rng.dirichlet(np.full(len(attrs), 2.0)) if len(attrs) > 1 else np.ones(1)
        for a, wa in zip(attrs, within):
            taste[a] = float(wg * wa)
    for d in DESCRIPTIVE:
        taste[d] = float(config.taste_scale * rng.standard_normal())
    noisy = config.noisy_factor if archetype == "noisy" else 1.0
    jitter = np.exp(0.3 * rng.standard_normal(2))

    def beta(mean):
        mean = float(np.clip(mean, 1e-6, 1 - 1e-6))
        return float(rng.beta(20 * mean, 20 * (1 - mean)))

    return Rater(
        rater_id=f"sim-{seed}-{index:04d}", archetype=archetype,
        group_weights={g: float(w) for g, w in zip(TASTE_GROUPS, group_w)}, taste=taste,
        noise_scale=float(config.noise_scale * noisy * jitter[0]),
        temperature=float(config.temperature * noisy * jitter[1]),
        tie_prob=beta(config.tie_prob) if config.tie_prob > 0 else 0.0,
        tie_width=float(config.tie_width),
        skip_prob=beta(config.skip_prob) if config.skip_prob > 0 else 0.0,
        bias=float(config.bias_scale * rng.standard_normal()),
        cutpoints=tuple(float(c) for c in config.cutpoints),
        seed=int(rng.integers(2 ** 31)))


@dataclasses.dataclass(frozen=True)
class RaterPanel:
    """A population of raters (immutable; `split_raters` / `calibrate` return new panels)."""
    raters: tuple[Rater, ...]
    seed: int
    config: PanelConfig

    @classmethod
    def sample(cls, num_raters: int, seed: int = 0, config: PanelConfig | None = None
               ) -> "RaterPanel":
        if num_raters < 1:
            raise ValueError(f"num_raters must be >= 1, got {num_raters}")
        config = config if config is not None else PanelConfig()
        return cls(tuple(_sample_rater(i, seed, config) for i in range(num_raters)), seed,
                   config)

    def __len__(self) -> int:
        return len(self.raters)

    def __iter__(self):
        return iter(self.raters)

    @property
    def rater_ids(self) -> list[str]:
        return [r.rater_id for r in self.raters]

    def utilities(self, attributes: Sequence[Mapping[str, float]] | np.ndarray) -> np.ndarray:
        """[num_raters, num_clips] noise-free utilities (attribute dicts, or an array in
        `features.ATTRIBUTE_NAMES` order)."""
        return _utility_matrix(np.stack([_weights_vector(r) for r in self.raters]),
                               _as_matrix(attributes))

    def calibrate(self, reference: Sequence[Mapping[str, float]] | np.ndarray,
                  proportions: Sequence[float] = (0.1, 0.2, 0.35, 0.25, 0.1)) -> "RaterPanel":
        """A panel whose shared cut-points put the pooled utilities of `reference` clips (e.g.
        the training corpus) into ratings 1..5 with `proportions`; rater biases are kept."""
        p = np.asarray(proportions, dtype=np.float64)
        if p.shape != (5,) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError("proportions must be 5 non-negative numbers")
        u = self.utilities(reference).ravel()
        cuts = tuple(float(c) for c in np.quantile(u, np.cumsum(p / p.sum())[:4]))
        return dataclasses.replace(
            self, raters=tuple(dataclasses.replace(r, cutpoints=cuts) for r in self.raters))


def _as_matrix(attributes) -> np.ndarray:
    if isinstance(attributes, np.ndarray):
        x = np.atleast_2d(attributes).astype(np.float64)
    else:
        x = np.array([[float(a[n]) for n in features.ATTRIBUTE_NAMES] for a in attributes])
    if x.ndim != 2 or x.shape[1] != len(features.ATTRIBUTE_NAMES):
        raise ValueError(f"attributes must be [clips, {len(features.ATTRIBUTE_NAMES)}]")
    return x


def _attribute_rng(rater: Rater, attributes: Mapping[str, float]) -> np.random.Generator:
    values = np.array([float(attributes[n]) for n in features.ATTRIBUTE_NAMES])
    return np.random.default_rng([rater.seed, zlib.crc32(np.round(values, 6).tobytes())])


def rate(rater: Rater, attributes: Mapping[str, float],
         rng: np.random.Generator | None = None) -> int:
    """MOS-like rating 1..5: utility + bias + N(0, noise_scale^2) through the cut-points.

    Without `rng` the noise is a deterministic function of the rater and the attributes (the
    same rater rating the same clip twice gives the same answer).
    """
    rng = rng if rng is not None else _attribute_rng(rater, attributes)
    u = rater.utility(attributes) + rater.bias + rater.noise_scale * rng.standard_normal()
    return 1 + int(np.searchsorted(np.asarray(rater.cutpoints), u, side="right"))


def preference_probability(rater: Rater, attrs_a: Mapping[str, float],
                           attrs_b: Mapping[str, float]) -> float:
    """Bradley-Terry P(a preferred over b | the rater neither skips nor ties)."""
    du = rater.utility(attrs_a) - rater.utility(attrs_b)
    return float(1.0 / (1.0 + math.exp(-np.clip(du / rater.temperature, -50, 50))))


def compare(rater: Rater, attrs_a: Mapping[str, float], attrs_b: Mapping[str, float],
            rng: np.random.Generator) -> Choice:
    """0 (a preferred), 1 (b preferred), "tie" or "skip" (see module docstring)."""
    if rng.random() < rater.skip_prob:
        return SKIP
    du = rater.utility(attrs_a) - rater.utility(attrs_b)
    if rng.random() < rater.tie_prob * math.exp(-abs(du) / max(rater.tie_width, 1e-9)):
        return TIE
    p_a = 1.0 / (1.0 + math.exp(-float(np.clip(du / rater.temperature, -50, 50))))
    return 0 if rng.random() < p_a else 1


def choice_value(choice: Choice) -> float | None:
    """Feedback-record `choice` of a comparison: 0, 1, 0.5 for a tie, None for a skip."""
    if choice == SKIP or choice is None:
        return None
    if choice == TIE or choice == 0.5:
        return 0.5
    if choice in (0, 1):
        return float(choice)
    raise ValueError(f"unknown choice {choice!r}")


def rate_all(panel: RaterPanel, attributes: Mapping[str, float], seed: int | None = None
             ) -> list[int]:
    """Every rater's rating of one clip (deterministic per rater and clip without seed)."""
    if seed is None:
        return [rate(r, attributes) for r in panel]
    rng = np.random.default_rng(seed)
    return [rate(r, attributes, rng) for r in panel]


def compare_all(panel: RaterPanel, attrs_a: Mapping[str, float], attrs_b: Mapping[str, float],
                seed: int = 0) -> list[Choice]:
    """Every rater's choice on one pair, from one seeded stream."""
    rng = np.random.default_rng(seed)
    return [compare(r, attrs_a, attrs_b, rng) for r in panel]


def population_preference(panel: RaterPanel, attrs_a, attrs_b) -> np.ndarray:
    """[pairs] the panel's mean Bradley-Terry P(a preferred over b): what a reward model
    trained on this panel's choices can at best learn (attribute dicts or arrays)."""
    du = panel.utilities(attrs_a) - panel.utilities(attrs_b)  # [raters, pairs]
    temperature = np.array([r.temperature for r in panel.raters])[:, None]
    return (1.0 / (1.0 + np.exp(-np.clip(du / temperature, -50, 50)))).mean(axis=0)


def expected_ratings(panel: RaterPanel, attributes) -> np.ndarray:
    """[clips] the panel's mean expected rating 1..5 (`rate`'s Gaussian noise integrated
    over each cut-point)."""
    from scipy.stats import norm
    u = panel.utilities(attributes)  # [raters, clips]
    out = np.zeros(u.shape[1])
    for i, r in enumerate(panel.raters):
        above = norm.cdf((u[i][:, None] + r.bias - np.asarray(r.cutpoints)[None])
                         / max(r.noise_scale, 1e-9))
        out += 1.0 + above.sum(axis=1)
    return out / len(panel)


def split_raters(panel: RaterPanel, held_out_fraction: float = 0.3, seed: int = 0
                 ) -> tuple[RaterPanel, RaterPanel]:
    """(training raters, evaluation raters): a seeded random partition, both non-empty.

    Preference/rating data for reward models must come from the first panel and evaluation
    from the second, so no evaluation rater's taste leaked into training.
    """
    n = len(panel)
    if n < 2 or not 0.0 < held_out_fraction < 1.0:
        raise ValueError("need >= 2 raters and 0 < held_out_fraction < 1")
    k = min(n - 1, max(1, int(round(held_out_fraction * n))))
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:k].tolist())
    train = tuple(r for i, r in enumerate(panel.raters) if i not in held)
    evaluation = tuple(r for i, r in enumerate(panel.raters) if i in held)
    return (dataclasses.replace(panel, raters=train),
            dataclasses.replace(panel, raters=evaluation))


def agreement(panel: RaterPanel,
              pairs: Iterable[tuple[Mapping[str, float], Mapping[str, float]]],
              seed: int = 0) -> float:
    """Inter-rater agreement: over all pairs of clips and all pairs of raters who both gave a
    decisive answer (0 or 1) on it, the fraction that chose the same clip. 0.5 = chance for
    coin-flipping raters, 1.0 = unanimity. NaN when no decisive pairs exist."""
    agree = total = 0.0
    for i, (a, b) in enumerate(pairs):
        choices = compare_all(panel, a, b, seed=seed * 1_000_003 + i)
        k0, k1 = choices.count(0), choices.count(1)
        k = k0 + k1
        agree += k0 * (k0 - 1) / 2 + k1 * (k1 - 1) / 2
        total += k * (k - 1) / 2
    return agree / total if total else float("nan")


@dataclasses.dataclass(frozen=True)
class WinRate:
    rate: float  # (wins + ties / 2) / (wins + ties + losses)
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    skips: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses


def win_rate(choices: Iterable[Choice], confidence: float = 0.95, method: str = "wilson",
             num_bootstrap: int = 2000, seed: int = 0) -> WinRate:
    """Win rate of system "a" (choice 0) over "b" (choice 1) with a confidence interval.

    Ties (choice "tie" or 0.5) count as half a win and half a loss (the convention of
    side-by-side evaluations such as MusicRL's); skips (choice "skip" or None) are dropped.
    method="wilson": Wilson score interval with n = wins + ties + losses and p = the win rate
    (with ties it is slightly conservative: half-points have less variance than 0/1 outcomes);
    method="bootstrap": percentile bootstrap over the per-judgement scores 1 / 0.5 / 0.
    """
    scores, skips = [], 0
    for c in choices:
        v = choice_value(c)
        if v is None:
            skips += 1
        else:
            scores.append(1.0 - v)  # choice 0 -> a wins -> 1
    s = np.asarray(scores)
    wins, ties = int(np.sum(s == 1.0)), int(np.sum(s == 0.5))
    losses = len(s) - wins - ties
    if len(s) == 0:
        return WinRate(float("nan"), 0.0, 1.0, 0, 0, 0, skips)
    p = float(s.mean())
    alpha = 1.0 - confidence
    if method == "wilson":
        from scipy.stats import norm
        z = float(norm.ppf(1 - alpha / 2))
        n = len(s)
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        low, high = max(0.0, centre - half), min(1.0, centre + half)
    elif method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = s[rng.integers(0, len(s), size=(num_bootstrap, len(s)))].mean(axis=1)
        low, high = (float(x) for x in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
    else:
        raise ValueError(f"method must be 'wilson' or 'bootstrap', got {method!r}")
    return WinRate(p, float(low), float(high), wins, ties, losses, skips)
