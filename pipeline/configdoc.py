"""What each config key means, read from the comments beside (or just above) its field in the
source, so that the code's comments are the one place a key is documented; `mimflow config`
prints them with the resolved values and the defaults."""
from __future__ import annotations

import ast
import inspect
import io
import tokenize
import typing
from functools import lru_cache
from typing import Any

from pydantic import BaseModel


@lru_cache(maxsize=None)
def _comments(module) -> dict[int, str]:
    """line number -> the comment text on that line, for one module."""
    source = inspect.getsource(module)
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


@lru_cache(maxsize=None)
def field_docs(cls: type[BaseModel]) -> dict[str, str]:
    """field name -> its comment (inline, else the comment lines right above it); the class
    docstring's first line under the key ''."""
    module = inspect.getmodule(cls)
    comments = _comments(module)
    source = inspect.getsource(module).splitlines()
    tree = ast.parse("\n".join(source))
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            doc = ast.get_docstring(node)
            if doc:
                docs[""] = doc.splitlines()[0]
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    text = [comments[ln] for ln in range(stmt.lineno, stmt.end_lineno + 1) if ln in comments]
                    above, ln = [], stmt.lineno - 1
                    while ln in comments and source[ln - 1].strip().startswith("#"):
                        above.insert(0, comments[ln])
                        ln -= 1
                    docs[stmt.target.id] = " ".join(above + text)
    return docs


def section_class(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # X | None, Annotated[...]
        found = section_class(arg)
        if found is not None:
            return found
    return None


def describe(model: BaseModel, indent: int = 0) -> list[str]:
    """YAML lines of `model`'s values, each key with its default (when it differs) and meaning."""
    lines, docs, pad = [], field_docs(type(model)), "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        meaning = docs.get(name, "")
        if isinstance(value, BaseModel):
            meaning = meaning or field_docs(type(value)).get("", "")
            lines.append(f"{pad}{name}:" + (f"  # {meaning}" if meaning else ""))
            lines.extend(describe(value, indent + 1))
            continue
        plain = _plain(value)
        default = _plain(field.get_default(call_default_factory=True))
        note = [] if default == plain else [f"default {_yaml(default)}"]
        if meaning:
            note.append(meaning)
        lines.append(f"{pad}{name}: {_yaml(plain)}" + (f"  # {'; '.join(note)}" if note else ""))
    return lines


def _plain(value: Any) -> Any:
    """Config sections nested in dicts or lists (e.g. sweep.heads) -> plain JSON-able values."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _yaml(value: Any) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, (list, dict, bool)):  # plain values (_plain): tuples are lists already
        return json.dumps(value)
    return str(value)
