"""Check, within seconds, that an MLflow tracking store can be used before a command starts its work.

MLflow's own client retries an HTTP server that does not answer for minutes (7 retries with exponential backoff,
120 s timeouts) before it raises. :func:`check_tracking_store` asks once, with a short timeout:

- ``http(s)://``: ``GET <uri>/health``; any HTTP answer (an error status or a TLS complaint included) counts
  as an answer, a refused or silent connection does not;
- ``sqlite:///<path>``: the database file is a readable and writable SQLite file, or its folder exists and is
  writable (MLflow creates the file);
- ``file://`` URIs and plain paths (MLflow's file store): the folder, or the nearest existing folder above it,
  is writable;
- ``postgresql://``, ``mysql://``, ``mssql://``: the database server accepts a TCP connection.

Other schemes (``databricks``, ...) are left to MLflow. A failure raises :class:`TrackingStoreError`, whose
message names the URI, where it came from and the choices: start the store, unset ``MLFLOW_TRACKING_URI``, or
work without tracking and log later.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

PROBE_SECONDS = 5.0  # an MLflow server answers /health in milliseconds
_DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}
_SQLITE_MAGIC = b"SQLite format 3\x00"


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store cannot be reached or opened; the message names it and says what to do."""


def check_tracking_store(uri: str, without: str = "", timeout: float = PROBE_SECONDS) -> None:
    """Raise :class:`TrackingStoreError` when the store at ``uri`` does not answer within ``timeout`` seconds or
    cannot be opened. ``without`` is the sentence telling how to do the command's work without tracking (e.g.
    "train without tracking (`mcibi train --no-tracking ...`) and log the run later (`mcibi log-run <run
    folder>`)"), added to the choices."""
    problem = _problem(uri, timeout)
    if problem:
        raise TrackingStoreError(_message(uri, problem, without))


def _problem(uri: str, timeout: float) -> str | None:
    """Why the store cannot be used, in words, or None."""
    scheme = urllib.parse.urlsplit(uri).scheme.lower().split("+")[0]
    if scheme in ("http", "https"):
        return _within(timeout, lambda: _http_problem(uri, timeout))
    if scheme == "sqlite":
        return _sqlite_problem(uri)
    if scheme in _DB_PORTS:
        return _within(timeout, lambda: _tcp_problem(uri, _DB_PORTS[scheme], timeout))
    if scheme == "file":
        return _folder_problem(Path(urllib.request.url2pathname(urllib.parse.urlsplit(uri).path)))
    if not scheme or len(scheme) == 1:  # a plain path (a Windows drive letter is no scheme)
        return _folder_problem(Path(uri))
    return None


def _within(timeout: float, probe) -> str | None:
    """Run ``probe`` in a daemon thread and give up after ``timeout`` (+1 s): a name lookup or a server that
    trickles bytes has no socket timeout that bounds the whole exchange."""
    outcome: list[str | None] = []
    start = time.monotonic()
    worker = threading.Thread(target=lambda: outcome.append(probe()), daemon=True, name="tracking-store-probe")
    worker.start()
    worker.join(timeout + 1.0)
    if not outcome:
        return f"no answer within {time.monotonic() - start:.0f} s"
    return outcome[0]


def _http_problem(uri: str, timeout: float) -> str | None:
    url = uri.rstrip("/") + "/health"
    start = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - the scheme is http(s)
            return None
    except urllib.error.HTTPError:  # it answered (authentication required, no /health route, ...)
        return None
    except urllib.error.URLError as exc:
        reason = exc.reason
    except (OSError, ValueError) as exc:  # a timeout while reading the answer, a malformed URL
        reason = exc
    if isinstance(reason, ssl.SSLError | ssl.CertificateError):  # it answered; MLflow reports TLS problems itself
        return None
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"no answer within {time.monotonic() - start:.0f} s (GET {url})"
    if isinstance(reason, ConnectionRefusedError):
        return f"connection refused (GET {url})"
    if isinstance(reason, socket.gaierror):
        return f"host not found (GET {url}: {reason})"
    return f"GET {url} failed: {reason}"


def _tcp_problem(uri: str, default_port: int, timeout: float) -> str | None:
    parts = urllib.parse.urlsplit(uri)
    host, port = parts.hostname or "localhost", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:.0f} s"
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc.strerror or exc})"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (SQLAlchemy's form: three slashes and a relative path, or four
    and an absolute one); None for an in-memory database."""
    rest = uri.split(":", 1)[1]
    if not rest.startswith("///"):
        return None
    path = urllib.parse.unquote(rest[3:].split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


def _sqlite_problem(uri: str) -> str | None:
    db = sqlite_path(uri)
    if db is None:
        return None
    if db.exists():
        if not db.is_file():
            return f"{db} is not a file"
        if not os.access(db, os.R_OK | os.W_OK):
            return f"{db} is not readable and writable for you"
        with open(db, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            return f"{db} is not an SQLite database"
        folder = db.parent  # SQLite writes its journal beside the database
    else:
        folder = db.parent
        if not folder.is_dir():
            return f"the folder {folder} of {db.name} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable for you"
    return None


def _folder_problem(folder: Path) -> str | None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable for you"
    return None


def _message(uri: str, problem: str, without: str) -> str:
    from mcibi.tracking.runs import local_tracking_uri

    from_env = os.environ.get("MLFLOW_TRACKING_URI") == uri
    where = " (MLFLOW_TRACKING_URI)" if from_env else ""
    choices = []
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(uri)
        choices.append(f"start the server (e.g. `mlflow server --host {parts.hostname} --port "
                       f"{parts.port or (443 if scheme == 'https' else 80)} --backend-store-uri sqlite:///mlflow.db`)")
    elif scheme in ("sqlite", "file", ""):
        choices.append("fix the path or its permissions")
    else:
        choices.append("start the database server or fix the URI")
    if from_env:
        choices.append(f"unset MLFLOW_TRACKING_URI (runs then go to the local store {local_tracking_uri()})")
    if without:
        choices.append(without)
    return (f"MLflow tracking store {uri}{where} cannot be used: {problem}. Nothing was done. Either "
            + "; or ".join(choices) + ".")

