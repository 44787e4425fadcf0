"""`--request-log FILE`: one JSON line per request, for auditing routes and recalibrating the gate later.

Lines are appended with one write each to a file opened with O_APPEND, under a lock, so concurrent
requests (and several server processes on one file) never interleave. The prompt text is kept only when
asked (`--log-prompts`)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from prism.errors import PrismError


class RequestLog:
    def __init__(self, path: str | Path, *, log_prompts: bool = False):
        self.path = Path(path)
        self.log_prompts = log_prompts
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PrismError(f"cannot open the request log {self.path}: {exc.strerror}") from None

    def write(self, record: dict[str, Any]) -> None:
        if not self.log_prompts:
            record = {k: v for k, v in record.items() if k != "messages"}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        os.close(self._fd)
