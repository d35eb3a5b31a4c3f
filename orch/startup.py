"""Why an engine failed to start, in one line, with what to change.

vLLM starts its engine core in a child process; when that fails, the exception the replica sees says
only "Engine core initialization failed. See root cause above", and Serve reports "Failed to update
the deployments [...]" minutes later. The root cause is the child's last error line in the replica's
own log files (the child inherits its stdout/stderr). :class:`EngineStartError` carries that line and
a hint; Serve puts the replica's exception in the deployment's status message after the first failed
start, where :func:`start_failure` finds it, so ``up`` and ``tap`` report it within seconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

MARK = "the engine failed to start:"
_ERROR_LINE = re.compile(r"\b((?:[A-Za-z_][\w.]*)?(?:Error|Exception)): (.+)$")
_WRAPPER = "Engine core initialization failed"
_HINTS = [
    (re.compile(r"memory|cache blocks|KV cache", re.I),
     "size the KV cache to fit max_model_len and the node's free memory: the engine's kv_cache_memory_bytes "
     "(e.g. --engine kv_cache_memory_bytes=1073741824 on a CPU), or a lower max_model_len"),
    (re.compile(r"max_model_len|max_position_embeddings|context length", re.I),
     "lower the engine's max_model_len (e.g. --engine max_model_len=2048)"),
    (re.compile(r"head.?size|head_dim", re.I), "this model's head size is not supported by the CPU engine"),
    (re.compile(r"does not appear to have a file|not a valid model|Repository Not Found|No such file", re.I),
     "check the model: a local folder with config.json and weights, or a Hugging Face id reachable from the node"),
]  # fmt: skip


class EngineStartError(RuntimeError):
    """The replica's engine did not start; the message is one line: model, root cause, what to change."""

    def __init__(self, model: str, cause: str) -> None:
        super().__init__(f"model {model}: {MARK} {cause}. Fix: {hint(cause)}")


def root_cause(log_text: str) -> str | None:
    """The last ``SomeError: message`` line of a log, without vLLM's process/logger prefix and
    skipping the engine client's "see root cause above" wrapper.

    >>> root_cause("(EngineCore pid=7) ERROR 11-27 [core.py:1] ValueError: No available memory\\n"
    ...            "RuntimeError: Engine core initialization failed. See root cause above.")
    'ValueError: No available memory'
    """
    for line in reversed(log_text.splitlines()):
        match = _ERROR_LINE.search(line.strip())
        if match and _WRAPPER not in match.group(2):
            return f"{match.group(1)}: {match.group(2).strip()}"
    return None


def hint(cause: str) -> str:
    """What to change for a root cause.

    >>> hint("ValueError: No available memory for the cache blocks")[:17]
    'size the KV cache'
    """
    for pattern, text in _HINTS:
        if pattern.search(cause):
            return text
    return "see the replica's log (`llama-orch status` lists the apps; Ray's logs are in the session's logs/ folder)"


def own_log_tail(max_bytes: int = 256_000) -> str:
    """The tail of this process's stdout and stderr files (a Ray worker's .out/.err), where vLLM's
    engine core child writes its error; empty when they are not files (a terminal, a pipe)."""
    tails = []
    for fd in (1, 2):
        try:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if not path.is_file():
                continue
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - max_bytes))
                tails.append(f.read().decode("utf-8", "replace"))
        except OSError:
            continue
    return "\n".join(tails)


def describe(exc: BaseException, log_text: str) -> str:
    """The root cause of a failed engine start: from the log when the exception only points there."""
    own = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}".rstrip(": ")
    if _WRAPPER in str(exc) or not str(exc).strip():
        return root_cause(log_text) or own
    return own


def start_failure(message: str) -> str | None:
    """The one line :class:`EngineStartError` left in a Serve deployment/app status message, if any.

    >>> start_failure("A replica failed to start with exception. Retrying 2 more time(s). Error:\\n"
    ...               "Traceback ...\\norch.startup.EngineStartError: model m: the engine failed to start: X. Fix: Y")
    'model m: the engine failed to start: X. Fix: Y'
    """
    for line in reversed(message.splitlines()):
        if MARK in line:
            return line[line.index("model ") :].strip() if "model " in line else line.strip()
    return None


def app_start_failure(app: Any) -> str | None:
    """The first failed engine start in a Serve app's status (``serve.status().applications[name]``), or
    None. Serve shows the replica's error in its deployment's message after one failed start; it would
    retry for minutes before the app turns DEPLOY_FAILED."""
    if app is None:
        return None
    for message in [app.message, *(d.message for d in app.deployments.values())]:
        if cause := start_failure(message or ""):
            return cause
    return None
