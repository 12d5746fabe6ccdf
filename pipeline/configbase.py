"""The base of every config section (kept apart from config.py so that the objective and backbone
files that define their own sections need not import the whole tree)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

RESUME_SAFE = "resume_safe"


class Section(BaseModel):
    """A config section: unknown keys fail at load; assignments are validated too."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def resume_safe(default: Any = ..., **kwargs) -> Any:
    """A field whose value may change between a run and its resumption without changing what is
    computed (logging, paths, workers): a resumed checkpoint does not compare it."""
    return Field(default, json_schema_extra={RESUME_SAFE: True}, **kwargs)


def resume_safe_factory(factory, **kwargs) -> Any:
    return Field(default_factory=factory, json_schema_extra={RESUME_SAFE: True}, **kwargs)


class ObjectiveConfig(Section):
    """Base of each objective's own section under `pretrain.objective` (tagged by `name`)."""
    name: str
