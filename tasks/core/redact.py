"""Secrets never leave the process: URLs' user info, query-string tokens and the values of secret-looking
keys are masked in every logged param, config file and log line (the real values are still used)."""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# Names whose values are secrets wherever they appear (config keys, query parameters, key=value text):
# whole words (hf_token, db_password, X-Amz-Signature), so max_new_tokens or tokenizer are not.
_SECRET_WORD = re.compile(
    r"(?:^|[_.-])(?:password|passwd|pwd|secret|token|credentials?|signature|sig|apikey|authorization)(?:$|[_.-])"
    r"|api[_-]?key|access[_-]?key|private[_-]?key|secret[_-]?key|client[_-]?secret",
    re.IGNORECASE,
)


def secret_name(name: str) -> bool:
    """Whether a key or parameter called ``name`` holds a secret."""
    return bool(_SECRET_WORD.search(name))


# scheme://user:password@host or scheme://token@host: everything before the last @ of the authority.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/?#@\s'\"]+)@")
# name=value in query strings and free text (token=..., X-Amz-Signature=...), name: value (YAML) and
# 'name': 'value' (a printed dict).
_PAIR = re.compile(
    r"(?P<name>[A-Za-z][A-Za-z0-9_.-]*)(?P<sep>['\"]?(?:=|:[ \t]+)['\"]?)(?P<value>[^\s&;,'\"}\]?#]+)"
)


def redact(text: str) -> str:
    """``text`` with URL user info replaced by *** and the values of secret-named pairs masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)

    def pair(match: re.Match) -> str:
        name = match["name"]
        if secret_name(name) and match["value"] != MASK:
            return f"{match['name']}{match['sep']}{MASK}"
        return match[0]

    return _PAIR.sub(pair, text)


def redact_tree(node: Any, key: str = "") -> Any:
    """A copy of a config tree (dicts, lists, scalars) with secret-named keys' values masked and every
    string ``redact``-ed."""
    if isinstance(node, dict):
        return {k: redact_tree(v, str(k)) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [redact_tree(v, key) for v in node]
    if key and secret_name(key) and node not in (None, "", False):
        return MASK
    return redact(node) if isinstance(node, str) else node


class RedactingFilter(logging.Filter):
    """A handler filter that masks secrets in the formatted message (arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and record.exc_info[1] is not None and not getattr(record, "_redacted", False):
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record._redacted = True
        return True


def redact_logs() -> None:
    """Put a RedactingFilter on every handler of the root logger (Hydra's console and file handlers),
    once: records of every logger pass through them."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
