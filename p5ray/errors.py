"""Domain errors, mapped once to CLI exit codes, HTTP status codes and gRPC status codes.

Every stage raises these; `cli.py`, the HTTP adapter and the gRPC adapter translate them with
the class attributes below, so a new error kind is one class here.
"""

from __future__ import annotations


class P5RayError(Exception):
    """Base class. An error of this exact class is an internal failure (exit 1, HTTP 500)."""

    exit_code = 1
    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """What happened and what to do, on one line (the CLI prints exactly this)."""
        text = self.message.replace("\n", " ").strip()
        if self.hint:
            text = f"{text} ({self.hint.replace(chr(10), ' ').strip()})"
        return text


class UserError(P5RayError):
    """Bad usage, bad input or an environment problem the user can fix: exit 2."""

    exit_code = 2
    http_status = 422
    grpc_code = "INVALID_ARGUMENT"


class ConfigError(UserError):
    """An unknown config key, a value of the wrong type, or an unreadable config file."""


class DataError(UserError):
    """An input data file that cannot be used; names the file, the line and the reason."""

    def __init__(self, path: str, reason: str, line: int | None = None, hint: str | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}", hint)
        self.path = str(path)
        self.line = line
        self.reason = reason


class OutputExistsError(UserError):
    """The output path already exists and --overwrite was not given."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, tampered with, or from other data."""


class ClusterError(UserError):
    """No Ray cluster at the address, missing or wrong auth token, a port in use."""


class InvalidRequestError(UserError):
    """A serving request with bad content (HTTP 422, gRPC INVALID_ARGUMENT)."""


class NotFoundError(P5RayError):
    """A task this model was not trained for, or an unknown route (HTTP 404, NOT_FOUND)."""

    exit_code = 2
    http_status = 404
    grpc_code = "NOT_FOUND"


class OverloadedError(P5RayError):
    """The server is over capacity (HTTP 503, gRPC UNAVAILABLE)."""

    exit_code = 1
    http_status = 503
    grpc_code = "UNAVAILABLE"
