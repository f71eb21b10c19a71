"""Load test of the listening server: many concurrent listeners voting against real uvicorn.

Builds a synthetic batch (short sine clips, random codes), invites `--listeners` listeners,
starts `python -m musicrl_jax.listening serve` on a free loopback port (its own process, so
the clients and the server do not share a GIL, and it can be killed), and lets every listener
log in and vote through the JSON API (GET /api/next, POST /api/vote with the session's CSRF
token) from its own thread until it has cast `--votes // --listeners` votes. Afterwards the
database must hold exactly `--votes` votes, no (listener, pair) twice; prints votes/s (wall
time of the voting phase, logins excluded).

With --kill-at F the server is SIGKILLed once a fraction F of the votes is acknowledged and
started again on the same database; the listeners retry what failed (a vote sent again is
answered as a replay, never stored twice), finish, and each sends its last vote once more.
Every acknowledged vote must then be in the database exactly once, and the export of
`python -m musicrl_jax.listening export` must match the database.

  python benchmarks/listening_load.py                      # 50 listeners, 2,000 votes
  python benchmarks/listening_load.py --listeners 10 --votes 200
  python benchmarks/listening_load.py --kill-at 0.5        # kill and restart mid-load

tests/test_listening.py imports this file for its smaller version and its browser test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from musicrl_jax.audio.synthesis import write_wav  # noqa: E402
from musicrl_jax.listening import batch as batch_lib  # noqa: E402
from musicrl_jax.listening.store import Store  # noqa: E402

SAMPLE_RATE = 16000


def make_demo_batch(out_dir: str, num_pairs: int, seed: int = 0, num_frames: int = 12,
                    num_codebooks: int = 2, codebook_size: int = 32) -> batch_lib.Batch:
    """`num_pairs` pairs of 0.2 s sine clips (model 'base' low notes, model 'tuned' high
    notes) with random codes and caption tokens: enough to exercise serving and export."""
    rng = np.random.default_rng(seed)
    captions = [f"a calm piano piece number {i}" for i in range(num_pairs)]
    caption_tokens = [list(rng.integers(3, 60, 5)) + [1] for _ in range(num_pairs)]
    codes = tuple([rng.integers(0, codebook_size, (num_frames, num_codebooks)) for _ in
                   range(num_pairs)] for _ in range(2))
    t = np.arange(int(0.2 * SAMPLE_RATE)) / SAMPLE_RATE

    def tone(hz):
        return lambda path: write_wav(path, 0.5 * np.sin(2 * np.pi * hz * t), SAMPLE_RATE)

    writers = ([tone(220 + i) for i in range(num_pairs)], [tone(440 + i) for i in
                                                           range(num_pairs)])
    return batch_lib.make_batch(out_dir, os.path.basename(out_dir), captions, caption_tokens,
                                ("base", "tuned"), codes, writers)


def invite(db_path: str, count: int, prefix: str = "listener") -> dict[str, str]:
    """{listener_id: invite token} for `count` new listeners."""
    store = Store(db_path)
    try:
        return dict(store.invite(f"{prefix}-{i:03d}") for i in range(count))
    finally:
        store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m musicrl_jax.listening serve` on a free loopback port, as its own process (so
    the clients and the server do not share a GIL), which can be SIGKILLed and started again
    on the same port and database."""

    def __init__(self, batch_dir: str, db_path: str, admin_token: str = "admin-secret",
                 rate_per_second: float = 0.0, rate_burst: int = 60, log_path: str = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.devnull
        self.command = [sys.executable, "-m", "musicrl_jax.listening", "serve", "--batch",
                        batch_dir, "--db", db_path, "--port", str(self.port),
                        "--rate-per-second", str(rate_per_second), "--rate-burst",
                        str(rate_burst), "--log-level", "warning"]
        self.env = dict(os.environ, MUSICRL_LISTENING_ADMIN_TOKEN=admin_token, PYTHONPATH=REPO)
        self.process = None

    def start(self, timeout_s: float = 60.0) -> None:
        """Starts the server and waits until /healthz answers."""
        with open(self.log_path, "a") as log:  # appends: a restart keeps the first run's log
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} "
                                   f"(log: {self.log_path})")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start within {timeout_s:.0f} s")
            time.sleep(0.1)

    def kill(self) -> int:
        """SIGKILL: no shutdown handler, no flush, as in a crash or an OOM kill."""
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


@contextlib.contextmanager
def running_server(batch_dir: str, db_path: str, admin_token: str = "admin-secret",
                   rate_per_second: float = 0.0, rate_burst: int = 60, log_path: str = None):
    """A started ServerProcess; yields its base URL."""
    server = ServerProcess(batch_dir, db_path, admin_token, rate_per_second, rate_burst,
                           log_path)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


def login(url: str, token: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30.0)
    response = client.get("/login", params={"token": token})
    if response.status_code != 303 or "listening_session" not in client.cookies:
        raise RuntimeError(f"login failed: {response.status_code} {response.text[:200]}")
    return client


def vote_many(client: httpx.Client, count: int, seed: int) -> int:
    """Casts `count` votes (random choice and ratings); returns how many the server took."""
    rng = np.random.default_rng(seed)
    cast = 0
    for _ in range(count):
        pair = client.get("/api/next").json()
        if pair["done"]:
            break
        body = {"pair_id": pair["pair_id"], "choice": str(rng.choice(["a", "b", "none"])),
                "rating_a": int(rng.integers(1, 6)), "rating_b": None}
        response = client.post("/api/vote", json=body,
                               headers={"X-CSRF-Token": pair["csrf_token"]})
        if response.status_code != 201:
            raise RuntimeError(f"vote refused: {response.status_code} {response.text[:200]}")
        cast += 1
    return cast


def _in_threads(work: dict, while_running=None) -> tuple[dict, float]:
    """Runs every `work[key]()` in its own thread, all released at once; `while_running()` (if
    given) runs in this thread meanwhile. Returns ({key: result}, seconds until all finished);
    one failed thread fails the run."""
    results, errors = {}, []
    start = threading.Barrier(len(work) + 1)

    def run(key, task):
        start.wait()
        try:
            results[key] = task()
        except Exception as err:  # reported below
            errors.append(f"{key}: {err!r}")

    threads = [threading.Thread(target=run, args=item) for item in work.items()]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    try:
        if while_running is not None:
            while_running(threads)
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} listeners failed, e.g. {errors[0]}")
    return results, time.perf_counter() - began


def run_load(url: str, tokens: dict[str, str], votes_per_listener: int) -> dict:
    """Every listener votes from its own thread at once; returns counts and votes/s."""
    clients = {lid: login(url, token) for lid, token in tokens.items()}
    try:
        results, seconds = _in_threads({
            lid: (lambda c=client, i=i: vote_many(c, votes_per_listener, i))
            for i, (lid, client) in enumerate(clients.items())})
    finally:
        for client in clients.values():
            client.close()
    total = sum(results.values())
    return {"votes": total, "seconds": seconds, "votes_per_second": total / seconds}


# --- durability: SIGKILL the server mid-load ------------------------------------------------

def _until_answered(send, deadline: float) -> tuple[httpx.Response, int]:
    """(response, attempts): `send()` again after each transport error (the server killed or
    still restarting) until it gets an HTTP answer or `deadline` (time.monotonic) passes."""
    attempts = 0
    while True:
        attempts += 1
        try:
            return send(), attempts
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def send_vote(client: httpx.Client, body: dict, csrf_token: str, deadline: float) -> dict:
    """POSTs a vote, retrying it unchanged through a restart, as a listener's page would; the
    acknowledgment: the body, vote_id, replayed, attempts. Anything but 200/201 is an error."""
    response, attempts = _until_answered(
        lambda: client.post("/api/vote", json=body, headers={"X-CSRF-Token": csrf_token}),
        deadline)
    if response.status_code not in (200, 201):
        raise RuntimeError(f"vote refused: {response.status_code} {response.text[:200]}")
    answer = response.json()
    return {**body, "vote_id": answer["vote_id"], "replayed": answer["replayed"],
            "attempts": attempts}


def vote_through_restarts(client: httpx.Client, count: int, seed: int,
                          acknowledged: list[dict], retry_s: float = 120.0) -> None:
    """Casts `count` votes like vote_many, but rides out a dead server (each request retried
    for up to `retry_s`); appends each acknowledgment to `acknowledged` as it arrives."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        deadline = time.monotonic() + retry_s
        response, _ = _until_answered(lambda: client.get("/api/next"), deadline)
        if response.status_code != 200:
            raise RuntimeError(f"/api/next: {response.status_code} {response.text[:200]}")
        pair = response.json()
        if pair["done"]:
            return
        body = {"pair_id": pair["pair_id"], "choice": str(rng.choice(["a", "b", "none"])),
                "rating_a": int(rng.integers(1, 6)), "rating_b": None}
        acknowledged.append(send_vote(client, body, pair["csrf_token"], deadline))


def run_load_with_kill(server: ServerProcess, tokens: dict[str, str], votes_per_listener: int,
                       kill_at: float, down_s: float = 0.5) -> dict:
    """run_load, but once `kill_at` of the votes are acknowledged the server is SIGKILLed,
    left down for `down_s`, and started again on the same port and database while the
    listeners keep voting (retrying what failed). Afterwards every listener sends its last
    acknowledged vote again, as a client whose answer was lost would. Returns the
    acknowledgments ({listener: [...]}) and the kill's figures."""
    clients = {lid: login(server.url, token) for lid, token in tokens.items()}
    acknowledged = {lid: [] for lid in clients}
    threshold = max(1, int(kill_at * votes_per_listener * len(clients)))
    kill = {}

    def kill_and_restart(threads):
        while sum(map(len, acknowledged.values())) < threshold:
            if not any(t.is_alive() for t in threads):
                raise RuntimeError(f"the load finished before {threshold} votes: lower kill_at")
            time.sleep(0.002)
        kill["acknowledged_before"] = sum(map(len, acknowledged.values()))
        kill["exit_status"] = server.kill()
        time.sleep(down_s)
        began = time.perf_counter()
        server.start()
        kill["restart_s"] = time.perf_counter() - began

    try:
        _, seconds = _in_threads(
            {lid: (lambda c=client, i=i, lid=lid: vote_through_restarts(
                c, votes_per_listener, i, acknowledged[lid]))
             for i, (lid, client) in enumerate(clients.items())}, kill_and_restart)
        for lid, client in clients.items():
            if acknowledged[lid]:
                last = {k: acknowledged[lid][-1][k] for k in ("pair_id", "choice", "rating_a",
                                                              "rating_b")}
                csrf = client.get("/api/next").json()["csrf_token"]
                acknowledged[lid].append(send_vote(client, last, csrf, time.monotonic() + 30))
    finally:
        for client in clients.values():
            client.close()
    acks = [a for votes in acknowledged.values() for a in votes]
    return {"acknowledged": acknowledged, "seconds": seconds, **kill,
            "retried": sum(a["attempts"] > 1 for a in acks),
            "replayed": sum(a["replayed"] for a in acks)}


def export_records(db_path: str, out_dir: str) -> tuple[list[dict], list[dict]]:
    """Runs `python -m musicrl_jax.listening export` and reads back (preferences, ratings)."""
    subprocess.run([sys.executable, "-m", "musicrl_jax.listening", "export", "--db", db_path,
                    "--out", out_dir], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=REPO))
    stem = os.path.splitext(os.path.basename(db_path))[0]
    records = []
    for kind in ("preferences", "ratings"):
        path = os.path.join(out_dir, kind, f"listening-{stem}.jsonl")
        with open(path) if os.path.exists(path) else contextlib.nullcontext([]) as lines:
            records.append([json.loads(line) for line in lines])
    return records[0], records[1]


def check_votes(db_path: str, acknowledged: dict[str, list[dict]], export_dir: str) -> dict:
    """The durability figures: acknowledged (distinct listener/pair with a 200/201), stored
    (rows), duplicates (rows beyond one per listener/pair, plus acknowledgments of one pair
    under two vote ids), lost (acknowledged but missing or stored otherwise), unacknowledged
    (stored, never acknowledged) and export_equal (the export holds exactly the stored votes
    and ratings)."""
    store = Store(db_path)
    try:
        rows = store.votes()
    finally:
        store.close()
    stored = {(r["listener_id"], r["pair_id"]): r for r in rows}
    acked: dict[tuple, dict] = {}
    ack_ids: dict[tuple, set] = {}
    for lid, acks in acknowledged.items():
        for a in acks:
            acked[(lid, a["pair_id"])] = a
            ack_ids.setdefault((lid, a["pair_id"]), set()).add(a["vote_id"])
    lost = sum(key not in stored or (stored[key]["vote_id"], stored[key]["choice"],
                                     stored[key]["rating_a"], stored[key]["rating_b"])
               != (a["vote_id"], a["choice"], a["rating_a"], a["rating_b"])
               for key, a in acked.items())
    preferences, ratings = export_records(db_path, export_dir)
    choice_values = {"a": 0.0, "b": 1.0, "none": 0.5}
    exported = sorted((p["rater_id"], p["pair_id"], p["choice"], p["model_a"], p["model_b"])
                      for p in preferences)
    expected = sorted((r["listener_id"], r["pair_id"], choice_values[r["choice"]],
                       r["model_a"], r["model_b"]) for r in rows)
    exported_ratings = sorted((r["rater_id"], r["clip_id"], r["rating"]) for r in ratings)
    expected_ratings = sorted((r["listener_id"], r[f"clip_{side}"], r[f"rating_{side}"])
                              for r in rows for side in ("a", "b")
                              if r[f"rating_{side}"] is not None)
    return {"acknowledged": len(acked), "stored": len(rows),
            "duplicates": len(rows) - len(stored) + sum(len(i) - 1 for i in ack_ids.values()),
            "lost": lost, "unacknowledged": len(set(stored) - set(acked)),
            "export_equal": exported == expected and exported_ratings == expected_ratings}


def count_votes(db_path: str) -> tuple[int, int]:
    """(votes, distinct (listener, pair)) in the database."""
    store = Store(db_path)
    try:
        votes = store.votes()
    finally:
        store.close()
    return len(votes), len({(v["listener_id"], v["pair_id"]) for v in votes})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listeners", type=int, default=50)
    parser.add_argument("--votes", type=int, default=2000, help="total; split evenly")
    parser.add_argument("--kill-at", "--kill_at", dest="kill_at", type=float,
                        help="SIGKILL the server once this fraction of the votes is "
                        "acknowledged, restart it on the same database, finish the load and "
                        "check every acknowledged vote is stored once and exported")
    parser.add_argument("--workdir", help="default: a temporary directory")
    args = parser.parse_args(argv)
    if args.votes % args.listeners:
        parser.error("--votes must be a multiple of --listeners")
    if args.kill_at is not None and not 0 < args.kill_at < 1:
        parser.error("--kill-at is a fraction of the votes, between 0 and 1 (e.g. 0.5)")
    per_listener = args.votes // args.listeners
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        batch = make_demo_batch(os.path.join(workdir, "load-batch"), per_listener)
        db_path = os.path.join(workdir, "load.db")
        tokens = invite(db_path, args.listeners)
        log_path = os.path.join(workdir, "server.log")
        if args.kill_at is not None:
            return _kill_run(batch, db_path, tokens, per_listener, args, workdir, log_path)
        with running_server(batch.directory, db_path, log_path=log_path) as url:
            result = run_load(url, tokens, per_listener)
        stored, distinct = count_votes(db_path)
    print(f"{args.listeners} listeners cast {result['votes']} votes in {result['seconds']:.2f} s:"
          f" {result['votes_per_second']:.0f} votes/s; database holds {stored} votes "
          f"({distinct} distinct listener/pair)")
    if not stored == distinct == args.votes:
        raise SystemExit(f"FAILED: expected exactly {args.votes} votes, found {stored} "
                         f"({distinct} distinct)")
    return result


def _kill_run(batch, db_path, tokens, per_listener, args, workdir, log_path) -> dict:
    server = ServerProcess(batch.directory, db_path, log_path=log_path)
    try:
        server.start()
        run = run_load_with_kill(server, tokens, per_listener, args.kill_at)
    finally:
        server.stop()
    figures = check_votes(db_path, run["acknowledged"], os.path.join(workdir, "export"))
    print(f"{args.listeners} listeners, {args.votes} votes: server SIGKILLed (exit "
          f"{run['exit_status']}) after {run['acknowledged_before']} acknowledged votes, "
          f"back in {run['restart_s']:.1f} s; load done in {run['seconds']:.1f} s; "
          f"{run['retried']} votes retried through the restart, {run['replayed']} answered "
          "as replays (incl. one resent per listener)")
    print("acknowledged {acknowledged}  stored {stored}  duplicates {duplicates}  lost {lost}  "
          "unacknowledged {unacknowledged}  export equal {export_equal}".format(**figures))
    if not (figures["acknowledged"] == figures["stored"] == args.votes and
            figures["duplicates"] == figures["lost"] == figures["unacknowledged"] == 0 and
            figures["export_equal"]):
        raise SystemExit("FAILED: the database or the export does not hold every acknowledged "
                         "vote exactly once")
    return {**run, **figures}


if __name__ == "__main__":
    main()
