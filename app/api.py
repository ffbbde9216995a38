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
from sqlalchemy import Connection, Row, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from werkzeug.routing import IntegerConverter

from app.db import Database, Result
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
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


class NoteIdConverter(IntegerConverter):
    """``<id:...>``: ASCII digits only (``int`` would also take "١", an Arabic-Indic one)."""

    regex = r"[0-9]+"


@bp.post("/notes")
def create_note() -> tuple[Response, int, dict[str, str]]:
    text = _note_text()
    key = _idempotency_key()
    if key is None:
        result = _database().write(lambda conn: (_insert_note(conn, text), False))
    else:
        digest = hashlib.sha256(text.encode()).hexdigest()
        result = _database().write(lambda conn: _insert_note_once(conn, key, digest, text))
    note, replayed = result.value
    if note is None:
        abort(422, description="this Idempotency-Key was used with a different body")
    session["lsn"] = max(_session_lsn(), result.lsn)
    headers = {"Location": url_for("api.get_note", note_id=note.id, _external=True)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return _served(jsonify(_note_json(note)), result), 201, headers


@bp.get("/notes")
def list_notes() -> Response:
    limit = _limit()
    query = select(notes).order_by(notes.c.created_at.desc(), notes.c.id.desc()).limit(limit)
    result = _database().read(lambda conn: conn.execute(query).all(), _session_lsn())
    return _served(jsonify(notes=[_note_json(row) for row in result.value]), result)


@bp.get("/notes/<id:note_id>")
def get_note(note_id: int) -> Response:
    if note_id > MAX_ID:
        abort(404, description="note not found")

    def fetch(conn: Connection) -> Row | None:
        return conn.execute(select(notes).where(notes.c.id == note_id)).one_or_none()

    database = _database()
    result = database.read(fetch, _session_lsn())
    if result.value is None and result.served_by != "primary":
        result = database.read_primary(fetch)
    if result.value is None:
        abort(404, description="note not found")
    return _served(jsonify(_note_json(result.value)), result)


def _database() -> Database:
    return current_app.extensions["webstack"].database


def _insert_note(conn: Connection, text: str) -> Row:
    return conn.execute(insert(notes).values(text=text).returning(*notes.c)).one()


def _insert_note_once(
    conn: Connection, key: str, digest: str, text: str
) -> tuple[Row | None, bool]:
    """(new note, False) for a new key; (its note, True) for a known key with the same body
    digest; (None, False) for a known key with another. A concurrent claim of the same key
    waits for the first one's commit (the unique key), then finds its note."""
    keys = idempotency_keys.c
    expired = keys.created_at < func.now() - IDEMPOTENCY_KEY_LIFETIME
    oldest = (select(keys.key).where(expired).order_by(keys.created_at)
              .limit(EXPIRED_KEYS_PER_WRITE).with_for_update(skip_locked=True))
    stale = or_(keys.key == key, keys.key.in_(oldest))
    conn.execute(delete(idempotency_keys).where(expired, stale))
    claim = pg_insert(idempotency_keys).values(key=key, fingerprint=digest)
    if conn.execute(claim.on_conflict_do_nothing().returning(keys.key)).first():
        note = _insert_note(conn, text)
        conn.execute(update(idempotency_keys).where(keys.key == key).values(note_id=note.id))
        return note, False
    known = conn.execute(select(keys.fingerprint, keys.note_id).where(keys.key == key)).one()
    if known.fingerprint != digest:
        return None, False
    return conn.execute(select(notes).where(notes.c.id == known.note_id)).one(), True


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


def _note_json(row: Row) -> dict[str, object]:
    created_at = row.created_at.astimezone(UTC).isoformat()
    return {"id": row.id, "text": row.text, "created_at": created_at}


def _served(response: Response, result: Result) -> Response:
    response.headers["X-Served-By"] = result.served_by
    return response
