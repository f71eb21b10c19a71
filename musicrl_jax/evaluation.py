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
6. Report: `report.md` and `report.html` in `out_dir` (a table like the paper's: win rate of
   each model against each other with its CI, mean rewards, KL), PNG plots (reward vs KL,
   win-rate bars with CI error bars, attribute breakdown), `results.json`, and WAVs of the first
   `num_audio_examples` captions per model under `out_dir/audio` (HTML `<audio>` players).

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
                  reward_models=None):
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
    if len(systems) < 2:
        raise ConfigError(f"evaluate_models: {len(systems)} model(s) ({[m.name for m in systems]}"
                          ", reference included); a side-by-side evaluation needs at least 2.")
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


# --------------------------------------------------------------------------------------------
# Steps


def _mean_se(x) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), se


def _sample_and_score(model: ModelUnderTest, reference: ModelUnderTest, captions, metas, rngs,
                      num_frames, tokenizer, reward_models, batch_size):
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
    attrs = features.batch_attributes(list(waveforms), tokenizer.sample_rate, metas)
    rewards = {}
    for rname, (score_fn, rparams) in (reward_models or {}).items():
        scores = np.concatenate([
            np.asarray(score_fn(rparams, captions[s:s + batch_size], codes[s:s + batch_size]),
                       np.float64).reshape(-1)
            for s in range(0, len(captions), batch_size)])
        rewards[rname] = _mean_se(scores)
    kl_terms = lp - ref_lp
    kl_sampling_terms = sample_lp - ref_lp
    return dict(codes=codes, waveforms=waveforms, attributes=attrs, rewards=rewards,
                kl=_mean_se(kl_terms), kl_sampling=_mean_se(kl_sampling_terms),
                kl_terms=kl_terms, kl_sampling_terms=kl_sampling_terms)


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


def _plots(out_dir, names, matrix, low, high, rewards, kl, kl_se, breakdown, reward_names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _fmt(x, digits=3):
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _table_rows(names, matrix, low, high, details, rewards, reward_names, kl, kl_se, kl_s,
                kl_s_se):
    header = (["model"] + [f"vs {b}" for b in names]
              + [f"reward: {r}" for r in reward_names] + ["KL (params)", "KL (sampling)"])
    rows = []
    for a, name in enumerate(names):
        row = [name]
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
        row.append(f"{_fmt(kl[a])} ± {_fmt(kl_se[a])}")
        row.append(f"{_fmt(kl_s[a])} ± {_fmt(kl_s_se[a])}")
        rows.append(row)
    return header, rows


def _write_reports(out_dir, result, header, rows, audio, prompts_shown, plots):
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
    attr_rows = [[a, _fmt(bd["logistic"][k], 2), _fmt(bd["agreement"][k], 2),
                  str(bd["agreement_n"][k])] for k, a in enumerate(bd["attributes"])]
    attr_header = ["attribute", "logistic coef.", "agreement", "n (decisive, differing)"]
    mean_header = ["model"] + list(features.ATTRIBUTE_NAMES)
    mean_rows = [[n] + [_fmt(result["mean_attributes"][n][a], 2)
                        for a in features.ATTRIBUTE_NAMES] for n in names]

    def md_table(h, rs):
        return ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)] + [
            "| " + " | ".join(r) + " |" for r in rs]

    md = ["# MusicRL evaluation", "", intro, "", "## Side-by-side win rates, rewards and KL", ""]
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
             "<h1>MusicRL evaluation</h1>", f"<p>{esc(intro)}</p>",
             "<h2>Side-by-side win rates, rewards and KL</h2>", html_table(header, rows)]
    for key in ("win_rates_png", "reward_vs_kl_png"):
        parts.append(f"<p><img src='{esc(os.path.basename(plots[key]))}'></p>")
    parts += ["<h2>What explains the panel's choices</h2>",
              f"<p>{bd['num_judgements']} non-skipped judgements; logistic training accuracy "
              f"{_fmt(bd['logistic_accuracy'], 2)}.</p>", html_table(attr_header, attr_rows),
              f"<p><img src='{esc(os.path.basename(plots['attributes_png']))}'></p>",
              "<h2>Mean attributes per model</h2>", html_table(mean_header, mean_rows),
              "<h2>Audio examples</h2>"]
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


# --------------------------------------------------------------------------------------------
# Entry point


def evaluate_models(models: Sequence[ModelUnderTest], reference: ModelUnderTest, prompts,
                    tokenizer, eval_panel: raters.RaterPanel, out_dir: str, *,
                    num_captions: int,
                    reward_models: Mapping[str, tuple[ScoreFn, Any]] | None = None,
                    seed: int = 0, num_audio_examples: int = 3, num_frames: int | None = None,
                    batch_size: int = 64, common_random_numbers: bool = True) -> dict[str, Any]:
    """Evaluates `models` (and `reference`, added when not among them) side by side on the
    first `num_captions` captions of `prompts` (a `collection.Prompts` of held-out captions
    with metadata). See the module docstring for what is measured. Writes report.md,
    report.html, PNG plots, results.json and example WAVs to `out_dir`; returns every number:

      models (names, reference last if it was added), reference, num_captions, num_frames,
      num_raters, win_rate / win_rate_low / win_rate_high ([n, n] lists, row vs column, NaN
      diagonal), win_rates {"a|b": WinRate fields}, kl / kl_stderr / kl_sampling /
      kl_sampling_stderr ({name: float}), rewards ({name: {reward: (mean, stderr)}}),
      mean_attributes ({name: {attribute: mean}}), attribute_breakdown, judgements (one record
      per comparison), paths (report, plots, audio).

    num_frames defaults to the smallest max_frames of the models; batch_size caps the number
    of captions sampled per call (per-example keys make the clips independent of it).
    common_random_numbers=False gives each model its own sampling keys (derived from seed and
    the model's name) instead of the shared per-caption keys.
    """
    systems = _check_inputs(models, reference, prompts, tokenizer, eval_panel, num_captions,
                            reward_models)
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
    names = [m.name for m in systems]
    os.makedirs(out_dir, exist_ok=True)
    captions = np.asarray(prompts.caption_tokens, np.int32)[:num_captions]
    metas = list(prompts.metas[:num_captions])
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
        sampled[m.name] = _sample_and_score(m, reference, captions, metas, keys_for(m),
                                            num_frames, tokenizer, reward_models, batch_size)
        seconds[f"sample_and_score/{m.name}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    attrs = [sampled[n]["attributes"] for n in names]
    choices, judgements = _judge_pairs(names, attrs, eval_panel, seed)
    matrix, low, high, details = _win_matrix(names, choices)
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
    slugs = [_slug(n) for n in names]  # unique file prefixes even when two names slug alike
    prefixes = [s if slugs.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(slugs)]
    audio = {m.name: _write_audio(out_dir, prefix, tokenizer, sampled[m.name],
                                  min(num_audio_examples, num_captions))
             for m, prefix in zip(systems, prefixes)}
    header, rows = _table_rows(names, matrix, low, high, details, rewards, reward_names, kl,
                               kl_se, kl_s, kl_s_se)
    result = {
        "models": names, "reference": reference.name, "num_captions": int(num_captions),
        "num_frames": int(num_frames), "num_raters": len(eval_panel), "seed": seed,
        "sampling": {m.name: dataclasses.asdict(m.sampling) for m in systems},
        "win_rate": matrix.tolist(), "win_rate_low": low.tolist(),
        "win_rate_high": high.tolist(),
        "win_rates": {f"{a}|{b}": dataclasses.asdict(wr) for (a, b), wr in details.items()},
        "kl": dict(zip(names, kl)), "kl_stderr": dict(zip(names, kl_se)),
        "kl_sampling": dict(zip(names, kl_s)), "kl_sampling_stderr": dict(zip(names, kl_s_se)),
        "rewards": {n: {r: list(v) for r, v in rewards[n].items()} for n in names},
        "mean_attributes": {n: {a: float(np.mean([x[a] for x in sampled[n]["attributes"]]))
                                for a in features.ATTRIBUTE_NAMES} for n in names},
        "attribute_breakdown": breakdown, "judgements": judgements,
    }
    shown = [(c, str(prompts.captions[c])) for c in range(min(num_audio_examples, num_captions))]
    _write_reports(out_dir, result, header, rows, audio, shown, plots)
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

