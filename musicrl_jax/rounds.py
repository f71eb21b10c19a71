"""Continuous feedback: one command runs a round of deploy -> listen -> retrain -> RL -> redeploy.

  python -m musicrl_jax.rounds run --gin_file=local/rounds.gin [--round N] [--until STEP]
  python -m musicrl_jax.rounds status --rounds_dir runs/rounds
  python -m musicrl_jax.main --gin_file=local/rounds.gin        (the gin job `feedback_rounds`)

A rounds directory holds the pretrained LM's serving export (`pretrained_lm_export/`, the fixed
yardstick of every batch) and one directory per round:

  round-001/round.json       round number, settings, and the sha256 of every input from outside
                             the round (pretrained LM, deployed policy, previous round's next
                             batch, reward models warm-started from): a rerun on other inputs is
                             refused
  round-001/steps/NN-S.json  one marker per finished step S (written atomically): the sha256 of
                             what it wrote, which the later steps check before reading it
  batch/                     the listening batch served (round 1: two clips of the deployed
                             policy per caption; later rounds: the previous round's next_batch)
  votes.db                   the listening database (people, or the simulated panel over HTTP)
  feedback/                  the votes exported: preferences/, ratings/ (with each clip's
                             provenance)
  preference_reward/, quality_reward/   retrained on this round's votes, warm-started from the
                             previous round's
  policy/                    RL fine-tuning of the deployed policy (KL anchor: the pretrained LM
                             or the deployed policy, `kl_anchor`)
  export/                    the new policy's serving export (the next round's deployed model)
  next_batch/                new policy vs deployed policy, and vs the pretrained LM
  evaluation.json            held-out panel: new policy vs the pretrained LM on held-out
                             captions, win rate with a 95% Wilson interval

Every step resumes: a step without its marker runs again from what it left (training resumes
from its checkpoints, listening from the votes stored, exports are rewritten whole).
`feedback_rounds` runs rounds until `num_rounds` are finished and writes `report.md` and
`win_rates.png` beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from typing import Any, Callable

import gin
import numpy as np

from musicrl_jax.errors import ConfigError, report_user_errors

if __name__ == "__main__":
    # `python -m musicrl_jax.rounds` runs this file as __main__: hand over to the imported
    # module before this copy registers its gin configurables a second time.
    from musicrl_jax.rounds import main
    main(sys.argv[1:])
    sys.exit(0)

PROG = "python -m musicrl_jax.rounds"
FORMAT = "musicrl-feedback-round/1"
STEPS = ("batch", "listen", "export_votes", "rewards", "rl", "serve_export", "next_batch",
         "evaluate")
# What each step reads of the earlier steps' outputs (checked against their markers first).
CONSUMES = {"listen": ("batch",), "export_votes": ("batch", "listen"),
            "rewards": ("export_votes",), "rl": ("rewards",), "serve_export": ("rl",),
            "next_batch": ("serve_export",), "evaluate": ("serve_export",)}
LISTENER_MODES = ("simulated", "people")
KL_ANCHORS = ("pretrained", "previous")
PRETRAINED_ID = "pretrained_lm"
REWARD_KINDS = {"preference": "preferences", "quality": "ratings"}


# --- digests and markers ----------------------------------------------------------------------

def sha256_file(path: str) -> str:
    from musicrl_jax.generate import sha256_file as file_digest
    return file_digest(path)


def sha256_tree(directory: str) -> str:
    """One digest of every file under `directory` (names and contents)."""
    digest = hashlib.sha256()
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode() + b"\0")
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def checkpoint_identity(run_dir: str) -> dict[str, Any]:
    """A policy or reward run's latest checkpoint: its directory, step and sha256."""
    from musicrl_jax.checkpoints import Checkpointer
    from musicrl_jax.training.reward_tasks import checkpoint_directory
    directory = checkpoint_directory(run_dir, "checkpoint")
    probe = Checkpointer(directory)
    try:
        step = probe.latest_step()
    finally:
        probe.close()
    if step is None:
        raise ConfigError(f"No complete checkpoint in {directory}. Fix: train that stage "
                          "first, or correct the path.")
    return {"path": os.path.abspath(run_dir), "step": int(step),
            "sha256": sha256_tree(os.path.join(directory, str(step)))}


def write_json_atomic(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a killed writer leaves the old file or none, never half of one


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def round_dir(rounds_dir: str, number: int) -> str:
    return os.path.join(rounds_dir, f"round-{number:03d}")


def marker_path(directory: str, step: str) -> str:
    return os.path.join(directory, "steps", f"{STEPS.index(step) + 1:02d}-{step}.json")


def read_marker(directory: str, step: str) -> dict | None:
    path = marker_path(directory, step)
    return read_json(path) if os.path.exists(path) else None


def round_finished(directory: str) -> bool:
    return all(read_marker(directory, step) for step in STEPS)


# --- settings and context ---------------------------------------------------------------------

@dataclasses.dataclass
class RoundContext:
    """What every step of every round shares: the data, the LM, the panel, the settings."""
    rounds_dir: str
    assets: str
    pretrained_lm: str
    lm_config: Any
    preference_reward_task: Callable
    quality_reward_task: Callable | None
    reward_weights: dict[str, float]
    kl_anchor: str
    listeners: str
    train_panel: Any
    eval_panel: Any
    num_pairs: int
    votes_per_listener: int
    num_eval_captions: int
    eval_split: str
    temperature: float
    guidance: float
    export_batch_size: int
    seed: int

    @property
    def vote_target(self) -> int:
        return len(self.train_panel) * self.votes_per_listener

    def settings(self) -> dict[str, Any]:
        """What a round is defined by: a rerun with other settings is refused."""
        return {"reward_weights": dict(self.reward_weights), "kl_anchor": self.kl_anchor,
                "listeners": self.listeners, "raters": self.train_panel.rater_ids,
                "held_out_raters": self.eval_panel.rater_ids, "num_pairs": self.num_pairs,
                "votes_per_listener": self.votes_per_listener,
                "sampling": {"temperature": self.temperature, "guidance": self.guidance},
                "num_eval_captions": self.num_eval_captions, "eval_split": self.eval_split,
                "seed": self.seed}


def deployed_policy(ctx: RoundContext, number: int) -> tuple[str, str, str]:
    """(model id, policy run directory, serving export) deployed during round `number`."""
    if number == 1:
        return PRETRAINED_ID, ctx.pretrained_lm, os.path.join(ctx.rounds_dir,
                                                             "pretrained_lm_export")
    previous = round_dir(ctx.rounds_dir, number - 1)
    return (f"round-{number - 1:03d}", os.path.join(previous, "policy"),
            os.path.join(previous, "export"))


def round_inputs(ctx: RoundContext, number: int) -> dict[str, Any]:
    """The sha256 of everything round `number` reads from outside its directory."""
    inputs = {"pretrained_lm": checkpoint_identity(ctx.pretrained_lm)}
    if number > 1:
        previous = round_dir(ctx.rounds_dir, number - 1)
        if not round_finished(previous):
            raise ConfigError(f"Round {number} needs round {number - 1} finished, but "
                              f"{previous} is not (`{PROG} status --rounds_dir "
                              f"{ctx.rounds_dir}` shows where it is). Fix: run round "
                              f"{number - 1} to its end first.")
        inputs["previous_round"] = {
            "path": os.path.abspath(previous),
            "next_batch_sha256": read_marker(previous, "next_batch")["outputs"]["next_batch"],
            "policy": read_marker(previous, "rl")["outputs"]["policy"],
            "export_sha256": read_marker(previous, "serve_export")["outputs"]["export"],
            "rewards": read_marker(previous, "rewards")["outputs"]}
    return inputs


def _describe_difference(recorded: dict, current: dict, prefix: str = "") -> str:
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _describe_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} was {a!r}, now {b!r}"
    return ""


def open_round(ctx: RoundContext, number: int) -> str:
    """Creates round `number`'s directory and round.json, or checks that a rerun has the
    inputs and settings it was started with."""
    directory = round_dir(ctx.rounds_dir, number)
    current = {"format": FORMAT, "round": number, "inputs": round_inputs(ctx, number),
               "settings": ctx.settings()}
    path = os.path.join(directory, "round.json")
    if os.path.exists(path):
        recorded = read_json(path)
        difference = _describe_difference(recorded, current)
        if difference:
            raise ConfigError(
                f"{path}: round {number} was started on other inputs or settings: "
                f"{difference}. Its batch, votes and models belong to those, not to this run's. "
                f"Fix: run the settings it was started with, start a new rounds directory "
                f"(--rounds_dir), or delete {directory} to redo the round.")
        return directory
    os.makedirs(os.path.join(directory, "steps"), exist_ok=True)
    write_json_atomic(path, current)
    return directory


def check_consumed(directory: str, step: str) -> None:
    """The outputs `step` reads are still the ones their steps' markers recorded."""
    for producer in CONSUMES.get(step, ()):
        marker = read_marker(directory, producer)
        for name, recorded in marker["outputs"].items():
            if name not in OUTPUT_DIGESTS:
                continue
            now = OUTPUT_DIGESTS[name](directory)
            if now != recorded:
                raise ConfigError(
                    f"{os.path.join(directory, name)} changed after step {producer!r} "
                    f"finished (its sha256 is {str(now)[:16]}..., "
                    f"{os.path.relpath(marker_path(directory, producer), directory)} recorded "
                    f"{str(recorded)[:16]}...): step {step!r} would read another round's "
                    f"input. Fix: restore it, or delete that marker and the later ones to redo "
                    "those steps.")


def _votes_digest(directory: str) -> str:
    from musicrl_jax.listening.store import Store
    store = Store(os.path.join(directory, "votes.db"))
    try:
        votes = sorted(store.votes(), key=lambda v: v["vote_id"])
    finally:
        store.close()
    return hashlib.sha256(json.dumps(votes, sort_keys=True, default=str).encode()).hexdigest()


OUTPUT_DIGESTS: dict[str, Callable[[str], Any]] = {
    "batch": lambda d: sha256_tree(os.path.join(d, "batch")),
    "votes.db": _votes_digest,
    "feedback": lambda d: sha256_tree(os.path.join(d, "feedback")),
    "preference_reward": lambda d: checkpoint_identity(os.path.join(d, "preference_reward")),
    "quality_reward": lambda d: checkpoint_identity(os.path.join(d, "quality_reward")),
    "policy": lambda d: checkpoint_identity(os.path.join(d, "policy")),
    "export": lambda d: sha256_file(os.path.join(d, "export", "manifest.json")),
}


# --- sampling with provenance -----------------------------------------------------------------

def ensure_export(ctx: RoundContext, run_dir: str, out_dir: str) -> str:
    """The serving export of the policy in `run_dir` at `out_dir` (made once)."""
    from musicrl_jax import export
    if not os.path.exists(os.path.join(out_dir, "manifest.json")):
        shutil.rmtree(out_dir, ignore_errors=True)  # an unfinished export: redone whole
        params, source = export.restore_policy_params(run_dir, ctx.lm_config)
        export.export_policy(params, ctx.lm_config, out_dir, assets_dir=ctx.assets,
                             batch_size=ctx.export_batch_size, source=source)
    return out_dir


def sample_with_provenance(ctx: RoundContext, model_id: str, run_dir: str, artifact_dir: str,
                           prompts, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Codes [n, frames, K] sampled by the serving export for every prompt, and each clip's
    provenance (listening/batch.py's docstring): enough to make the clip again."""
    from musicrl_jax.generate import Artifact
    artifact = Artifact(artifact_dir)
    codes = artifact.sample(np.asarray(prompts.caption_tokens, np.int32), seed=seed,
                            temperature=ctx.temperature, guidance=ctx.guidance)["codes"]
    source = artifact.manifest.get("source", {})
    common = {"model": model_id, "checkpoint": os.path.abspath(run_dir),
              "checkpoint_step": int(source.get("step", -1)), "artifact": artifact.directory,
              "artifact_sha256": sha256_file(os.path.join(artifact_dir, "manifest.json")),
              "seed": seed, "num_samples": len(codes),
              "sampling": {"temperature": ctx.temperature, "guidance": ctx.guidance}}
    return codes, [{**common, "sample_index": i, "caption_id": str(meta["clip_id"])}
                   for i, meta in enumerate(prompts.metas)]


def caption_prompts(ctx: RoundContext, split: str):
    from musicrl_jax.pipeline import collection_prompts
    return collection_prompts(ctx.assets, ctx.lm_config.max_caption_length, split)


def _subset(prompts, indices):
    from musicrl_jax.collection import Prompts
    return Prompts(np.asarray(prompts.caption_tokens)[indices],
                   [prompts.captions[i] for i in indices], [prompts.metas[i] for i in indices])


def round_captions(ctx: RoundContext, number: int):
    """The training captions round `number`'s batch asks about (seeded by the round)."""
    prompts = caption_prompts(ctx, "train")
    rng = np.random.default_rng([ctx.seed, number])
    indices = rng.choice(len(prompts.captions), ctx.num_pairs,
                         replace=ctx.num_pairs > len(prompts.captions))
    return _subset(prompts, indices)


def write_batch(ctx: RoundContext, out_dir: str, batch_id: str, prompts, sides) -> None:
    """A listening batch of pair i = (clip i of side A, clip i of side B); `sides` holds per
    side (model ids [n], codes [n, frames, K], provenance [n])."""
    from musicrl_jax.audio.listen import codes_to_wavs
    from musicrl_jax.audio.tokenizer import load_tokenizer
    from musicrl_jax.listening import batch as batch_lib
    from musicrl_jax.listening.__main__ import _copy_writer
    shutil.rmtree(out_dir, ignore_errors=True)  # an unfinished batch: never served, redone
    tokenizer = load_tokenizer(os.path.join(ctx.assets, "tokenizer"))
    # One model id per side and batch: make_batch's format; mixed sides become two halves.
    halves = {}
    for i in range(len(prompts.captions)):
        halves.setdefault((sides[0][0][i], sides[1][0][i]), []).append(i)
    with tempfile.TemporaryDirectory() as scratch:
        writers = [[], []]
        for side in (0, 1):
            paths = codes_to_wavs(tokenizer, sides[side][1], scratch, prefix=f"side{side}")
            writers[side] = [_copy_writer(p) for p in paths]
        staging = f"{out_dir}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        manifests = []
        for part, ((model_a, model_b), rows) in enumerate(sorted(halves.items())):
            part_dir = os.path.join(staging, f"part{part}")
            made = batch_lib.make_batch(
                part_dir, f"{batch_id}-{part}", [prompts.captions[i] for i in rows],
                [prompts.caption_tokens[i] for i in rows], (model_a, model_b),
                ([sides[0][1][i] for i in rows], [sides[1][1][i] for i in rows]),
                ([writers[0][i] for i in rows], [writers[1][i] for i in rows]),
                ([sides[0][2][i] for i in rows], [sides[1][2][i] for i in rows]))
            manifests.append((part_dir, made))
        merge_batches(staging, batch_id, manifests)
        os.replace(staging, out_dir)


def merge_batches(out_dir: str, batch_id: str, parts) -> None:
    """One batch (manifest, codes, WAVs) in `out_dir` from batches in its subdirectories."""
    from musicrl_jax.listening import batch as batch_lib
    pairs, arrays = [], {}
    for part_dir, made in parts:
        manifest = read_json(os.path.join(part_dir, batch_lib.MANIFEST))
        pairs += manifest["pairs"]
        arrays.update(made.load_codes())
        for clip in (c for p in made.pairs for c in p.clips):
            os.replace(os.path.join(part_dir, clip.wav), os.path.join(out_dir, clip.wav))
        shutil.rmtree(part_dir)
    np.savez(os.path.join(out_dir, batch_lib.CODES_FILE), **arrays)
    write_json_atomic(os.path.join(out_dir, batch_lib.MANIFEST),
                      {"format": batch_lib.FORMAT, "batch_id": batch_id,
                       "codes_file": batch_lib.CODES_FILE, "pairs": pairs})
    batch_lib.load_batch(out_dir)  # the merged batch is a valid one


# --- the steps --------------------------------------------------------------------------------

def step_batch(ctx: RoundContext, number: int, directory: str) -> dict:
    out = os.path.join(directory, "batch")
    if number > 1:
        previous = round_dir(ctx.rounds_dir, number - 1)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(os.path.join(previous, "next_batch"), out)
        if sha256_tree(out) != read_marker(previous, "next_batch")["outputs"]["next_batch"]:
            raise ConfigError(f"{os.path.join(previous, 'next_batch')} is not the batch round "
                              f"{number - 1} made (its sha256 differs from that round's "
                              "marker). Fix: restore it, or rerun that round's next_batch step.")
        return {"batch": sha256_tree(out)}
    # Round 1: two clips of the deployed policy per caption, as MusicRL's users heard.
    model_id, run_dir, artifact = deployed_policy(ctx, number)
    ensure_export(ctx, run_dir, artifact)
    prompts = round_captions(ctx, number)
    sides = [([model_id] * ctx.num_pairs, *sample_with_provenance(
        ctx, model_id, run_dir, artifact, prompts, seed=1000 * number + side)) for side in (1, 2)]
    write_batch(ctx, out, f"round-{number:03d}", prompts, sides)
    return {"batch": sha256_tree(out)}


def _listener_tokens(store, directory: str, rater_ids) -> dict[str, str]:
    """Invite tokens of the simulated listeners, kept in the round directory so a resumed
    round logs the same listeners in (the database keeps only their hashes)."""
    path = os.path.join(directory, "simulated_listeners.json")
    tokens = read_json(path) if os.path.exists(path) else {}
    for rater_id in rater_ids:
        if rater_id not in tokens:
            tokens[rater_id] = store.invite(rater_id)[1]
            write_json_atomic(path, tokens)
    return tokens


def simulate_listening(ctx: RoundContext, batch, db_path: str, directory: str,
                       seed: int) -> dict:
    """The training raters vote through the listening page itself (the same FastAPI app, in
    process): each logs in with an invite link, asks for its next pair, downloads both clips,
    hears the WAVs, rates them and votes, until its quota. Returns the /admin summary."""
    import io

    import soundfile
    from fastapi.testclient import TestClient

    from musicrl_jax import raters
    from musicrl_jax.audio import features
    from musicrl_jax.audio.tokenizer import load_tokenizer
    from musicrl_jax.listening.server import ServerSettings, create_app
    from musicrl_jax.listening.store import Store
    tokenizer = load_tokenizer(os.path.join(ctx.assets, "tokenizer"))
    metas = {m["clip_id"]: m for m in caption_prompts(ctx, "train").metas}
    store = Store(db_path)
    admin_token = os.urandom(16).hex()
    app = create_app(batch, store, ServerSettings(
        admin_token=admin_token, rate_per_second=0, vote_target=ctx.vote_target,
        max_votes_per_listener=ctx.votes_per_listener))
    try:
        tokens = _listener_tokens(store, directory, ctx.train_panel.rater_ids)
        for index, rater in enumerate(ctx.train_panel):
            # Its own cookie jar: one browser per listener.
            client = TestClient(app, follow_redirects=False)
            client.get("/login", params={"token": tokens[rater.rater_id]})
            while True:
                issued = client.get("/api/next").json()
                if issued["done"]:
                    break
                pair = batch.pair(issued["pair_id"])
                # The raters judge what the page plays; the caption's metadata stands for
                # reading the caption.
                meta = metas[pair.clips[0].provenance["caption_id"]]
                waves = [soundfile.read(io.BytesIO(client.get(issued[f"audio_{s}"]).content),
                                        dtype="float32")[0] for s in "ab"]
                attrs = features.batch_attributes(waves, tokenizer.sample_rate, [meta, meta])
                rng = np.random.default_rng([seed, index, zlib.crc32(pair.pair_id.encode())])
                choice = raters.compare(rater, attrs[0], attrs[1], rng)
                # The page has no "skip": a rater who would skip says "no preference".
                vote = {"pair_id": pair.pair_id,
                        "choice": {0: "a", 1: "b"}.get(choice, "none"),
                        "rating_a": raters.rate(rater, attrs[0]),
                        "rating_b": raters.rate(rater, attrs[1])}
                answer = client.post("/api/vote", json=vote,
                                     headers={"X-CSRF-Token": issued["csrf_token"]})
                if answer.status_code not in (200, 201):
                    raise RuntimeError(f"the listening page refused a simulated vote: "
                                       f"{answer.status_code} {answer.text}")
        admin = TestClient(app).get("/admin", params={"format": "json"},
                                    headers={"Authorization": f"Bearer {admin_token}"})
        return admin.json()
    finally:
        store.close()


def step_listen(ctx: RoundContext, number: int, directory: str) -> dict | None:
    from musicrl_jax.listening.batch import load_batch
    from musicrl_jax.listening.store import Store
    from musicrl_jax.listening.summary import summarize
    batch_dir, db_path = os.path.join(directory, "batch"), os.path.join(directory, "votes.db")
    batch = load_batch(batch_dir)
    if ctx.listeners == "simulated":
        summary = simulate_listening(ctx, batch, db_path, directory, ctx.seed + number)
    else:
        store = Store(db_path)
        try:
            store.register_batch(batch.batch_id, batch.directory)
            summary = summarize(store.votes(), ctx.vote_target)
        finally:
            store.close()
        if summary["votes"] < ctx.vote_target:
            print(f"round {number}: {summary['votes']} of {ctx.vote_target} votes so far. "
                  f"Serve the batch to people:\n  python -m musicrl_jax.listening serve "
                  f"--batch {batch_dir} --db {db_path} --vote-target {ctx.vote_target} "
                  f"--max-votes-per-listener {ctx.votes_per_listener}\n(invite listeners "
                  f"with `python -m musicrl_jax.listening invite --db {db_path} --name ...`) "
                  "and rerun this command when the target is reached.", flush=True)
            return None
    return {"votes.db": _votes_digest(directory), "summary": summary}


def step_export_votes(ctx: RoundContext, number: int, directory: str) -> dict:
    from musicrl_jax.listening.export import export_votes
    out = os.path.join(directory, "feedback")
    shutil.rmtree(out, ignore_errors=True)
    result = export_votes(os.path.join(directory, "votes.db"), out,
                          [os.path.join(directory, "batch")], ctx.vote_target)
    return {"feedback": sha256_tree(out), "preference_records": result["preference_records"],
            "rating_records": result["rating_records"]}


def step_rewards(ctx: RoundContext, number: int, directory: str) -> dict:
    from musicrl_jax.data import feedback
    from musicrl_jax.pipeline import train_stage
    outputs = {}
    previous = round_dir(ctx.rounds_dir, number - 1) if number > 1 else None
    for reward, kind in REWARD_KINDS.items():
        factory = (ctx.preference_reward_task if reward == "preference"
                   else ctx.quality_reward_task)
        shards = os.path.join(directory, "feedback", kind)
        if factory is None or not os.path.isdir(shards):
            continue
        stage = f"{reward}_reward"
        source = feedback.preferences_source if kind == "preferences" else (
            feedback.ratings_source)
        warm = os.path.join(previous, stage) if previous else None
        warm = warm if warm and os.path.isdir(warm) else None
        print(f"== round {number}: {stage} on {kind} "
              f"({'from ' + os.path.relpath(warm, ctx.rounds_dir) if warm else 'fresh'}) ==",
              flush=True)
        result = train_stage(stage, lambda: factory(
            train_source=source(shards, "train"), eval_source=source(shards, "validation"),
            warm_start=warm), directory)
        outputs[stage] = checkpoint_identity(os.path.join(directory, stage))
        outputs[f"{stage}_eval"] = {k: float(v) for k, v in result["eval"].items()}
    return outputs


def step_rl(ctx: RoundContext, number: int, directory: str) -> dict:
    from musicrl_jax.pipeline import rl_stages
    marker = read_marker(directory, "rewards")["outputs"]
    tasks = {}
    for reward in ctx.reward_weights:
        stage = f"{reward}_reward"
        if stage not in marker:
            raise ConfigError(f"feedback_rounds.reward_weights names {reward!r}, but round "
                              f"{number} trained no {stage} (no {REWARD_KINDS[reward]} in its "
                              "votes, or no task for it). Fix: drop it from reward_weights.")
        factory = (ctx.preference_reward_task if reward == "preference"
                   else ctx.quality_reward_task)
        with gin.config_scope(stage):
            tasks[stage] = factory()
    _, deployed_dir, _ = deployed_policy(ctx, number)
    reference = ctx.pretrained_lm if ctx.kl_anchor == "pretrained" else deployed_dir
    result = rl_stages(directory, ctx.assets, ctx.lm_config, tasks, {"policy": {
        "rewards": dict(ctx.reward_weights), "init_checkpoint": deployed_dir,
        "reference_checkpoint": reference}}, ctx.pretrained_lm)["policy"]
    summary = result["summary"]
    return {"policy": checkpoint_identity(os.path.join(directory, "policy")),
            "eval_first": summary.get("eval_first", {}), "eval_last": summary.get("eval_last", {}),
            "reference_checkpoint": summary["reference_checkpoint"]}


def step_serve_export(ctx: RoundContext, number: int, directory: str) -> dict:
    out = os.path.join(directory, "export")
    shutil.rmtree(out, ignore_errors=True)
    ensure_export(ctx, os.path.join(directory, "policy"), out)
    return {"export": sha256_file(os.path.join(out, "manifest.json"))}


def step_next_batch(ctx: RoundContext, number: int, directory: str) -> dict:
    """Next round's pairs: the new policy against the deployed one (first half) and against
    the pretrained LM (second half, a yardstick fixed across rounds)."""
    new_id = f"round-{number:03d}"
    deployed_id, deployed_dir, deployed_artifact = deployed_policy(ctx, number)
    pretrained_artifact = ensure_export(ctx, ctx.pretrained_lm,
                                        os.path.join(ctx.rounds_dir, "pretrained_lm_export"))
    prompts = round_captions(ctx, number + 1)
    n, half = ctx.num_pairs, ctx.num_pairs // 2
    base = 1000 * (number + 1)
    new = sample_with_provenance(ctx, new_id, os.path.join(directory, "policy"),
                                 os.path.join(directory, "export"), prompts, base + 1)
    old = sample_with_provenance(ctx, deployed_id, deployed_dir, deployed_artifact,
                                 _subset(prompts, range(half)), base + 2)
    yard = sample_with_provenance(ctx, PRETRAINED_ID, ctx.pretrained_lm, pretrained_artifact,
                                  _subset(prompts, range(half, n)), base + 3)
    other_ids = [deployed_id] * half + [PRETRAINED_ID] * (n - half)
    other_codes = np.concatenate([old[0], yard[0]])
    write_batch(ctx, os.path.join(directory, "next_batch"), f"round-{number + 1:03d}",
                prompts, [([new_id] * n, new[0], new[1]),
                          (other_ids, other_codes, old[1] + yard[1])])
    return {"next_batch": sha256_tree(os.path.join(directory, "next_batch"))}


def step_evaluate(ctx: RoundContext, number: int, directory: str) -> dict:
    """The held-out raters (never voters) compare the new policy with the pretrained LM on
    held-out captions, with common sampling keys; every rater judges every pair."""
    from musicrl_jax import collection, raters
    from musicrl_jax.audio.tokenizer import load_tokenizer
    prompts = caption_prompts(ctx, ctx.eval_split)
    count = min(ctx.num_eval_captions, len(prompts.captions))
    prompts = _subset(prompts, range(count))
    seed = 7 * ctx.seed + 1
    pretrained_artifact = ensure_export(ctx, ctx.pretrained_lm,
                                        os.path.join(ctx.rounds_dir, "pretrained_lm_export"))
    new, _ = sample_with_provenance(ctx, f"round-{number:03d}",
                                    os.path.join(directory, "policy"),
                                    os.path.join(directory, "export"), prompts, seed)
    old, _ = sample_with_provenance(ctx, PRETRAINED_ID, ctx.pretrained_lm, pretrained_artifact,
                                    prompts, seed)
    tokenizer = load_tokenizer(os.path.join(ctx.assets, "tokenizer"))
    attrs = collection.hear(tokenizer, np.concatenate([new, old]), list(prompts.metas) * 2,
                            "waveform")
    choices = []
    for i in range(count):
        choices += raters.compare_all(ctx.eval_panel, attrs[i], attrs[count + i],
                                      seed=ctx.seed * 100_003 + i)
    wr = raters.win_rate(choices)
    result = {"round": number, "model": f"round-{number:03d}", "against": PRETRAINED_ID,
              "split": ctx.eval_split, "captions": count, "raters": len(ctx.eval_panel),
              "win_rate": wr.rate, "low": wr.low, "high": wr.high, "wins": wr.wins,
              "ties": wr.ties, "losses": wr.losses, "skips": wr.skips}
    write_json_atomic(os.path.join(directory, "evaluation.json"), result)
    return {"evaluation": result}


STEP_FUNCTIONS = {"batch": step_batch, "listen": step_listen, "export_votes": step_export_votes,
                  "rewards": step_rewards, "rl": step_rl, "serve_export": step_serve_export,
                  "next_batch": step_next_batch, "evaluate": step_evaluate}


def run_round(ctx: RoundContext, number: int, until: str | None = None) -> bool:
    """Runs round `number`'s unfinished steps in order (through `until`); True when the round
    is finished, False when it stopped early (`until`, or listening still short of votes)."""
    directory = open_round(ctx, number)
    for step in STEPS:
        if read_marker(directory, step) is None:
            check_consumed(directory, step)
            print(f"== round {number}: {step} ==", flush=True)
            start = time.time()
            outputs = STEP_FUNCTIONS[step](ctx, number, directory)
            if outputs is None:
                return False
            write_json_atomic(marker_path(directory, step), {
                "step": step, "round": number, "outputs": outputs,
                "seconds": round(time.time() - start, 2), "finished_unix": time.time()})
        if step == until:
            return round_finished(directory)
    return True


# --- status and report ------------------------------------------------------------------------

def round_numbers(rounds_dir: str) -> list[int]:
    if not os.path.isdir(rounds_dir):
        return []
    return sorted(int(name[6:]) for name in os.listdir(rounds_dir)
                  if name.startswith("round-") and name[6:].isdigit())


def status(rounds_dir: str) -> list[dict]:
    """Per round: each step's state (done with its seconds, or pending) and the votes so far."""
    if not os.path.isdir(rounds_dir):
        raise ConfigError(f"--rounds_dir {rounds_dir}: no such directory. Fix: point it at "
                          f"the directory `{PROG} run` wrote (feedback_rounds.rounds_dir).")
    rows = []
    for number in round_numbers(rounds_dir):
        directory = round_dir(rounds_dir, number)
        steps = {}
        for step in STEPS:
            marker = read_marker(directory, step)
            steps[step] = f"done ({marker['seconds']:.0f} s)" if marker else "pending"
        row = {"round": number, "directory": directory, "steps": steps}
        db = os.path.join(directory, "votes.db")
        if os.path.exists(db):
            from musicrl_jax.listening.store import Store
            store = Store(db)
            try:
                row["votes"] = len(store.votes())
            finally:
                store.close()
            settings = read_json(os.path.join(directory, "round.json"))["settings"]
            row["vote_target"] = len(settings["raters"]) * settings["votes_per_listener"]
        rows.append(row)
    return rows


def format_status(rows: list[dict]) -> str:
    if not rows:
        return "no rounds yet"
    lines = []
    for row in rows:
        pending = [s for s, state in row["steps"].items() if state == "pending"]
        where = "finished" if not pending else f"next step: {pending[0]}"
        lines.append(f"round {row['round']} ({row['directory']}): {where}")
        for step, state in row["steps"].items():
            extra = ""
            if step == "listen" and "votes" in row:
                extra = f"  [{row['votes']} / {row['vote_target']} votes]"
            lines.append(f"  {step:13s} {state}{extra}")
    return "\n".join(lines)


def write_report(rounds_dir: str, numbers: list[int]) -> str:
    """report.md and win_rates.png: per round, the held-out panel's win rate of its policy
    against the pretrained LM (95% Wilson interval), its votes, rewards and step times."""
    from musicrl_jax.evaluation import _pyplot
    rows = []
    for number in numbers:
        directory = round_dir(rounds_dir, number)
        markers = {s: read_marker(directory, s) for s in STEPS}
        rows.append((number, markers))
    lines = ["# Feedback rounds", "",
             "Each round: the deployed policy's batch is served on the listening page, the "
             "training raters vote over HTTP, the votes are exported, the reward models are "
             "retrained (warm-started from the previous round's), the deployed policy is "
             "fine-tuned by RL and exported, and the next batch is made. Win rate: the held-out "
             "raters (who never vote) compare the round's policy with the pretrained LM on "
             "held-out captions (ties count half; 95% Wilson interval).", "",
             "| round | votes | preference reward held-out acc. | RL reward first -> last | "
             "KL to anchor | win rate vs pretrained LM [95% CI] | round time |",
             "|---|---|---|---|---|---|---|"]
    for number, m in rows:
        ev = m["evaluate"]["outputs"]["evaluation"]
        acc = m["rewards"]["outputs"].get("preference_reward_eval", {}).get("accuracy")
        rl = m["rl"]["outputs"]
        seconds = sum(marker["seconds"] for marker in m.values())
        lines.append(
            f"| {number} | {m['listen']['outputs']['summary']['votes']} | "
            f"{'n/a' if acc is None else f'{acc:.3f}'} | "
            f"{rl['eval_first'].get('reward', float('nan')):.3f} -> "
            f"{rl['eval_last'].get('reward', float('nan')):.3f} | "
            f"{rl['eval_last'].get('kl', float('nan')):.2f} | "
            f"{ev['win_rate']:.3f} [{ev['low']:.3f}, {ev['high']:.3f}] "
            f"({ev['wins']}-{ev['ties']}-{ev['losses']}) | {seconds / 60:.1f} min |")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    evals = [m["evaluate"]["outputs"]["evaluation"] for _, m in rows]
    rates = np.array([e["win_rate"] for e in evals])
    ax.errorbar(numbers, rates, yerr=[rates - [e["low"] for e in evals],
                                      [e["high"] for e in evals] - rates],
                fmt="o-", capsize=4)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(numbers)
    ax.set_ylim(0, 1)
    ax.set_xlabel("feedback round")
    ax.set_ylabel("win rate vs pretrained LM")
    ax.set_title("held-out raters, 95% Wilson CI")
    fig.tight_layout()
    fig.savefig(os.path.join(rounds_dir, "win_rates.png"), dpi=120)
    plt.close(fig)
    lines += ["", "![win rate per round](win_rates.png)", ""]
    path = os.path.join(rounds_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# --- the job ----------------------------------------------------------------------------------

def _check_settings(kl_anchor, listeners, num_pairs, votes_per_listener, reward_weights):
    if kl_anchor not in KL_ANCHORS:
        raise ConfigError(f"feedback_rounds.kl_anchor={kl_anchor!r}: expected one of "
                          f"{KL_ANCHORS} (the pretrained LM, or the policy deployed in the "
                          "round).")
    if listeners not in LISTENER_MODES:
        raise ConfigError(f"feedback_rounds.listeners={listeners!r}: expected 'simulated' (the "
                          "rater panel votes over HTTP) or 'people' (a served listening page).")
    if num_pairs < 2 or not 1 <= votes_per_listener <= num_pairs:
        raise ConfigError(f"feedback_rounds.num_pairs={num_pairs} and votes_per_listener="
                          f"{votes_per_listener}: need num_pairs >= 2 and 1 <= "
                          "votes_per_listener <= num_pairs.")
    unknown = [r for r in reward_weights if r not in REWARD_KINDS]
    if unknown or not reward_weights:
        raise ConfigError(f"feedback_rounds.reward_weights={reward_weights!r}: name rewards "
                          f"among {list(REWARD_KINDS)} (trained on the round's votes).")


@gin.configurable
def feedback_rounds(rounds_dir: str = gin.REQUIRED, pretrained_lm: str = gin.REQUIRED,
                    prepare_data: Callable = gin.REQUIRED,
                    register_tasks: Callable = gin.REQUIRED,
                    preference_reward_task: Callable = gin.REQUIRED,
                    quality_reward_task: Callable | None = None,
                    reward_weights: dict | None = None, kl_anchor: str = "pretrained",
                    listeners: str = "simulated", num_raters: int = 20,
                    held_out_fraction: float = 0.3, num_pairs: int = 32,
                    votes_per_listener: int = 8, num_eval_captions: int = 32,
                    eval_split: str = "validation", temperature: float = 1.0,
                    guidance: float = 1.0, export_batch_size: int = 8, seed: int = 0,
                    num_rounds: int = 1, only_round: int | None = None,
                    until: str | None = None) -> list[int]:
    """Runs feedback rounds in `rounds_dir` until `num_rounds` are finished (or only round
    `only_round`, through step `until`); returns the finished rounds. Rewards and RL train with
    the stage files' gin settings (scopes `preference_reward`, `quality_reward`, `train_rl`).
    """
    from musicrl_jax import raters
    from musicrl_jax.models.music_lm import MusicLMConfig
    from musicrl_jax.training import rl_finetune
    reward_weights = dict(reward_weights or {"preference": 1.0})
    _check_settings(kl_anchor, listeners, num_pairs, votes_per_listener, reward_weights)
    if until is not None and until not in STEPS:
        raise ConfigError(f"--until {until!r}: expected one of {list(STEPS)}.")
    rounds_dir = os.path.abspath(rounds_dir)
    os.makedirs(rounds_dir, exist_ok=True)
    assets = prepare_data()
    register_tasks()
    _, _, meta = rl_finetune.policy_checkpoint(pretrained_lm)
    train_panel, eval_panel = raters.split_raters(raters.RaterPanel.sample(num_raters, seed),
                                                  held_out_fraction, seed)
    ctx = RoundContext(
        rounds_dir=rounds_dir, assets=assets, pretrained_lm=os.path.abspath(pretrained_lm),
        lm_config=MusicLMConfig(**meta["model_config"]),
        preference_reward_task=preference_reward_task,
        quality_reward_task=quality_reward_task, reward_weights=reward_weights,
        kl_anchor=kl_anchor, listeners=listeners, train_panel=train_panel,
        eval_panel=eval_panel, num_pairs=num_pairs, votes_per_listener=votes_per_listener,
        num_eval_captions=num_eval_captions, eval_split=eval_split, temperature=temperature,
        guidance=guidance, export_batch_size=export_batch_size, seed=seed)
    if only_round is not None:
        if only_round < 1:
            raise ConfigError(f"--round {only_round}: rounds count from 1.")
        run_round(ctx, only_round, until)
    else:
        for number in range(1, num_rounds + 1):
            if not run_round(ctx, number, until if number == num_rounds else None):
                break
    finished = [n for n in round_numbers(rounds_dir)
                if round_finished(round_dir(rounds_dir, n))]
    if finished:
        print(f"report: {write_report(rounds_dir, finished)}", flush=True)
    print(format_status(status(rounds_dir)), flush=True)
    return finished


# --- CLI --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Feedback rounds: deploy -> listen "
                                     "-> retrain -> RL -> redeploy, one command per round.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) feedback rounds")
    run.add_argument("--gin_file", action="append", default=[], help="e.g. local/rounds.gin")
    run.add_argument("--gin_bindings", action="append", default=[])
    run.add_argument("--rounds_dir", help="default: feedback_rounds.rounds_dir")
    run.add_argument("--num_rounds", type=int, help="default: feedback_rounds.num_rounds")
    run.add_argument("--round", type=int, dest="only_round", help="run only this round")
    run.add_argument("--until", choices=STEPS, help="stop after this step")
    show = commands.add_parser("status", help="where each round is")
    show.add_argument("--rounds_dir", required=True)
    show.add_argument("--json", action="store_true")
    return parser


@report_user_errors(PROG)
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "status":
        rows = status(args.rounds_dir)
        print(json.dumps(rows, indent=1) if args.json else format_status(rows))
        return rows
    from musicrl_jax.main import parse_gin
    if not args.gin_file:
        raise ConfigError("run needs --gin_file (e.g. --gin_file=local/rounds.gin: the data, "
                          "pretrained LM, reward models and RL settings of the rounds).")
    parse_gin(args.gin_file, args.gin_bindings)
    overrides = {k: v for k, v in (("rounds_dir", args.rounds_dir),
                                   ("num_rounds", args.num_rounds),
                                   ("only_round", args.only_round), ("until", args.until))
                 if v is not None}
    return feedback_rounds(**overrides)

