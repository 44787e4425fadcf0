"""Hot reload of a served run (POST /admin/reload, SIGHUP): the run's gate, threshold and adapter read
again while requests keep flowing; a reload that fails leaves the old run serving."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from prism.errors import PrismError
from prism.inference.base import RouteDecider
from prism.serving.metrics import ServingMetrics
from prism.serving.protocol import ApiError, Reloaded

log = logging.getLogger("prism")


def reload_run(model: RouteDecider, metrics: ServingMetrics | None) -> Reloaded:
    """POST /admin/reload and SIGHUP: the run's gate, threshold and adapter read again; on failure the old
    run keeps serving and the caller gets why."""
    try:
        info = model.reload()
    except PrismError as exc:
        if metrics is not None:
            metrics.reloads.labels("failed").inc()
        log.error("reload failed, the old run keeps serving: %s", exc)
        raise ApiError(409, f"reload failed: {exc}. The run loaded before keeps serving.", "reload_error",
                       code="reload_failed") from None
    if metrics is not None:
        metrics.reloads.labels("ok").inc()
    log.info("reloaded %s: threshold %.4f", model.run_path, model.threshold)
    return Reloaded(run=str(model.run_path), **info.to_dict())


def reload_on_sighup(reload: Callable[[], Any]) -> None:
    """SIGHUP reloads the run in a thread of its own (the signal handler must return at once)."""

    def handler(_signum: int, _frame: Any) -> None:
        threading.Thread(target=_reload_logged, args=(reload,), name="prism-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, handler)


def _reload_logged(reload: Callable[[], Any]) -> None:
    with contextlib.suppress(ApiError):  # reload_run has logged why
        reload()
