"""What the collected votes say: votes per listener, agreement between listeners on shared
pairs, per-model win rates (with Wilson intervals), mean ratings and, when a round sets one,
progress toward its vote target."""

from __future__ import annotations

import collections
import math
from typing import Any, Iterable

from musicrl_jax import raters


def _chosen_clip(vote: dict) -> str | None:
    return {"a": vote["clip_a"], "b": vote["clip_b"]}.get(vote["choice"])


def agreement(votes: Iterable[dict]) -> dict[str, Any]:
    """Over every pair two or more listeners judged decisively (A or B), the fraction of
    listener pairs that chose the same clip: the definition of `raters.agreement`, applied to
    real votes. Compared by clip, not by side, since each listener saw their own A/B order."""
    by_pair: dict[str, list[str]] = collections.defaultdict(list)
    for vote in votes:
        chosen = _chosen_clip(vote)
        if chosen is not None:
            by_pair[vote["pair_id"]].append(chosen)
    agree = total = 0
    shared = 0
    for chosen in by_pair.values():
        k = len(chosen)
        if k < 2:
            continue
        shared += 1
        counts = collections.Counter(chosen)
        agree += sum(c * (c - 1) // 2 for c in counts.values())
        total += k * (k - 1) // 2
    return {"rate": agree / total if total else None, "listener_pairs": total,
            "shared_pairs": shared}


def model_win_rates(votes: Iterable[dict]) -> dict[str, dict[str, Any]]:
    """Per model, its win rate against whatever it was paired with ('no preference' is half a
    win, as in `raters.win_rate`), with a 95% Wilson interval."""
    choices: dict[str, list] = collections.defaultdict(list)
    for vote in votes:
        if vote["model_a"] == vote["model_b"]:
            continue  # a model against itself says nothing about either
        outcome = {"a": (0, 1), "b": (1, 0), "none": (raters.TIE, raters.TIE)}[vote["choice"]]
        choices[vote["model_a"]].append(outcome[0])
        choices[vote["model_b"]].append(outcome[1])
    result = {}
    for model, model_choices in sorted(choices.items()):
        wr = raters.win_rate(model_choices)
        result[model] = {"rate": wr.rate, "low": wr.low, "high": wr.high, "wins": wr.wins,
                         "ties": wr.ties, "losses": wr.losses, "n": wr.n}
    return result


def mean_ratings(votes: Iterable[dict]) -> dict[str, dict[str, Any]]:
    ratings: dict[str, list[int]] = collections.defaultdict(list)
    for vote in votes:
        for side in ("a", "b"):
            if vote[f"rating_{side}"] is not None:
                ratings[vote[f"model_{side}"]].append(int(vote[f"rating_{side}"]))
    return {m: {"mean": sum(r) / len(r), "n": len(r)} for m, r in sorted(ratings.items())}


def summarize(votes: list[dict], vote_target: int = 0) -> dict[str, Any]:
    """vote_target > 0 (a feedback round's target) adds the share of it collected so far."""
    per_listener = collections.Counter(v["listener_id"] for v in votes)
    summary = {"votes": len(votes), "votes_per_listener": dict(sorted(per_listener.items())),
               "agreement": agreement(votes), "win_rates": model_win_rates(votes),
               "ratings": mean_ratings(votes)}
    if vote_target > 0:
        summary["vote_target"] = vote_target
        summary["progress"] = min(1.0, len(votes) / vote_target)
    return summary


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"votes: {summary['votes']} from {len(summary['votes_per_listener'])} listeners"]
    if summary.get("vote_target"):
        lines.append(f"progress toward the round's target: {summary['votes']} / "
                     f"{summary['vote_target']} votes ({_pct(summary['progress'])})")
    for listener, count in summary["votes_per_listener"].items():
        lines.append(f"  {listener}: {count}")
    ag = summary["agreement"]
    lines.append(f"agreement between listeners: {_pct(ag['rate'])} over {ag['listener_pairs']} "
                 f"listener pairs on {ag['shared_pairs']} shared pairs")
    lines.append("win rate per model (no preference = half a win; 95% Wilson interval):")
    for model, wr in summary["win_rates"].items():
        lines.append(f"  {model}: {_pct(wr['rate'])} [{_pct(wr['low'])}, {_pct(wr['high'])}] "
                     f"({wr['wins']} wins, {wr['ties']} ties, {wr['losses']} losses)")
    if summary["ratings"]:
        lines.append("mean rating per model (1-5):")
        for model, r in summary["ratings"].items():
            lines.append(f"  {model}: {r['mean']:.2f} (n={r['n']})")
    return "\n".join(lines)
