"""Logging set-up: plain text for people, one JSON object per line for log collectors.

Every line about an HTTP request carries its request id (`request_id`): `RequestIdMiddleware` takes it from a
sane incoming `X-Request-ID` header or makes one, echoes it in the response's `X-Request-ID`, and keeps it in a
context variable that `RequestIdFilter` stamps on every record. Lines written by the model worker thread (no
request context there) pass `extra={"request_id": ...}` themselves. Fields passed with `extra=` become JSON
fields (text format: `[key=value ...]` after the message).

One summary line per request (logger `xlora.request`, info) once the response is complete (streams: when they
end): method, path, status, duration_ms, and for generations generation_id, prompt_tokens, completion_tokens,
finish_reason. The prompt and completion text only with `logging.log_prompts: true`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Probes and scrapes that succeed are summarised at debug level, so they do not drown the rest.
_QUIET_PATHS = {"/health", "/ready", "/metrics"}

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("xlora_request_id", default=None)
_request_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "xlora_request_fields", default=None
)

request_log = logging.getLogger("xlora.request")

# Attributes every LogRecord has; anything else on a record came from `extra=` (or our filter).
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_NOT_FIELDS = _RECORD_ATTRS | {"color_message"}  # uvicorn's coloured copy of the message


def current_request_id() -> str | None:
    """The id of the HTTP request being handled (None outside one, e.g. in the model worker thread)."""
    return _request_id.get()


def note_request(**fields: Any) -> None:
    """Add fields to this request's summary line (no-op outside a request)."""
    notes = _request_fields.get()
    if notes is not None:
        notes.update(fields)


def note_generation(done: Any, prompt: Any, log_prompts: bool) -> None:
    """A finished generation's figures for the summary line; `prompt` (text or chat messages) and the completion
    text only if `log_prompts` (logging.log_prompts in the config)."""
    fields: dict[str, Any] = {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "finish_reason": done.finish_reason,
    }
    if log_prompts:
        fields.update(prompt=prompt, completion=done.text)
    note_request(**fields)


def _sane_request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _SANE_ID.match(text):
                return text
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI (streams and disconnect detection untouched): sets the request id, echoes it, and logs the
    summary line after the last byte of the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _sane_request_id(scope)
        token = _request_id.set(request_id)
        notes: dict[str, Any] = {}
        notes_token = _request_fields.set(notes)
        started = time.perf_counter()
        status = 500  # if nothing was sent: an unhandled error, answered by Starlette's outermost handler

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        ok = False
        try:
            await self.app(scope, receive, send_with_id)
            ok = True
        finally:
            path = scope.get("path", "")
            fields = {
                "method": scope.get("method"),
                "path": path,
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                **notes,
            }
            level = logging.DEBUG if path in _QUIET_PATHS and status < 400 else logging.INFO
            request_log.log(level, "%s %s %s", fields["method"], path, status, extra=fields)
            # On an error the id stays set (this task serves this request only), so the line that the outer
            # error handler writes still carries it.
            if ok:
                _request_id.reset(token)
                _request_fields.reset(notes_token)


class RequestIdFilter(logging.Filter):
    """Stamps `request_id` on every record (from the request context unless the caller passed one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's extra fields, request_id first; None values left out."""
    fields = {}
    if getattr(record, "request_id", None) is not None:
        fields["request_id"] = record.request_id
    for key, value in vars(record).items():
        if key not in _NOT_FIELDS and key != "request_id" and value is not None:
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [request_id=... key=value ...]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = _fields(record)
        if fields:
            line += " [" + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items()) + "]"
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not re.search(r'[\s"=\[\]]', value):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(value, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's loggers go through ours, so one format covers access logs too.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # So do Python warnings and transformers' own logger (which has a handler of its own by default).
    logging.captureWarnings(True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if fmt == "json":
        hf_logging.disable_progress_bar()  # model-loading progress bars are not log lines
