"""Table definitions shared by the queries and the migrations."""

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    MetaData,
    Table,
    Text,
    func,
)

MAX_NOTE_LENGTH = 10_000
"""Longest note text accepted, in characters."""

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
