"""`make demo`: the MusicRL recipe end to end at toy scale, every output under one run directory.

Stages: build the music data (corpus, tokenizer, caption vocabulary, TFDS; cached in the data
directory); pretrain the music LM; train the text-adherence reward; the rater panel rates and
compares the pretrained LM's clips and the quality and preference rewards train on that
feedback; RL fine-tuning (MusicRL-R, -U, -RU); the held-out raters compare every policy with the
pretrained LM; the MusicRL-RU policy is exported for serving and generated from in a fresh
process; samples are decoded to WAV and `report.md` sums it up. Each stage resumes from its own
checkpoints or caches, so rerunning the demo continues work.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import gin
import jax
import numpy as np

from musicrl_jax import decoding, partitioning
from musicrl_jax.errors import ConfigError
from musicrl_jax.models import music_lm
from musicrl_jax.training import trainer
from musicrl_jax.training.trainer import eval_history


def check_lm_reads_tempos(config, assets_dir: str) -> None:
    """A beat-rope LM reads caption tempos through the vocabulary's tempo pieces and turns them
    into rotations at the tokenizer's frame rate: both must match, or it learns a wrong clock."""
    if not config.beat_rope_multiples:
        return
    from musicrl_jax.audio.tokenizer import load_tokenizer
    from musicrl_jax.data import vocab
    vocab_dir = os.path.join(assets_dir, "vocab")
    if not vocab.caption_vocabulary_is_current(vocab_dir):
        raise ConfigError(
            f"MusicLMConfig.beat_rope_multiples is set but the caption vocabulary in {vocab_dir} "
            "has no tempo pieces. Fix: rebuild it (prepare_music_data refits it) or set "
            "MusicLMConfig.beat_rope_multiples = ().")
    frame_rate = load_tokenizer(os.path.join(assets_dir, "tokenizer")).frame_rate
    if abs(frame_rate - config.frames_per_second) > 1e-6:
        raise ConfigError(
            f"MusicLMConfig.frames_per_second={config.frames_per_second:g} but the audio "
            f"tokenizer in {assets_dir} makes {frame_rate:g} frames/s. Fix: set "
            f"MusicLMConfig.frames_per_second = {frame_rate:g}.")


def _music_prompts(assets_dir: str, count: int, caption_length: int, vocab_limit: int,
                   split: str):
    from musicrl_jax.data import tasks, vocab
    vocabulary = vocab.load_caption_vocabulary(os.path.join(assets_dir, "vocab"))
    if vocabulary.vocab_size > vocab_limit:
        raise ConfigError(
            f"The caption vocabulary has {vocabulary.vocab_size} pieces but "
            f"MusicLMConfig.caption_vocab_size={vocab_limit}. Fix: raise CAPTION_VOCAB_SIZE.")
    prompts = tasks.prompts(split, caption_length)
    return prompts["caption_tokens"][:count], [str(c) for c in prompts["caption"][:count]]


def _write_audio(assets_dir: str, codes, run_dir: str) -> list[str]:
    from musicrl_jax.audio import listen
    from musicrl_jax.audio.tokenizer import load_tokenizer
    from musicrl_jax.data import corpus
    tokenizer = load_tokenizer(os.path.join(assets_dir, "tokenizer"))
    samples_dir = os.path.join(run_dir, "samples")
    wavs = listen.codes_to_wavs(tokenizer, codes, samples_dir, prefix="pretrained_lm")
    # One real clip through the tokenizer, to hear what the tokens can carry at best.
    clip = corpus.load_manifest(os.path.join(assets_dir, "corpus"), "test")[0]
    listen.round_trip_wav(tokenizer, os.path.join(assets_dir, "corpus", clip.wav), samples_dir)
    return wavs


def pretrained_lm_stage(pretrain_task: Callable, run_dir: str, pretrained_lm: str | None):
    """(pretraining run directory, LM config, params, step): the checkpoint of another
    pretraining run on this data when `pretrained_lm` holds one, else the demo's own
    pretraining in `run_dir/pretrain`."""
    from musicrl_jax.models.music_lm import MusicLMConfig
    from musicrl_jax.training import rl_finetune
    if pretrained_lm and os.path.isdir(os.path.join(pretrained_lm, "checkpoints")):
        directory = os.path.abspath(pretrained_lm)
        _, step, meta = rl_finetune.policy_checkpoint(directory)
        config = MusicLMConfig(**meta["model_config"])
        with gin.config_scope("pretrain"):
            demo_config = MusicLMConfig()
        if (config.num_codebooks, config.codebook_size, config.caption_vocab_size) != (
                demo_config.num_codebooks, demo_config.codebook_size,
                demo_config.caption_vocab_size):
            raise ConfigError(
                f"The pretrained LM in {directory} was trained on {config.num_codebooks} "
                f"codebooks of {config.codebook_size} and {config.caption_vocab_size} caption "
                "pieces, but the demo's data has "
                f"{demo_config.num_codebooks} x {demo_config.codebook_size} and "
                f"{demo_config.caption_vocab_size}. Fix: pretrain that LM on this data, or set "
                "demo.pretrained_lm = None.")
        print(f"== pretrained LM: {directory} (step {step}; demo.pretrained_lm) ==", flush=True)
        return (directory, config,
                rl_finetune.restore_policy_params(config, directory, step=step), step)
    print("== pretrain the music LM ==", flush=True)
    result = train_stage("pretrain", pretrain_task, run_dir)
    return (os.path.join(run_dir, "pretrain"), result["task"].config, result["state"].params,
            result["step"])


def check_same_lm(run_dir: str, pretrain_dir: str, step: int) -> None:
    """Every later stage of a run directory (feedback, rewards, RL) was made from one pretrained
    LM; resuming them on another one would mix the two silently."""
    path = os.path.join(run_dir, "pretrained_lm.json")
    current = {"directory": os.path.abspath(pretrain_dir), "step": int(step)}
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        if recorded != current:
            raise ConfigError(
                f"{run_dir} was made from the pretrained LM {recorded['directory']} at step "
                f"{recorded['step']}, but this run's LM is {current['directory']} at step "
                f"{current['step']} (see {path}). Fix: run the demo in a new run directory "
                "(make demo RUN_DIR=runs/demo2), or delete the old one.")
        return
    with open(path, "w") as f:
        json.dump(current, f)


def train_stage(name: str, task_factory: Callable, run_dir: str) -> dict:
    """Trains one stage in `run_dir/name` under the gin scope `name`, so a run file can set
    e.g. `text_reward/train.num_steps` apart from the other stages."""
    with gin.config_scope(name):
        task = task_factory()
        result = trainer.train(task=task, workdir=os.path.join(run_dir, name))
    return {**result, "task": task}


def collection_prompts(assets_dir: str, caption_length: int, split: str = "train"):
    """A split's captions with the metadata of the clip each was written for."""
    from musicrl_jax.collection import Prompts
    from musicrl_jax.data import corpus, tasks
    prompts = tasks.prompts(split, caption_length)
    clips = {c.clip_id: c for c in corpus.load_manifest(os.path.join(assets_dir, "corpus"))}
    metas = [dataclasses.asdict(clips[str(i)]) for i in prompts["clip_id"]]
    return Prompts(prompts["caption_tokens"], [str(c) for c in prompts["caption"]], metas)


def corpus_renders(assets_dir: str, prompts, count: int) -> list[np.ndarray]:
    """The corpus renders the first `count` prompts' captions were written for: evaluation's
    "original" reference (and, through the tokenizer, its "tokenized" one)."""
    from musicrl_jax.data.musicrl_music import read_wav
    corpus_dir = os.path.join(assets_dir, "corpus")
    return [read_wav(os.path.join(corpus_dir, meta["wav"])) for meta in prompts.metas[:count]]


def feedback_stages(run_dir: str, assets_dir: str, lm_config, lm_params, quality_reward_task,
                    preference_reward_task, *, train_raters, num_ratings: int,
                    num_preference_pairs: int, batch_size: int, seed: int) -> dict:
    """The training raters rate / compare the pretrained LM's clips; the quality and preference
    rewards train on those judgements (the held-out raters never hear these clips)."""
    from musicrl_jax import collection
    from musicrl_jax.audio.tokenizer import load_tokenizer
    from musicrl_jax.data import feedback
    tokenizer = load_tokenizer(os.path.join(assets_dir, "tokenizer"))
    prompts = collection_prompts(assets_dir, lm_config.max_caption_length)
    common = dict(lm_config=lm_config, params=lm_params, tokenizer=tokenizer,
                  panel=train_raters, prompts=prompts, batch_size=batch_size, seed=seed,
                  mesh=partitioning.make_mesh())
    results = {}
    for kind, task_factory, count, source in (
            ("ratings", quality_reward_task, num_ratings, feedback.ratings_source),
            ("preferences", preference_reward_task, num_preference_pairs,
             feedback.preferences_source)):
        if task_factory is None:
            continue
        print(f"== collect {kind} from the rater panel ==", flush=True)
        directory = collection.collect(kind, os.path.join(run_dir, "feedback", kind),
                                       num_items=count, **common)
        stage = "quality_reward" if kind == "ratings" else "preference_reward"
        print(f"== {stage} ==", flush=True)
        results[stage] = train_stage(stage, lambda: task_factory(
            train_source=source(directory, "train"), eval_source=source(directory, "validation")),
            run_dir)
        results[kind] = len(feedback.read_records(directory, kind))
    return results


def rl_stages(run_dir: str, assets_dir: str, lm_config, reward_tasks: dict,
              experiments: dict[str, dict], pretrain_dir: str) -> dict:
    """MusicRL fine-tuning runs, in order: {name: {"rewards": {reward: weight}, "init": stage}}
    where a reward 'text' is the stage `text_reward` trained above and "init" (default
    'pretrain') names the stage whose policy it starts from (MusicRL-RU: 'musicrl_r'), or
    "init_checkpoint" a policy directory elsewhere (a feedback round's deployed policy). The KL
    anchor is the pretrained LM unless "reference_checkpoint" names another policy. Each is
    `rl_finetune` with the demo's gin settings, except an optional "learning_rate" (RL's
    optimizer) per run."""
    from musicrl_jax import rewards as rewards_lib
    from musicrl_jax.data import tasks
    from musicrl_jax.training.rl_finetune import optimizer_at, rl_finetune
    results = {}
    for name, spec in experiments.items():
        weights = dict(spec["rewards"])
        missing = [r for r in weights if f"{r}_reward" not in reward_tasks]
        init = spec.get("init", "pretrain")
        if "init_checkpoint" in spec:
            init, init_checkpoint = spec["init_checkpoint"], spec["init_checkpoint"]
        else:
            init_checkpoint = pretrain_dir if init == "pretrain" else os.path.join(run_dir, init)
        if missing or ("init_checkpoint" not in spec and init != "pretrain"
                       and init not in results):
            raise ConfigError(f"demo.rl_experiments[{name!r}] needs the reward stages "
                              f"{[f'{r}_reward' for r in missing]} and the init stage {init!r} "
                              "to run before it. Fix: enable those stages or reorder.")

        def combination(weights=weights, name=name):
            models = {r: rewards_lib.load_reward_model(
                task=reward_tasks[f"{r}_reward"], checkpoint_dir=os.path.join(run_dir, f"{r}_reward"))
                for r in weights}
            return rewards_lib.RewardCombination(
                rewards=models, weights=weights,
                stats_path=os.path.join(run_dir, name, "reward_stats.json"),
                reference_source=tasks.seqio_source(split="validation"))

        print(f"== RL fine-tuning: {name} (rewards {weights}, from {init}) ==", flush=True)
        results[name] = rl_finetune(
            lm_config=lm_config,
            init_checkpoint=init_checkpoint,
            reference_checkpoint=spec.get("reference_checkpoint", pretrain_dir),
            rewards=combination,
            caption_source=lambda: tasks.prompt_source(split="train"),
            eval_source=lambda: tasks.prompt_source(split="validation"),
            workdir=os.path.join(run_dir, name),
            tokenizer_dir=os.path.join(assets_dir, "tokenizer"),
            train_rl_overrides=({"optimizer": optimizer_at(float(spec["learning_rate"]))}
                                if "learning_rate" in spec else None))
    return results


def serve_stage(run_dir: str, assets_dir: str, lm_config, policy_name: str, policy_params,
                captions: list[str], seed: int,
                sampling: decoding.SamplingConfig = decoding.SamplingConfig()) -> dict:
    """Exports a policy checkpoint for serving and generates from the artifact in fresh
    processes (`python -m musicrl_jax.export` / `generate`, as a user would, with `sampling`),
    then checks that the artifact's codes equal `decoding.sample` from the checkpoint's params
    with that seed; a difference stops the run (a served model that is not the trained one)."""
    import shutil
    import subprocess
    import sys
    out = os.path.join(run_dir, "export")
    artifact, generated = os.path.join(out, policy_name), os.path.join(out, "generated")
    shutil.rmtree(out, ignore_errors=True)  # re-exported from the (resumed) checkpoint
    os.makedirs(out)
    captions_file = os.path.join(out, "captions.txt")
    with open(captions_file, "w") as f:
        f.write("\n".join(captions) + "\n")
    for command in (
            ["-m", "musicrl_jax.export", "--checkpoint_dir", os.path.join(run_dir, policy_name),
             "--assets_dir", assets_dir, "--out", artifact, "--batch_size", str(len(captions)),
             "--top_k", str(sampling.top_k)],
            ["-m", "musicrl_jax.generate", "--artifact", artifact, "--captions_file",
             captions_file, "--out_dir", generated, "--seed", str(seed),
             "--temperature", repr(sampling.temperature),
             "--guidance", repr(sampling.guidance_weight)]):
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"`python {' '.join(command)}` failed (exit {done.returncode}):\n"
                               f"{done.stderr[-3000:]}")
    num_captions = check_served_codes(generated, lm_config, policy_params, seed, sampling,
                                      f"{policy_name}'s checkpoint params")
    size = sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(artifact) for name in names)
    return {"artifact": artifact, "generated": generated, "bytes": size,
            "num_captions": num_captions}


def check_served_codes(generated_dir: str, lm_config, policy_params, seed: int,
                       sampling: decoding.SamplingConfig, what: str) -> int:
    """Raises unless the codes `generate` wrote to `generated_dir` equal `decoding.sample` from
    `policy_params` (described by `what`) with the same seed and sampling; returns the number of
    captions compared."""
    served = np.load(os.path.join(generated_dir, "codes.npz"))
    tokens = served["caption_tokens"]
    expected = decoding.sample(lm_config, policy_params, tokens,
                               decoding.example_rngs(jax.random.PRNGKey(seed), len(tokens)),
                               num_frames=served["codes"].shape[1], sampling=sampling)["codes"]
    differing = int((np.asarray(expected) != served["codes"]).any(axis=(1, 2)).sum())
    if differing:
        raise RuntimeError(
            f"The codes served in {generated_dir} differ from decoding.sample with {what} for "
            f"{differing} of {len(tokens)} captions (seed {seed}, {sampling}): the export does "
            "not serve the trained model.")
    return len(tokens)


RL_DISPLAY_NAMES = {"musicrl_r": "MusicRL-R", "musicrl_u": "MusicRL-U",
                    "musicrl_ru": "MusicRL-RU", "musicrl_u_dpo": "MusicRL-U (DPO)"}


@gin.configurable
def demo(run_dir: str = gin.REQUIRED, pretrain_task: Callable = gin.REQUIRED,
         text_reward_task: Callable | None = None, quality_reward_task: Callable | None = None,
         preference_reward_task: Callable | None = None, dpo_task: Callable | None = None,
         prepare_data: Callable | None = None, register_tasks: Callable | None = None,
         num_raters: int = 40, num_ratings: int = 256, num_preference_pairs: int = 256,
         collect_batch_size: int = 32, num_eval_captions: int = 32,
         num_sample_captions: int = 8, sample_frames: int | None = None,
         rl_experiments: dict[str, dict] | None = None, export_policy: str = "musicrl_ru",
         sampling=decoding.SamplingConfig(),
         sampling_candidates: Sequence[decoding.SamplingConfig] = (),
         num_sampling_captions: int = 64, pretrained_lm: str | None = None,
         eval_split: str = "test", seed: int = 0):
    """Runs the recipe's stages in order. Tasks are factories, called after the data stage so
    that their sources read the freshly built data.

    pretrained_lm: another pretraining run on this data, used instead of the demo's own
    pretraining when it holds a checkpoint. dpo_task: a `DPOTask` factory; when given,
    MusicRL-U is also trained offline by DPO on the panel's preference pairs
    ("musicrl_u_dpo") and evaluated beside the RL policies. sampling_candidates: when given,
    the sampling settings for evaluation and samples are chosen among them (training raters,
    validation captions; `evaluation.choose_sampling`) instead of `sampling`; the evaluation
    runs on `eval_split` captions with the held-out raters."""
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    assets = None
    if prepare_data is not None:
        print("== data: corpus, tokenizer, caption vocabulary, TFDS (cached) ==", flush=True)
        assets = prepare_data()
        register_tasks()
        check_lm_reads_tempos(music_lm.MusicLMConfig(), assets)

    from musicrl_jax import raters
    train_raters, eval_raters = raters.split_raters(raters.RaterPanel.sample(num_raters, seed),
                                                    0.3, seed)
    pretrain_dir, config, lm_params, pretrain_step = pretrained_lm_stage(
        pretrain_task, run_dir, pretrained_lm)
    check_same_lm(run_dir, pretrain_dir, pretrain_step)
    history = eval_history(pretrain_dir)
    first, last = min(history), max(history)

    text_reward = None
    if text_reward_task is not None:
        print("== text-adherence reward (MuLan-style dual encoder) ==", flush=True)
        text_reward = train_stage("text_reward", text_reward_task, run_dir)

    feedback_results = {}
    if assets and (quality_reward_task or preference_reward_task):
        feedback_results = feedback_stages(
            run_dir, assets, config, lm_params, quality_reward_task, preference_reward_task,
            train_raters=train_raters, num_ratings=num_ratings,
            num_preference_pairs=num_preference_pairs, batch_size=collect_batch_size, seed=seed)

    dpo_result = None
    if assets and dpo_task is not None and "preference_reward" in feedback_results:
        from musicrl_jax.data import feedback
        print("== MusicRL-U by DPO on the preference pairs (no reward model, no RL) ==",
              flush=True)
        pairs = os.path.join(run_dir, "feedback", "preferences")
        dpo_result = train_stage("musicrl_u_dpo", lambda: dpo_task(
            train_source=feedback.preferences_source(pairs, "train"),
            eval_source=feedback.preferences_source(pairs, "validation"),
            init_checkpoint=pretrain_dir), run_dir)

    rl_results = {}
    if assets and rl_experiments:
        stages = {"text_reward": text_reward, **feedback_results}
        reward_tasks = {name: stages[name]["task"] for name in
                        ("text_reward", "quality_reward", "preference_reward") if stages.get(name)}
        rl_results = rl_stages(run_dir, assets, config, reward_tasks, rl_experiments,
                               pretrain_dir)

    sampling_rows = []
    if assets and sampling_candidates:
        from musicrl_jax import evaluation
        from musicrl_jax.audio.tokenizer import load_tokenizer
        print("== choose sampling settings (validation captions, training raters) ==",
              flush=True)
        validation = collection_prompts(assets, config.max_caption_length, "validation")
        sampling, sampling_rows = evaluation.choose_sampling(
            evaluation.ModelUnderTest("pretrained LM", config, lm_params), sampling_candidates,
            validation, load_tokenizer(os.path.join(assets, "tokenizer")), train_raters,
            num_captions=min(num_sampling_captions, len(validation.captions)), seed=seed)
        print(f"chose {sampling}", flush=True)

    print("== sample held-out captions ==", flush=True)
    if assets:
        captions, caption_texts = _music_prompts(assets, num_sample_captions,
                                                 config.max_caption_length,
                                                 config.caption_vocab_size, eval_split)
    else:
        eval_source = pretrain_task().eval_source
        captions = next(eval_source.eval_batches(num_sample_captions))["caption_tokens"]
        caption_texts = [" ".join(map(str, c[c > 0])) for c in captions]
    frames = sample_frames or config.max_frames
    samples = decoding.sample(config, lm_params, captions,
                              decoding.example_rngs(jax.random.PRNGKey(seed), len(captions)),
                              num_frames=frames, sampling=sampling)
    codes = np.asarray(samples["codes"])
    samples_dir = os.path.join(run_dir, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    np.savez(os.path.join(samples_dir, "pretrained_lm.npz"), caption_tokens=np.asarray(captions),
             codes=codes, captions=np.array(caption_texts))
    wavs = _write_audio(assets, codes, run_dir) if assets else []

    evaluation_result = None
    if assets:
        from musicrl_jax import evaluation
        from musicrl_jax.audio.tokenizer import load_tokenizer
        print("== evaluate (held-out raters, rewards, KL; original and tokenized references) "
              "==", flush=True)
        reference = evaluation.ModelUnderTest("pretrained LM", config, lm_params, sampling)
        models = [reference] + [
            evaluation.ModelUnderTest(RL_DISPLAY_NAMES.get(name, name), config,
                                      rl_result["policy_params"], sampling)
            for name, rl_result in rl_results.items()]
        if dpo_result:
            models.append(evaluation.ModelUnderTest(RL_DISPLAY_NAMES["musicrl_u_dpo"], config,
                                                    dpo_result["state"].params, sampling))
        stages = {"text_reward": text_reward, **feedback_results}
        reward_models = {name: (jax.jit(stages[name]["task"].score), stages[name]["state"].params)
                         for name in ("text_reward", "quality_reward", "preference_reward")
                         if stages.get(name)}
        eval_prompts = collection_prompts(assets, config.max_caption_length, eval_split)
        num_eval = min(num_eval_captions, len(eval_prompts.captions))
        evaluation_result = evaluation.evaluate_models(
            models, reference, eval_prompts, load_tokenizer(os.path.join(assets, "tokenizer")),
            eval_raters, os.path.join(run_dir, "evaluation"), num_captions=num_eval,
            reward_models=reward_models, seed=seed,
            reference_audio=corpus_renders(assets, eval_prompts, num_eval))

    serving = None
    if assets and rl_results and export_policy:
        name = export_policy if export_policy in rl_results else list(rl_results)[-1]
        print(f"== export {name} for serving; generate from the artifact ==", flush=True)
        serving = serve_stage(run_dir, assets, config, name, rl_results[name]["policy_params"],
                              caption_texts[:4], seed)
        serving["name"] = RL_DISPLAY_NAMES.get(name, name)

    mesh = partitioning.make_mesh()
    report = [
        "# musicrl_jax demo report", "",
        f"Devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}", "",
    ]
    if assets:
        build = json.load(open(os.path.join(assets, "corpus", "build_log.json")))
        report += [
            "## Data", "",
            f"- corpus: {build['clips']} clips ({build['clips_per_split']}), "
            f"{build['distinct_captions']} distinct captions, "
            f"{len(build.get('styles', {}))} styles, {len(build.get('instruments', {}))} "
            f"instruments -> `{os.path.join(assets, 'corpus')}`",
            f"- audio tokenizer, caption vocabulary: `{assets}`",
            "- tokenizer round trip of a test clip: `samples/*.original.wav` vs "
            "`samples/*.tokenized_000.wav`", ""]
    report += [
        "## Pretraining (music LM, next-token loss)", "",
        f"- steps: {pretrain_step}" + (
            "" if pretrain_dir == os.path.join(run_dir, "pretrain")
            else f" (demo.pretrained_lm: `{pretrain_dir}`)"),
        f"- validation loss: {history[first]['loss']:.4f} (step {first}) -> "
        f"{history[last]['loss']:.4f} (step {last})",
        f"- checkpoints: `{os.path.join(pretrain_dir, 'checkpoints')}`", "",
    ]
    if text_reward:
        metrics = text_reward["eval"]
        report += [
            "## Text-adherence reward (contrastive dual encoder; reward = cosine)", "",
            f"- steps: {text_reward['step']}; held-out retrieval over "
            f"{metrics.get('num_captions', 0):.0f} captions: "
            + ", ".join(f"{k} {metrics[k]:.3f}" for k in sorted(metrics) if "recall" in k
                        or "chance" in k),
            f"- checkpoints: `{os.path.join(run_dir, 'text_reward', 'checkpoints')}`", ""]
    if feedback_results:
        report += [f"## Feedback from the rater panel ({len(train_raters)} "
                   f"training raters; {len(eval_raters)} held out for "
                   "evaluation)", ""]
        if "quality_reward" in feedback_results:
            m = feedback_results["quality_reward"]["eval"]
            report.append(f"- {feedback_results['ratings']} ratings of pretrained-LM clips -> "
                          f"quality reward: held-out Pearson {m.get('pearson', float('nan')):.3f}, "
                          f"Spearman {m.get('spearman', float('nan')):.3f}")
        if "preference_reward" in feedback_results:
            m = feedback_results["preference_reward"]["eval"]
            report.append(f"- {feedback_results['preferences']} preference pairs -> preference "
                          f"reward: held-out accuracy {m.get('accuracy', float('nan')):.3f} "
                          f"(majority class {m.get('majority_rate', float('nan')):.3f}), ECE "
                          f"{m.get('ece', float('nan')):.3f}")
        report.append(f"- feedback shards: `{os.path.join(run_dir, 'feedback')}`")
        report.append("")
    if rl_results:
        report += ["## RL fine-tuning (KL-regularised policy gradient; held-out captions)", ""]
        for name, rl_result in rl_results.items():
            summary = rl_result["summary"]
            first, last = summary.get("eval_first", {}), summary.get("eval_last", {})
            own = ", ".join(f"{r} {first.get(f'reward/{r}', float('nan')):.3f} -> "
                            f"{last.get(f'reward/{r}', float('nan')):.3f}"
                            for r in summary["rewards"])
            report.append(
                f"- {RL_DISPLAY_NAMES.get(name, name)}: {summary['step']} steps from "
                f"`{os.path.relpath(summary['init_checkpoint'], run_dir)}`; own reward "
                f"(normalised sum) {first.get('reward', float('nan')):.3f} (step "
                f"{first.get('step', 0)}) -> {last.get('reward', float('nan')):.3f} (step "
                f"{last.get('step', 0)}); raw: {own}; KL to the pretrained LM "
                f"{last.get('kl', float('nan')):.2f} nats; "
                f"{summary['train'].get('samples_per_sec', float('nan')):.1f} samples/s -> "
                f"`{name}/` (metrics.jsonl, tensorboard, samples/)")
        report.append("")
    if dpo_result:
        m, task = dpo_result["eval"], dpo_result["task"]
        report += ["## MusicRL-U by DPO (offline, on the panel's preference pairs)", "",
                   f"- {task.loss_type}, beta {task.beta}: {dpo_result['step']} steps from the "
                   f"pretrained LM (also its reference); held-out pairs: agreement with the "
                   f"panel {m.get('agreement', float('nan')):.3f}, loss "
                   f"{m.get('loss', float('nan')):.3f}, mean margin "
                   f"{m.get('margin', float('nan')):.3f} nats -> `musicrl_u_dpo/`", ""]
    if sampling_rows:
        shown = [k for k in sampling_rows[0] if k not in ("top_k",)]
        report += ["## Sampling settings (validation captions, training raters' mean utility)",
                   "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
        report += ["| " + " | ".join(f"{row[k]:.3g}" for k in shown) + " |"
                   for row in sampling_rows]
        report += ["", f"Chosen: {sampling}", ""]
    if evaluation_result:
        report += ["## Side-by-side evaluation (held-out raters, rewards, KL)", "",
                   "- report: `evaluation/report.html` (`evaluation/report.md`)", ""]
        with open(os.path.join(run_dir, "evaluation", "report.md")) as f:
            # Demoted headings, and links made relative to the run directory.
            report += [(line.replace("## ", "### ", 1) if line.startswith("## ") else line)
                       .replace("](", "](evaluation/") for line in f.read().splitlines()[1:]]
        report.append("")
    if serving:
        report += [
            f"## Serving export ({serving['name']})", "",
            f"- artifact (jax.export StableHLO sampler + weights + tokenizer + vocabulary): "
            f"`{os.path.relpath(serving['artifact'], run_dir)}`, "
            f"{serving['bytes'] / 2**20:.1f} MiB",
            f"- `python -m musicrl_jax.generate` in a fresh process, {serving['num_captions']} "
            f"captions -> `{os.path.relpath(serving['generated'], run_dir)}/`; codes identical "
            f"to sampling from the checkpoint with the same seed: "
            "**yes**", ""]
    report += [
        "## Samples from the pretrained LM", "",
        f"{len(captions)} held-out captions x {frames} frames x {config.num_codebooks} codebooks "
        f"(KV-cache sampling, {sampling}) -> `samples/pretrained_lm.npz`", "",
    ]
    for i, text in enumerate(caption_texts):
        report.append(f"- {text}" + (f" -> `samples/{os.path.basename(wavs[i])}`" if wavs else ""))
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("\n".join(report))
    print(f"\nRun directory: {run_dir}")
    return run_dir
