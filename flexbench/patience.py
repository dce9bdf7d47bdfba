"""How long the tracking client waits: a server that is down fails fast, a busy one is waited for.

MLflow's own retries (7, exponential backoff: minutes per call) are cut to 2 a request, so a
refused connection or an unknown host is given up within seconds, as before. A server that
answers slowly (a read timeout, or 429/502/503/504 after MLflow's retries) is *busy*: the
tracking step is tried again with backoff until `--tracking-timeout` seconds have passed since
its first try: a loaded server can take longer than a fixed timeout to answer, which read as
an outage (BENCHMARKS.md, "Figures the code cites").
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_TIMEOUT_S = 120.0  # --tracking-timeout: one tracking step may wait this long
MIN_REQUEST_TIMEOUT_S = 5  # MLflow parses its timeout as a whole number of seconds
MAX_BACKOFF_S = 30.0
RETRIES = 2  # MLflow's retries per request (refused connections, 5xx, read timeouts)
HTTP_FIXED = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(RETRIES),
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}
TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
# No "View run at <tracking URI>" lines: that URI may hold credentials.
HTTP_FORCED = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# What MLflow/urllib3 say when the server is there but slow or overloaded.
BUSY = re.compile(
    r"read timed? ?out|ReadTimeout|too many (429|502|503|504) error responses|"
    r"\b(429|502|503|504)\b.*(too many|unavailable|gateway|busy)",
    re.I,
)

_lock = threading.Lock()
_depth = [0]
_saved: dict[str, str | None] = {}


def request_timeout(timeout_s: float) -> int:
    """Per-request timeout: MLflow tries a request 1 + RETRIES times, so all tries of one
    request fit in the step's budget."""
    return max(MIN_REQUEST_TIMEOUT_S, int(timeout_s // (RETRIES + 1)))


def http_settings(timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, str]:
    """MLflow's HTTP environment for a tracking step with this budget."""
    return {**HTTP_FIXED, TIMEOUT_ENV: str(request_timeout(timeout_s))}


@contextmanager
def patient_http(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """MLflow HTTP settings for tracking steps (those the user set stay theirs), for the
    duration of the `with`; safe to nest and to enter from the background logging thread
    (the first to enter sets them, the last to leave restores the environment)."""
    with _lock:
        if _depth[0] == 0:
            wanted = {**http_settings(timeout_s), **HTTP_FORCED}
            _saved.clear()
            _saved.update({k: os.environ.get(k) for k in wanted})
            os.environ.update({k: v for k, v in wanted.items() if _saved[k] is None})
            os.environ.update(HTTP_FORCED)
        _depth[0] += 1
    try:
        yield
    finally:
        with _lock:
            _depth[0] -= 1
            if _depth[0] == 0:
                for k, v in _saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def is_busy(exc: BaseException) -> bool:
    """The server is there but slow or overloaded (worth waiting for), not down."""
    return bool(BUSY.search(" ".join(str(exc).split())))


def backoff_s(attempt: int) -> float:
    """Seconds to wait before try `attempt + 1` of a step: 1, 2, 4, ... up to 30."""
    return min(MAX_BACKOFF_S, 2.0**attempt)
