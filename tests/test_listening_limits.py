"""Listening page: what the shared fixture cannot see (issue 20, item 5). Its rate_per_second=0
also turns off the failed-login and admin limits, so they run here with the limits on; and
session expiry, the Secure cookie flag, the frame / sniffing headers on every kind of reply and
the Origin check of /api/vote and POST /login, which no other test sends."""

import contextlib
import re
import sqlite3

import pytest
from fastapi.testclient import TestClient

from musicrl_jax.listening.server import SESSION_COOKIE
from test_listening import ADMIN, Session, demo_batch, session  # noqa: F401 (fixtures)

# Failed attempts refill at rate_per_second / 5 = 0.01 a second: none while a test runs, so
# the 11th failure in a row is refused however slow the machine is.
SLOW = 0.05


@pytest.fixture
def limited(demo_batch, tmp_path):
    s = Session(demo_batch, str(tmp_path / "votes.db"), rate_per_second=SLOW)
    yield s
    s.store.close()


def _login(client, token):
    return client.get("/login", params={"token": token}, follow_redirects=False)


def test_failed_logins_are_limited_per_client_address(limited):
    guesser = TestClient(limited.app)  # client address "testclient"
    assert [_login(guesser, f"guess-{i}").status_code for i in range(10)] == [401] * 10
    refused = _login(guesser, "guess-10")
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    # Every kind of failed authentication draws on the same bucket of the address: the posted
    # login form, a forged session cookie, no cookie at all.
    assert guesser.post("/login", data={"token": "guess"},
                        follow_redirects=False).status_code == 429
    forged = TestClient(limited.app)
    forged.cookies.set(SESSION_COOKIE, "forged")
    assert forged.get("/api/next").status_code == 429
    assert TestClient(limited.app).get("/").status_code == 429
    # Only failures count: a real invite still logs in from that address (a guesser behind
    # the same NAT does not lock listeners out), and another address has its own bucket.
    _, token = limited.store.invite("alice")
    assert _login(guesser, token).status_code == 303
    other = TestClient(limited.app, client=("203.0.113.9", 4321))
    assert _login(other, "guess").status_code == 401
    events = limited.events()
    assert events.count("bad_invite_token") == 11 and events.count("rate_limited_login") == 4


def test_wrong_admin_tokens_are_limited_and_the_admin_still_gets_in(limited):
    client = TestClient(limited.app)
    wrong = {"Authorization": "Bearer wrong"}
    assert [client.get("/admin", headers=wrong).status_code for _ in range(10)] == [401] * 10
    refused = client.get("/admin", headers=wrong)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    assert client.get("/admin").status_code == 429  # no credentials: a failure as well
    response = client.get("/admin", params={"format": "json"},
                          headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200 and response.json()["votes"] == 0
    # Admin and login failures share the address's bucket: guessing one does not reset the other.
    assert _login(client, "guess").status_code == 429
    events = limited.events()
    assert events.count("bad_admin_token") == 10 and events.count("rate_limited_admin") == 2


def test_a_session_expires_after_session_max_age_s(demo_batch, tmp_path):
    s = Session(demo_batch, str(tmp_path / "votes.db"), rate_per_second=0.0,
                session_max_age_s=3600.0)
    client = TestClient(s.app)
    _, token = s.store.invite("alice")
    response = _login(client, token)
    assert re.search(r"max-age=3600(;|$)", response.headers["set-cookie"].lower())
    pair = s.next_pair(client)

    def age(seconds):  # moves every session's start back in time
        with contextlib.closing(sqlite3.connect(s.db_path)) as conn, conn:
            conn.execute("UPDATE sessions SET created_at = created_at - ?", (seconds,))

    age(3500)
    assert client.get("/api/next").status_code == 200  # 3,500 s old: still live
    age(200)  # 3,700 s old
    response = client.get("/api/next")
    assert response.status_code == 401 and "expired" in response.json()["error"]
    assert s.vote(client, pair).status_code == 401 and s.store.votes() == []
    assert "bad_session" in s.events()
    # The invite link starts a fresh session.
    assert _login(client, token).status_code == 303
    assert s.vote(client, s.next_pair(client)).status_code == 201
    s.store.close()


@pytest.mark.parametrize("secure_cookies, base_url, secure", [
    (False, "http://testserver", False),  # a Secure cookie would never come back over http
    (True, "http://testserver", True),  # behind a TLS proxy the app itself sees http
    (False, "https://testserver", True),
])
def test_the_session_cookie_is_secure_when_configured_or_over_https(
        demo_batch, tmp_path, secure_cookies, base_url, secure):
    s = Session(demo_batch, str(tmp_path / "votes.db"), rate_per_second=0.0,
                secure_cookies=secure_cookies)
    _, token = s.store.invite("alice")
    cookie = _login(TestClient(s.app, base_url=base_url), token).headers["set-cookie"]
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert ("secure" in attributes) == secure, cookie
    assert {"httponly", "samesite", "max-age", "path"} <= attributes, cookie
    s.store.close()


def test_every_kind_of_reply_forbids_framing_and_sniffing(session):
    client = session.client("alice")
    pair = session.next_pair(client)
    anonymous = TestClient(session.app)
    replies = {
        "page": client.get("/"), "api": client.get("/api/next"),
        "audio": client.get(pair["audio_a"]), "vote": session.vote(client, pair),
        "login form": anonymous.get("/login"), "healthz": anonymous.get("/healthz"),
        "401": anonymous.get("/api/next"), "404": client.get("/no-such-route"),
        "400 traversal": client.get("/audio/..%2Fx"),
        "413": client.post("/api/vote", content=b"x" * 20_000,
                           headers={"X-CSRF-Token": pair["csrf_token"]}),
    }
    for name, reply in replies.items():
        assert reply.headers.get("x-frame-options") == "DENY", (name, reply.status_code)
        assert reply.headers.get("x-content-type-options") == "nosniff", name
        assert "frame-ancestors 'none'" in reply.headers.get("content-security-policy", ""), name
    assert replies["vote"].status_code == 201 and replies["413"].status_code == 413


def test_api_vote_and_the_login_form_refuse_a_foreign_origin(session):
    """test_listening checks the Origin of the HTML form's POST /vote; the JSON API and the
    login form check it too (a right CSRF token is not enough)."""
    client = session.client("alice")
    pair = session.next_pair(client)
    body = {"pair_id": pair["pair_id"], "choice": "a"}
    csrf = {"X-CSRF-Token": pair["csrf_token"]}
    # Another site, another port, a look-alike host, and the opaque origin of a sandboxed frame.
    for origin in ("http://evil.example", "http://testserver:8080",
                   "http://testserver.evil.example", "null"):
        response = client.post("/api/vote", json=body, headers={**csrf, "Origin": origin})
        assert response.status_code == 403 and "cross-site" in response.json()["error"], origin
    assert session.store.votes() == [] and session.events().count("foreign_origin") == 4
    # Login CSRF: a foreign page must not log the visitor in as someone else.
    _, token = session.store.invite("mallory")
    response = TestClient(session.app).post("/login", data={"token": token},
                                            headers={"Origin": "http://evil.example"},
                                            follow_redirects=False)
    assert response.status_code == 403 and "set-cookie" not in response.headers
    # The page's own origin is accepted.
    response = client.post("/api/vote", json=body,
                           headers={**csrf, "Origin": "http://testserver"})
    assert response.status_code == 201
