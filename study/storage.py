"""The study's database: SQLAlchemy models, Alembic migrations and the few writes the app makes.

Any SQLAlchemy URL works: ``sqlite:///study.db`` (one file, the default) for one site,
``postgresql+psycopg://user@host/db`` for a multi-site study. The schema is made and upgraded only by
the Alembic migrations in ``study/migrations`` (:func:`migrate`), never by ``create_all``, so the
migrations are what the tests run.

Integrity lives in the schema, not only in the code: an answer is unique per assignment (a replayed or
double submit cannot add a second row, whichever process wins the race), confidence is checked to be
1-5 and the call to be "real" or "synthetic", and every write is one transaction.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

ORIGINS = ("real", "synthetic")
CONFIDENCE_RANGE = (1, 5)
MIGRATIONS = Path(__file__).parent / "migrations"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_token() -> str:
    """A URL-safe secret of 128 bits (``secrets``), for reader and admin links."""
    return secrets.token_urlsafe(16)


def token_digest(token: str) -> str:
    """Tokens are stored as their SHA-256 only: a copy of the database opens no reader's link."""
    return hashlib.sha256(token.encode()).hexdigest()


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (CheckConstraint("status IN ('open', 'closed')", name="status_known"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(8), default="open")
    ask_findings: Mapped[bool] = mapped_column(Boolean, default=True)
    resolution: Mapped[int] = mapped_column(Integer)
    admin_token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    setup: Mapped[str] = mapped_column(Text)  # JSON: sources, mix, seed, encoding; the recorded set-up
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    cases: Mapped[list[Case]] = relationship(back_populates="study", order_by="Case.id")
    readers: Mapped[list[Reader]] = relationship(back_populates="study", order_by="Reader.id")


class Case(Base):
    """One image shown to every reader. ``origin`` and ``source`` never leave the server for a reader."""

    __tablename__ = "cases"
    __table_args__ = (CheckConstraint("origin IN ('real', 'synthetic')", name="origin_known"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    origin: Mapped[str] = mapped_column(String(9))
    source: Mapped[str] = mapped_column(Text)  # file path, or bundle/archive and seed
    finding_labels: Mapped[str] = mapped_column(Text)  # NIH "Finding Labels": true (real) or requested
    png: Mapped[bytes] = mapped_column(LargeBinary)
    png_sha256: Mapped[str] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="cases")


class Reader(Base):
    __tablename__ = "readers"
    __table_args__ = (UniqueConstraint("study_id", "name", name="reader_name_unique"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    order_seed: Mapped[int] = mapped_column(Integer)  # the seed of this reader's case order, recorded

    study: Mapped[Study] = relationship(back_populates="readers")
    assignments: Mapped[list[Assignment]] = relationship(back_populates="reader", order_by="Assignment.position")


class Assignment(Base):
    """A case in one reader's order. ``key`` is the only id a reader ever sees: random, per reader."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("reader_id", "position", name="assignment_position_unique"),
        UniqueConstraint("reader_id", "case_id", name="assignment_case_unique"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(32), unique=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id", ondelete="CASCADE"), index=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)

    reader: Mapped[Reader] = relationship(back_populates="assignments")
    case: Mapped[Case] = relationship()
    answer: Mapped[Answer | None] = relationship(back_populates="assignment", uselist=False)


class Answer(Base):
    __tablename__ = "answers"
    __table_args__ = (
        CheckConstraint("call IN ('real', 'synthetic')", name="call_known"),
        CheckConstraint("confidence BETWEEN 1 AND 5", name="confidence_1_to_5"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    call: Mapped[str] = mapped_column(String(9))
    confidence: Mapped[int] = mapped_column(Integer)
    findings: Mapped[str | None] = mapped_column(Text, nullable=True)  # NIH "Finding Labels"; None: not asked
    reading_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)  # as the reading page measured it
    answered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    assignment: Mapped[Assignment] = relationship(back_populates="answer")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys on and a busy timeout (one file, several writers)."""
    engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _foreign_keys(connection, _record) -> None:
            connection.execute("PRAGMA foreign_keys=ON")
    return engine


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` with the Alembic migrations (creates the tables)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, revision)


def session_factory(url: str) -> sessionmaker:
    return sessionmaker(make_engine(url), expire_on_commit=False)
