"""MLflow's rules for run keys and values, and the one place that makes ours fit them.

MLflow refuses a metric, param or tag key with a character outside letters, digits, `_ - . /`,
space (and `:` off Windows), one that is not a clean relative path (`a//b`, `./a`, `..`, `/a`),
or one longer than 250 characters; a refused key fails its whole `log_batch` request. Keys built
from user data (class names such as `Cat (domestic)` or `a,b+c`, option names) are therefore
renamed before they are sent, loudly, and the tracker records every rename in the run's tag
RENAMED_TAG ({logged key: original key}). Values longer than MLflow keeps (params 6,000
characters, tags 8,000) are cut, loudly.
"""
from __future__ import annotations

import hashlib
import re

from mlflow.utils.validation import (MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH,
                                     path_not_unique, validate_param_and_metric_name)

from pipeline.tracking.retry import log

RENAMED_TAG = "mimflow.renamed_keys"
VALUE_LIMITS = {"param": MAX_PARAM_VAL_LENGTH, "tag": MAX_TAG_VAL_LENGTH}
_REFUSED_CHARACTER = re.compile(r"[^/\w.\- ]")  # what MLflow allows on every OS (no colon: Windows)
_HASH_CHARS = 8


def is_valid_key(key: str) -> bool:
    """True when MLflow accepts `key` as a metric, param or tag key (MLflow's own checks)."""
    return (bool(key) and len(key) <= MAX_ENTITY_KEY_LENGTH and bool(validate_param_and_metric_name(key))
            and not path_not_unique(key))


def sanitize_key(key: str) -> str:
    """-> a key MLflow accepts, as close to `key` as it can be: every refused character becomes
    `_`, empty, `.` and `..` path segments are dropped, and a key over 250 characters keeps its
    start plus a hash of the whole. Valid keys come back unchanged."""
    if is_valid_key(key):
        return key
    segments = [s for s in _REFUSED_CHARACTER.sub("_", str(key)).split("/") if s not in ("", ".", "..")]
    out = "/".join(segments) or "_"
    if len(out) > MAX_ENTITY_KEY_LENGTH:
        out = with_hash(out[:MAX_ENTITY_KEY_LENGTH - _HASH_CHARS - 1], key)
    return out


def with_hash(key: str, original: str) -> str:
    """`key` + `_` + 8 hex characters of sha1(original): a distinct key for a distinct original."""
    return f"{key}_{hashlib.sha1(str(original).encode()).hexdigest()[:_HASH_CHARS]}"


class KeyMap:
    """Original key -> the key logged to MLflow, stable for the life of one tracker.

    Valid keys are kept; others are sanitised. Two originals never share a logged key: a
    rename that would land on a key already in use gets a hash suffix. Every rename is
    printed once. Keys given together are mapped valid ones first, so that within one call a
    valid key is never the one renamed.
    """

    def __init__(self) -> None:
        self.logged: dict[str, str] = {}  # original -> logged
        self.original: dict[str, str] = {}  # logged -> original

    def map(self, keys, kind: str) -> dict[str, str]:
        """-> {original: logged} for `keys`; `kind` (metric, param, tag) names them in messages."""
        keys = list(dict.fromkeys(str(k) for k in keys))
        for key in sorted(keys, key=lambda k: not is_valid_key(k)):
            if key not in self.logged:
                self._add(key, kind)
        return {k: self.logged[k] for k in keys}

    def renamed(self) -> dict[str, str]:
        """{logged key: original key} of every key renamed so far."""
        return {new: old for new, old in self.original.items() if new != old}

    def _add(self, key: str, kind: str) -> None:
        new = sanitize_key(key)
        if self.original.get(new, key) != key:
            new = with_hash(new[:MAX_ENTITY_KEY_LENGTH - _HASH_CHARS - 1], key)
        self.logged[key], self.original[new] = new, key
        if new != key:
            why = "is taken by another key" if is_valid_key(key) else "is not a key MLflow accepts"
            log(f"{kind} key {key!r} {why}: logged as {new!r} (tag {RENAMED_TAG} maps it back)")


def fit_value(key: str, value, kind: str) -> str:
    """str(value), cut to MLflow's limit for a `kind` ("param" or "tag") value, loudly."""
    text, limit = str(value), VALUE_LIMITS[kind]
    if len(text) <= limit:
        return text
    log(f"{kind} {key!r}: value of {len(text)} characters cut to MLflow's limit of {limit}")
    return text[:limit]
