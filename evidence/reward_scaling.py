"""Reward-model learning curves (issue 14, item 2): held-out accuracy of the preference model
and held-out Pearson of the quality model against the amount of feedback.

The training raters judge the pretrained LM's clips on training captions (`collection`); the
held-out raters judge other clips on validation captions. For each size n, a reward model trains
on the first n judgements and is scored on the held-out set, beside two references:

  majority    the held-out set's majority choice (preferences) / a constant (ratings: 0)
  ceiling     what the panel itself allows (it is simulated, so this is computable): how often a
              held-out rater's decisive choice agrees with the training raters' mean
              Bradley-Terry preference, and the Pearson of held-out ratings with the training
              raters' mean expected rating of the clip

Everything is resumable: collection shards, training checkpoints, and each size's result in
results.json. Run through gin: `python -m musicrl_jax.main --gin_file=evidence/reward_scaling.gin`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Sequence

import gin
import numpy as np

from musicrl_jax import collection, pipeline, raters
from musicrl_jax.audio import features
from musicrl_jax.audio.tokenizer import load_tokenizer
from musicrl_jax.data import feedback
from musicrl_jax.errors import ConfigError
from musicrl_jax.training import trainer


def pearson_interval(r: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Fisher-z interval of a Pearson correlation over n pairs."""
    if n <= 3 or not np.isfinite(r):
        return float("nan"), float("nan")
    centre, half = math.atanh(np.clip(r, -0.999999, 0.999999)), z / math.sqrt(n - 3)
    return math.tanh(centre - half), math.tanh(centre + half)


def _proportion(hits: np.ndarray) -> dict[str, float]:
    rate = raters.win_rate([0 if h else 1 for h in hits])
    return {"value": rate.rate, "low": rate.low, "high": rate.high, "n": int(len(hits))}


def _attributes_of(records, fields, prompts, tokenizer):
    """The attributes the raters heard for each record's clips (the listener is deterministic,
    so hearing the stored codes again gives what they judged)."""
    meta_of = dict(zip(prompts.captions, prompts.metas))
    metas = [meta_of[r["caption"]] for r in records]
    return [np.array([[a[n] for n in features.ATTRIBUTE_NAMES] for a in collection.hear(
        tokenizer, np.stack([r[field] for r in records]), metas)]) for field in fields]


def preference_ceiling(records, prompts, tokenizer, train_raters) -> dict[str, float]:
    attrs_a, attrs_b = _attributes_of(records, ("tokens_a", "tokens_b"), prompts, tokenizer)
    population = raters.population_preference(train_raters, attrs_a, attrs_b)
    choice = np.array([r["choice"] for r in records])
    decided = choice != 0.5
    return _proportion((population[decided] > 0.5) == (choice[decided] == 0))


def quality_ceiling(records, prompts, tokenizer, train_raters) -> dict[str, float]:
    (attrs,) = _attributes_of(records, ("audio_codes",), prompts, tokenizer)
    expected = raters.expected_ratings(train_raters, attrs)
    ratings = np.array([r["rating"] for r in records], np.float64)
    r = float(np.corrcoef(expected, ratings)[0, 1])
    low, high = pearson_interval(r, len(ratings))
    return {"value": r, "low": low, "high": high, "n": len(ratings)}


def _steps(size: int, epochs: float, batch_size: int, min_steps: int, max_steps: int) -> int:
    return int(np.clip(round(epochs * size / batch_size), min_steps, max_steps))


@gin.configurable
def reward_scaling(out_dir: str = gin.REQUIRED, lm_dir: str = gin.REQUIRED,
                   prepare_data: Callable = gin.REQUIRED, register_tasks: Callable = gin.REQUIRED,
                   quality_reward_task: Callable = gin.REQUIRED,
                   preference_reward_task: Callable = gin.REQUIRED,
                   sizes: Sequence[int] = (256, 1024, 4096, 16384), num_held_out: int = 2048,
                   num_raters: int = 40, collect_batch_size: int = 64, epochs: float = 3.0,
                   batch_size: int = 32, min_steps: int = 100, max_steps: int = 3000,
                   seed: int = 0) -> dict:
    """Collects max(sizes) training judgements and `num_held_out` held-out ones of each kind,
    trains a reward model per size and writes results.json, curves.png and table.md."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.isdir(os.path.join(lm_dir, "checkpoints")):
        raise ConfigError(f"reward_scaling.lm_dir={lm_dir}: no pretraining checkpoints there. "
                          "Fix: run `make demo` (its LM is runs/demo/pretrain) or point lm_dir "
                          "at another pretraining run on this data.")
    assets = prepare_data()
    register_tasks()
    _, lm_config, lm_params, _ = pipeline.pretrained_lm_stage(None, out_dir, lm_dir)
    tokenizer = load_tokenizer(os.path.join(assets, "tokenizer"))
    train_raters, held_out_raters = raters.split_raters(
        raters.RaterPanel.sample(num_raters, seed), 0.3, seed)
    prompts = {split: pipeline.collection_prompts(assets, lm_config.max_caption_length, split)
               for split in ("train", "validation")}
    common = dict(lm_config=lm_config, params=lm_params, tokenizer=tokenizer,
                  batch_size=collect_batch_size)
    results_path = os.path.join(out_dir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    for kind, task_factory, source, ceiling, stage in (
            ("preferences", preference_reward_task, feedback.preferences_source,
             preference_ceiling, "preference_reward"),
            ("ratings", quality_reward_task, feedback.ratings_source, quality_ceiling,
             "quality_reward")):
        directories = {}
        for role, panel, split, count, role_seed in (
                # Raters skip ~3% of pairs (the paper's users could too): collect a margin.
                ("train", train_raters, "train", math.ceil(1.06 * max(sizes)), seed),
                ("held_out", held_out_raters, "validation", num_held_out, seed + 1)):
            print(f"== collect {count} {kind}: {role} raters, {split} captions ==", flush=True)
            directories[role] = collection.collect(
                kind, os.path.join(out_dir, "feedback", f"{role}_{kind}"), panel=panel,
                prompts=prompts[split], num_items=count, seed=role_seed, **common)
        held_out = feedback.read_records(directories["held_out"], kind)
        references = results.setdefault(kind, {})
        if "ceiling" not in references:
            references["ceiling"] = ceiling(held_out, prompts["validation"], tokenizer,
                                            train_raters)
        eval_source = source(directories["held_out"], "train", validation_fraction=0.0)
        for size in sizes:
            if str(size) in references:
                continue
            steps = _steps(size, epochs, batch_size, min_steps, max_steps)
            print(f"== {stage} on {size} {kind} ({steps} steps) ==", flush=True)
            with gin.config_scope(stage):
                task = task_factory(
                    train_source=source(directories["train"], "train", validation_fraction=0.0,
                                        max_records=size, seed=seed),
                    eval_source=eval_source)
                state = trainer.train(task=task, workdir=os.path.join(out_dir, f"{stage}_{size}"),
                                      num_steps=steps, batch_size=batch_size)["state"]
            metrics = task.heldout_metrics(state.params, eval_source)
            references[str(size)] = {"steps": steps, **metrics}
            with open(results_path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(results_path + ".tmp", results_path)
    with open(results_path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(results_path + ".tmp", results_path)
    write_report(results, sizes, out_dir)
    print(f"reward scaling: {out_dir}/table.md, curves.png", flush=True)
    return results


def write_report(results: dict, sizes: Sequence[int], out_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    prefs, ratings = results.get("preferences", {}), results.get("ratings", {})
    lines = ["| feedback | preference accuracy [95% CI] | majority | quality Pearson [95% CI] |",
             "|---|---|---|---|"]
    acc_rows, r_rows = [], []
    for size in sizes:
        p, q = prefs.get(str(size)), ratings.get(str(size))
        acc = _accuracy_interval(p) if p else None
        r = (q["pearson"], *pearson_interval(q["pearson"], int(q["num_clips"]))) if q else None
        acc_rows.append(acc)
        r_rows.append(r)
        lines.append(f"| {size} | " + (f"{acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}]" if acc
                                       else "—") + " | "
                     + (f"{p['majority_rate']:.3f}" if p else "—") + " | "
                     + (f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]" if r else "—") + " |")
    for name, ref in (("preferences", prefs.get("ceiling")), ("ratings", ratings.get("ceiling"))):
        if ref:
            lines.append(f"\nPanel ceiling ({name}, {ref['n']} held-out judgements): "
                         f"{ref['value']:.3f} [{ref['low']:.3f}, {ref['high']:.3f}]")
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, ref, title, ylabel in (
            (axes[0], acc_rows, prefs.get("ceiling"), "Preference model", "held-out accuracy"),
            (axes[1], r_rows, ratings.get("ceiling"), "Quality model", "held-out Pearson")):
        xs = [s for s, row in zip(sizes, rows) if row]
        ys = np.array([row for row in rows if row])
        if len(xs):
            ax.errorbar(xs, ys[:, 0], yerr=[ys[:, 0] - ys[:, 1], ys[:, 2] - ys[:, 0]],
                        marker="o", capsize=3, label="reward model")
        if ref:
            ax.axhline(ref["value"], color="green", linestyle="--", label="panel ceiling")
        if title.startswith("Preference") and xs:
            ax.plot(xs, [prefs[str(s)]["majority_rate"] for s in xs], color="gray",
                    linestyle=":", label="majority class")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training judgements")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=120)
    plt.close(fig)


def _accuracy_interval(metrics: dict) -> tuple[float, float, float]:
    n, acc = int(metrics["num_pairs"]), float(metrics["accuracy"])
    rate = raters.win_rate([0] * int(round(acc * n)) + [1] * (n - int(round(acc * n))))
    return rate.rate, rate.low, rate.high
