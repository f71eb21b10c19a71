"""Listening sessions from the command line (see musicrl_jax/listening/README.md).

  python -m musicrl_jax.listening make-batch --out BATCH --captions captions.txt \\
      --model-a base --wavs-a base_wavs/ --model-b rl --wavs-b rl_wavs/ \\
      --tokenizer ASSETS/tokenizer --caption-vocab ASSETS/vocab
  python -m musicrl_jax.listening invite --db votes.db --name alice --base-url http://host:8000
  python -m musicrl_jax.listening serve --batch BATCH --db votes.db --port 8000
  python -m musicrl_jax.listening summary --db votes.db
  python -m musicrl_jax.listening export --db votes.db --out feedback/

User errors (missing files, bad fields) print one paragraph naming the file or field and the
fix (`python -m musicrl_jax.listening: error: ...`), and exit with status 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import secrets
import shutil
import sys
import urllib.parse

import numpy as np

from musicrl_jax.errors import ConfigError, report_user_errors

PROG = "python -m musicrl_jax.listening"
ADMIN_TOKEN_ENV = "MUSICRL_LISTENING_ADMIN_TOKEN"


# --- make-batch ------------------------------------------------------------------------------

def _sorted_wavs(directory: str, flag: str) -> list[str]:
    if not os.path.isdir(directory):
        raise ConfigError(f"{flag} {directory}: no such directory.")
    paths = sorted(glob.glob(os.path.join(directory, "*.wav")))
    if not paths:
        raise ConfigError(f"{flag} {directory}: holds no *.wav files.")
    return paths


def _read_codes(path: str, flag: str) -> list[np.ndarray]:
    """An .npz with `codes` [n, frames, K] (and optionally `mask` [n, frames], 1 = real frame),
    as `decoding.sample` results are saved; returns one [frames, K] array per clip."""
    from musicrl_jax.audio.listen import read_codes
    codes, mask = read_codes(path, flag)
    if codes.ndim != 3:
        raise ConfigError(f"{flag} {path}: 'codes' has shape {codes.shape}; expected "
                          "[clips, frames, K].")
    if mask is not None and mask.shape != codes.shape[:2]:
        raise ConfigError(f"{flag} {path}: 'mask' has shape {mask.shape}; expected "
                          f"{codes.shape[:2]} (clips, frames).")
    return [c if mask is None else c[mask[i] > 0] for i, c in enumerate(codes)]


def _copy_writer(source: str):
    return lambda path: shutil.copyfile(source, path)


def _decode_writer(tokenizer, codes: np.ndarray):
    def write(path: str):
        from musicrl_jax.audio.listen import codes_to_wavs
        stem = os.path.splitext(os.path.basename(path))[0]
        written = codes_to_wavs(tokenizer, codes, os.path.dirname(path), prefix=stem)[0]
        os.replace(written, path)
    return write


def _encode_wavs(tokenizer, paths: list[str], flag: str) -> list[np.ndarray]:
    from musicrl_jax.audio.listen import read_clip
    return [tokenizer.encode(read_clip(path, flag, tokenizer.sample_rate)) for path in paths]


def make_batch_command(args) -> None:
    from musicrl_jax.listening import batch as batch_lib
    captions, tokens = batch_lib.read_captions(args.captions)
    if any(t is None for t in tokens):
        if not args.caption_vocab:
            raise ConfigError(f"--captions {args.captions}: captions without caption_tokens need "
                              "--caption-vocab DIR (the directory holding captions.model), or "
                              "give tokens in a JSONL captions file.")
        from musicrl_jax.data.vocab import load_caption_vocabulary
        vocabulary = load_caption_vocabulary(args.caption_vocab)
        tokens = [t if t is not None else list(vocabulary.encode(c)) + [1]  # EOS = 1
                  for c, t in zip(captions, tokens)]
    tokenizer = None
    if args.tokenizer:
        from musicrl_jax.audio.tokenizer import load_tokenizer_input
        tokenizer = load_tokenizer_input(args.tokenizer, f"--tokenizer {args.tokenizer}")
    codes, writers = [], []
    for side in ("a", "b"):
        wav_dir, codes_file = getattr(args, f"wavs_{side}"), getattr(args, f"codes_{side}")
        wavs = _sorted_wavs(wav_dir, f"--wavs-{side}") if wav_dir else None
        side_codes = _read_codes(codes_file, f"--codes-{side}") if codes_file else None
        if wavs is None and side_codes is None:
            raise ConfigError(f"make-batch: model {side.upper()} needs --wavs-{side} DIR and/or "
                              f"--codes-{side} FILE.npz.")
        if (wavs is None or side_codes is None) and tokenizer is None:
            raise ConfigError(f"make-batch: model {side.upper()} has "
                              f"{'no WAVs' if wavs is None else 'no codes'}; give --tokenizer "
                              "DIR to " + ("decode its codes to audio." if wavs is None else
                                           "encode its WAVs to codes (the exported records "
                                           "need them)."))
        if side_codes is None:
            side_codes = _encode_wavs(tokenizer, wavs, f"--wavs-{side}")
        if wavs is not None and len(wavs) != len(side_codes):
            raise ConfigError(f"make-batch: --wavs-{side} holds {len(wavs)} WAVs but "
                              f"--codes-{side} holds {len(side_codes)} clips.")
        writers.append([_copy_writer(w) for w in wavs] if wavs is not None
                       else [_decode_writer(tokenizer, c) for c in side_codes])
        codes.append(side_codes)
    batch_id = args.batch_id or os.path.basename(os.path.abspath(args.out))
    batch = batch_lib.make_batch(args.out, batch_id, captions, tokens,
                                 (args.model_a, args.model_b), tuple(codes), tuple(writers))
    print(f"wrote batch {batch.batch_id!r}: {len(batch.pairs)} pairs in {batch.directory}")


# --- the other commands ------------------------------------------------------------------------

def invite_command(args) -> None:
    from musicrl_jax.listening.store import Store
    store = Store(args.db)
    try:
        if args.revoke:
            store.revoke(args.revoke)
            print(f"revoked {args.revoke}")
            return
        names = args.name or [None] * args.count
        for name in names:
            listener_id, token = store.invite(name)
            link = f"{args.base_url.rstrip('/')}/login?token={token}" if args.base_url else token
            print(f"{listener_id}\t{link}")
    finally:
        store.close()


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(base_url: str | None, host: str, port: int) -> tuple[str, ...]:
    """The Host header values `serve` answers: --base-url's host, else the bind address (all
    loopback names for a loopback bind); () (no check) for a wildcard bind without --base-url."""
    if base_url:
        parts = urllib.parse.urlsplit(base_url)
        try:
            url_port = parts.port
        except ValueError:
            url_port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or url_port == -1:
            raise ConfigError(f"--base-url {base_url!r}: expected the address listeners open, "
                              "like https://listen.example.org or http://10.0.0.5:8000.")
        name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        default = 443 if parts.scheme == "https" else 80
        url_port = url_port or default
        return (name, f"{name}:{default}") if url_port == default else (f"{name}:{url_port}",)
    if host in ("", "0.0.0.0", "::"):
        return ()
    names = ("127.0.0.1", "localhost", "[::1]") if host in _LOOPBACK else (
        f"[{host}]" if ":" in host else host,)
    return tuple(f"{name}:{port}" for name in names)


def serve_command(args) -> None:
    import uvicorn

    from musicrl_jax.listening.batch import load_batch
    from musicrl_jax.listening.server import ServerSettings, create_app
    from musicrl_jax.listening.store import Store
    if args.max_body_bytes < 1024:
        raise ConfigError(f"--max-body-bytes {args.max_body_bytes}: too small for a vote; "
                          "use at least 1024 (default 16384).")
    if not args.session_max_age_hours > 0:
        raise ConfigError(f"--session-max-age-hours {args.session_max_age_hours}: a session "
                          "must last some time; use a positive number of hours (default 24).")
    proxy_headers = args.proxy_headers or bool(args.trusted_proxy)
    if proxy_headers and not (args.trusted_proxy and args.base_url):
        raise ConfigError("--proxy-headers needs --trusted-proxy ADDR (the reverse proxy's "
                          "address; X-Forwarded-For from any other is ignored, so a client "
                          "connecting directly cannot pick its address) and --base-url URL "
                          "(the public address, whose host the proxy passes on).")
    if "*" in (args.trusted_proxy or []):
        raise ConfigError("--trusted-proxy '*': trusting every address lets any client pick "
                          "its own. Fix: give the reverse proxy's address.")
    hosts = allowed_hosts(args.base_url, args.host, args.port)
    if not hosts:
        print(f"warning: serving on {args.host} without --base-url: the Host header is not "
              "checked. Pass --base-url with the address listeners open.", file=sys.stderr)
    batch = load_batch(args.batch)
    admin_token = os.environ.get(ADMIN_TOKEN_ENV)
    if not admin_token:
        admin_token = secrets.token_urlsafe(24)
        print(f"admin token (set {ADMIN_TOKEN_ENV} to choose one): {admin_token}",
              file=sys.stderr)
    settings = ServerSettings(admin_token=admin_token, rate_per_second=args.rate_per_second,
                              rate_burst=args.rate_burst, secure_cookies=args.secure_cookies,
                              max_body_bytes=args.max_body_bytes, allowed_hosts=hosts,
                              session_max_age_s=args.session_max_age_hours * 3600.0,
                              max_votes_per_listener=args.max_votes_per_listener,
                              vote_target=args.vote_target)
    app = create_app(batch, Store(args.db), settings)
    print(f"serving batch {batch.batch_id!r} ({len(batch.pairs)} pairs) on "
          f"http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                proxy_headers=proxy_headers, forwarded_allow_ips=args.trusted_proxy or [])


def summary_command(args) -> dict:
    from musicrl_jax.listening.store import Store
    from musicrl_jax.listening.summary import format_summary, summarize
    if not os.path.exists(args.db):
        raise ConfigError(f"--db {args.db}: no such database.")
    store = Store(args.db)
    try:
        result = summarize(store.votes(), args.vote_target)
    finally:
        store.close()
    print(json.dumps(result, indent=1) if args.json else format_summary(result))
    return result


def export_command(args) -> dict:
    from musicrl_jax.listening.export import export_votes
    from musicrl_jax.listening.summary import format_summary
    result = export_votes(args.db, args.out, args.batch)
    print(format_summary(result))
    print(f"wrote {result['preference_records']} preference records to "
          f"{result['preferences_path']}")
    if result["ratings_path"]:
        print(f"wrote {result['rating_records']} rating records to {result['ratings_path']}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG,
                                     description="Collect pairwise preferences and 1-5 ratings "
                                     "from listeners on a web page.")
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-batch", help="build a batch directory of pairs")
    make.add_argument("--out", required=True, help="new batch directory")
    make.add_argument("--captions", required=True, help="one caption per line (.txt) or JSONL "
                      "with 'caption' and optional 'caption_tokens'; line i goes with clip i")
    make.add_argument("--model-a", required=True, help="id of the first model")
    make.add_argument("--model-b", required=True, help="id of the second model")
    for side in ("a", "b"):
        make.add_argument(f"--wavs-{side}", help=f"directory of model {side.upper()}'s WAVs, "
                          "paired with the captions in sorted file-name order")
        make.add_argument(f"--codes-{side}", help=f"model {side.upper()}'s codes: .npz with "
                          "'codes' [clips, frames, K] (optional 'mask' [clips, frames])")
    make.add_argument("--tokenizer", help="saved audio tokenizer: encodes WAVs given without "
                      "codes, decodes codes given without WAVs")
    make.add_argument("--caption-vocab", help="directory with captions.model, to tokenize "
                      "captions given as text")
    make.add_argument("--batch-id", help="default: the --out directory's name")
    make.set_defaults(run=make_batch_command)

    invite = commands.add_parser("invite", help="create listeners and print their tokens")
    invite.add_argument("--db", required=True)
    invite.add_argument("--name", action="append", help="listener id (repeatable)")
    invite.add_argument("--count", type=int, default=1, help="random ids when --name is absent")
    invite.add_argument("--base-url", help="print invite links on this server address")
    invite.add_argument("--revoke", metavar="LISTENER", help="revoke a listener's token")
    invite.set_defaults(run=invite_command)

    serve = commands.add_parser("serve", help="run the listening web page")
    serve.add_argument("--batch", required=True)
    serve.add_argument("--db", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--rate-per-second", type=float, default=5.0,
                       help="requests a second per listener (token bucket refill; <= 0: off)")
    serve.add_argument("--rate-burst", type=int, default=60, help="token bucket size")
    serve.add_argument("--secure-cookies", action="store_true", help="when served over HTTPS")
    serve.add_argument("--max-body-bytes", type=int, default=16 * 1024,  # server.MAX_BODY_BYTES
                       help="largest request body read (larger: 413, before any parsing)")
    serve.add_argument("--proxy-headers", action="store_true",
                       help="take the client address and scheme from X-Forwarded-* headers "
                       "sent by a --trusted-proxy")
    serve.add_argument("--trusted-proxy", action="append", metavar="ADDR",
                       help="address (or CIDR) of the reverse proxy whose X-Forwarded-* "
                       "headers are believed (repeatable; implies --proxy-headers)")
    serve.add_argument("--base-url", help="the address listeners open (e.g. "
                       "https://listen.example.org): requests for any other Host are refused "
                       "(default: the --host/--port address)")
    serve.add_argument("--session-max-age-hours", type=float, default=24.0,
                       help="a session's lifetime from its login; then the invite link starts "
                       "a new one")
    serve.add_argument("--max-votes-per-listener", type=int, default=0,
                       help="votes taken from one listener (further votes: 403; <= 0: no cap "
                       "but the batch's pairs)")
    serve.add_argument("--vote-target", type=int, default=0,
                       help="votes this round needs: /admin shows the progress toward it")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=serve_command)

    summary = commands.add_parser("summary", help="votes per listener, agreement, win rates")
    summary.add_argument("--db", required=True)
    summary.add_argument("--json", action="store_true")
    summary.add_argument("--vote-target", type=int, default=0,
                         help="votes this round needs: also show the progress toward it")
    summary.set_defaults(run=summary_command)

    export = commands.add_parser("export", help="write musicrl_preferences / musicrl_ratings "
                                 "shards")
    export.add_argument("--db", required=True)
    export.add_argument("--out", required=True, help="writes OUT/preferences and OUT/ratings")
    export.add_argument("--batch", action="append", help="batch directory (repeatable; "
                        "default: the batches the server recorded in the database)")
    export.set_defaults(run=export_command)
    return parser


@report_user_errors(PROG)
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s "
                        "%(message)s")
    return args.run(args)


if __name__ == "__main__":
    main()
