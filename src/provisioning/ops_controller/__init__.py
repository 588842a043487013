"""The ops-controller: consumes signed operation tokens from NATS and dispatches each one to the
orchestrator exactly once.

Its :mod:`.idempotency` store records every token's ``jti`` through
``received → dispatched → completed | failed`` and writes each terminal outcome's audit event
through a transactional outbox. Implementations: :mod:`.idempotency_sql` (SQLite, PostgreSQL)
and :mod:`.idempotency_surreal` (embedded SurrealDB).
"""
