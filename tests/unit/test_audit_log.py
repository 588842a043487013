"""The hash-chained audit log, one body on SQLite and on PostgreSQL: the chain verifies, every
kind of tampering is found at the right record, concurrent writers never fork it, secrets never
reach it, and search and export filter and page."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection

from provisioning.control_center.audit_log import (
    GENESIS_HASH,
    REDACTED,
    AuditEvent,
    AuditResult,
    append,
    canonical_json,
    export_lines,
    query,
    redact,
    verify,
)
from provisioning.control_center.tables_audit import audit_metadata, cc_audit
from provisioning.core.errors import ValidationError
from provisioning.core.store import Database, open_database, to_async_url

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
async def db(state_url: str) -> AsyncIterator[Database]:
    database = open_database(to_async_url(state_url), sqlite_synchronous="NORMAL")
    await database.run_write(lambda c: audit_metadata.create_all(c))
    yield database
    await database.close()


def event(i: int, **overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "action": "workflow:create",
        "actor": "alice",
        "actor_type": "user",
        "object_type": "workflow",
        "object_id": f"wf-{i}",
        "source": "127.0.0.1",
        "request_id": f"req-{i}",
        "service": "orchestrator",
        "details": {"i": i},
    }
    fields.update(overrides)
    return AuditEvent(**fields)


async def fill(db: Database, n: int) -> list[dict[str, Any]]:
    def body(conn: Connection) -> list[dict[str, Any]]:
        return [append(conn, event(i), now=T0 + timedelta(seconds=i)) for i in range(1, n + 1)]

    return await db.run_write(body)


async def rows(db: Database) -> list[dict[str, Any]]:
    def body(conn: Connection) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in conn.execute(select(cc_audit).order_by(cc_audit.c.seq))]

    return await db.run_read(body)


async def test_an_untouched_chain_verifies_and_follows_the_documented_formula(
    db: Database,
) -> None:
    assert (await db.run_read(verify)).ok
    records = await fill(db, 7)
    result = await db.run_read(verify)
    assert result.ok and result.checked == 7 and result.first_bad_seq is None
    assert (result.last_seq, result.last_hash) == (7, records[-1]["hash"])
    prev = GENESIS_HASH
    for seq, record in enumerate(records, start=1):
        body = {k: v for k, v in record.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert canonical == canonical_json(record)
        assert record["seq"] == seq and record["prev_hash"] == prev
        assert record["hash"] == hashlib.sha256((prev + canonical).encode()).hexdigest()
        prev = record["hash"]
    assert records[0]["ts"] == "2025-03-01T12:00:01.123456Z"


async def test_the_record_returned_by_append_is_what_query_reads_back(db: Database) -> None:
    local = timezone(timedelta(hours=2))
    written = await db.run_write(lambda c: append(c, event(1), now=T0.astimezone(local)))
    assert written["ts"] == "2025-03-01T12:00:00.123456Z"
    assert await db.run_read(lambda c: query(c)) == [written]


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("actor", "mallory"),
        ("result", "denied"),
        ("object_id", "wf-999"),
        ("details", {"i": 3, "extra": True}),
        ("ts", datetime(2020, 1, 1, tzinfo=UTC)),
    ],
)
async def test_editing_a_field_is_detected_at_that_record(
    db: Database, column: str, value: Any
) -> None:
    await fill(db, 6)
    await db.run_write(
        lambda c: c.execute(update(cc_audit).where(cc_audit.c.seq == 3).values({column: value}))
    )
    result = await db.run_read(verify)
    assert not result.ok
    assert (result.first_bad_seq, result.checked) == (3, 2)
    assert result.reason is not None and "altered" in result.reason


async def test_an_edit_with_a_recomputed_hash_is_detected_at_the_next_record(
    db: Database,
) -> None:
    records = await fill(db, 6)
    forged = {**records[2], "actor": "mallory"}
    forged["hash"] = hashlib.sha256(
        (forged["prev_hash"] + canonical_json(forged)).encode()
    ).hexdigest()
    await db.run_write(
        lambda c: c.execute(
            update(cc_audit).where(cc_audit.c.seq == 3).values(actor="mallory", hash=forged["hash"])
        )
    )
    result = await db.run_read(verify)
    assert (result.ok, result.first_bad_seq) == (False, 4)


async def test_deleting_a_middle_record_is_detected_at_the_missing_seq(db: Database) -> None:
    await fill(db, 7)
    await db.run_write(lambda c: c.execute(delete(cc_audit).where(cc_audit.c.seq == 4)))
    result = await db.run_read(verify)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 4, 3)
    assert result.reason is not None and "missing" in result.reason


async def test_swapping_two_records_contents_is_detected_at_the_earlier_one(
    db: Database,
) -> None:
    await fill(db, 6)
    before = await rows(db)
    third, fifth = before[2], before[4]
    columns = [c.name for c in cc_audit.columns if c.name not in ("seq", "id")]

    def swap(conn: Connection) -> None:
        def content(row: dict[str, Any]) -> dict[str, Any]:
            return {name: row[name] for name in columns}

        # ids are unique: park one while the other moves.
        conn.execute(update(cc_audit).where(cc_audit.c.seq == 3).values(id="parked"))
        conn.execute(
            update(cc_audit).where(cc_audit.c.seq == 5).values(id=third["id"], **content(third))
        )
        conn.execute(
            update(cc_audit).where(cc_audit.c.seq == 3).values(id=fifth["id"], **content(fifth))
        )

    await db.run_write(swap)
    after = await rows(db)
    assert [r["details"]["i"] for r in after] == [1, 2, 5, 4, 3, 6]
    result = await db.run_read(verify)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 3, 2)


async def test_dropping_the_newest_records_is_detected_against_a_known_head(
    db: Database,
) -> None:
    await fill(db, 7)
    head = await db.run_read(verify)
    assert head.last_seq is not None and head.last_hash is not None
    known = (head.last_seq, head.last_hash)
    await db.run_write(lambda c: c.execute(delete(cc_audit).where(cc_audit.c.seq >= 6)))
    assert (await db.run_read(verify)).ok  # a shorter chain is still a valid chain...
    result = await db.run_read(lambda c: verify(c, known_head=known))
    assert (result.ok, result.first_bad_seq) == (False, 6)  # ...but not the one seen before
    assert result.reason is not None and "truncated" in result.reason


async def test_verification_reads_in_pages_and_finds_tampering_past_the_first_page(
    db: Database,
) -> None:
    await fill(db, 9)
    assert (await db.run_read(lambda c: verify(c, page_size=2))).checked == 9
    await db.run_write(
        lambda c: c.execute(update(cc_audit).where(cc_audit.c.seq == 8).values(actor="x"))
    )
    result = await db.run_read(lambda c: verify(c, page_size=2))
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 8, 7)


async def test_concurrent_appends_keep_one_unbroken_chain(db: Database) -> None:
    async def one(i: int) -> dict[str, Any]:
        return await db.run_write(lambda c: append(c, event(i)))

    written = await asyncio.gather(*(one(i) for i in range(50)))
    assert sorted(r["seq"] for r in written) == list(range(1, 51))
    result = await db.run_read(verify)
    assert (result.ok, result.checked) == (True, 50)
    stored = await rows(db)
    assert sorted(r["details"]["i"] for r in stored) == list(range(50))


async def test_an_append_rolled_back_with_its_transaction_leaves_no_gap(db: Database) -> None:
    await fill(db, 2)

    def failing(conn: Connection) -> None:
        append(conn, event(3))
        raise RuntimeError("the change being audited failed")

    with pytest.raises(RuntimeError):
        await db.run_write(failing)
    await db.run_write(lambda c: append(c, event(4)))
    result = await db.run_read(verify)
    assert (result.ok, result.last_seq) == (True, 3)


async def test_secrets_in_details_never_reach_the_store(db: Database) -> None:
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    api_key = "prvng_k7f3a9_Zm9vYmFyYmF6cXV4cXV1eHh5eg"
    details = {
        "username": "alice",
        "password": "hunter2-hunter2",
        "headers": {"Authorization": f"Bearer {jwt}", "Cookie": "sid=s3ss10n", "Accept": "*/*"},
        "attempts": [{"refresh_token": "rt-0123456789"}, {"mfa_code": "123456"}],
        "apiKey": api_key,
        "note": f"client sent {api_key} and token {jwt}",
        "key_prefix": "prvng_k7f3a9",
    }
    written = await db.run_write(lambda c: append(c, event(1, details=details)))
    # Hashes, ids and timestamps are left out: their digits could contain a short secret by chance.
    volatile = {"hash", "prev_hash", "id", "ts"}
    dump = json.dumps([{k: v for k, v in r.items() if k not in volatile} for r in await rows(db)])
    for secret in ["hunter2", jwt, "s3ss10n", "rt-0123456789", "123456", api_key]:
        assert secret not in dump
    stored = written["details"]
    assert stored["password"] == REDACTED
    assert stored["headers"] == {"Authorization": REDACTED, "Cookie": REDACTED, "Accept": "*/*"}
    assert stored["attempts"] == [{"refresh_token": REDACTED}, {"mfa_code": REDACTED}]
    assert stored["username"] == "alice" and stored["key_prefix"] == "prvng_k7f3a9"
    assert (await db.run_read(verify)).ok


async def test_hostile_text_is_stored_cut_to_size_and_still_verifies(db: Database) -> None:
    hostile = "ev\x00il\ud800" + "x" * 1000
    written = await db.run_write(
        lambda c: append(
            c, event(1, actor=hostile, actor_type="anonymous", details={hostile: hostile})
        )
    )
    assert "\x00" not in written["actor"] and len(written["actor"]) == 200
    assert (await db.run_read(verify)).ok


async def test_an_event_with_an_unknown_result_or_actor_type_is_refused(db: Database) -> None:
    with pytest.raises(ValidationError, match="result"):
        await db.run_write(lambda c: append(c, event(1, result="maybe")))
    with pytest.raises(ValidationError, match="actor_type"):
        await db.run_write(lambda c: append(c, event(1, actor_type="robot")))
    assert await rows(db) == []


async def seed_for_search(db: Database) -> None:
    specs: list[tuple[str, str, AuditResult, str | None, str | None]] = [
        ("alice", "auth:login", "success", None, None),
        ("mallory", "auth:login", "failure", None, None),
        ("alice", "workflow:create", "success", "workflow", "wf-1"),
        ("bob", "workflow:cancel", "denied", "workflow", "wf-1"),
        ("bob", "workflow:create", "success", "workflow", "wf-2"),
        ("alice", "auth:logout", "success", None, None),
        ("system", "key:rotate", "error", "signing_key", "k2"),
    ]

    def body(conn: Connection) -> None:
        for i, (actor, action, result, otype, oid) in enumerate(specs):
            append(
                conn,
                AuditEvent(
                    action=action,
                    result=result,
                    actor=actor,
                    actor_type="system" if actor == "system" else "user",
                    object_type=otype,
                    object_id=oid,
                ),
                now=T0 + timedelta(minutes=i),
            )

    await db.run_write(body)


async def test_search_filters_by_actor_action_object_result_and_time(db: Database) -> None:
    await seed_for_search(db)

    async def seqs(**filters: Any) -> list[int]:
        found = await db.run_read(lambda c: query(c, **filters))
        return [r["seq"] for r in found]

    assert await seqs(actor="alice") == [1, 3, 6]
    assert await seqs(action="auth:login") == [1, 2]
    assert await seqs(action="auth:*") == [1, 2, 6]
    assert await seqs(action="workflow:*", result="success") == [3, 5]
    assert await seqs(object_type="workflow", object_id="wf-1") == [3, 4]
    assert await seqs(result="denied") == [4]
    assert await seqs(since=T0 + timedelta(minutes=2), until=T0 + timedelta(minutes=5)) == [3, 4, 5]
    naive = (T0 + timedelta(minutes=5)).replace(tzinfo=None)
    assert await seqs(since=naive) == [6, 7]
    assert await seqs(actor="nobody") == []
    assert await seqs(action="auth_*") == []  # "_" is literal, not a LIKE wildcard


async def test_search_pages_without_gaps_or_overlap(db: Database) -> None:
    await seed_for_search(db)
    pages = [await db.run_read(partial(query, limit=3, offset=o)) for o in (0, 3, 6)]
    assert [[r["seq"] for r in page] for page in pages] == [[1, 2, 3], [4, 5, 6], [7]]
    newest = await db.run_read(lambda c: query(c, limit=2, newest_first=True))
    assert [r["seq"] for r in newest] == [7, 6]
    bad_args: list[dict[str, Any]] = [
        {"limit": 0},
        {"limit": 1001},
        {"offset": -1},
        {"result": "ok"},
    ]
    for bad in bad_args:
        with pytest.raises(ValidationError):
            await db.run_read(partial(query, **bad))


async def test_export_yields_one_valid_json_line_per_record_in_pages(db: Database) -> None:
    await seed_for_search(db)
    lines = await db.run_read(lambda c: list(export_lines(c, page_size=2)))
    assert len(lines) == 7 and all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    parsed = [json.loads(line) for line in lines]
    assert parsed == await db.run_read(lambda c: query(c))
    filtered = await db.run_read(lambda c: list(export_lines(c, actor="bob", page_size=1)))
    assert [json.loads(line)["seq"] for line in filtered] == [4, 5]
    resumed = await db.run_read(lambda c: list(export_lines(c, after_seq=5)))
    assert [json.loads(line)["seq"] for line in resumed] == [6, 7]


def test_redaction_masks_secret_keys_in_any_spelling_and_depth() -> None:
    details = {
        "Password": "a",
        "new_password": "b",
        "clientSecret": "c",
        "X-Auth-Token": "d",
        "API-Key": "e",
        "set-cookie": "f",
        "refresh": "g",
        "otp": "h",
        "credentials": {"user": "u", "pass": "p"},
        "items": [{"access_token": "i"}, ("tuple", {"pwd": "j"})],
        "user": "alice",
        "count": 3,
        "enabled": True,
    }
    out = redact(details)
    for key in ["Password", "new_password", "clientSecret", "X-Auth-Token", "API-Key"]:
        assert out[key] == REDACTED
    for key in ["set-cookie", "refresh", "otp", "credentials"]:
        assert out[key] == REDACTED
    assert out["items"] == [{"access_token": REDACTED}, ["tuple", {"pwd": REDACTED}]]
    assert (out["user"], out["count"], out["enabled"]) == ("alice", 3, True)
    assert details["Password"] == "a"  # the input is not modified


def test_redaction_masks_credentials_inside_free_text() -> None:
    text = "Authorization: Basic YWxpY2U6aHVudGVyMg== then bearer abc.def-ghi"
    assert redact(text) == f"Authorization: Basic {REDACTED} then bearer {REDACTED}"
    assert redact({"message": "key prvng_ab12_0123456789abcdefXYZ used"}) == {
        "message": f"key {REDACTED} used"
    }
