"""The notes API: ``/api/notes``.

Writes go to the primary; reads go to a replica that has caught up with the client's own
writes (see ``app.db``). The WAL position of the client's last write travels in the signed
session cookie under ``"lsn"``. ``GET /api/notes/<id>`` that misses on a replica asks the
primary before answering 404, so a note is found right after its creation by anyone, e.g.
through a shared link. Responses say which server answered in ``X-Served-By``.

Retrying a write: ``POST /api/notes`` with an ``Idempotency-Key`` header (1 to 255 visible
ASCII characters, e.g. a UUID) creates at most one note per key. A retry with the same key and
the same body gets the original note and status (201, with ``Idempotent-Replayed: true``); the
same key with another body is a 422. Keys are kept in PostgreSQL under a unique constraint, so
retries that reach different droplets at once agree; a key is forgotten 24 hours after its
first use (``IDEMPOTENCY_KEY_LIFETIME``).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from datetime import UTC
from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, request, session, url_for
from sqlalchemy import bindparam, delete, func, insert, or_, select
from sqlalchemy import text as sql_text
from werkzeug.routing import IntegerConverter

from app.db import Database, Result, Statement
from app.models import (
    IDEMPOTENCY_KEY_LIFETIME,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_NOTE_LENGTH,
    idempotency_keys,
    notes,
)

bp = Blueprint("api", __name__, url_prefix="/api")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_ID = 2**63 - 1
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a request body."""
EXPIRED_KEYS_PER_WRITE = 100
"""Expired idempotency keys deleted by each write that brings a key."""
_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_LENGTH}}}")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: no per-byte alternation
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))

_keys = idempotency_keys.c
_expired = _keys.created_at < func.now() - IDEMPOTENCY_KEY_LIFETIME
_oldest_expired = (select(_keys.key).where(_expired).order_by(_keys.created_at)
                   .limit(EXPIRED_KEYS_PER_WRITE).with_for_update(skip_locked=True))

LIST = Statement(
    "SELECT json_build_object('notes', coalesce(json_agg(page"
    ' ORDER BY page.created_at COLLATE "C" DESC, page.id DESC), \'[]\'))::text AS body'
    " FROM (SELECT id, text,"
    " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"
    " AS created_at FROM notes ORDER BY notes.created_at DESC, notes.id DESC"
    " LIMIT %(limit)s) AS page",
    {},
)
"""A page of notes, newest first, as the response's JSON document, built by PostgreSQL: one
value to pass on instead of a row per note to convert and encode (issue 14). ``created_at``
as ``_note_json`` writes it; fixed-width UTC text, so it sorts as the times do."""
GET = Statement.of(select(notes).where(notes.c.id == bindparam("id")))
INSERT = Statement.of(insert(notes).values(text=bindparam("text")).returning(*notes.c))
FORGET_EXPIRED_KEYS = Statement.of(
    delete(idempotency_keys).where(
        _expired, or_(_keys.key == bindparam("key"), _keys.key.in_(_oldest_expired)))
)
"""The key itself if it expired, and up to EXPIRED_KEYS_PER_WRITE others."""
CLAIM_AND_INSERT = Statement.of(sql_text(
    "WITH claim AS ("
    " INSERT INTO idempotency_keys (key, fingerprint, note_id)"
    " VALUES (:key, :fingerprint, nextval(pg_get_serial_sequence('notes', 'id')))"
    " ON CONFLICT (key) DO NOTHING RETURNING note_id)"
    " INSERT INTO notes (id, text) OVERRIDING SYSTEM VALUE"
    " SELECT note_id, :text FROM claim RETURNING id"
))
"""Claims the key and inserts its note, or does nothing when the key is known (once a
concurrent claim of the same key has committed: the unique key makes it wait). One statement,
so the note's id is drawn first; a known key spends one (ids have gaps anyway)."""
KNOWN_KEY = Statement.of(
    select(_keys.fingerprint, *notes.c)
    .join_from(idempotency_keys, notes, notes.c.id == _keys.note_id)
    .where(_keys.key == bindparam("key"))
)
"""The key's fingerprint and note; a statement of its own, so that it sees a concurrent
claim committed while CLAIM_AND_INSERT waited."""


class NoteIdConverter(IntegerConverter):
    """``<id:...>``: ASCII digits only (``int`` would also take "١", an Arabic-Indic one)."""

    regex = r"[0-9]+"


@bp.post("/notes")
def create_note() -> tuple[Response, int, dict[str, str]]:
    text = _note_text()
    key = _idempotency_key()
    if key is None:
        result = _database().write(INSERT.bind(text=text))
        (note,), replayed = result.value[0], False
    else:
        digest = hashlib.sha256(text.encode()).hexdigest()
        result = _database().write(
            FORGET_EXPIRED_KEYS.bind(key=key),
            CLAIM_AND_INSERT.bind(key=key, fingerprint=digest, text=text),
            KNOWN_KEY.bind(key=key),
        )
        _, created, (note,) = result.value
        if note.fingerprint != digest:
            abort(422, description="this Idempotency-Key was used with a different body")
        replayed = not created
    session["lsn"] = max(_session_lsn(), result.lsn)
    # A path, not a URL: nothing absolute is built from the request's Host (issue 13), and a
    # client resolves it against the URL it asked for (RFC 9110, 10.2.2).
    headers = {"Location": url_for("api.get_note", note_id=note.id)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return _served(jsonify(_note_json(note)), result), 201, headers


@bp.get("/notes")
def list_notes() -> Response:
    result = _database().read(LIST.bind(limit=_limit()), _session_lsn())
    return _served(Response(result.value[0].body, mimetype="application/json"), result)


@bp.get("/notes/<id:note_id>")
def get_note(note_id: int) -> Response:
    if note_id > MAX_ID:
        abort(404, description="note not found")
    database, query = _database(), GET.bind(id=note_id)
    result = database.read(query, _session_lsn())
    if not result.value and result.served_by != "primary":
        result = database.read_primary(query)
    if not result.value:
        abort(404, description="note not found")
    return _served(jsonify(_note_json(result.value[0])), result)


def _database() -> Database:
    return current_app.extensions["webstack"].database


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _KEY.fullmatch(key):
        abort(400, description="Idempotency-Key must be 1 to "
                               f"{MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters")
    return key


def _json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in the JSON text ``raw`` (brackets in strings skipped)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    steps = (1 if bracket in b"[{" else -1 for bracket in brackets)
    return max(itertools.accumulate(steps), default=0)


def _note_text() -> str:
    """The validated ``text`` of a JSON request body, or a 4xx."""
    if not request.is_json:
        abort(415, description="Content-Type must be application/json")
    if _json_depth(request.get_data(cache=True)) > MAX_JSON_DEPTH:
        abort(400, description=f"body must not nest deeper than {MAX_JSON_DEPTH} levels")
    body: Any = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, description='body must be a JSON object like {"text": "..."}')
    text = body.get("text")
    if not isinstance(text, str):
        abort(400, description="text is required and must be a string")
    if not text.strip():
        abort(400, description="text must not be empty")
    if len(text) > MAX_NOTE_LENGTH:
        abort(400, description=f"text must be at most {MAX_NOTE_LENGTH} characters")
    if "\x00" in text:
        abort(400, description="text must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        abort(400, description="text must be valid Unicode (no lone surrogates)")
    return text


def _limit() -> int:
    raw = request.args.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3 and 1 <= int(raw) <= MAX_LIMIT):
        abort(400, description=f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _session_lsn() -> int:
    lsn = session.get("lsn", 0)
    return lsn if isinstance(lsn, int) else 0


def _note_json(row: Any) -> dict[str, object]:
    created_at = row.created_at.astimezone(UTC).isoformat(timespec="microseconds")
    return {"id": row.id, "text": row.text, "created_at": created_at}


def _served(response: Response, result: Result) -> Response:
    response.headers["X-Served-By"] = result.served_by
    return response
