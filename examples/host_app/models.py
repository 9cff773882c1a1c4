"""The host's own models, on the host's own metadata.

The credits tables are not here: they live on ``callora_credits.metadata`` and
have their own migrations, so this metadata (and the host's autogenerate)
knows nothing of them.
"""

from __future__ import annotations

from datetime import datetime, timezone

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import DateTime, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "Project", "db"]


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


db = SQLAlchemy(model_class=Base)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Project(db.Model):  # type: ignore[name-defined,misc]
    """A customer's API project: the host's business, not the library's."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: The JWT identity, the same string callora-credits keys balances by.
    #: No foreign key either way: the two schemas stay independent.
    owner_id: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_utcnow)
