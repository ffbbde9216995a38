"""The notes API: ``/api/notes``.

Writes go to the primary; reads go to a replica that has caught up with the client's own
writes (see ``app.db``). The WAL position of the client's last write travels in the signed
session cookie under ``"lsn"``. ``GET /api/notes/<id>`` that misses on a replica asks the
primary before answering 404, so a note is found right after its creation by anyone, e.g.
through a shared link. Responses say which server answered in ``X-Served-By``.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, request, session, url_for
from sqlalchemy import Connection, Row, insert, select

from app.db import Database, Result
from app.models import MAX_NOTE_LENGTH, notes

bp = Blueprint("api", __name__, url_prefix="/api")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_ID = 2**63 - 1


@bp.post("/notes")
def create_note() -> tuple[Response, int, dict[str, str]]:
    text = _note_text()
    result = _database().write(
        lambda conn: conn.execute(insert(notes).values(text=text).returning(*notes.c)).one()
    )
    session["lsn"] = max(_session_lsn(), result.lsn)
    location = url_for("api.get_note", note_id=result.value.id, _external=True)
    return _served(jsonify(_note_json(result.value)), result), 201, {"Location": location}


@bp.get("/notes")
def list_notes() -> Response:
    limit = _limit()
    query = select(notes).order_by(notes.c.created_at.desc(), notes.c.id.desc()).limit(limit)
    result = _database().read(lambda conn: conn.execute(query).all(), _session_lsn())
    return _served(jsonify(notes=[_note_json(row) for row in result.value]), result)


@bp.get("/notes/<int:note_id>")
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


def _note_text() -> str:
    """The validated ``text`` of a JSON request body, or a 4xx."""
    if not request.is_json:
        abort(415, description="Content-Type must be application/json")
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
