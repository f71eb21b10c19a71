"""Load test of the listening server: many concurrent listeners voting against real uvicorn.

Builds a synthetic batch (short sine clips, random codes), invites `--listeners` listeners,
starts `python -m musicrl_jax.listening serve` on a free loopback port (its own process, so
the clients and the server do not share a GIL), and lets every listener log in and vote
through the JSON API (GET /api/next, POST /api/vote with the session's CSRF token) from its
own thread until it has cast `--votes // --listeners` votes. Afterwards the database must hold
exactly `--votes` votes, no (listener, pair) twice; prints votes/s (wall time of the voting
phase, logins excluded).

  python benchmarks/listening_load.py                      # 50 listeners, 2,000 votes
  python benchmarks/listening_load.py --listeners 10 --votes 200

tests/test_listening.py imports this file for its smaller version and its browser test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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


@contextlib.contextmanager
def running_server(batch_dir: str, db_path: str, admin_token: str = "admin-secret",
                   rate_per_second: float = 0.0, rate_burst: int = 60, log_path: str = None):
    """`python -m musicrl_jax.listening serve` on a free loopback port; yields its base URL."""
    port = free_port()
    env = dict(os.environ, MUSICRL_LISTENING_ADMIN_TOKEN=admin_token, PYTHONPATH=REPO)
    log = open(log_path or os.devnull, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "musicrl_jax.listening", "serve", "--batch", batch_dir, "--db",
         db_path, "--port", str(port), "--rate-per-second", str(rate_per_second),
         "--rate-burst", str(rate_burst), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode} (log: {log_path})")
            try:
                if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 60 s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


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


def run_load(url: str, tokens: dict[str, str], votes_per_listener: int) -> dict:
    """Every listener votes from its own thread at once; returns counts and votes/s."""
    clients = {lid: login(url, token) for lid, token in tokens.items()}
    results, errors = {}, []
    start = threading.Barrier(len(clients) + 1)

    def listener(lid, client, seed):
        start.wait()
        try:
            results[lid] = vote_many(client, votes_per_listener, seed)
        except Exception as err:  # reported below: one failed listener fails the run
            errors.append(f"{lid}: {err!r}")

    threads = [threading.Thread(target=listener, args=(lid, c, i))
               for i, (lid, c) in enumerate(clients.items())]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    for client in clients.values():
        client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} listeners failed, e.g. {errors[0]}")
    total = sum(results.values())
    return {"votes": total, "seconds": seconds, "votes_per_second": total / seconds}


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
    parser.add_argument("--workdir", help="default: a temporary directory")
    args = parser.parse_args(argv)
    if args.votes % args.listeners:
        parser.error("--votes must be a multiple of --listeners")
    per_listener = args.votes // args.listeners
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        batch = make_demo_batch(os.path.join(workdir, "load-batch"), per_listener)
        db_path = os.path.join(workdir, "load.db")
        tokens = invite(db_path, args.listeners)
        with running_server(batch.directory, db_path,
                            log_path=os.path.join(workdir, "server.log")) as url:
            result = run_load(url, tokens, per_listener)
        stored, distinct = count_votes(db_path)
    print(f"{args.listeners} listeners cast {result['votes']} votes in {result['seconds']:.2f} s:"
          f" {result['votes_per_second']:.0f} votes/s; database holds {stored} votes "
          f"({distinct} distinct listener/pair)")
    if not stored == distinct == args.votes:
        raise SystemExit(f"FAILED: expected exactly {args.votes} votes, found {stored} "
                         f"({distinct} distinct)")
    return result


if __name__ == "__main__":
    main()
