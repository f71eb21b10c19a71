"""Over-optimisation, measured (issue 14, items 3 and 4): RL runs against a reward (a learnt
reward model, or the gold panel reward of evidence/gold_reward.py) at several KL coefficients,
each checkpoint evaluated against the pretrained LM by the held-out raters on validation
captions. For every (run, checkpoint): the proxy reward (the run's own reward, normalised as
in training), KL to the pretrained LM, and the held-out win rate with its 95% CI. Plots proxy
and held-out curves against KL (Gao et al. 2022) and reports the KL where the held-out win rate
peaks. Resumable: RL checkpoints, and each evaluated checkpoint in results.json.

Run through gin: `python -m musicrl_jax.main --gin_file=evidence/overoptimisation.gin`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Mapping

import gin
import jax
import numpy as np

from evidence.gold_reward import PanelReward
from musicrl_jax import decoding, evaluation, pipeline, raters, rewards
from musicrl_jax.audio.tokenizer import load_tokenizer
from musicrl_jax.checkpoints import Checkpointer
from musicrl_jax.data import tasks
from musicrl_jax.errors import ConfigError
from musicrl_jax.training import reward_tasks, rl, rl_finetune

REFERENCE = "pretrained LM"


def _checkpoint_steps(workdir: str) -> list[int]:
    directory = reward_tasks.checkpoint_directory(workdir, "policy")
    return sorted(Checkpointer(directory).manager.all_steps())


@gin.configurable
def overoptimisation(out_dir: str = gin.REQUIRED, lm_dir: str = gin.REQUIRED,
                     prepare_data: Callable = gin.REQUIRED,
                     register_tasks: Callable = gin.REQUIRED,
                     runs: Mapping[str, Mapping] = gin.REQUIRED,
                     reward_tasks_by_name: Mapping[str, Callable] | None = None,
                     reward_dirs: Mapping[str, str] | None = None,
                     num_steps: int = 60, checkpoint_every: int = 10,
                     num_eval_captions: int = 64, num_raters: int = 40,
                     sampling: decoding.SamplingConfig = decoding.SamplingConfig(),
                     seed: int = 0) -> dict:
    """runs: {name: {"reward": "gold" or a key of reward_dirs, "beta": KL coefficient, and
    optionally "entropy_bonus" (RLConfig.entropy_bonus), "learning_rate" (RL's optimizer,
    `rl/make_optimizer`) and "seed" (train_rl.seed)}}.
    reward_dirs: {reward name: a reward stage's run directory}; reward_tasks_by_name: {reward
    name: its task factory} (e.g. {'preference': @PreferenceRewardTask})."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    assets = prepare_data()
    register_tasks()
    _, lm_config, lm_params, _ = pipeline.pretrained_lm_stage(None, out_dir, lm_dir)
    tokenizer = load_tokenizer(os.path.join(assets, "tokenizer"))
    train_raters, held_out_raters = raters.split_raters(
        raters.RaterPanel.sample(num_raters, seed), 0.3, seed)
    prompts = {split: pipeline.collection_prompts(assets, lm_config.max_caption_length, split)
               for split in ("train", "validation")}
    num_eval_captions = min(num_eval_captions, len(prompts["validation"].captions))
    results_path = os.path.join(out_dir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    reference = evaluation.ModelUnderTest(REFERENCE, lm_config, lm_params, sampling)

    def reward_model(name):
        if name == "gold":
            return PanelReward.from_prompts(lm_config, tokenizer, train_raters,
                                            list(prompts.values()))
        if name not in (reward_dirs or {}) or name not in (reward_tasks_by_name or {}):
            raise ConfigError(f"overoptimisation.runs names the reward {name!r}, which "
                              "reward_dirs and reward_tasks_by_name must both hold. Fix: add "
                              f"it to both, or use 'gold'.")
        return rewards.load_reward_model(task=reward_tasks_by_name[name](),
                                         checkpoint_dir=reward_dirs[name])

    for run_name, spec in runs.items():
        workdir = os.path.join(out_dir, run_name)
        name = spec["reward"]
        model = reward_model(name)

        def combination(model=model, name=name):
            return rewards.RewardCombination(
                rewards={name: model}, weights={name: 1.0},
                stats_path=os.path.join(out_dir, f"reward_stats_{name}.json"),
                reference_source=tasks.seqio_source(split="validation"))

        print(f"== RL {run_name}: reward {name}, beta {spec['beta']} ==", flush=True)
        rl_config = dataclasses.replace(
            rl.RLConfig(), beta=float(spec["beta"]),
            entropy_bonus=float(spec.get("entropy_bonus", rl.RLConfig().entropy_bonus)))
        overrides = {"rl_config": rl_config, "num_steps": num_steps,
                     "checkpoint_every": checkpoint_every,
                     "keep_checkpoints": num_steps // checkpoint_every + 2}
        if "seed" in spec:
            overrides["seed"] = int(spec["seed"])
        if "learning_rate" in spec:
            overrides["optimizer"] = rl_finetune.optimizer_at(float(spec["learning_rate"]))
        rl_finetune.rl_finetune(
            lm_config=lm_config, init_checkpoint=lm_dir, reference_checkpoint=lm_dir,
            rewards=combination, workdir=workdir,
            caption_source=lambda: tasks.prompt_source(split="train"),
            eval_source=lambda: tasks.prompt_source(split="validation"),
            tokenizer_dir=os.path.join(assets, "tokenizer"),
            train_rl_overrides=overrides)
        stats = combination().stats[name]
        score = jax.jit(model.score)
        done = results.setdefault(run_name, {})
        for step in [0] + _checkpoint_steps(workdir):
            if str(step) in done:
                continue
            params = lm_params if step == 0 else rl_finetune.restore_policy_params(
                lm_config, workdir, step=step)
            policy = evaluation.ModelUnderTest(run_name, lm_config, params, sampling)
            print(f"== evaluate {run_name} at step {step} (held-out raters) ==", flush=True)
            report = evaluation.evaluate_models(
                [policy], reference, prompts["validation"], tokenizer, held_out_raters,
                os.path.join(workdir, "heldout_eval", f"step_{step}"),
                num_captions=num_eval_captions, reward_models={name: (score, model.params)},
                seed=seed, num_audio_examples=0)
            wr = report["win_rates"][f"{run_name}|{REFERENCE}"]
            mean, stderr = report["rewards"][run_name][name]
            done[str(step)] = {
                "step": step, "beta": float(spec["beta"]), "reward": name,
                "kl": report["kl"][run_name], "kl_stderr": report["kl_stderr"][run_name],
                "proxy": (mean - stats["mean"]) / stats["std"],
                "proxy_stderr": stderr / stats["std"],
                "win_rate": wr["rate"], "win_rate_low": wr["low"], "win_rate_high": wr["high"],
                "judgements": wr["wins"] + wr["ties"] + wr["losses"]}
            with open(results_path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(results_path + ".tmp", results_path)
    write_report(results, out_dir)
    return results


def peak(points: list[dict]) -> dict:
    """The evaluated checkpoint with the highest held-out win rate."""
    return max(points, key=lambda p: p["win_rate"])


def write_report(results: dict, out_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = ["| run | reward | beta | step | KL | proxy reward (z) | held-out win rate vs "
             "pretrained [95% CI] | judgements |", "|---|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run_name, by_step in results.items():
        points = sorted(by_step.values(), key=lambda p: p["step"])
        for p in points:
            lines.append(f"| {run_name} | {p['reward']} | {p['beta']:g} | {p['step']} | "
                         f"{p['kl']:.2f} | {p['proxy']:+.2f} | {p['win_rate']:.3f} "
                         f"[{p['win_rate_low']:.3f}, {p['win_rate_high']:.3f}] | "
                         f"{p['judgements']} |")
        best = peak(points)
        lines.append(f"| **{run_name}: peak** | | | {best['step']} | {best['kl']:.2f} | | "
                     f"**{best['win_rate']:.3f}** | |")
        kl = np.array([p["kl"] for p in points])
        axes[0].plot(kl, [p["proxy"] for p in points], marker="o", label=run_name)
        axes[1].errorbar(kl, [p["win_rate"] for p in points],
                         yerr=[[p["win_rate"] - p["win_rate_low"] for p in points],
                               [p["win_rate_high"] - p["win_rate"] for p in points]],
                         marker="o", capsize=3, label=run_name)
    axes[0].set_ylabel("proxy reward (z-score, training reward)")
    axes[1].set_ylabel("held-out win rate vs pretrained LM")
    axes[1].axhline(0.5, color="gray", linestyle=":")
    for ax in axes:
        ax.set_xlabel("KL(policy || pretrained LM), nats per clip")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "overoptimisation.png"), dpi=120)
    plt.close(fig)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
