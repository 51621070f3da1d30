"""Secret-looking names, and redaction of everything prefopt prints or writes.

A name is secret when one of its ``_``/``-``/``.``-separated parts is a word such as ``token``,
``secret``, ``password``, ``auth``, ``key``, ``credentials`` or ``pgpass``, or it holds ``api_key``,
``private_key``, ``secret`` or ``passw`` anywhere: ``HF_TOKEN``, ``WANDB_API_KEY``,
``SSH_PRIVATE_KEY``, ``PGPASS``, ``GITHUB_AUTH``, ``AWS_CREDENTIALS``, ``AWS_SECRET_ACCESS_KEY``.
Counters such as ``max_tokens`` or ``tokenizer`` are not secrets.
"""
from __future__ import annotations

import re

_PART = (r"token|secret|secrets|password|passwd|passphrase|pass|pwd|pgpass|auth|key|apikey|credential|"
         r"credentials|cookie|dsn")
SECRET_NAME = re.compile(rf"(?i)(^|[_\-.])({_PART})($|[_\-.])|api[_-]?key|private[_-]?key|secret|passw|pgpass")
REDACTED = "***redacted***"


def is_secret(name: str) -> bool:
    """Whether a variable or config key with this name holds a secret."""
    return bool(SECRET_NAME.search(str(name)))


def redact(value, key: str = ""):
    """A copy of a config tree with the values under secret-looking keys replaced by ``REDACTED``."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret(k) and not isinstance(v, dict) else redact(v, str(k)))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    return value


def redact_text(text: str, secrets: dict[str, str]) -> str:
    """``text`` with every occurrence of a secret's value replaced (for log lines and messages)."""
    for value in sorted((v for v in secrets.values() if v and len(v) >= 4), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text
