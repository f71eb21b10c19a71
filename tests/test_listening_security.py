"""Listening page: the weaknesses an attack on it found (issue 19), each with a test that failed
on the code before its fix: clip responses that told the models apart, bodies read before the
session was checked or without a size limit, invite tokens in the access log, vote fields that
gave 500s (fuzzed over both vote endpoints), security logging without bounds; and forwarded
addresses believed from anyone, any Host header accepted."""

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from musicrl_jax.errors import ConfigError
from musicrl_jax.listening import __main__ as cli
from musicrl_jax.listening import batch as batch_lib
from musicrl_jax.listening.store import Store
from test_listening import REPO, Session, demo_batch, load, session  # noqa: F401 (fixtures)

HUGE = "9" * 5000  # int() refuses strings of more than 4,300 digits

# Raw JSON fragments that are no valid value of the field they are put in.
_BAD_JSON = {
    "pair_id": [HUGE, "1", "true", "null", "[]", "{}", '"../x"', '"\\u0000"', '"\\ud800"',
                '"x y"', json.dumps("a" * 200), json.dumps("p\u00b2")],
    "choice": [HUGE, "null", "[]", '{"a": 1}', '"A"', '"a "', '""', '"\\ud800"', '"\u00b2"'],
    "rating_a": [HUGE, "-" + HUGE, "1" + "0" * 400, '"' + HUGE + '"', '"\u00b2"', '"\u0663"',
                 "0", "6", "-1", "3.0", "1e999", "NaN", "Infinity", "true", "[]", "{}",
                 '" 3"', '"\\u0000"', '"\\ud800"', json.dumps("3" * 9000)],
}
_BAD_JSON["rating_b"] = _BAD_JSON["rating_a"]
# Form values are strings: the same, spelled as a browser would send them.
_BAD_FORM = {
    "pair_id": [HUGE, "../x", "x y", "a" * 200, "\u00b2", "\x00"],
    "choice": [HUGE, "A", "a ", "\u00b2", "\x00"],
    "rating_a": [HUGE, "-" + HUGE, "\u00b2", "\u0663", "\u00b3", "0", "6", "-1", "3.0", " 3",
                 "\x00", "3" * 9000],
}
_BAD_FORM["rating_b"] = _BAD_FORM["rating_a"]
# Whole bodies that are no JSON object (or no form) at all.
_BAD_BODIES = [b"[" * 8000, b'{"a": ' * 5000, b"\xff\xfe{}", b"", b"null", b'"vote"',
               HUGE.encode(), b"\xef\xbb\xbf{}", b'{"choice": "a"', b"[" * 8000 + b"]" * 8000,
               b'{"pair_id": "x", "pair_id": {"$gt": ""}}', b"\x00" * 100]


def _json_body(pair_id: str, field: str, fragment: str) -> bytes:
    fields = {"pair_id": json.dumps(pair_id), "choice": '"a"', "rating_a": "3", "rating_b": "4"}
    fields[field] = fragment
    return ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()


def test_fuzzed_vote_fields_are_4xx_json_naming_the_field_never_5xx(session):
    """Issue 19, item 4: a 5,000-digit rating, a rating of '²' (JSON or form) and a body of
    8,000 '[' were plain 500s."""
    client = TestClient(session.app, raise_server_exceptions=False)
    _, token = session.store.invite("fuzzer")
    assert client.get("/login", params={"token": token}, follow_redirects=False).status_code == 303
    pair = session.next_pair(client)
    csrf = {"X-CSRF-Token": pair["csrf_token"], "Content-Type": "application/json"}
    failures = []

    def check(kind, field, value, response, named):
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = None
        if not (400 <= response.status_code < 500 and isinstance(error, str) and named in error):
            failures.append(f"{kind} {field}={value[:40]!r}: {response.status_code} "
                            f"{response.text[:120]!r}")

    for field, fragments in _BAD_JSON.items():
        for fragment in fragments:
            response = client.post("/api/vote", content=_json_body(pair["pair_id"], field,
                                                                   fragment), headers=csrf)
            check("json", field, fragment, response, field)
    for body in _BAD_BODIES:
        response = client.post("/api/vote", content=body, headers=csrf)
        check("json body", "", body.decode("latin-1"), response, "")  # any message
    for field, values in _BAD_FORM.items():
        for value in values:
            form = {"pair_id": pair["pair_id"], "choice": "a", "rating_a": "3", "rating_b": "4",
                    "csrf_token": pair["csrf_token"], field: value}
            response = client.post("/vote", data=form, follow_redirects=False)
            check("form", field, value, response, field)
    # A file part where a field should be, and a multipart body without its closing boundary.
    response = client.post("/vote", data={"choice": "a", "csrf_token": pair["csrf_token"]},
                           files={"pair_id": ("x.txt", b"x" * 100)}, follow_redirects=False)
    check("multipart", "pair_id", "<file>", response, "pair_id")
    response = client.post("/vote", content=b"--xx\r\nContent-Disposition: form-data; name=a",
                           headers={"Content-Type": "multipart/form-data; boundary=xx"},
                           follow_redirects=False)
    check("multipart", "", "<truncated>", response, "")
    assert not failures, f"{len(failures)} bad answers:\n" + "\n".join(failures)
    assert session.store.votes() == []


# --- item 1: the blind test must stay blind ------------------------------------------------------

def test_a_pairs_two_clips_are_served_alike_but_for_the_audio_bytes(session):
    """Issue 19, item 1: GET /audio sent Last-Modified and ETag from the file, and make-batch
    wrote model A's clip first, so the dates told the models apart."""
    client = session.client("alice")
    pair = session.next_pair(client)
    # Byte ranges (browsers seek audio with them) still work; If-Range gets the whole clip.
    for headers, status in (({}, 200), ({"Range": "bytes=0-99"}, 206),
                            ({"Range": "bytes=0-99", "If-Range": '"x"'}, 200)):
        a, b = (client.get(pair[f"audio_{side}"], headers=headers) for side in ("a", "b"))
        assert a.status_code == b.status_code == status
        # The demo clips are equally long, so even Content-Length must match.
        assert dict(a.headers) == dict(b.headers)
        assert not {"last-modified", "etag"} & set(a.headers)
        assert a.content != b.content


def test_make_batch_writes_a_pairs_clips_in_random_order_with_one_date(tmp_path):
    written = []

    def writer(model):
        def write(path):
            written.append(model)
            load.write_wav(path, np.zeros(160), 16000)
        return write

    n = 24
    batch = batch_lib.make_batch(
        str(tmp_path / "b"), "b", [f"song {i}" for i in range(n)], [[5, 1]] * n,
        ("base", "tuned"), ([np.zeros((2, 2), int)] * n,) * 2,
        ([writer("base")] * n, [writer("tuned")] * n))
    firsts = written[::2]
    assert sorted(written[::2] + written[1::2]) == ["base"] * n + ["tuned"] * n
    # Both orders occur (each 2**-23 likely to be missing by chance).
    assert 0 < firsts.count("base") < n
    mtimes = {os.stat(batch.clip_path(c.clip_id)).st_mtime for p in batch.pairs for c in p.clips}
    assert len(mtimes) == 1


# --- item 2: no body is read before the session check, none past the size limit -----------------

def _asgi(app, method, path, chunks=(), headers=(), cookie=None):
    """Calls the ASGI app directly with the body in `chunks` (no Content-Length unless given:
    a chunked upload); returns (status, JSON body, how many body bytes the app pulled)."""
    pending, pulled, replies = list(chunks) or [b""], 0, []
    headers = [("host", "testserver"), *headers] + ([("cookie", cookie)] if cookie else [])

    async def receive():
        nonlocal pulled
        if not pending:
            return {"type": "http.disconnect"}
        chunk = pending.pop(0)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        replies.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("198.51.100.7", 4321),
             "server": ("testserver", 80),
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in replies if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in replies if m["type"] == "http.response.body")
    if body.startswith(b"<!doctype html>"):  # 401 on the page's routes: for a person
        return status, {"error": body.decode()}, pulled
    return status, json.loads(body) if body else None, pulled


def test_bodies_are_read_only_after_the_session_check_and_never_past_the_limit(demo_batch,
                                                                             tmp_path):
    """Issue 19, item 2: an anonymous POST /vote of 250 fields of 1 MB was parsed in full before
    the 401, and a 300 MB multipart part was spooled to a temp file."""
    limit, chunk = 8192, 64 * 1024
    s = Session(demo_batch, str(tmp_path / "votes.db"), rate_per_second=0.0,
                max_body_bytes=limit)
    form = [("content-type", "application/x-www-form-urlencoded")]
    multipart = [("content-type", "multipart/form-data; boundary=xx")]
    big_form = [b"f=" + b"x" * (chunk - 3) + b"&"] * 64  # 4 MiB, chunked
    big_part = [b'--xx\r\nContent-Disposition: form-data; name="f"; filename="f"\r\n\r\n'] + [
        b"x" * chunk] * 16
    # Anonymous: refused before a byte of the body is read, whatever the route.
    for path, headers in (("/vote", form), ("/vote", multipart), ("/api/vote", [])):
        status, reply, pulled = _asgi(s.app, "POST", path, big_form, headers)
        assert (status, pulled) == (401, 0) and "session" in reply["error"], (path, reply)
    # A declared length over the limit is refused before routing, on any route.
    for method, path in (("POST", "/vote"), ("GET", "/api/next"), ("POST", "/login")):
        status, reply, pulled = _asgi(s.app, method, path, big_part,
                                      multipart + [("content-length", str(300 << 20))])
        assert (status, pulled) == (413, 0) and str(limit) in reply["error"], (path, reply)
    # With a session, a chunked body stops being read once it passes the limit.
    listener_id, _ = s.store.invite("alice")
    session_id, _ = s.store.create_session(listener_id)
    csrf = s.store.session(session_id, 3600)[1]
    cookie = f"listening_session={session_id}"
    for path, headers, chunks in (("/vote", multipart, big_part), ("/vote", form, big_form),
                                  ("/api/vote", [("x-csrf-token", csrf)], big_form)):
        status, reply, pulled = _asgi(s.app, "POST", path, chunks, headers, cookie)
        assert status == 413 and str(limit) in reply["error"], (path, reply)
        assert pulled <= limit + chunk, (path, pulled)
    assert "body_too_large" in s.events()
    # A vote under the limit still goes through, as a form, multipart or JSON.
    client = s.client("bob")
    for send in ("form", "multipart", "json"):
        pair = s.next_pair(client)
        fields = {"pair_id": pair["pair_id"], "choice": "a", "rating_a": "2"}
        if send == "json":
            assert s.vote(client, pair, "a", rating_a=2).status_code == 201
            continue
        fields["csrf_token"] = pair["csrf_token"]
        response = client.post("/vote", data=fields, follow_redirects=False, files={
            k: (None, v) for k, v in fields.items()} if send == "multipart" else None)
        assert response.status_code == 303, response.text
    assert [v["rating_a"] for v in s.store.votes()] == [2, 2, 2]
    s.store.close()


# --- item 3: invite tokens stay out of the logs ---------------------------------------------------

@contextlib.contextmanager
def _serve(batch_dir, db_path, log_path, port, *args):
    """`python -m musicrl_jax.listening serve` at log level info (access log on), its output
    in `log_path`; yields the base URL."""
    env = dict(os.environ, MUSICRL_LISTENING_ADMIN_TOKEN="admin-secret", PYTHONPATH=REPO)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "musicrl_jax.listening", "serve", "--batch", batch_dir,
             "--db", db_path, "--port", str(port), "--log-level", "info", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, open(log_path).read()
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                        break
                assert time.monotonic() < deadline, "server did not start within 60 s"
                time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def served(demo_batch, tmp_path_factory):
    """One real server for the tests below: access log on, X-Forwarded-For believed only from
    a proxy at 192.0.2.1, answering only for Host 127.0.0.1:<port>."""
    tmp = tmp_path_factory.mktemp("served")
    db_path, log_path, port = str(tmp / "votes.db"), tmp / "server.log", load.free_port()
    with _serve(demo_batch.directory, db_path, log_path, port, "--trusted-proxy", "192.0.2.1",
                "--proxy-headers", "--base-url", f"http://127.0.0.1:{port}") as url:
        yield {"url": url, "db_path": db_path, "log_path": log_path}


def test_invite_tokens_never_reach_the_access_log(served):
    """Issue 19, item 3: GET /login?token=... was logged with the token."""
    url = served["url"]
    tokens = list(load.invite(served["db_path"], 3, prefix="logged").values())
    # The link as `invite` prints it; the name percent-encoded, after another field.
    assert httpx.get(f"{url}/login?token={tokens[0]}").status_code == 303
    assert httpx.get(f"{url}/login?lang=en&%74oken={tokens[1]}").status_code == 303
    assert httpx.get(f"{url}/login?token=guess-{tokens[2][:8]}").status_code == 401
    # The login form posts the token instead.
    assert "method=\"post\"" in httpx.get(f"{url}/login").text
    assert httpx.post(f"{url}/login", data={"token": tokens[2]}).status_code == 303
    log = served["log_path"].read_text()  # logging flushes every line
    assert not [t for t in tokens if t in log] and "guess" not in log, log
    assert log.count("oken=[redacted]") >= 3 and "POST /login HTTP/1.1\" 303" in log, log


# --- also in issue 19: forwarded addresses and the Host header ----------------------------------

def test_forwarded_for_is_believed_only_from_the_trusted_proxy(served):
    """With --proxy-headers a client connecting directly could rotate X-Forwarded-For and so
    escape the failed-login limit (uvicorn trusted loopback by default)."""
    url = served["url"]
    statuses = [httpx.get(f"{url}/login?token=wrong", headers={
        "X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(15)]
    assert 429 in statuses, statuses
    store = Store(served["db_path"])
    clients = {e["client"] for e in store.security_events()}
    store.close()
    assert clients == {"127.0.0.1"}, clients
    # A Host other than the --base-url's is refused (the Origin check compares against it).
    response = httpx.get(f"{url}/healthz", headers={"Host": "evil.example"})
    assert response.status_code == 400 and "evil.example" in response.json()["error"]


def test_host_header_check_and_serve_options(demo_batch, tmp_path, capsys):
    s = Session(demo_batch, str(tmp_path / "votes.db"), allowed_hosts=("listen.example.org",))
    assert TestClient(s.app, base_url="http://listen.example.org").get(
        "/healthz").status_code == 200
    assert TestClient(s.app).get("/healthz").status_code == 400  # Host: testserver
    assert s.events() == ["bad_host"]
    s.store.close()
    assert cli.allowed_hosts("https://Listen.example.org/", "0.0.0.0", 8000) == (
        "listen.example.org", "listen.example.org:443")
    assert cli.allowed_hosts("http://10.0.0.5:8080", "0.0.0.0", 8000) == ("10.0.0.5:8080",)
    assert "localhost:8000" in cli.allowed_hosts(None, "127.0.0.1", 8000)
    assert cli.allowed_hosts(None, "0.0.0.0", 8000) == ()
    with pytest.raises(ConfigError, match="--base-url"):
        cli.allowed_hosts("listen.example.org", "0.0.0.0", 8000)
    serve = ["serve", "--batch", demo_batch.directory, "--db", str(tmp_path / "v.db")]
    for extra in (["--proxy-headers"], ["--proxy-headers", "--trusted-proxy", "10.0.0.1"],
                  ["--trusted-proxy", "*", "--base-url", "https://x.org"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(serve + extra)
        assert exit_info.value.code == 2 and "--trusted-proxy" in capsys.readouterr().err


# --- item 5: security logging is bounded -------------------------------------------------------

def test_a_flood_of_long_refused_requests_logs_a_bounded_amount(session, caplog):
    """Issue 19, item 5: 100 unauthenticated requests with 60 KB paths grew the database by
    5.7 MB and the server log by ~12 MB."""
    client = TestClient(session.app)
    client.cookies.set("listening_session", "forged")
    long = "x" * 60_000
    with caplog.at_level(logging.WARNING, logger="musicrl_jax.listening.security"):
        for i in range(50):  # path traversal (before routing) and a forged session (after)
            assert client.get(f"/audio/..%2F{long}{i}").status_code == 400
            assert client.get(f"/audio/{long}{i}").status_code in (401, 429)
    events = session.store.security_events()
    logged = sum(len(r.getMessage()) for r in caplog.records)
    stored = sum(len(str(v)) for e in events for v in e.values())
    assert len(events) <= 25 and stored < 25 * 1000 and logged < 30 * 1000, (
        len(events), stored, logged)
    assert {"path_traversal", "bad_session"} <= {e["kind"] for e in events}
    assert any("over the cap" in r.getMessage() for r in caplog.records)
    # The cap is per client: another address is still heard.
    other = TestClient(session.app, client=("203.0.113.9", 4321))
    assert other.get("/audio/..%2Fx").status_code == 400
    assert session.store.security_events()[-1]["client"] == "203.0.113.9"
