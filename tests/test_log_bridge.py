"""Other libraries' stdlib log records become our JSON lines."""

from __future__ import annotations

import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage

from worker.logs import CapturingLog, LoggerLog, bridge_stdlib_logging


def test_records_are_forwarded_with_level_and_logger() -> None:
    log = CapturingLog()
    with bridge_stdlib_logging(log):
        logging.getLogger("some.library").warning("disk %s", "slow")
        logging.getLogger("some.library").info("below the bridge level")
    record = log.find("disk slow")[0]
    assert record["level"] == "WARN" and record["logger"] == "some.library"
    assert not log.find("below the bridge level")


def test_malformed_http_is_a_warning_without_traceback() -> None:
    log = CapturingLog()
    with bridge_stdlib_logging(log):
        try:
            raise BadHttpMessage("Invalid character in Content-Length")
        except BadHttpMessage:
            logging.getLogger("aiohttp.server").exception("Error handling request")
    record = log.find("malformed HTTP request refused")[0]
    assert record["level"] == "WARN"
    assert record["error"]["type"] == "BadHttpMessage"
    assert "traceback" not in record["error"]


def test_errors_keep_their_type_and_the_handler_is_removed() -> None:
    log = CapturingLog()
    with bridge_stdlib_logging(log) as bridge:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
    assert log.find("Task exception was never retrieved")[0]["error"]["type"] == "RuntimeError"
    assert bridge not in logging.getLogger().handlers
    logging.getLogger("x").error("after the block")
    assert not log.find("after the block")


def test_logger_log_writes_redacted_fields_to_a_stdlib_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = LoggerLog("worker.test").bind(component="auth")
    with caplog.at_level(logging.INFO, logger="worker.test"):
        log.info("key loaded", keys=2, accessToken="secret-value")
        log.debug("not shown")
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert text.startswith("key loaded ") and "'keys': 2" in text and "'component': 'auth'" in text
    assert "secret-value" not in text
