"""OpenAI-shaped API errors.

Every error the API returns is one of these, rendered as
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status (DESIGN invariant 7).
Logic raises them; only the HTTP layer renders them.
"""

from __future__ import annotations

import json
from typing import Any


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body.

    >>> err = InvalidRequest("Invalid 'n': only n=1 is supported.", param="n", code="unsupported_value")
    >>> err.status, err.body()["error"]["param"]
    (400, 'n')
    """

    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_json(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()

    def headers(self) -> dict[str, str]:
        """HTTP headers the error's response carries besides its body."""
        return {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps param/code when the error crosses a Ray process boundary.
        return (_rebuild, (type(self), self.message, self.param, self.code))


def _rebuild(cls: type[APIError], message: str, param: str | None, code: str | None) -> APIError:
    return cls(message, param=param, code=code)


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "invalid_request_error"


class InsufficientCredits(APIError):
    """402: the request's worst case (``hold_micro_credits``) does not fit what the tenant has free
    (``balance_micro_credits``); both ride in the error body beside the OpenAI fields, for the SDK.

    >>> InsufficientCredits("No.", hold=53, balance=40).body()["error"]["hold_micro_credits"]
    53
    """

    status = 402
    type = "insufficient_quota"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, hold: int | None = None,
        balance: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message, param=param, code=code)
        self.hold, self.balance = hold, balance

    def body(self) -> dict[str, Any]:
        body = super().body()
        if self.hold is not None:
            body["error"] |= {"hold_micro_credits": self.hold, "balance_micro_credits": self.balance}
        return body

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_insufficient, (self.message, self.param, self.code, self.hold, self.balance))


def _rebuild_insufficient(
    message: str, param: str | None, code: str | None, hold: int | None, balance: int | None
) -> InsufficientCredits:
    return InsufficientCredits(message, param=param, code=code, hold=hold, balance=balance)


class Forbidden(APIError):
    status = 403
    type = "invalid_request_error"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"


class RateLimited(APIError):
    """429 with ``Retry-After`` (whole seconds) when ``retry_after_s`` is known."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s
        self.extra_headers = headers or {}  # x-ratelimit-* of a rate limit

    def headers(self) -> dict[str, str]:
        retry = {"retry-after": str(self.retry_after_s)} if self.retry_after_s is not None else {}
        return self.extra_headers | retry

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.message, self.param, self.code, self.retry_after_s, self.extra_headers)
        return (_rebuild_rate_limited, args)


def _rebuild_rate_limited(
    message: str, param: str | None, code: str | None, retry: int | None, headers: dict[str, str] | None = None
) -> RateLimited:
    return RateLimited(message, param=param, code=code, retry_after_s=retry, headers=headers)


class EngineUnavailable(APIError):
    status = 503
    type = "service_unavailable_error"


class InternalError(APIError):
    status = 500
    type = "server_error"


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
