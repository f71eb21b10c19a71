"""Side-by-side evaluation of music LMs: the held-out rater panel, reward models and KL.

`evaluate_models(models, reference, prompts, tokenizer, eval_panel, out_dir, num_captions=...)`
compares any set of models (the pretrained LM, MusicRL-R/U/RU policies, checkpoints, or one LM
under several sampling configs) on the same held-out captions, the way MusicRL's Table 1 does:

1. Samples. Each model samples one clip per caption (batched, `decoding.sample`). The per-example
   sampling keys are the same for every model (common random numbers: models that differ only
   slightly produce similar clips, which lowers the variance of their comparison; identical
   models produce identical codes). Codes are decoded to audio with the tokenizer, the model's
   optional `audio_transform` is applied to the waveforms (e.g. `add_noise`, to check that the
   panel hears degradations), and the clips' rater attributes are measured.
2. Rewards (optional). Mean and standard error of each given reward model's score over a
   model's clips: `reward_models={"quality": (score_fn, params)}` with
   `score_fn(params, caption_tokens, audio_codes) -> [batch]` (e.g. `RewardModel.score`, or
   `jax.jit` of it). Rewards see tokens, so `audio_transform` does not change them.
3. KL to the reference. `kl` is the sequence-level Monte-Carlo estimate of
   KL(pi || pi_ref) = E_{y ~ model}[log pi(y|x) - log pi_ref(y|x)] averaged over the captions,
   where pi and pi_ref are the LMs' temperature-1, unguided, untruncated teacher-forced
   distributions (`decoding.sequence_logprobs`): it measures how far the *parameters* moved, as
   the KL regulariser of RL fine-tuning does. Sampling settings (temperature, top-k,
   classifier-free guidance) are not part of pi, so the reference sampled with another
   SamplingConfig has kl = 0 (its samples still come from its sampling distribution). The
   reported `kl_sampling` is the same estimate with log q(y|x) of the distribution actually
   sampled from (`sample_logprobs`, with temperature, top-k and guidance), i.e. an estimate of
   KL(q || pi_ref). Both come with the standard error of the mean over captions; single-sample
   estimates can be slightly negative.
4. Win rates. For every pair of models and every caption, one rater drawn from `eval_panel`
   (hold these raters out of reward-model training: `raters.split_raters`) compares the two
   models' clips, presented in random order. Each pair is judged once, and the matrix holds
   both directions: W[a, b] = (wins + ties / 2) / (wins + ties + losses) of a against b (ties
   count half a win, as in the paper; skips are dropped), so W[a, b] + W[b, a] = 1 exactly.
   95% Wilson intervals (`raters.win_rate`). The diagonal is NaN.
5. Attribute breakdown: which attribute differences explain the panel's choices. Over all
   judgements (pair (a, b), d = attributes(a) - attributes(b), outcome y = 1 / 0.5 / 0 for a
   win / tie / loss), two summaries per attribute:
     * agreement: among decisive judgements where the two clips differ in the attribute
       (|d| > 1e-6), the fraction won by the clip with the higher value (0.5 = unrelated;
       below 0.5 = the panel prefers lower values);
     * logistic: coefficient of an L2-regularised logistic regression of y on the standardised
       differences d / std(d) (no intercept; the data are symmetrised with (-d, 1 - y), so
       presentation order cannot matter). It is the change in log-odds of winning per
       standard deviation of the difference, holding the other attributes fixed.
6. Reference systems (optional). With `reference_audio` (the corpus renders of the held-out
   captions), two systems that are not models join the comparison, listed first: "original",
   the render cropped or zero-padded to the models' clip length, and "tokenized", its
   tokenizer round trip (the ceiling a token LM can reach). They are measured, judged by the
   panel and broken down like the models; rewards score their (round-trip) tokens; KL is
   undefined (NaN, "-" in tables). With them, the spectrograms of the first captions' clips
   of every system are plotted side by side.
7. Chance baseline for text adherence. Each clip's raw measurements are also scored against
   a different caption's metadata (a fixed derangement of the captions, from `seed`): the
   mean text-adherence attribute a system gets when audio and caption are unrelated. The
   baseline is the "tokenized" system's (else all systems') deranged mean, and headroom =
   (x - chance) / (tokenized - chance) is the fraction of the tokenizer's ceiling above chance
   that a system reaches.
8. Report: `report.md` and `report.html` in `out_dir` (a table like the paper's: win rate of
   each model against each other with its CI, mean rewards, KL), PNG plots (reward vs KL,
   win-rate bars with CI error bars, attribute breakdown, spectrograms), `results.json`, and
   WAVs of the first `num_audio_examples` captions per system under `out_dir/audio` (HTML
   `<audio>` players).

Everything is a pure function of (models, prompts, panel, seed): reruns give the same report.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from musicrl_jax import decoding, raters
from musicrl_jax.audio import features
from musicrl_jax.errors import ConfigError

AudioTransform = Callable[[np.ndarray, int], np.ndarray]  # (waveforms [B, T], sample_rate)
ScoreFn = Callable[..., Any]  # score_fn(params, caption_tokens, audio_codes) -> [batch]


@dataclasses.dataclass(frozen=True, eq=False)
class ModelUnderTest:
    """One system in the comparison: an LM's config and params, how it samples, and optionally
    a transform applied to its decoded waveforms before the raters hear them (tests, ablations:
    e.g. `add_noise(...)`)."""
    name: str
    lm_config: Any
    params: Any
    sampling: decoding.SamplingConfig = decoding.SamplingConfig()
    audio_transform: AudioTransform | None = None


def add_noise(snr_db: float = -10.0, seed: int = 0) -> AudioTransform:
    """An `audio_transform` adding white noise at `snr_db` relative to each clip's RMS
    (deterministic: the noise depends on `seed` and the clip index only)."""
    def transform(waveforms: np.ndarray, sample_rate: int) -> np.ndarray:
        del sample_rate
        out = []
        for i, w in enumerate(waveforms):
            w = np.asarray(w, np.float32)
            rms = float(np.sqrt(np.mean(w.astype(np.float64) ** 2))) or 1e-3
            noise = np.random.default_rng([seed, i]).standard_normal(w.shape)
            out.append((w + rms * 10 ** (-snr_db / 20) * noise).astype(np.float32))
        return np.stack(out) if out else np.zeros((0, 0), np.float32)
    return transform


# --------------------------------------------------------------------------------------------
# Validation


def _check_inputs(models, reference, prompts, tokenizer, eval_panel, num_captions,
                  reward_models=None, num_references: int = 0):
    models = list(models)
    if not isinstance(reference, ModelUnderTest) or not all(
            isinstance(m, ModelUnderTest) for m in models):
        raise ConfigError("evaluate_models: models and reference must be ModelUnderTest.")
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"evaluate_models: model names {dupes} are used more than once; give "
                          "every ModelUnderTest a distinct name.")
    for m in models:
        if m.name == reference.name and m is not reference:
            raise ConfigError(f"evaluate_models: a model is named {m.name!r} like the reference "
                              "but is another ModelUnderTest; pass the reference object itself "
                              "or rename it.")
    systems = list(models) + ([] if reference.name in names else [reference])
    if len(systems) + num_references < 2:
        raise ConfigError(f"evaluate_models: {len(systems)} model(s) ({[m.name for m in systems]}"
                          ", reference included) and no reference_audio; a side-by-side "
                          "evaluation needs at least 2 systems.")
    for m in systems:
        if not m.name or not str(m.name).strip():
            raise ConfigError("evaluate_models: every model needs a non-empty name.")
        cfg = m.lm_config
        if (cfg.num_codebooks != tokenizer.num_codebooks
                or cfg.codebook_size != tokenizer.codebook_size):
            raise ConfigError(
                f"evaluate_models: model {m.name!r} has num_codebooks={cfg.num_codebooks}, "
                f"codebook_size={cfg.codebook_size} but the tokenizer has num_codebooks="
                f"{tokenizer.num_codebooks}, codebook_size={tokenizer.codebook_size}. Fix: "
                "evaluate with the tokenizer the LM was trained on.")
        ref = reference.lm_config
        if (cfg.num_codebooks, cfg.codebook_size, cfg.caption_vocab_size) != (
                ref.num_codebooks, ref.codebook_size, ref.caption_vocab_size):
            raise ConfigError(f"evaluate_models: model {m.name!r} and the reference "
                              f"{reference.name!r} use different token vocabularies; KL to the "
                              "reference needs the same codebooks and caption vocabulary.")
    n = len(prompts.captions)
    if not isinstance(num_captions, (int, np.integer)) or not 1 <= num_captions <= n:
        raise ConfigError(f"evaluate_models: num_captions={num_captions!r}; expected an integer "
                          f"in [1, {n}] (the prompts hold {n} captions).")
    width = np.asarray(prompts.caption_tokens).shape[1]
    for m in systems:
        if width > m.lm_config.max_caption_length:
            raise ConfigError(f"evaluate_models: caption tokens are {width} long but model "
                              f"{m.name!r} has max_caption_length="
                              f"{m.lm_config.max_caption_length}.")
    for rname, entry in (reward_models or {}).items():
        if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[0])):
            raise ConfigError(f"evaluate_models: reward_models[{rname!r}] must be a "
                              "(score_fn, params) pair, score_fn(params, caption_tokens, "
                              "audio_codes) -> [batch], e.g. (reward_model.score, "
                              "reward_model.params).")
    if eval_panel is None or len(eval_panel) < 1:
        raise ConfigError("evaluate_models: eval_panel has no raters; pass the held-out raters "
                          "of raters.split_raters(panel).")
    return systems


REFERENCE_SYSTEMS = ("original", "tokenized")


def _check_reference_audio(reference_audio, systems, num_captions):
    clash = [m.name for m in systems if m.name in REFERENCE_SYSTEMS]
    if clash:
        raise ConfigError(f"evaluate_models: model name(s) {clash} are taken by the reference "
                          f"systems {list(REFERENCE_SYSTEMS)} that reference_audio adds; rename "
                          "the model(s).")
    try:
        count = len(reference_audio)
    except TypeError:
        kind = type(reference_audio).__name__
        raise ConfigError(f"evaluate_models: reference_audio is a {kind}; expected a sequence "
                          "of 1-D float waveforms, one per caption of prompts.") from None
    if count < num_captions:
        raise ConfigError(f"evaluate_models: reference_audio has {count} clip(s) but "
                          f"num_captions={num_captions}; pass one render per held-out caption, "
                          "aligned with prompts (entry i is the clip caption i was written "
                          "for), or lower num_captions.")
    for i in range(num_captions):
        clip = np.asarray(reference_audio[i])
        if clip.ndim != 1 or not clip.size or not np.issubdtype(clip.dtype, np.floating):
            raise ConfigError(f"evaluate_models: reference_audio[{i}] has shape {clip.shape} "
                              f"and dtype {clip.dtype}; expected a non-empty 1-D float "
                              "waveform (mono, at tokenizer.sample_rate). Mix multichannel "
                              "audio down and convert integer PCM to float in [-1, 1].")
        bad = int(np.size(clip) - np.count_nonzero(np.isfinite(clip)))
        if bad:
            raise ConfigError(f"evaluate_models: reference_audio[{i}] has {bad} non-finite "
                              "sample(s) (NaN or inf); fix that render (e.g. re-render it, or "
                              "np.nan_to_num) before evaluating.")


# --------------------------------------------------------------------------------------------
# Steps


def _mean_se(x) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), se


def _sample(model: ModelUnderTest, reference: ModelUnderTest, captions, rngs, num_frames,
            tokenizer, batch_size):
    """The model's clips (codes, and the waveforms the raters hear) and its KL terms."""
    codes, sample_lp, lp, ref_lp = [], [], [], []
    for start in range(0, len(captions), batch_size):
        sl = slice(start, start + batch_size)
        out = decoding.sample(model.lm_config, model.params, captions[sl], rngs[sl],
                              num_frames=num_frames, sampling=model.sampling)
        c = out["codes"]
        codes.append(np.asarray(c))
        sample_lp.append(np.asarray(out["sample_logprobs"], np.float64))
        lp.append(np.asarray(decoding.sequence_logprobs(model.lm_config, model.params,
                                                        captions[sl], c)[1], np.float64))
        if model is reference:
            ref_lp.append(lp[-1])
        else:
            ref_lp.append(np.asarray(decoding.sequence_logprobs(
                reference.lm_config, reference.params, captions[sl], c)[1], np.float64))
    codes = np.concatenate(codes)
    sample_lp, lp, ref_lp = (np.concatenate(x) for x in (sample_lp, lp, ref_lp))
    waveforms = np.asarray(tokenizer.decode(codes), np.float32)
    if model.audio_transform is not None:
        waveforms = np.asarray(model.audio_transform(waveforms, tokenizer.sample_rate),
                               np.float32)
    kl_terms = lp - ref_lp
    kl_sampling_terms = sample_lp - ref_lp
    return dict(codes=codes, waveforms=waveforms, kl=_mean_se(kl_terms),
                kl_sampling=_mean_se(kl_sampling_terms), kl_terms=kl_terms,
                kl_sampling_terms=kl_sampling_terms)


def _fit_length(waveform, num_samples: int) -> np.ndarray:
    waveform = np.asarray(waveform, np.float32)[:num_samples]
    return np.pad(waveform, (0, num_samples - len(waveform)))


def _reference_clips(reference_audio, num_captions, num_frames, tokenizer):
    """{"original", "tokenized"} -> codes and waveforms at the models' clip length. Both carry
    the round-trip codes: rewards see tokens, and the render's tokens are its round trip's."""
    num_samples = tokenizer.num_samples(num_frames)
    original = np.stack([_fit_length(w, num_samples) for w in reference_audio[:num_captions]])
    codes = np.asarray(tokenizer.encode(original))[:, :num_frames]
    tokenized = np.stack([_fit_length(w, num_samples) for w in tokenizer.decode(codes)])
    nan = (float("nan"), float("nan"))  # KL is a property of an LM, which these are not
    return {name: dict(codes=codes, waveforms=waveforms, kl=nan, kl_sampling=nan)
            for name, waveforms in zip(REFERENCE_SYSTEMS, (original, tokenized))}


def caption_derangement(num_captions: int, seed: int) -> np.ndarray | None:
    """A permutation of range(num_captions) without fixed points (uniform over derangements,
    by rejection), a pure function of seed; None for a single caption (no other caption)."""
    if num_captions < 2:
        return None
    rng = np.random.default_rng([seed, 104729])
    while True:
        perm = rng.permutation(num_captions)
        if not np.any(perm == np.arange(num_captions)):
            return perm


def _measure(waveforms, sample_rate, metas, other_metas):
    """Attributes of each clip against its caption and, for the chance baseline, the text
    attributes against another caption; one `features.measure` per clip serves both."""
    raw = [features.measure(w, sample_rate) for w in waveforms]
    attributes = [features.score(r, m) for r, m in zip(raw, metas)]
    chance = [{k: v for k, v in features.score(r, m).items() if k in features.GROUPS["text"]}
              for r, m in zip(raw, other_metas or ())]
    return attributes, chance


def _rewards(codes, captions, reward_models, batch_size):
    rewards = {}
    for rname, (score_fn, rparams) in (reward_models or {}).items():
        scores = np.concatenate([
            np.asarray(score_fn(rparams, captions[s:s + batch_size], codes[s:s + batch_size]),
                       np.float64).reshape(-1)
            for s in range(0, len(captions), batch_size)])
        rewards[rname] = _mean_se(scores)
    return rewards


def _chance_and_headroom(names, mean_attributes, chance_attributes, with_references):
    """The chance baseline of each text attribute and, with references, each system's headroom
    (x - chance) / (tokenized - chance); NaN where the ceiling does not clear chance."""
    text = features.GROUPS["text"]
    if not with_references:
        return {a: float(np.mean([chance_attributes[n][a] for n in names])) for a in text}, {}
    chance = dict(chance_attributes["tokenized"])

    def headroom(name, attribute):
        span = mean_attributes["tokenized"][attribute] - chance[attribute]
        return ((mean_attributes[name][attribute] - chance[attribute]) / span
                if abs(span) > 1e-6 else float("nan"))

    return chance, {n: {a: headroom(n, a) for a in text} for n in names}


def _judge_pairs(names, attrs, eval_panel, seed):
    """Every unordered pair (i < j) judged once per caption: returns {(i, j): [choice from i's
    point of view]} (0 = i won, 1 = j won, "tie", "skip") and the judgement records."""
    choices, records = {}, []
    num_captions = len(attrs[0])
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            rng = np.random.default_rng([seed, 7919, i, j])
            out = []
            for c in range(num_captions):
                rater = eval_panel.raters[int(rng.integers(len(eval_panel)))]
                swapped = bool(rng.integers(2))
                first, second = (attrs[j][c], attrs[i][c]) if swapped else (
                    attrs[i][c], attrs[j][c])
                choice = raters.compare(rater, first, second, rng)
                if swapped and choice in (0, 1):
                    choice = 1 - choice
                out.append(choice)
                records.append({"a": names[i], "b": names[j], "caption_index": c,
                                "rater_id": rater.rater_id, "a_presented_first": not swapped,
                                "choice": raters.choice_value(choice)})
            choices[(i, j)] = out
    return choices, records


def _flip(choice):
    return 1 - choice if choice in (0, 1) else choice


def _win_matrix(names, choices):
    n = len(names)
    matrix = np.full((n, n), np.nan)
    low, high = np.full((n, n), np.nan), np.full((n, n), np.nan)
    details = {}
    for (i, j), cs in choices.items():
        for a, b, seq in ((i, j, cs), (j, i, [_flip(c) for c in cs])):
            wr = raters.win_rate(seq, confidence=0.95, method="wilson")
            matrix[a, b], low[a, b], high[a, b] = wr.rate, wr.low, wr.high
            details[(names[a], names[b])] = wr
    return matrix, low, high, details


def _fit_logistic(x, y, l2=1.0, iters=50):
    """Newton's method on mean cross-entropy + l2/(2N) * ||w||^2 (soft labels y in [0, 1])."""
    n, d = x.shape
    w = np.zeros(d)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) / n + l2 * w / n
        hess = (x * (p * (1 - p))[:, None]).T @ x / n + l2 * np.eye(d) / n
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def attribute_breakdown(choices, attrs, l2: float = 1.0) -> dict[str, Any]:
    """Which attribute differences explain the panel's choices (module docstring, step 5).

    choices: {(i, j): [choice of i vs j per caption]}; attrs: per model, per caption attribute
    dicts. Returns {"attributes", "agreement", "agreement_n", "logistic", "logistic_accuracy",
    "num_judgements"}; NaN where an attribute never differed.
    """
    names = features.ATTRIBUTE_NAMES
    arr = [np.array([[a[k] for k in names] for a in per_model], np.float64)
           for per_model in attrs]
    diffs, ys = [], []
    for (i, j), cs in choices.items():
        for c, choice in enumerate(cs):
            v = raters.choice_value(choice)
            if v is None:
                continue
            diffs.append(arr[i][c] - arr[j][c])
            ys.append(1.0 - v)  # 1 = i (the "a" side) won
    d = np.array(diffs).reshape(-1, len(names))
    y = np.array(ys)
    agreement, agreement_n = [], []
    decisive = y != 0.5
    for k in range(len(names)):
        mask = decisive & (np.abs(d[:, k]) > 1e-6)
        agreement_n.append(int(mask.sum()))
        agreement.append(float(np.mean((d[mask, k] > 0) == (y[mask] == 1.0)))
                         if mask.any() else float("nan"))
    coef = np.full(len(names), np.nan)
    accuracy = float("nan")
    if len(y):
        std = d.std(axis=0)
        varying = std > 1e-9
        if varying.any():
            z = d[:, varying] / std[varying]
            x = np.concatenate([z, -z])
            w = _fit_logistic(x, np.concatenate([y, 1.0 - y]), l2=l2)
            coef[varying] = w
            if decisive.any():
                accuracy = float(np.mean(((z[decisive] @ w) > 0) == (y[decisive] == 1.0)))
    return {"attributes": list(names), "agreement": agreement, "agreement_n": agreement_n,
            "logistic": [float(c) for c in coef], "logistic_accuracy": accuracy,
            "num_judgements": int(len(y))}


# --------------------------------------------------------------------------------------------
# Report


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # headless: the report is written to files
    import matplotlib.pyplot as plt
    return plt


def _plots(out_dir, names, matrix, low, high, rewards, kl, kl_se, breakdown, reward_names):
    plt = _pyplot()

    paths = {}
    n = len(names)
    # Win-rate bars: for each model, its win rate against each other model, with 95% CIs.
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * n * (n - 1) / 2 + 2), 3.6))
    width = 0.8 / max(1, n - 1)
    for slot, b in enumerate(range(n)):
        xs, ys, errs = [], [], [[], []]
        for a in range(n):
            if a == b:
                continue
            xs.append(a - 0.4 + width * (slot - (slot > a)) + width / 2)
            ys.append(matrix[a, b])
            errs[0].append(max(0.0, matrix[a, b] - low[a, b]))
            errs[1].append(max(0.0, high[a, b] - matrix[a, b]))
        ax.bar(xs, ys, width=width * 0.95, yerr=errs, capsize=3, label=f"vs {names[b]}")
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(n), names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate (95% CI)")
    ax.set_title("Held-out rater panel: win rate of each model")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    paths["win_rates_png"] = os.path.join(out_dir, "win_rates.png")
    fig.savefig(paths["win_rates_png"], dpi=110)
    plt.close(fig)

    # Reward (or mean panel win rate when no reward model is given) vs KL to the reference.
    targets = list(reward_names) or ["mean win rate"]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for m, name in enumerate(names):
            if not np.isfinite(kl[m]):  # reference systems: no LM, no KL
                continue
            if reward_names:
                y, yerr = rewards[name][target]
            else:
                y, yerr = float(np.nanmean(matrix[m])) if n > 1 else float("nan"), 0.0
            ax.errorbar(kl[m], y, xerr=np.nan_to_num(kl_se[m]), yerr=np.nan_to_num(yerr),
                        fmt="o", capsize=3, label=name)
            ax.annotate(name, (kl[m], y), textcoords="offset points", xytext=(5, 4 - 10 * m),
                        fontsize=7)
        ax.set_xlabel("KL(model || reference), nats per clip")
        ax.set_ylabel(target if not reward_names else f"mean reward: {target}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Reward vs KL to the reference" if reward_names else
                 "Panel win rate vs KL to the reference")
    fig.tight_layout()
    paths["reward_vs_kl_png"] = os.path.join(out_dir, "reward_vs_kl.png")
    fig.savefig(paths["reward_vs_kl_png"], dpi=110)
    plt.close(fig)

    # Attribute breakdown.
    attrs = breakdown["attributes"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.28 * len(attrs) + 1.5), sharey=True)
    pos = np.arange(len(attrs))
    axes[0].barh(pos, np.nan_to_num(np.array(breakdown["logistic"])), color="tab:blue")
    axes[0].axvline(0, color="k", lw=0.8)
    axes[0].set_yticks(pos, attrs, fontsize=7)
    axes[0].set_xlabel("logistic coefficient (log-odds per std of the difference)")
    axes[1].barh(pos, np.nan_to_num(np.array(breakdown["agreement"]), nan=0.5) - 0.5,
                 left=0.5, color="tab:orange")
    axes[1].axvline(0.5, color="k", lw=0.8)
    axes[1].set_xlim(0, 1)
    axes[1].set_xlabel("agreement of the choice with the attribute's sign")
    fig.suptitle("Which attribute differences explain the panel's choices")
    fig.tight_layout()
    paths["attributes_png"] = os.path.join(out_dir, "attribute_breakdown.png")
    fig.savefig(paths["attributes_png"], dpi=110)
    plt.close(fig)
    return paths


def _spectrograms(out_dir, names, waveforms, sample_rate, shown):
    """One row per shown caption of log-mel panels, one per system; each row shares its dB
    scale (0 dB = the row's loudest bin) so panels compare directly."""
    import librosa
    plt = _pyplot()

    fig, axes = plt.subplots(len(shown), len(names), figsize=(2.4 * len(names) + 0.8,
                                                              2.3 * len(shown) + 0.6),
                             squeeze=False, sharey=True, layout="constrained")
    image = None
    for row, (c, caption) in enumerate(shown):
        mels = [librosa.feature.melspectrogram(y=np.asarray(waveforms[n][c], np.float32),
                                               sr=sample_rate, n_fft=1024, hop_length=256,
                                               n_mels=64) for n in names]
        loudest = max(float(m.max()) for m in mels) + 1e-12
        for ax, name, mel in zip(axes[row], names, mels):
            seconds = len(waveforms[name][c]) / sample_rate
            image = ax.imshow(librosa.power_to_db(mel, ref=loudest, top_db=None),
                              origin="lower", aspect="auto", cmap="magma", vmin=-80.0,
                              vmax=0.0, extent=(0.0, seconds, 0, mel.shape[0]))
            ax.set_title(name, fontsize=8)
            ax.tick_params(labelsize=6)
        axes[row][0].set_ylabel(f"caption {c}\nmel band", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=7)
    fig.colorbar(image, ax=axes, label="dB re row max", shrink=0.8)
    fig.suptitle("Log-mel spectrograms: " + "; ".join(
        f"caption {c}: {_shorten(caption, 60)}" for c, caption in shown), fontsize=8)
    path = os.path.join(out_dir, "spectrograms.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _fmt(x, digits=3):
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _label(name, references):
    return f"{name} (reference)" if name in references else name


def _fmt_mean_se(mean, se):
    return "-" if not np.isfinite(mean) else f"{_fmt(mean)} ± {_fmt(se)}"


def _table_rows(names, matrix, low, high, details, rewards, reward_names, kl, kl_se, kl_s,
                kl_s_se, references=()):
    header = (["model"] + [f"vs {b}" for b in names]
              + [f"reward: {r}" for r in reward_names] + ["KL (params)", "KL (sampling)"])
    rows = []
    for a, name in enumerate(names):
        row = [_label(name, references)]
        for b, other in enumerate(names):
            if a == b:
                row.append("-")
            else:
                wr = details[(name, other)]
                row.append(f"{_fmt(matrix[a, b], 2)} [{_fmt(low[a, b], 2)}, "
                           f"{_fmt(high[a, b], 2)}] (n={wr.n})")
        for r in reward_names:
            mean, se = rewards[name][r]
            row.append(f"{_fmt(mean)} ± {_fmt(se)}")
        row.append(_fmt_mean_se(kl[a], kl_se[a]))
        row.append(_fmt_mean_se(kl_s[a], kl_s_se[a]))
        rows.append(row)
    return header, rows


def _chance_rows(result):
    """The text-adherence table: per system and text attribute, "mean (vs other caption)
    headroom" (headroom only with reference systems)."""
    text = features.GROUPS["text"]
    headroom = result["headroom"]
    header = ["system"] + [f"{a}: mean (vs other caption)" + (" headroom" if headroom else "")
                           for a in text]
    rows = []
    for name in result["models"]:
        row = [_label(name, result["references"])]
        for a in text:
            cell = (f"{_fmt(result['mean_attributes'][name][a], 2)} "
                    f"({_fmt(result['chance_attributes'][name][a], 2)})")
            if headroom:
                cell += f" {_fmt(headroom[name][a], 2)}"
            row.append(cell)
        rows.append(row)
    return header, rows


def _chance_text(result):
    baseline = ("the tokenized reference's" if result["references"]
                else "the mean over all systems of their")
    values = ", ".join(f"{a} {_fmt(v, 2)}" for a, v in result["chance"].items())
    text = ("Each clip's text-adherence attributes are also scored against another caption's "
            "metadata (a fixed derangement of the captions; in parentheses): what a system "
            f"gets when audio and caption are unrelated. Chance baseline = {baseline} mean "
            f"against other captions: {values}.")
    if result["references"]:
        text += (" Headroom = (mean - chance) / (tokenized - chance): 0 = chance, 1 = the "
                 "tokenizer's round trip of the caption's own render (the ceiling of a "
                 "token LM); nan where that ceiling does not clear chance.")
    return text


def _references_text(result):
    if not result["references"]:
        return ""
    return ("Reference systems (not models): 'original' is the corpus render each caption was "
            "written for, cropped or zero-padded to the models' clip length; 'tokenized' is "
            "its round trip through the audio tokenizer (encode, decode), the best a token LM "
            "can sound. The panel judges them like the models, rewards score their round-trip "
            "tokens, and KL is not defined for them ('-').")


def _write_reports(out_dir, result, header, rows, audio, prompts_shown, plots,
                   spectrogram_shown=()):
    names = result["models"]
    bd = result["attribute_breakdown"]
    intro = (f"{result['num_captions']} held-out captions, one clip per caption per model "
             f"({result['num_frames']} frames); {len(result['judgements'])} side-by-side "
             f"judgements by {result['num_raters']} held-out raters (one rater per caption and "
             "pair, random presentation order). Win rate = (wins + ties/2) / (wins + ties + "
             "losses) of the row model against the column model, 95% Wilson CI; skips dropped. "
             f"KL: Monte-Carlo estimate of KL(model || {result['reference']}) in nats per clip "
             "± s.e.; 'params' uses the temperature-1 LM distributions (sampling settings are "
             "not part of pi), 'sampling' the distribution actually sampled from.")
    references_text = _references_text(result)
    chance_header, chance_rows = _chance_rows(result)
    chance_text = _chance_text(result)
    spectrograms = plots.get("spectrograms_png")
    spectrogram_caption = ("Log-mel spectrograms of each system's clip (original, tokenized, "
                           "then the models; dB relative to each row's loudest bin) for "
                           + "; ".join(f"caption {c}: \"{_shorten(t, 80)}\""
                                       for c, t in spectrogram_shown) + ".")
    attr_rows = [[a, _fmt(bd["logistic"][k], 2), _fmt(bd["agreement"][k], 2),
                  str(bd["agreement_n"][k])] for k, a in enumerate(bd["attributes"])]
    attr_header = ["attribute", "logistic coef.", "agreement", "n (decisive, differing)"]
    mean_header = ["model"] + list(features.ATTRIBUTE_NAMES)
    mean_rows = [[_label(n, result["references"])]
                 + [_fmt(result["mean_attributes"][n][a], 2) for a in features.ATTRIBUTE_NAMES]
                 for n in names]

    def md_table(h, rs):
        return ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)] + [
            "| " + " | ".join(r) + " |" for r in rs]

    md = ["# MusicRL evaluation", "", intro, ""]
    if references_text:
        md += [references_text, ""]
    md += ["## Side-by-side win rates, rewards and KL", ""]
    md += md_table(header, rows)
    md += ["", f"![win rates]({os.path.basename(plots['win_rates_png'])})",
           f"![reward vs KL]({os.path.basename(plots['reward_vs_kl_png'])})", "",
           "## What explains the panel's choices", "",
           f"{bd['num_judgements']} non-skipped judgements. Logistic: L2-regularised logistic "
           "regression of 'row clip won' (ties = 0.5) on standardised attribute differences "
           f"(training accuracy on decisive judgements {_fmt(bd['logistic_accuracy'], 2)}). "
           "Agreement: fraction of decisive judgements won by the clip with the higher "
           "attribute, among those where the clips differ (0.5 = unrelated).", ""]
    md += md_table(attr_header, attr_rows)
    md += ["", f"![attribute breakdown]({os.path.basename(plots['attributes_png'])})", "",
           "## Mean attributes per model", ""]
    md += md_table(mean_header, mean_rows)
    md += ["", "## Text adherence against chance", "", chance_text, ""]
    md += md_table(chance_header, chance_rows)
    if spectrograms:
        md += ["", "## Spectrograms", "", f"![spectrograms]({os.path.basename(spectrograms)})",
               "", spectrogram_caption]
    md += ["", "## Audio examples", ""]
    for c, caption in prompts_shown:
        md.append(f"- caption {c}: {caption}")
        for name in names:
            if c < len(audio[name]):
                md.append(f"  - {name}: [{os.path.relpath(audio[name][c], out_dir)}]"
                          f"({os.path.relpath(audio[name][c], out_dir)})")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")

    esc = html.escape

    def html_table(h, rs):
        return ("<table><tr>" + "".join(f"<th>{esc(x)}</th>" for x in h) + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{esc(x)}</td>" for x in r) + "</tr>" for r in rs)
            + "</table>")

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>MusicRL evaluation"
             "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
             "padding:3px 6px}img{max-width:100%}</style></head><body>",
             "<h1>MusicRL evaluation</h1>", f"<p>{esc(intro)}</p>"]
    if references_text:
        parts.append(f"<p>{esc(references_text)}</p>")
    parts += ["<h2>Side-by-side win rates, rewards and KL</h2>", html_table(header, rows)]
    for key in ("win_rates_png", "reward_vs_kl_png"):
        parts.append(f"<p><img src='{esc(os.path.basename(plots[key]))}'></p>")
    parts += ["<h2>What explains the panel's choices</h2>",
              f"<p>{bd['num_judgements']} non-skipped judgements; logistic training accuracy "
              f"{_fmt(bd['logistic_accuracy'], 2)}.</p>", html_table(attr_header, attr_rows),
              f"<p><img src='{esc(os.path.basename(plots['attributes_png']))}'></p>",
              "<h2>Mean attributes per model</h2>", html_table(mean_header, mean_rows),
              "<h2>Text adherence against chance</h2>", f"<p>{esc(chance_text)}</p>",
              html_table(chance_header, chance_rows)]
    if spectrograms:
        parts += ["<h2>Spectrograms</h2>",
                  f"<figure><img src='{esc(os.path.basename(spectrograms))}'><figcaption>"
                  f"{esc(spectrogram_caption)}</figcaption></figure>"]
    parts.append("<h2>Audio examples</h2>")
    for c, caption in prompts_shown:
        parts.append(f"<h3>caption {c}: {esc(caption)}</h3><table><tr>")
        for name in names:
            if c < len(audio[name]):
                src = os.path.relpath(audio[name][c], out_dir)
                parts.append(f"<td>{esc(name)}<br><audio controls src='{esc(src)}'></audio>"
                             "</td>")
        parts.append("</tr></table>")
    parts.append("</body></html>")
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write("\n".join(parts) + "\n")


def _write_audio(out_dir, prefix, tokenizer, sampled, count):
    """WAVs of what the raters heard (after any audio_transform), decoded once in sampling."""
    from musicrl_jax.audio import listen
    from musicrl_jax.audio.synthesis import finish_clip
    audio_dir = os.path.join(out_dir, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    clips = [finish_clip(w, tokenizer.sample_rate) for w in sampled["waveforms"][:count]]
    return listen.write_wavs(clips, tokenizer.sample_rate, audio_dir, prefix)


def choose_sampling(model: ModelUnderTest, candidates: Sequence[decoding.SamplingConfig],
                    prompts, tokenizer, panel: raters.RaterPanel, *, num_captions: int,
                    seed: int = 0, batch_size: int = 64):
    """The sampling settings (temperature, top-k, classifier-free guidance) under which the
    model's clips for the first `num_captions` prompts have the highest mean noise-free utility
    for `panel`. Choose on captions and raters the evaluation does not use (the demo: validation
    captions, training raters; it evaluates on test captions with held-out raters).

    Returns (best SamplingConfig, one row per candidate: its settings, "utility" and the mean
    text-adherence and musicality attributes), every candidate sampled with the same keys.
    """
    if not candidates:
        raise ConfigError("choose_sampling: no candidate SamplingConfig given.")
    captions = np.asarray(prompts.caption_tokens, np.int32)[:num_captions]
    metas = list(prompts.metas[:num_captions])
    rngs = decoding.example_rngs(jax.random.PRNGKey(seed), len(captions))
    shown = features.GROUPS["text"] + features.GROUPS["musicality"]
    rows = []
    for sampling in candidates:
        codes = np.concatenate([np.asarray(decoding.sample(
            model.lm_config, model.params, captions[s:s + batch_size],
            rngs[s:s + batch_size], num_frames=model.lm_config.max_frames,
            sampling=sampling)["codes"]) for s in range(0, len(captions), batch_size)])
        attributes, _ = _measure(tokenizer.decode(codes), tokenizer.sample_rate, metas, None)
        rows.append({**dataclasses.asdict(sampling),
                     "utility": float(panel.utilities(attributes).mean()),
                     **{a: float(np.mean([x[a] for x in attributes])) for a in shown}})
    best = max(range(len(rows)), key=lambda i: rows[i]["utility"])
    return candidates[best], rows


# --------------------------------------------------------------------------------------------
# Entry point


def evaluate_models(models: Sequence[ModelUnderTest], reference: ModelUnderTest, prompts,
                    tokenizer, eval_panel: raters.RaterPanel, out_dir: str, *,
                    num_captions: int,
                    reward_models: Mapping[str, tuple[ScoreFn, Any]] | None = None,
                    seed: int = 0, num_audio_examples: int = 3, num_frames: int | None = None,
                    batch_size: int = 64, common_random_numbers: bool = True,
                    reference_audio: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """Evaluates `models` (and `reference`, added when not among them) side by side on the
    first `num_captions` captions of `prompts` (a `collection.Prompts` of held-out captions
    with metadata). See the module docstring for what is measured. Writes report.md,
    report.html, PNG plots, results.json and example WAVs to `out_dir`; returns every number:

      models (names of all systems in table order: the reference systems first when
      reference_audio is given, then the models, reference last if it was added), references
      (the reference systems' names, [] without reference_audio), reference, num_captions,
      num_frames, num_raters, win_rate / win_rate_low / win_rate_high ([n, n] lists, row vs
      column, NaN diagonal), win_rates {"a|b": WinRate fields}, kl / kl_stderr / kl_sampling /
      kl_sampling_stderr ({name: float}, NaN for reference systems), rewards ({name: {reward:
      (mean, stderr)}}), mean_attributes ({name: {attribute: mean}}), chance_attributes
      ({name: {text attribute: mean against another caption}}), chance ({text attribute:
      baseline}), headroom ({name: {text attribute: fraction}}, {} without reference_audio),
      caption_derangement (caption i's clips are scored against caption perm[i] for the
      chance baseline; None for one caption), attribute_breakdown, judgements (one record per
      comparison), paths (report, plots, audio, and spectrograms_png with reference_audio).

    num_frames defaults to the smallest max_frames of the models; batch_size caps the number
    of captions sampled per call (per-example keys make the clips independent of it).
    common_random_numbers=False gives each model its own sampling keys (derived from seed and
    the model's name) instead of the shared per-caption keys. reference_audio: the float32
    mono renders (at tokenizer.sample_rate) of the captions of `prompts`, aligned with them;
    adds the "original" and "tokenized" reference systems and spectrograms.png.
    """
    systems = _check_inputs(models, reference, prompts, tokenizer, eval_panel, num_captions,
                            reward_models,
                            len(REFERENCE_SYSTEMS) if reference_audio is not None else 0)
    if reference_audio is not None:
        _check_reference_audio(reference_audio, systems, num_captions)
    if batch_size < 1:
        raise ConfigError(f"evaluate_models: batch_size={batch_size}; expected >= 1.")
    if num_audio_examples < 0:
        raise ConfigError(f"evaluate_models: num_audio_examples={num_audio_examples}; "
                          "expected >= 0.")
    max_frames = min(m.lm_config.max_frames for m in systems)
    num_frames = num_frames or max_frames
    if not 1 <= num_frames <= max_frames:
        raise ConfigError(f"evaluate_models: num_frames={num_frames}; expected 1..{max_frames} "
                          "(the smallest max_frames of the models).")
    model_names = [m.name for m in systems]
    references = list(REFERENCE_SYSTEMS) if reference_audio is not None else []
    # Judged in this order so that adding references leaves the model-vs-model judgements
    # (seeded by pair index) unchanged; tables list the references first.
    judge_names = model_names + references
    names = references + model_names
    os.makedirs(out_dir, exist_ok=True)
    captions = np.asarray(prompts.caption_tokens, np.int32)[:num_captions]
    metas = list(prompts.metas[:num_captions])
    derangement = caption_derangement(num_captions, seed)
    other_metas = None if derangement is None else [metas[i] for i in derangement]
    start = time.perf_counter()
    seconds = {}

    def keys_for(model):  # common random numbers: by default every model uses the same keys
        key = jax.random.PRNGKey(seed)
        if not common_random_numbers:
            key = jax.random.fold_in(key, zlib.crc32(model.name.encode()) & 0x7FFFFFFF)
        return decoding.example_rngs(key, num_captions)

    sampled = {}
    for m in systems:
        t0 = time.perf_counter()
        sampled[m.name] = _sample(m, reference, captions, keys_for(m), num_frames, tokenizer,
                                  batch_size)
        sampled[m.name]["rewards"] = _rewards(sampled[m.name]["codes"], captions,
                                              reward_models, batch_size)
        seconds[f"sample_and_score/{m.name}"] = time.perf_counter() - t0
    if references:
        t0 = time.perf_counter()
        sampled.update(_reference_clips(reference_audio, num_captions, num_frames, tokenizer))
        reference_rewards = _rewards(sampled["tokenized"]["codes"], captions, reward_models,
                                     batch_size)
        for name in references:
            sampled[name]["rewards"] = reference_rewards
        seconds["reference_systems"] = time.perf_counter() - t0
    for name in judge_names:
        t0 = time.perf_counter()
        sampled[name]["attributes"], sampled[name]["chance_attributes"] = _measure(
            sampled[name]["waveforms"], tokenizer.sample_rate, metas, other_metas)
        key = f"sample_and_score/{name}" if name in model_names else "reference_systems"
        seconds[key] += time.perf_counter() - t0
    t0 = time.perf_counter()
    attrs = [sampled[n]["attributes"] for n in judge_names]
    choices, judgements = _judge_pairs(judge_names, attrs, eval_panel, seed)
    matrix, low, high, details = _win_matrix(judge_names, choices)
    order = np.array([judge_names.index(n) for n in names])
    matrix, low, high = (x[np.ix_(order, order)] for x in (matrix, low, high))
    breakdown = attribute_breakdown(choices, attrs)
    seconds["judge_and_breakdown"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    reward_names = list(reward_models or {})
    rewards = {n: sampled[n]["rewards"] for n in names}
    kl = [sampled[n]["kl"][0] for n in names]
    kl_se = [sampled[n]["kl"][1] for n in names]
    kl_s = [sampled[n]["kl_sampling"][0] for n in names]
    kl_s_se = [sampled[n]["kl_sampling"][1] for n in names]
    plots = _plots(out_dir, names, matrix, low, high, rewards, kl, kl_se, breakdown,
                   reward_names)
    spectrogram_shown = [(c, str(prompts.captions[c])) for c in range(min(2, num_captions))]
    if references:
        plots["spectrograms_png"] = _spectrograms(
            out_dir, names, {n: sampled[n]["waveforms"] for n in names},
            tokenizer.sample_rate, spectrogram_shown)
    slugs = [_slug(n) for n in names]  # unique file prefixes even when two names slug alike
    prefixes = [s if slugs.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(slugs)]
    audio = {name: _write_audio(out_dir, prefix, tokenizer, sampled[name],
                                min(num_audio_examples, num_captions))
             for name, prefix in zip(names, prefixes)}
    header, rows = _table_rows(names, matrix, low, high, details, rewards, reward_names, kl,
                               kl_se, kl_s, kl_s_se, references)
    sampling = {m.name: dataclasses.asdict(m.sampling) for m in systems}
    mean_attributes = {n: {a: float(np.mean([x[a] for x in sampled[n]["attributes"]]))
                           for a in features.ATTRIBUTE_NAMES} for n in names}
    chance_attributes = {n: {a: _mean_se([x[a] for x in sampled[n]["chance_attributes"]])[0]
                             for a in features.GROUPS["text"]} for n in names}
    chance, headroom = _chance_and_headroom(names, mean_attributes, chance_attributes,
                                            bool(references))
    result = {
        "models": names, "references": references, "reference": reference.name,
        "num_captions": int(num_captions), "num_frames": int(num_frames),
        "num_raters": len(eval_panel), "seed": seed,
        "sampling": {n: sampling.get(n) for n in names},
        "win_rate": matrix.tolist(), "win_rate_low": low.tolist(),
        "win_rate_high": high.tolist(),
        "win_rates": {f"{a}|{b}": dataclasses.asdict(wr) for (a, b), wr in details.items()},
        "kl": dict(zip(names, kl)), "kl_stderr": dict(zip(names, kl_se)),
        "kl_sampling": dict(zip(names, kl_s)), "kl_sampling_stderr": dict(zip(names, kl_s_se)),
        "rewards": {n: {r: list(v) for r, v in rewards[n].items()} for n in names},
        "mean_attributes": mean_attributes, "chance_attributes": chance_attributes,
        "chance": chance, "headroom": headroom,
        "caption_derangement": None if derangement is None else derangement.tolist(),
        "attribute_breakdown": breakdown, "judgements": judgements,
    }
    shown = [(c, str(prompts.captions[c])) for c in range(min(num_audio_examples, num_captions))]
    _write_reports(out_dir, result, header, rows, audio, shown, plots,
                   spectrogram_shown if references else ())
    seconds["report"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    result["seconds"] = seconds
    result["paths"] = {"report_md": os.path.join(out_dir, "report.md"),
                       "report_html": os.path.join(out_dir, "report.html"),
                       "results_json": os.path.join(out_dir, "results.json"), **plots,
                       "audio": audio}
    with open(result["paths"]["results_json"], "w") as f:
        json.dump(result, f, indent=1, default=float, allow_nan=True)
    return result
