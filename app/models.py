"""Table definitions shared by the queries and the migrations."""

from datetime import timedelta

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    MetaData,
    Table,
    Text,
    func,
)

MAX_NOTE_LENGTH = 10_000
"""Longest note text accepted, in characters."""
MAX_IDEMPOTENCY_KEY_LENGTH = 255
IDEMPOTENCY_KEY_LIFETIME = timedelta(hours=24)
"""A key is remembered this long after its first use; then it may create a new note."""

metadata = MetaData()

notes = Table(
    "notes",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("text", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(f"char_length(text) <= {MAX_NOTE_LENGTH}", name="notes_text_length"),
    Index("notes_created_at_id_idx", "created_at", "id"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("key", Text, primary_key=True),
    Column("fingerprint", Text, nullable=False),
    Column("note_id", BigInteger, ForeignKey("notes.id", ondelete="CASCADE")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(
        f"char_length(key) <= {MAX_IDEMPOTENCY_KEY_LENGTH}", name="idempotency_keys_key_length"
    ),
    Index("idempotency_keys_created_at_idx", "created_at"),
)
"""``Idempotency-Key`` of ``POST /api/notes``: the key (unique: the primary key), a digest of
the request it came with, and the note it created."""
