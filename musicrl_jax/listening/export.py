"""Votes -> `musicrl_preferences` / `musicrl_ratings` shards (musicrl_jax/data/feedback.py).

`export_votes(db, out_dir)` writes

  out_dir/preferences/listening-<db name>.jsonl   one record per vote: caption, caption_tokens,
      tokens_a / tokens_b (the codes of the clips as the listener saw them: A left, B right),
      choice (0: A preferred, 1: B preferred, 0.5: no preference), rater_id (listener id),
      pair_id; plus model_a / model_b and provenance_a / provenance_b (the batch's record of
      the program that made each clip, when it has one), which training ignores
  out_dir/ratings/listening-<db name>.jsonl       one record per 1-5 rating a listener gave:
      clip_id, caption, caption_tokens, audio_codes, rating, rater_id, model_id, provenance

so `preferences_source(directory=out_dir + "/preferences")` and `ratings_source(directory=
out_dir + "/ratings")` read them unchanged. The files are rewritten whole on every export
(they hold every vote so far), so exporting twice never duplicates a record.
"""

from __future__ import annotations

import os
from typing import Any

from musicrl_jax.data import feedback
from musicrl_jax.errors import ConfigError
from musicrl_jax.listening.batch import Batch, load_batch
from musicrl_jax.listening.store import Store
from musicrl_jax.listening.summary import summarize

CHOICE_VALUES = {"a": 0.0, "b": 1.0, "none": 0.5}


def _batches(store: Store, batch_dirs: list[str] | None) -> dict[str, Batch]:
    """Batches by id: the ones given, else the ones the server recorded in the database."""
    paths = batch_dirs if batch_dirs else list(store.batch_paths().values())
    batches = {}
    for path in paths:
        batch = load_batch(path)
        batches[batch.batch_id] = batch
    return batches


def vote_records(votes: list[dict], batches: dict[str, Batch]
                 ) -> tuple[list[dict], list[dict]]:
    """(preference records, rating records) of `votes`, validated by feedback.validate_record."""
    codes_by_batch: dict[str, dict] = {}
    preferences, ratings = [], []
    for vote in votes:
        batch = batches.get(vote["batch_id"])
        if batch is None:
            raise ConfigError(f"vote {vote['vote_id']} is from batch {vote['batch_id']!r}, which "
                              f"is not among the batches given ({sorted(batches)}). Fix: pass "
                              "that batch's directory with --batch.")
        if batch.batch_id not in codes_by_batch:
            codes_by_batch[batch.batch_id] = batch.load_codes()
        codes = codes_by_batch[batch.batch_id]
        pair = batch.pair(vote["pair_id"])
        if pair is None:
            raise ConfigError(f"vote {vote['vote_id']}: pair {vote['pair_id']!r} is not in "
                              f"{batch.directory}. Fix: export with the batch the votes were "
                              "collected on.")
        caption_tokens = list(pair.caption_tokens)
        where = f"vote {vote['vote_id']} (pair {vote['pair_id']})"
        provenance = {side: batch.clip(vote[f"clip_{side}"]).provenance for side in "ab"}
        preferences.append(feedback.validate_record({
            "caption": pair.caption, "caption_tokens": caption_tokens,
            "tokens_a": codes[vote["clip_a"]], "tokens_b": codes[vote["clip_b"]],
            "choice": CHOICE_VALUES[vote["choice"]], "rater_id": vote["listener_id"],
            "pair_id": vote["pair_id"], "model_a": vote["model_a"],
            "model_b": vote["model_b"], "provenance_a": provenance["a"],
            "provenance_b": provenance["b"]}, "preferences", where))
        for side in ("a", "b"):
            if vote[f"rating_{side}"] is None:
                continue
            ratings.append(feedback.validate_record({
                "clip_id": vote[f"clip_{side}"], "caption": pair.caption,
                "caption_tokens": caption_tokens, "audio_codes": codes[vote[f"clip_{side}"]],
                "rating": int(vote[f"rating_{side}"]), "rater_id": vote["listener_id"],
                "model_id": vote[f"model_{side}"], "provenance": provenance[side]},
                "ratings", where))
    return preferences, ratings


def export_votes(db_path: str, out_dir: str, batch_dirs: list[str] | None = None,
                 vote_target: int = 0) -> dict[str, Any]:
    """Writes the shards (see module docstring); returns the summary plus the written paths."""
    if not os.path.exists(db_path):
        raise ConfigError(f"--db {db_path}: no such database. Fix: point --db at the file "
                          "`serve` wrote.")
    store = Store(db_path)
    try:
        votes = store.votes()
        batches = _batches(store, batch_dirs)
    finally:
        store.close()
    if not votes:
        raise ConfigError(f"{db_path} holds no votes yet. Fix: collect some with `serve`.")
    preferences, ratings = vote_records(votes, batches)
    stem = os.path.splitext(os.path.basename(db_path))[0]
    result = summarize(votes, vote_target)
    result["preferences_path"] = feedback.write_jsonl(
        os.path.join(out_dir, "preferences", f"listening-{stem}.jsonl"), preferences)
    result["ratings_path"] = None
    if ratings:
        result["ratings_path"] = feedback.write_jsonl(
            os.path.join(out_dir, "ratings", f"listening-{stem}.jsonl"), ratings)
    result["preference_records"], result["rating_records"] = len(preferences), len(ratings)
    return result
