"""The headline table (issue 14, item 5): MusicRL-R, -U and -RU against the pretrained LM, and
RU against R, judged by the held-out raters on held-out (test) captions, over several seeds.

Per seed, the three policies are fine-tuned as in the demo (`pipeline.rl_stages`: R on the
text-adherence and quality rewards, U on the preference reward, RU = U started from R; the KL
anchor is always the pretrained LM) with the RL seed set to that seed, from reward models
trained elsewhere (`reward_dirs`, e.g. the largest of evidence/reward_scaling.gin); only the
text-adherence reward trains here when it is not given. Each seed's policies are then compared
side by side on `num_eval_captions` test captions (`evaluation.evaluate_models`, one
judgement per caption and pair, sampling keys shared across systems). The table gives each
seed's win rate and the pooled one, each with its 95% Wilson interval.

Resumable: RL runs resume from their checkpoints and a seed's finished evaluation is read
back from its results.json. Run through gin: `python -m musicrl_jax.main
--gin_file=evidence/headline.gin`.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping, Sequence

import gin

from musicrl_jax import decoding, evaluation, pipeline, raters
from musicrl_jax.audio.tokenizer import load_tokenizer
from musicrl_jax.errors import ConfigError

REFERENCE = "pretrained LM"
DEFAULT_COMPARISONS = (("MusicRL-R", REFERENCE), ("MusicRL-U", REFERENCE),
                       ("MusicRL-RU", REFERENCE), ("MusicRL-RU", "MusicRL-R"))


def pooled_win_rate(per_seed: Sequence[Mapping]) -> raters.WinRate:
    """One win rate over the judgements of all seeds (each a WinRate-like mapping with wins,
    ties, losses), with its Wilson interval."""
    choices = []
    for counts in per_seed:
        choices += [0] * int(counts["wins"]) + [0.5] * int(counts["ties"])
        choices += [1] * int(counts["losses"])
    return raters.win_rate(choices)


def _link_reward(run_dir: str, name: str, source: str) -> None:
    """run_dir/{name}_reward -> source, where `pipeline.rl_stages` looks for the reward."""
    link = os.path.join(run_dir, f"{name}_reward")
    source = os.path.abspath(source)
    if os.path.islink(link) and os.readlink(link) != source:
        os.remove(link)
    if not os.path.lexists(link):
        os.symlink(source, link)


@gin.configurable
def headline(out_dir: str = gin.REQUIRED, lm_dir: str = gin.REQUIRED,
             prepare_data: Callable = gin.REQUIRED, register_tasks: Callable = gin.REQUIRED,
             reward_tasks: Mapping[str, Callable] = gin.REQUIRED,
             reward_dirs: Mapping[str, str] = gin.REQUIRED,
             experiments: Mapping[str, Mapping] = gin.REQUIRED,
             display_names: Mapping[str, str] | None = None,
             comparisons: Sequence[Sequence[str]] = DEFAULT_COMPARISONS,
             seeds: Sequence[int] = (0, 1), num_eval_captions: int = 240,
             eval_split: str = "test", num_raters: int = 40, panel_seed: int = 0,
             sampling: decoding.SamplingConfig = decoding.SamplingConfig()) -> dict:
    """reward_tasks: {reward name ('text', 'quality', 'preference'): task factory};
    reward_dirs: {reward name: a trained reward's run directory}; a reward in reward_tasks but
    not in reward_dirs trains here (stage `{name}_reward`, e.g. the text-adherence reward on
    the corpus). experiments: as `demo.rl_experiments`."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.isdir(os.path.join(lm_dir, "checkpoints")):
        raise ConfigError(f"headline.lm_dir={lm_dir}: no pretraining checkpoints there. Fix: "
                          "run `make demo` (its LM is runs/demo/pretrain) or point lm_dir at "
                          "another pretraining run on this data.")
    missing = [d for d in (reward_dirs or {}).values()
               if not os.path.isdir(os.path.join(d, "checkpoints"))]
    if missing:
        raise ConfigError(f"headline.reward_dirs: no reward checkpoints in {missing}. Fix: run "
                          "the study that trains them first (make evidence runs "
                          "evidence/reward_scaling.gin before this one).")
    display_names = dict(display_names or pipeline.RL_DISPLAY_NAMES)
    assets = prepare_data()
    register_tasks()
    _, lm_config, lm_params, _ = pipeline.pretrained_lm_stage(None, out_dir, lm_dir)
    tokenizer = load_tokenizer(os.path.join(assets, "tokenizer"))
    _, held_out_raters = raters.split_raters(raters.RaterPanel.sample(num_raters, panel_seed),
                                             0.3, panel_seed)
    prompts = pipeline.collection_prompts(assets, lm_config.max_caption_length, eval_split)
    num_eval_captions = min(num_eval_captions, len(prompts.captions))

    reward_sources = dict(reward_dirs)
    for name, factory in reward_tasks.items():
        if name not in reward_sources:
            print(f"== {name}_reward ==", flush=True)
            pipeline.train_stage(f"{name}_reward", factory, out_dir)
            reward_sources[name] = os.path.join(out_dir, f"{name}_reward")
    tasks_by_stage = {f"{name}_reward": factory() for name, factory in reward_tasks.items()}

    per_seed = {}
    for seed in seeds:
        run_dir = os.path.join(out_dir, f"seed_{seed}")
        os.makedirs(run_dir, exist_ok=True)
        for name, source in reward_sources.items():
            _link_reward(run_dir, name, source)
        results_path = os.path.join(run_dir, "evaluation", "results.json")
        if os.path.exists(results_path):
            with open(results_path) as f:
                per_seed[seed] = json.load(f)["win_rates"]
            continue
        with gin.unlock_config():
            gin.bind_parameter("train_rl.seed", seed)
        policies = pipeline.rl_stages(run_dir, assets, lm_config, tasks_by_stage, experiments,
                                      lm_dir)
        reference = evaluation.ModelUnderTest(REFERENCE, lm_config, lm_params, sampling)
        models = [reference] + [
            evaluation.ModelUnderTest(display_names.get(name, name), lm_config,
                                      result["policy_params"], sampling)
            for name, result in policies.items()]
        print(f"== seed {seed}: held-out raters judge {num_eval_captions} {eval_split} "
              "captions ==", flush=True)
        report = evaluation.evaluate_models(
            models, reference, prompts, tokenizer, held_out_raters,
            os.path.join(run_dir, "evaluation"), num_captions=num_eval_captions, seed=seed,
            num_audio_examples=2)
        per_seed[seed] = report["win_rates"]

    table = {}
    for a, b in comparisons:
        key = f"{a}|{b}"
        rows = [per_seed[s][key] for s in seeds if key in per_seed[s]]
        if len(rows) != len(seeds):
            raise ConfigError(f"headline.comparisons names {a!r} vs {b!r}, which the "
                              "evaluation did not judge. Fix: compare systems that "
                              f"headline.experiments trains ({sorted(display_names.values())}) "
                              f"or {REFERENCE!r}.")
        pooled = pooled_win_rate(rows)
        table[key] = {"seeds": {str(s): r for s, r in zip(seeds, rows)},
                      "pooled": {"rate": pooled.rate, "low": pooled.low, "high": pooled.high,
                                 "judgements": pooled.n}}
    with open(os.path.join(out_dir, "results.json.tmp"), "w") as f:
        json.dump(table, f, indent=1)
    os.replace(os.path.join(out_dir, "results.json.tmp"), os.path.join(out_dir, "results.json"))
    write_table(table, seeds, out_dir)
    print(f"headline: {out_dir}/table.md", flush=True)
    return table


def write_table(table: Mapping, seeds: Sequence[int], out_dir: str) -> None:
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| comparison (held-out raters, test captions) | {head} | pooled [95% CI] | "
             "judgements |", "|---|" + "---|" * len(seeds) + "---|---|"]
    for key, row in table.items():
        a, b = key.split("|")
        cells = " | ".join(f"{r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"
                           for r in row["seeds"].values())
        p = row["pooled"]
        lines.append(f"| {a} vs {b} | {cells} | **{p['rate']:.3f}** [{p['low']:.3f}, "
                     f"{p['high']:.3f}] | {p['judgements']} |")
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
