"""Studies, cases, readers, their case orders and the answers.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("ask_findings", sa.Boolean, nullable=False),
        sa.Column("resolution", sa.Integer, nullable=False),
        sa.Column("admin_token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("setup", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('open', 'closed')", name="status_known"),
    )
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("origin", sa.String(9), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("finding_labels", sa.Text, nullable=False),
        sa.Column("png", sa.LargeBinary, nullable=False),
        sa.Column("png_sha256", sa.String(64), nullable=False),
        sa.CheckConstraint("origin IN ('real', 'synthetic')", name="origin_known"),
    )
    op.create_table(
        "readers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("order_seed", sa.Integer, nullable=False),
        sa.UniqueConstraint("study_id", "name", name="reader_name_unique"),
    )
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(32), nullable=False, unique=True),
        sa.Column("reader_id", sa.Integer, sa.ForeignKey("readers.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.UniqueConstraint("reader_id", "position", name="assignment_position_unique"),
        sa.UniqueConstraint("reader_id", "case_id", name="assignment_case_unique"),
    )
    op.create_table(
        "answers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("assignment_id", sa.Integer, sa.ForeignKey("assignments.id", ondelete="CASCADE"),
                  nullable=False, unique=True),
        sa.Column("call", sa.String(9), nullable=False),
        sa.Column("confidence", sa.Integer, nullable=False),
        sa.Column("findings", sa.Text, nullable=True),
        sa.Column("reading_ms", sa.Integer, nullable=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("call IN ('real', 'synthetic')", name="call_known"),
        sa.CheckConstraint("confidence BETWEEN 1 AND 5", name="confidence_1_to_5"),
    )


def downgrade() -> None:
    for table in ("answers", "assignments", "readers", "cases", "studies"):
        op.drop_table(table)
