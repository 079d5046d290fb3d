"""Request-id logging: RequestLog's text prefix and the JSON formatter's one object per line."""

from __future__ import annotations

import json
import logging

from specpipe.coordinator.server import JsonLogFormatter
from specpipe.coordinator.servicer import RequestLog


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def capture():
    logger = logging.getLogger("test-request-log")
    logger.setLevel(logging.INFO)
    handler = Capture()
    logger.handlers = [handler]
    logger.propagate = False
    return logger, handler


def test_request_log_prefixes_text_and_sets_the_attribute():
    logger, handler = capture()
    RequestLog(logger, "req-1").info("started: %d tokens", 4)
    record = handler.records[0]
    assert record.getMessage() == "[req-1] started: 4 tokens"
    assert record.request_id == "req-1"


def test_json_lines_carry_the_request_id_as_a_field():
    logger, handler = capture()
    RequestLog(logger, "req-2").warning("refused: %s", "full")
    logger.info("[req-3] a scheduler line with the prefix convention")
    logger.info("no request here")
    try:
        raise ValueError("boom")
    except ValueError:
        RequestLog(logger, "req-4").exception("failed")
    lines = [json.loads(JsonLogFormatter().format(record)) for record in handler.records]
    assert lines[0]["request_id"] == "req-2" and lines[0]["message"] == "refused: full"
    assert lines[0]["level"] == "WARNING" and lines[0]["process"] == "coordinator" and lines[0]["ts"].endswith("+00:00")
    assert lines[1]["request_id"] == "req-3" and lines[1]["message"].startswith("a scheduler line")
    assert "request_id" not in lines[2] and lines[2]["message"] == "no request here"
    assert lines[3]["request_id"] == "req-4" and "ValueError: boom" in lines[3]["exception"]


def test_json_keeps_unicode_and_newlines_on_one_line():
    logger, handler = capture()
    RequestLog(logger, "r").info("text %r", "数学\nnext")
    line = JsonLogFormatter().format(handler.records[0])
    assert "\n" not in line and json.loads(line)["message"] == "text '数学\\nnext'"
