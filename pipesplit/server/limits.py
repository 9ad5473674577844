"""The server's limits: plain data, importable without the web stack (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from pipesplit.errors import UserError

DEFAULT_MAX_REQUEST_BYTES = 2**20  # 1 MiB: about 200,000 prompt tokens of English text
# How long a server whose engine died keeps answering 503 before it exits (exit 1).
UNHEALTHY_SECONDS = 2.0


@dataclass(frozen=True)
class ServerLimits:
    """What one request may hold, checked before the request reaches the engine, and how long a
    server with a dead engine stays up answering 503.

    max_prompt_tokens None means the context: the smaller of the model's context length and the
    KV capacity, minus one token to generate.
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_prompt_tokens: int | None = None
    unhealthy_seconds: float = UNHEALTHY_SECONDS

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise UserError(f"--max-request-bytes {self.max_request_bytes} is below 1024; a request needs room for its JSON")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise UserError(f"--max-prompt-tokens {self.max_prompt_tokens} must be at least 1")
        if not 0 <= self.unhealthy_seconds <= 60:
            raise UserError(f"--unhealthy-seconds {self.unhealthy_seconds} must be between 0 and 60")
