"""Log records never carry secrets, but keep the settings that only talk about them."""

from __future__ import annotations

import json
import logging

from provisioning.core.logging import JsonFormatter, TextFormatter


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("t", logging.WARNING, __file__, 1, "msg", None, None)
    rec.__dict__.update(extra)
    return rec


def test_secrets_are_masked_and_durations_about_them_are_not() -> None:
    rec = record(
        token="eyJhbGciOi.x.y",
        api_key="prvng_abc_def",
        password="hunter2",
        token_ttl_s=900,
        key_overlap_s=1800,
        token_s="a string ending like a duration",
    )
    doc = json.loads(JsonFormatter().format(rec))
    text = TextFormatter().format(rec)
    for key in ("token", "api_key", "password", "token_s"):
        assert doc[key] == "***"
    assert doc["token_ttl_s"] == 900 and doc["key_overlap_s"] == 1800
    assert "hunter2" not in text and "prvng_abc_def" not in text and "token_ttl_s=900" in text
