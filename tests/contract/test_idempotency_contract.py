"""The ops-controller's idempotency store contract (``IdempotencyStore``'s docstring), one body
run on every backend: SQLite and PostgreSQL (the state store) and embedded SurrealDB.

Each test gets a store of its own (a file in ``tmp_path`` or a fresh PostgreSQL database);
``reopen`` makes another store on the same location, for durability.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from provisioning.core.errors import InvalidState, NotFound, ValidationError
from provisioning.ops_controller import idempotency_sql, idempotency_surreal
from provisioning.ops_controller.idempotency import (
    IdempotencyRecord,
    IdempotencyStore,
    TokenState,
)
from provisioning.ops_controller.idempotency_sql import SqlIdempotencyStore
from provisioning.ops_controller.idempotency_surreal import SurrealIdempotencyStore

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), "surrealdb"]
T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
EVENT = {"action": "ops.server.create", "result": "success", "actor": None, "details": {"n": 1}}

Factory = Callable[[], IdempotencyStore]


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """A factory of (unopened) stores that all use one location of the parametrised backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ctl.db'}"
        return lambda: SqlIdempotencyStore.from_url(url)
    if request.param == "postgres":
        pg = str(request.getfixturevalue("pg_url"))
        return lambda: SqlIdempotencyStore.from_url(pg)
    return lambda: SurrealIdempotencyStore(tmp_path / "ctl.surreal")


@pytest.fixture
async def store(make_store: Factory) -> AsyncIterator[IdempotencyStore]:
    s = make_store()
    await s.open()
    yield s
    await s.close()


async def dispatched(store: IdempotencyStore, jti: str, workflow_id: str = "wf-1") -> None:
    await store.claim(jti, "server.create", now=T0)
    await store.mark_dispatched(jti, workflow_id=workflow_id, now=T0 + timedelta(seconds=1))


def assert_utc(record: IdempotencyRecord) -> None:
    for value in (
        record.received_at,
        record.updated_at,
        record.dispatched_at,
        record.finished_at,
    ):
        if value is not None:
            assert value.utcoffset() == timedelta(0), record


# ---------------------------------------------------------------------- claim


async def test_every_backend_implements_the_protocol(store: IdempotencyStore) -> None:
    assert isinstance(store, IdempotencyStore)


async def test_the_first_claim_is_new_and_a_later_one_returns_the_record_unchanged(
    store: IdempotencyStore,
) -> None:
    first, is_new = await store.claim("jti-1", "server.create", now=T0)
    assert is_new
    assert first.jti == "jti-1" and first.op_type == "server.create"
    assert first.state is TokenState.RECEIVED and first.attempts == 0
    assert first.workflow_id is None and first.outcome is None and first.reason is None
    assert first.received_at == first.updated_at == T0
    assert first.dispatched_at is None and first.finished_at is None

    again, is_new = await store.claim("jti-1", "server.delete", now=T0 + timedelta(hours=1))
    assert not is_new
    assert again == first
    assert await store.get("jti-1") == first


async def test_of_fifty_concurrent_claims_of_one_jti_exactly_one_is_new(
    store: IdempotencyStore,
) -> None:
    """Five hot jtis, fifty interleaved claims each (an engine that loses the race now and then
    is caught with high probability)."""
    hot = [f"hot-{k}" for k in range(5)]
    claims = [(jti, i) for i in range(50) for jti in hot]
    results = await asyncio.gather(
        *(store.claim(jti, f"op-{i}", now=T0 + timedelta(seconds=i)) for jti, i in claims)
    )
    by_jti = list(zip((jti for jti, _ in claims), results, strict=True))
    for jti in hot:
        mine = [result for j, result in by_jti if j == jti]
        assert sum(is_new for _, is_new in mine) == 1, jti
        winner = next(record for record, is_new in mine if is_new)
        assert all(record == winner for record, _ in mine)
        assert await store.get(jti) == winner


async def test_concurrent_claims_of_distinct_jtis_are_all_new(store: IdempotencyStore) -> None:
    results = await asyncio.gather(*(store.claim(f"j-{i}", "op", now=T0) for i in range(40)))
    assert all(is_new for _, is_new in results)
    assert len(await store.in_state("received", limit=100)) == 40


async def test_get_of_an_unknown_jti_is_none(store: IdempotencyStore) -> None:
    assert await store.get("never-claimed") is None


# ---------------------------------------------------------------------- state machine


async def test_dispatch_counts_attempts_and_a_redispatch_after_a_crash_is_allowed(
    store: IdempotencyStore,
) -> None:
    await store.claim("j", "op", now=T0)
    first = await store.mark_dispatched("j", workflow_id="wf-1", now=T0 + timedelta(seconds=1))
    assert first.state is TokenState.DISPATCHED and first.attempts == 1
    assert first.workflow_id == "wf-1"
    assert first.dispatched_at == first.updated_at == T0 + timedelta(seconds=1)
    assert first.received_at == T0

    kept = await store.mark_dispatched("j", now=T0 + timedelta(seconds=2))
    assert kept.attempts == 2 and kept.workflow_id == "wf-1"
    replaced = await store.mark_dispatched("j", workflow_id="wf-2", now=T0 + timedelta(seconds=3))
    assert replaced.attempts == 3 and replaced.workflow_id == "wf-2"
    assert await store.get("j") == replaced


async def test_a_dispatched_token_completes_with_its_outcome(store: IdempotencyStore) -> None:
    await dispatched(store, "j")
    at = T0 + timedelta(minutes=5)
    assert await store.finish(
        "j", "completed", outcome={"workflow": "Completed", "n": [1, 2]}, audit_event=EVENT, now=at
    )
    record = await store.get("j")
    assert record is not None
    assert record.state is TokenState.COMPLETED and record.terminal
    assert record.outcome == {"workflow": "Completed", "n": [1, 2]}
    assert record.reason is None
    assert record.finished_at == record.updated_at == at
    assert record.workflow_id == "wf-1" and record.attempts == 1


async def test_a_received_token_can_fail_but_not_complete(store: IdempotencyStore) -> None:
    await store.claim("refused", "op", now=T0)
    with pytest.raises(
        InvalidState, match=r"'refused' is received.*completed only from dispatched"
    ):
        await store.finish("refused", "completed", audit_event=EVENT)
    record = await store.get("refused")
    assert record is not None and record.state is TokenState.RECEIVED
    assert await store.outbox_pending() == []

    assert await store.finish(
        "refused", TokenState.FAILED, reason="policy denied", audit_event=EVENT
    )
    record = await store.get("refused")
    assert record is not None
    assert record.state is TokenState.FAILED and record.reason == "policy denied"
    assert record.attempts == 0 and record.dispatched_at is None


@pytest.mark.parametrize("terminal", ["completed", "failed"])
async def test_a_terminal_token_cannot_be_dispatched_again(
    store: IdempotencyStore, terminal: str
) -> None:
    await dispatched(store, "done")
    await store.finish("done", terminal, audit_event=EVENT)
    with pytest.raises(InvalidState, match=f"'done' is {terminal}") as err:
        await store.mark_dispatched("done", workflow_id="wf-9")
    assert err.value.details == {"jti": "done", "state": terminal, "to": "dispatched"}
    record = await store.get("done")
    assert record is not None and record.state == terminal and record.workflow_id == "wf-1"


async def test_unknown_tokens_cannot_be_dispatched_or_finished(store: IdempotencyStore) -> None:
    with pytest.raises(NotFound, match="'ghost'"):
        await store.mark_dispatched("ghost")
    with pytest.raises(NotFound, match="'ghost'"):
        await store.finish("ghost", "failed", audit_event=EVENT)
    assert await store.get("ghost") is None
    assert await store.outbox_pending() == []


async def test_malformed_arguments_are_refused_before_anything_is_written(
    store: IdempotencyStore,
) -> None:
    with pytest.raises(ValidationError, match="jti"):
        await store.claim("", "op", now=T0)
    with pytest.raises(ValidationError, match="jti"):
        await store.claim("x" * 256, "op", now=T0)
    with pytest.raises(ValidationError, match="timezone-aware"):
        await store.claim("j", "op", now=datetime(2030, 1, 1))  # naive on purpose
    await dispatched(store, "j")
    with pytest.raises(ValidationError, match="'completed' or 'failed'"):
        await store.finish("j", "dispatched", audit_event=EVENT)
    with pytest.raises(ValidationError, match="not one of"):
        await store.finish("j", "done", audit_event=EVENT)
    with pytest.raises(ValidationError, match="audit_event is not JSON"):
        await store.finish("j", "completed", audit_event={"at": T0})
    with pytest.raises(ValidationError, match="limit"):
        await store.outbox_pending(0)
    record = await store.get("j")
    assert record is not None and record.state is TokenState.DISPATCHED
    assert await store.outbox_pending() == []


# ---------------------------------------------------------------------- finish + outbox


async def test_finish_writes_one_outbox_row_and_a_second_finish_none(
    store: IdempotencyStore,
) -> None:
    await dispatched(store, "j")
    assert await store.finish("j", "completed", outcome={"ok": True}, audit_event=EVENT)
    pending = await store.outbox_pending()
    assert [event for _, event in pending] == [EVENT]
    before = await store.get("j")

    assert not await store.finish("j", "completed", outcome={"ok": 2}, audit_event={"again": 1})
    assert not await store.finish("j", "failed", reason="late", audit_event={"again": 2})
    assert await store.outbox_pending() == pending
    assert await store.get("j") == before  # the first outcome stands


async def test_of_racing_finishes_exactly_one_wins_and_writes_the_outbox(
    store: IdempotencyStore,
) -> None:
    races = [f"race-{k}" for k in range(5)]
    for jti in races:
        await dispatched(store, jti)
    finishes = [(jti, i) for i in range(20) for jti in races]
    results = await asyncio.gather(
        *(
            store.finish(
                jti,
                "completed" if i % 2 else "failed",
                reason=f"r{i}",
                audit_event={"jti": jti, "i": i},
            )
            for jti, i in finishes
        )
    )
    winners = {jti: i for (jti, i), won in zip(finishes, results, strict=True) if won}
    assert sum(results) == len(races) and set(winners) == set(races)
    events = [event for _, event in await store.outbox_pending(limit=1000)]
    assert sorted(events, key=lambda e: e["jti"]) == [
        {"jti": jti, "i": winners[jti]} for jti in sorted(races)
    ]
    for jti in races:
        record = await store.get(jti)
        assert record is not None and record.reason == f"r{winners[jti]}"
        assert record.state == ("completed" if winners[jti] % 2 else "failed")


async def test_outcome_and_outbox_row_commit_together_or_not_at_all(
    store: IdempotencyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox insert of the second finish collides with the first's row: the whole
    transaction must roll back, leaving the record dispatched."""
    for module in (idempotency_sql, idempotency_surreal):
        monkeypatch.setattr(module, "new_outbox_id", lambda: "0190a000-0000-7000-8000-000000000001")
    await dispatched(store, "a")
    await dispatched(store, "b")
    assert await store.finish("a", "completed", audit_event={"jti": "a"})
    with pytest.raises(Exception):  # noqa: B017 - each backend raises its own store error
        await store.finish("b", "completed", outcome={"ok": True}, audit_event={"jti": "b"})
    record = await store.get("b")
    assert record is not None
    assert record.state is TokenState.DISPATCHED and record.outcome is None
    assert [event for _, event in await store.outbox_pending()] == [{"jti": "a"}]


async def test_the_outbox_is_read_oldest_first_and_done_removes_rows(
    store: IdempotencyStore,
) -> None:
    for i in range(6):
        await dispatched(store, f"j{i}")
    for i in (3, 0, 5, 1, 4, 2):  # finish order, not claim order, is outbox order
        assert await store.finish(f"j{i}", "completed", audit_event={"jti": f"j{i}", "n": i})

    pending = await store.outbox_pending(limit=100)
    assert [event["n"] for _, event in pending] == [3, 0, 5, 1, 4, 2]
    ids = [outbox_id for outbox_id, _ in pending]
    assert len(set(ids)) == 6 and all(len(i) == 36 for i in ids)
    assert await store.outbox_pending(limit=2) == pending[:2]

    assert await store.outbox_done([*ids[:2], "01900000-0000-7000-8000-00000000dead"]) == 2
    assert await store.outbox_pending() == pending[2:]
    assert await store.outbox_done([]) == 0
    assert await store.outbox_done(ids) == 4
    assert await store.outbox_pending() == []


async def test_the_audit_event_reads_back_as_its_json_round_trip(store: IdempotencyStore) -> None:
    event: dict[str, Any] = {
        "actor": None,
        "nested": {"empty": {}, "list": [1, "two", None, 3.5, True], "none": None},
        "unicode": "⟨jti⟩ ✓",
        "tuple": (1, 2),
    }
    await dispatched(store, "j")
    await store.finish("j", "completed", outcome={"x": None}, audit_event=event)
    ((_, stored),) = await store.outbox_pending()
    assert stored == {**event, "tuple": [1, 2]}
    record = await store.get("j")
    assert record is not None and record.outcome == {"x": None}


# ---------------------------------------------------------------------- in_state


async def test_in_state_lists_the_least_recently_updated_first(store: IdempotencyStore) -> None:
    for i in range(5):
        await store.claim(f"j{i}", "op", now=T0)
    for i in (4, 1, 3):
        await store.mark_dispatched(f"j{i}", now=T0 + timedelta(seconds=10 - i))
    await store.finish("j3", "failed", reason="x", audit_event=EVENT)

    assert [r.jti for r in await store.in_state("dispatched")] == ["j4", "j1"]
    assert [r.jti for r in await store.in_state(TokenState.RECEIVED)] == ["j0", "j2"]
    assert [r.jti for r in await store.in_state("failed")] == ["j3"]
    assert await store.in_state("completed") == []
    assert [r.jti for r in await store.in_state("dispatched", limit=1)] == ["j4"]
    with pytest.raises(ValidationError, match="not one of"):
        await store.in_state("running")


# ---------------------------------------------------------------------- durability, time, schema


async def test_records_and_outbox_survive_closing_and_reopening(make_store: Factory) -> None:
    first = make_store()
    await first.open()
    await dispatched(first, "kept")
    await first.claim("waiting", "op", now=T0)
    assert await first.finish("kept", "completed", outcome={"ok": True}, audit_event=EVENT)
    kept, pending = await first.get("kept"), await first.outbox_pending()
    await first.close()

    second = make_store()
    await second.open()  # open again: migrations already applied
    try:
        assert await second.get("kept") == kept
        assert await second.outbox_pending() == pending
        _, is_new = await second.claim("kept", "op", now=T0)
        assert not is_new
        assert [r.jti for r in await second.in_state("received")] == ["waiting"]
    finally:
        await second.close()


async def test_timestamps_are_stored_and_returned_in_utc(store: IdempotencyStore) -> None:
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2030, 6, 1, 14, 0, 0, 123456, tzinfo=plus_two)
    record, _ = await store.claim("j", "op", now=local)
    assert record.received_at == local
    assert record.received_at.utcoffset() == timedelta(0)
    assert record.received_at.hour == 12

    before = datetime.now(UTC)
    await store.mark_dispatched("j")  # default: now
    await store.finish("j", "completed", audit_event=EVENT)
    after = datetime.now(UTC)
    for rec in [await store.get("j"), *await store.in_state("completed")]:
        assert rec is not None
        assert_utc(rec)
        assert rec.received_at == local
        assert rec.dispatched_at is not None and before <= rec.dispatched_at <= after
        assert rec.finished_at is not None and before <= rec.finished_at <= after


async def test_opening_twice_is_harmless(store: IdempotencyStore) -> None:
    await store.claim("j", "op", now=T0)
    await store.open()
    assert await store.get("j") is not None
