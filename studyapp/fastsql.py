"""The participant hot path's few statements, as prepared SQL text instead of ORM querysets.

Why: on the judgment POST, building a queryset and compiling it to SQL cost more than the
database's own work. Measured on the 2-core benchmark box (``bench/load.py``'s set-up): the
locked-trial read as an ORM queryset (``select_for_update(of=...)``, four joins) took 2.6 ms
of Python to compile and 5.2 ms in all, the same statement as SQL text 0.2 ms. Each function
here runs one statement whose text is built once per process from the models' ``_meta`` (so a
renamed table or column follows the models) and keeps the ORM's semantics: rows come back as
model instances through ``Model.objects.raw`` (the backend's converters, e.g. SQLite's
datetimes, apply), parameters are adapted by the backend's ``ops``, and database errors are
Django's (``IntegrityError`` included). PostgreSQL and SQLite both run them; the row lock is
``FOR UPDATE OF`` the trial where the backend has it (SQLite serialises writers anyway).

Everything else, and every rare path of the hot one, stays on the ORM (:mod:`.scheduler`).
"""

from __future__ import annotations

from datetime import datetime
from functools import cache

from django.db import connection

from .models import Judgment, Participant, Session, Study, Trial


def _table(model) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _column(model, field: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(field).column)


@cache
def _locked_trial_sql(vendor: str) -> str:  # (vendor: a cache key per backend)
    q = connection.ops.quote_name
    lock = " FOR UPDATE OF t" if connection.features.has_select_for_update_of else ""
    return (
        f"SELECT t.{q('id')}, t.{_column(Trial, 'session')}, t.{_column(Trial, 'position')},"
        f" t.{_column(Trial, 'leased_until')}, t.{_column(Trial, 'released')},"
        f" st.{_column(Study, 'lease_minutes')} AS lease_minutes, j.{q('id')} AS judgment_pk"
        f" FROM {_table(Trial)} t"
        f" JOIN {_table(Session)} s ON s.{q('id')} = t.{_column(Trial, 'session')}"
        f" JOIN {_table(Participant)} p ON p.{q('id')} = s.{_column(Session, 'participant')}"
        f" JOIN {_table(Study)} st ON st.{q('id')} = p.{_column(Participant, 'study')}"
        f" LEFT JOIN {_table(Judgment)} j ON j.{_column(Judgment, 'trial')} = t.{q('id')}"
        f" WHERE s.{_column(Session, 'token')} = %s AND t.{_column(Trial, 'position')} = %s"
        f"{lock}"
    )


def locked_trial(token: str, position: int) -> Trial | None:
    """The trial at ``position`` of the session with ``token``, its row locked (call it inside
    a transaction), or ``None``. One statement; the instance carries two extra attributes:
    ``lease_minutes`` (its study's) and ``judgment_pk`` (its judgment's id, or ``None``).

    Only the trial's row is locked: FOR UPDATE on a joined pair or session row would block the
    foreign-key checks of every session being built with that pair.
    """
    rows = list(Trial.objects.raw(_locked_trial_sql(connection.vendor), [token, position]))
    return rows[0] if rows else None


@cache
def _insert_sql(model, vendor: str) -> tuple[str, tuple]:
    fields = tuple(f for f in model._meta.concrete_fields if not f.primary_key)
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    sql = (
        f"INSERT INTO {_table(model)} ({columns}) VALUES ({', '.join(['%s'] * len(fields))})"
    )
    if connection.features.can_return_columns_from_insert:
        sql += f" RETURNING {connection.ops.quote_name(model._meta.pk.column)}"
    return sql, fields


def insert(obj) -> None:
    """``obj.save()`` for a new row, as one INSERT: every field's ``pre_save`` (``auto_now_add``
    included) and ``get_db_prep_save`` as the ORM runs them; sets ``obj.pk``. No signals (none
    are connected to these models)."""
    sql, fields = _insert_sql(type(obj), connection.vendor)
    values = [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        obj.pk = (
            cursor.fetchone()[0]
            if connection.features.can_return_columns_from_insert
            else cursor.lastrowid
        )
    obj._state.adding = False
    obj._state.db = connection.alias


@cache
def _lease_sql(vendor: str) -> dict[str, str]:
    t, q = _table(Trial), connection.ops.quote_name
    lease, session, released = (
        _column(Trial, "leased_until"), _column(Trial, "session"), _column(Trial, "released")
    )
    return {
        "end": f"UPDATE {t} SET {lease} = NULL WHERE {q('id')} = %s",
        "end_and_renew": (
            f"UPDATE {t} SET {lease} = CASE WHEN {q('id')} = %s THEN NULL ELSE %s END"
            f" WHERE {session} = %s AND {released} = %s AND ({q('id')} = %s OR {lease} < %s)"
        ),
        "renew": (
            f"UPDATE {t} SET {lease} = %s"
            f" WHERE {session} = %s AND {released} = %s AND {lease} < %s"
        ),
    }


def settle_leases(
    session_id: int, trial_id: int, *, end: bool, renew_until: datetime | None,
    renew_before: datetime | None,
) -> None:
    """One UPDATE: end trial ``trial_id``'s lease (``end``) and/or push every other unreleased
    lease of the session that ends before ``renew_before`` to ``renew_until``."""
    sql = _lease_sql(connection.vendor)
    adapt = connection.ops.adapt_datetimefield_value
    with connection.cursor() as cursor:
        if end and renew_until is None:
            cursor.execute(sql["end"], [trial_id])
        elif end:
            cursor.execute(sql["end_and_renew"], [
                trial_id, adapt(renew_until), session_id, False, trial_id, adapt(renew_before),
            ])
        elif renew_until is not None:
            cursor.execute(
                sql["renew"], [adapt(renew_until), session_id, False, adapt(renew_before)]
            )
