"""The listening web app (FastAPI): a caption, two clips, A / B / no preference, optional 1-5
ratings, next pair.

Access: an invite link `/login?token=...` (tokens from `python -m musicrl_jax.listening
invite`), or the token posted by the form at /login, starts a session: an HttpOnly,
SameSite=Strict cookie holding a random session id, plus a per-session CSRF token that every
POST must echo (hidden form field `csrf_token`, or the `X-CSRF-Token` header for the JSON
API). A POST whose Origin header names another host is refused as well. `/admin` needs the
admin token (`Authorization: Bearer <token>`, or HTTP Basic with the token as password) and
nothing else does. The access log shows invite links as `token=[redacted]`.

Routes: GET / (the page), POST /vote (its form), GET /api/next and POST /api/vote (the same as
JSON, for scripts and the load test), GET /audio/{clip_id} (a clip of a pair issued to the
listener; the id is looked up in the batch manifest, so no client string reaches the
filesystem, and nothing but the audio bytes tells a pair's two clips apart), GET and POST
/login, GET /admin, GET /healthz. No route reads a body over ServerSettings.max_body_bytes,
and the vote routes read theirs only after the session checks out.

Refusals are JSON {"error": message} with a 4xx status: 401 no/unknown session or token,
403 bad CSRF / foreign Origin / pair or clip not issued to this listener, 404 unknown pair or
clip or vote quota reached, 409 a different second vote on a pair (the same vote sent again,
as a client retrying after a lost answer does, is 200 with the stored vote's id and
"replayed": true), 400/422 malformed input, 413 body too large, 429 rate limit (token
bucket per listener; per client address for failed logins). Every refusal that smells of
probing (bad tokens, bad CSRF, pairs not issued, path traversal, malformed ids, oversized
bodies) goes to the `security_events` table and the `musicrl_jax.listening.security` logger.
A session lasts ServerSettings.session_max_age_s from its login; after that the HTML routes
answer 401 with the login form (the invite link or its token starts a new session) and the
JSON routes 401 with a message saying so.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import re
import secrets
import threading
import time
import urllib.parse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from musicrl_jax.listening.batch import ID_PATTERN, Batch
from musicrl_jax.listening.store import (CHOICES, SECURITY_LOG, DuplicateVote, QuotaReached,
                                         SessionExpired, Store, assignment_order)
from musicrl_jax.listening.summary import format_summary, summarize

SESSION_COOKIE = "listening_session"
CSRF_HEADER = "x-csrf-token"
MAX_BODY_BYTES = 16 * 1024
HTML_ROUTES = ("/", "/vote")  # the page and its form; the rest answer JSON


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """admin_token: guards /admin. rate_per_second / rate_burst: each listener's token bucket
    (refill rate and size; rate_per_second <= 0 turns the limit off). secure_cookies: mark
    cookies Secure (set it when serving over HTTPS, e.g. behind a TLS proxy). max_body_bytes:
    the largest request body any route reads (a vote is a few hundred bytes).
    security_events_per_second / _burst: the cap on security events recorded per client address
    (a token bucket, as for listeners; <= 0: no cap). allowed_hosts: the Host header values
    ("name" or "name:port") served; any other is refused (empty: no check).
    session_max_age_s: a session's lifetime from its login (a day: a sitting with breaks;
    the invite link starts a new one). max_votes_per_listener: votes taken from one listener
    (<= 0: no cap but the batch's pairs). vote_target: the votes a feedback round needs
    (musicrl_jax/rounds.py); /admin shows the progress toward it (0: no target)."""
    admin_token: str
    rate_per_second: float = 5.0
    rate_burst: int = 60
    session_max_age_s: float = 24 * 3600.0
    max_votes_per_listener: int = 0
    vote_target: int = 0
    secure_cookies: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    security_events_per_second: float = 0.1
    security_events_burst: int = 20
    allowed_hosts: tuple[str, ...] = ()


class TokenBucket:
    """Per-key token buckets: `rate` tokens a second up to `burst`; a request takes one."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, max(1, int(burst))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0.0 if allowed, else the seconds until a token is free."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class SecurityEvents:
    """Records refused requests (Store.security_event) at most `burst` at once and `rate` a
    second per client address: a flood of probes costs a bounded number of rows and log lines.
    How many were dropped goes into the client's next recorded event."""

    def __init__(self, store: Store, rate: float, burst: int):
        self.store, self._bucket = store, TokenBucket(rate, burst)
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, kind: str, client: str, path: str, listener_id: str | None = None,
               detail: str = "") -> None:
        allowed = self._bucket.take(client) == 0.0
        with self._lock:
            if allowed:
                dropped = self._dropped.pop(client, 0)
            else:
                dropped = self._dropped[client] = self._dropped.get(client, 0) + 1
        if not allowed:
            if dropped == 1:
                SECURITY_LOG.warning("security events from client %s over the cap: dropping "
                                     "them until it slows down", client[:64])
            return
        if dropped:
            detail = f"{detail} ({dropped} events of this client dropped before)".strip()
        self.store.security_event(kind, client, path, listener_id, detail)


class Refused(Exception):
    """A refused request: status, message, and the security-event kind if it is to be logged."""

    def __init__(self, status: int, message: str, event: str | None = None,
                 listener_id: str | None = None, detail: str = "", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.event = status, message, event
        self.listener_id, self.detail, self.headers = listener_id, detail, headers or {}


_SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; media-src 'self'; style-src "
     b"'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # same-origin, not no-referrer: under no-referrer Chrome sends "Origin: null" on form posts.
    (b"referrer-policy", b"same-origin"),
]


# Query fields whose values never reach a log: the invite link is /login?token=<secret>.
SECRET_QUERY_FIELDS = ("token",)
_QUERY_FIELD = re.compile(r"([?&])([^=&\s\"#]*)=([^&\s\"#]*)")


def redact_query(text: str) -> str:
    """`text` with the value of every secret query field (in any percent-encoding of its
    name, as the server would decode it) replaced by [redacted]."""
    def redact(match):
        name = urllib.parse.unquote_plus(match.group(2)).strip().lower()
        if name not in SECRET_QUERY_FIELDS:
            return match.group(0)
        return f"{match.group(1)}{match.group(2)}=[redacted]"
    return _QUERY_FIELD.sub(redact, text) if "=" in text else text


class RedactQuerySecrets(logging.Filter):
    """A logging filter for uvicorn's access log, which logs each URL with its query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        return True


class _ClipResponse(FileResponse):
    """A WAV with no validators taken from the file: Last-Modified and ETag (mtime-derived)
    would tell a pair's two clips apart, and so which model made which. Byte ranges still work
    (browsers seek audio with them); an If-Range cannot match, so it gets the whole clip."""

    def set_stat_headers(self, stat_result) -> None:
        self.headers.setdefault("content-length", str(stat_result.st_size))

    def _should_use_range(self, http_if_range: str) -> bool:
        return False


def _client(scope_or_request) -> str:
    client = scope_or_request.get("client") if isinstance(scope_or_request, dict) else (
        scope_or_request.client)
    return client[0] if client else "unknown"


class BodyTooLarge(Refused):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes", "body_too_large",
                         headers={"Connection": "close"})  # the rest of it is never read


def _header(scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


class _BodyLimit:
    """ASGI middleware: no route reads more than `limit` body bytes. A larger Content-Length is
    refused before routing; a body without one (chunked) is cut off, by BodyTooLarge from
    `receive`, as soon as the bytes read pass the limit."""

    def __init__(self, app, events: SecurityEvents, limit: int):
        self.app, self.events, self.limit = app, events, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.strip().isdigit() or
                                     int(declared) > self.limit):
            return await self._refuse(scope, receive, send, BodyTooLarge(self.limit))
        read, started = 0, False

        async def limited_receive():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge as err:  # the app's Refused handler answers it when it can
            if started:
                raise
            await self._refuse(scope, receive, send, err)

    async def _refuse(self, scope, receive, send, err: Refused):
        await run_in_threadpool(self.events.record, err.event, _client(scope),
                                scope.get("path", ""), None, err.message)
        response = JSONResponse({"error": err.message}, status_code=err.status,
                                headers=err.headers)
        await response(scope, receive, send)


class _PathGuard:
    """ASGI middleware: refuses any path with a '..' segment, a backslash or a NUL (after
    percent-decoding, so '..%2F' is caught) before routing, and a Host header not in
    `allowed_hosts` (when given: the Origin check trusts Host, and DNS rebinding forges it),
    logs them, and adds security headers to every response."""

    def __init__(self, app, events: SecurityEvents, allowed_hosts: tuple[str, ...] = ()):
        self.app, self.events = app, events
        self.allowed_hosts = {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        decoded = urllib.parse.unquote(path)  # catches double-encoded dots as well
        if any(s == ".." for s in decoded.replace("\\", "/").split("/")) or (
                "\\" in path or "\x00" in decoded):
            await run_in_threadpool(self.events.record, "path_traversal", _client(scope), path)
            response = JSONResponse({"error": "path refused"}, status_code=400)
            return await response(scope, receive, self._with_headers(send))
        host = (_header(scope, b"host") or "").lower()
        if self.allowed_hosts and host not in self.allowed_hosts:
            await run_in_threadpool(self.events.record, "bad_host", _client(scope), path, None,
                                    f"host {host!r}")
            response = JSONResponse(
                {"error": f"this server does not answer for host {host[:100]!r}"}, 400)
            return await response(scope, receive, self._with_headers(send))
        return await self.app(scope, receive, self._with_headers(send))

    @staticmethod
    def _with_headers(send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + _SECURITY_HEADERS
            await send(message)
        return send_with_headers


def create_app(batch: Batch, store: Store, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="musicrl_jax listening", docs_url=None, redoc_url=None,
                  openapi_url=None)
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuerySecrets) for f in access_log.filters):
        access_log.addFilter(RedactQuerySecrets())
    events = SecurityEvents(store, settings.security_events_per_second,
                            settings.security_events_burst)
    app.add_middleware(_BodyLimit, events=events, limit=settings.max_body_bytes)
    # Added last, so outermost: security headers on every reply.
    app.add_middleware(_PathGuard, events=events, allowed_hosts=settings.allowed_hosts)
    listener_buckets = TokenBucket(settings.rate_per_second, settings.rate_burst)
    # Failed logins share a stricter bucket per client address: guessing tokens stays slow.
    failure_buckets = TokenBucket(max(settings.rate_per_second, 0.0) / 5, 10)
    pair_ids = [p.pair_id for p in batch.pairs]
    store.register_batch(batch.batch_id, batch.directory)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        if exc.event:
            await run_in_threadpool(events.record, exc.event, _client(request),
                                    request.url.path, exc.listener_id,
                                    f"{exc.message} {exc.detail}".strip())
        if exc.status == 401 and request.url.path in HTML_ROUTES:
            # A person is behind these: show why, and the form that starts a new session.
            body = f"<p id=refusal>{html.escape(exc.message)}</p>{_LOGIN_FORM}"
            return HTMLResponse(_page("Log in", body), status_code=401, headers=exc.headers)
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": "malformed request", "detail": jsonable_errors(exc)},
                            status_code=422)

    def refuse_unauthenticated(request: Request, message: str, event: str | None):
        if failure_buckets.take(f"ip:{_client(request)}") > 0:
            raise Refused(429, "too many failed attempts; wait a minute", "rate_limited_login",
                          headers={"Retry-After": "60"})
        raise Refused(401, message, event)

    def listener(request: Request) -> tuple[str, str]:
        """(listener_id, csrf_token) of the request's session, after the rate limit."""
        session_id = request.cookies.get(SESSION_COOKIE)
        if not session_id:
            refuse_unauthenticated(request, "no session: open your invite link "
                                   "(/login?token=...)", None)
        try:
            session = store.session(session_id, settings.session_max_age_s)
        except SessionExpired as expired:
            # Not a guess: no security event, no draw on the failed-login bucket.
            raise Refused(401, f"session expired: it started {expired.age_s / 3600:.1f} h ago "
                          f"and sessions last {settings.session_max_age_s / 3600:g} h (server "
                          "setting session_max_age_s, `serve --session-max-age-hours`). Open "
                          "your invite link again to start a new session.")
        if session is None:
            refuse_unauthenticated(request, "unknown or expired session: open your invite "
                                   "link again", "bad_session")
        wait = listener_buckets.take(session[0])
        if wait > 0:
            raise Refused(429, f"rate limit: retry in {wait:.1f} s", "rate_limited", session[0],
                          headers={"Retry-After": str(max(1, round(wait)))})
        return session

    def check_origin(request: Request, listener_id: str | None) -> None:
        origin = request.headers.get("origin")
        if origin and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
            raise Refused(403, "cross-site request refused", "foreign_origin", listener_id,
                          f"origin {origin}")

    def check_csrf(request: Request, listener_id: str, expected: str, supplied) -> None:
        check_origin(request, listener_id)
        if not isinstance(supplied, str) or not _same_secret(supplied, expected):
            raise Refused(403, "missing or wrong CSRF token: reload the page", "bad_csrf",
                          listener_id)

    def quota_reached(votes_cast: int) -> bool:
        return 0 < settings.max_votes_per_listener <= votes_cast

    def quota_message(votes_cast: int) -> str:
        return (f"vote quota reached: you have cast {votes_cast} votes, the most this server "
                f"takes from one listener (server setting max_votes_per_listener = "
                f"{settings.max_votes_per_listener}, `serve --max-votes-per-listener`). "
                "Thank you!")

    def next_pair(listener_id: str):
        """The first pair in the listener's order without their vote, issued; None when done
        (every pair voted on, or the listener's quota reached)."""
        voted = store.voted_pairs(listener_id)
        if quota_reached(len(voted)):
            return None, None, len(voted)
        for pair_id in assignment_order(pair_ids, batch.batch_id, listener_id):
            if pair_id not in voted:
                pair = batch.pair(pair_id)
                issued = store.issue(listener_id, batch.batch_id, pair_id,
                                     tuple((c.clip_id, c.model_id) for c in pair.clips))
                return pair, issued, len(voted)
        return None, None, len(voted)

    def submit(request: Request, listener_id: str, fields: dict) -> dict:
        pair_id, choice = fields.get("pair_id"), fields.get("choice")
        if not isinstance(pair_id, str) or not ID_PATTERN.match(pair_id):
            raise Refused(422, "field 'pair_id' must be a pair id string", "malformed_pair_id",
                          listener_id, repr(pair_id)[:100])
        if choice not in CHOICES:
            raise Refused(422, f"field 'choice' must be one of {list(CHOICES)}")
        ratings = {}
        for side in ("a", "b"):
            value = fields.get(f"rating_{side}")
            if value in (None, ""):
                ratings[side] = None
                continue
            if isinstance(value, str):  # a form field; not int(): "²".isdigit() but int fails
                value = _RATINGS.get(value, value)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
                raise Refused(422, f"field 'rating_{side}' must be an integer 1-5 or empty")
            ratings[side] = value
        if batch.pair(pair_id) is None:
            raise Refused(404, f"unknown pair {pair_id!r}", "unknown_pair", listener_id)
        issued = store.issued(listener_id, pair_id)
        if issued is None:
            raise Refused(403, f"pair {pair_id!r} was not issued to you", "pair_not_issued",
                          listener_id)
        try:
            vote_id, replayed = store.record_vote(issued, choice, ratings["a"], ratings["b"],
                                                  settings.max_votes_per_listener)
        except DuplicateVote:
            raise Refused(409, f"you already voted on pair {pair_id!r}, differently")
        except QuotaReached as reached:
            raise Refused(403, quota_message(reached.votes_cast))
        return {"vote_id": vote_id, "pair_id": pair_id, "choice": choice, "replayed": replayed}

    def set_session_cookie(response: Response, request: Request, session_id: str):
        response.set_cookie(SESSION_COOKIE, session_id, max_age=int(settings.session_max_age_s),
                            httponly=True, samesite="strict", path="/",
                            secure=settings.secure_cookies or request.url.scheme == "https")

    @app.get("/healthz")
    def healthz():
        return {"ok": True, "batch_id": batch.batch_id, "pairs": len(pair_ids)}

    def start_session(request: Request, token: str):
        listener_id = store.listener_for_token(token)
        if listener_id is None:
            refuse_unauthenticated(request, "unknown or revoked invite token", "bad_invite_token")
        session_id, _ = store.create_session(listener_id)
        # Redirect so the token leaves the address bar and history.
        response = RedirectResponse("/", status_code=303)
        set_session_cookie(response, request, session_id)
        return response

    @app.get("/login")
    def login(request: Request, token: str | None = None):
        if token is None:
            return HTMLResponse(_page("Log in", _LOGIN_FORM))
        return start_session(request, token)

    # The login form posts the token: a typed token stays out of URLs, history and logs.
    @app.post("/login")
    async def login_form(request: Request):
        check_origin(request, None)
        token = (await _read_form(request)).get("token")
        if not isinstance(token, str) or not token:
            raise Refused(422, "field 'token' (your invite token) is missing")
        return await run_in_threadpool(start_session, request, token)

    @app.get("/")
    def page(request: Request):
        listener_id, csrf_token = listener(request)
        pair, issued, done = next_pair(listener_id)
        if pair is None:
            message = (f"You judged {done} pairs, as many as this session takes."
                       if quota_reached(done) else f"You judged all {done} pairs of this batch.")
            return HTMLResponse(_page("Thank you", f"<h1>Thank you!</h1><p>{message}</p>"))
        return HTMLResponse(_pair_page(pair, issued, csrf_token, done, len(pair_ids)),
                            headers={"Cache-Control": "no-store"})

    # Bodies are read on the event loop; the SQLite work runs in the thread pool, like the
    # plain `def` routes, so a busy database never stalls the loop. The session (and Origin)
    # is checked first: an anonymous or cross-site body is never read, let alone parsed.
    @app.post("/vote")
    async def vote_form(request: Request):
        listener_id, csrf_token = await run_in_threadpool(listener, request)
        check_origin(request, listener_id)
        form = await _read_form(request)

        def handle():
            check_csrf(request, listener_id, csrf_token, form.get("csrf_token"))
            submit(request, listener_id, form)
            return RedirectResponse("/", status_code=303)
        return await run_in_threadpool(handle)

    @app.get("/api/next")
    def api_next(request: Request):
        listener_id, csrf_token = listener(request)
        pair, issued, done = next_pair(listener_id)
        body = {"done": pair is None, "judged": done, "total": len(pair_ids),
                "csrf_token": csrf_token, "quota_reached": quota_reached(done)}
        if pair is not None:
            body.update(pair_id=pair.pair_id, caption=pair.caption,
                        audio_a=f"/audio/{issued['clip_a']}", audio_b=f"/audio/{issued['clip_b']}")
        return body

    @app.post("/api/vote", status_code=201)
    async def api_vote(request: Request, response: Response):
        listener_id, csrf_token = await run_in_threadpool(listener, request)
        check_csrf(request, listener_id, csrf_token, request.headers.get(CSRF_HEADER))
        body = await request.body()  # capped by _BodyLimit

        def handle():
            fields = _parse_json(body)
            if not isinstance(fields, dict):
                raise Refused(422, "body must be a JSON object with pair_id, choice, "
                              "rating_a, rating_b")
            result = submit(request, listener_id, fields)
            if result["replayed"]:
                response.status_code = 200  # nothing new was created
            return result
        return await run_in_threadpool(handle)

    @app.get("/audio/{clip_id:path}")
    def audio(request: Request, clip_id: str):
        listener_id, _ = listener(request)
        if not ID_PATTERN.match(clip_id):
            raise Refused(400, "malformed clip id", "malformed_clip_id", listener_id,
                          repr(clip_id)[:200])
        path = batch.clip_path(clip_id)
        if path is None:
            raise Refused(404, "unknown clip", "unknown_clip", listener_id, clip_id)
        if not store.clip_issued_to(listener_id, clip_id):
            raise Refused(403, "clip not issued to you", "clip_not_issued", listener_id, clip_id)
        return _ClipResponse(path, media_type="audio/wav",
                             headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/admin")
    def admin(request: Request, format: str = "html"):
        supplied = _admin_credential(request.headers.get("authorization", ""))
        if supplied is None or not _same_secret(supplied, settings.admin_token):
            if failure_buckets.take(f"ip:{_client(request)}") > 0:
                raise Refused(429, "too many failed attempts", "rate_limited_admin",
                              headers={"Retry-After": "60"})
            raise Refused(401, "admin token required (Authorization: Bearer <token>)",
                          "bad_admin_token" if supplied is not None else None,
                          headers={"WWW-Authenticate": 'Basic realm="listening admin"'})
        summary = summarize(store.votes(), settings.vote_target)
        summary["security_events"] = len(store.security_events())
        if format == "json":
            return summary
        text = format_summary(summary) + f"\nsecurity events: {summary['security_events']}"
        return HTMLResponse(_page("Admin", f"<h1>Votes</h1><pre>{html.escape(text)}</pre>"),
                            headers={"Cache-Control": "no-store"})

    return app


async def _read_form(request: Request) -> dict:
    try:
        return dict(await request.form())
    except Refused:  # BodyTooLarge: answered as such
        raise
    except Exception as err:  # multipart parser errors carry no common base class
        raise Refused(400, f"unreadable form body: {err}")


_RATINGS = {str(v): v for v in range(1, 6)}


def _parse_json_int(text: str) -> int | float:
    # int() raises on more than 4,300 digits; a float fails the field checks by type, so a
    # 5,000-digit rating is a 422 naming the field, not a 500.
    return int(text) if len(text) <= 18 else float(text)


def _parse_json(body: bytes):
    try:
        return json.loads(body, parse_int=_parse_json_int)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Refused(400, f"body is not valid JSON: {err}")
    except RecursionError:
        raise Refused(400, "body is not valid JSON: nested too deeply")


def _same_secret(supplied: str, expected: str) -> bool:
    # Bytes: compare_digest raises on non-ASCII str, and a client must not turn that into a 500.
    return secrets.compare_digest(supplied.encode("utf-8", "replace"), expected.encode())


def jsonable_errors(exc: RequestValidationError) -> list:
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]


def _admin_credential(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    if scheme.lower() == "basic" and value:
        try:
            return base64.b64decode(value.strip()).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return ""
    return None


_STYLE = """body{font-family:sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem}
.clips{display:flex;gap:2rem;flex-wrap:wrap}.clip{flex:1;min-width:16rem}
button{font-size:1.1rem;padding:.5rem 1.2rem;margin-right:.5rem}fieldset{border:0;padding:0}
.caption{font-size:1.2rem;background:#f3f3f3;padding:.8rem}"""

_LOGIN_FORM = """<h1>Listening test</h1><p>Paste the invite token you were given.</p>
<form method="post" action="/login"><input name="token" size="40" autocomplete="off">
<button type="submit">Start</button></form>"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>"
            f"{html.escape(title)}</title><meta name=viewport content='width=device-width'>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")


def _rating_inputs(side: str) -> str:
    options = "".join(f"<label><input type=radio name=rating_{side} value={v} "
                      f"id=rating_{side}_{v}>{v}</label> " for v in range(1, 6))
    return f"<fieldset><legend>Rate clip {side.upper()} (optional)</legend>{options}</fieldset>"


def _pair_page(pair, issued, csrf_token: str, done: int, total: int) -> str:
    clips = "".join(
        f"<div class=clip><h2>Clip {side.upper()}</h2><audio controls preload=none "
        f"src='/audio/{html.escape(issued[f'clip_{side}'])}'></audio>{_rating_inputs(side)}</div>"
        for side in ("a", "b"))
    body = (f"<p>Pair {done + 1} of {total}</p><p>Caption:</p>"
            f"<p class=caption id=caption>{html.escape(pair.caption)}</p>"
            f"<form method=post action='/vote' id=vote-form>"
            f"<input type=hidden name=pair_id id=pair_id value='{html.escape(pair.pair_id)}'>"
            f"<input type=hidden name=csrf_token value='{html.escape(csrf_token)}'>"
            f"<div class=clips>{clips}</div><p>Which clip fits the caption better and sounds "
            f"better?</p><button type=submit name=choice value=a id=choose-a>A</button>"
            f"<button type=submit name=choice value=b id=choose-b>B</button>"
            f"<button type=submit name=choice value=none id=choose-none>No preference</button>"
            f"</form>")
    return _page("Listening test", body)
