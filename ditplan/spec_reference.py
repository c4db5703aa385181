"""The experiment-file reference, generated from :mod:`ditplan.spec`'s schema: every section and field with
its type, default and description. ``python -m ditplan.spec_reference docs/guides/experiment-file.md``."""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ditplan.spec import ExperimentSpec, model_in

COMMAND = "python -m ditplan.spec_reference docs/guides/experiment-file.md"


def type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: ``int | null``, ``list[str]``, ``'tpe' | 'nsga2'``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return "(section)"
    return f"`{field.default!r}`"


def field_docs(doc: str, keys: list[str]) -> tuple[str, dict[str, str]]:
    """A section's docstring split into its intro and the ``key: text`` passages it gives its fields (a key
    at the start of a line or of a sentence, up to the next such key or the paragraph's end)."""
    label = re.compile(rf"(?:^|(?<=\. ))({'|'.join(map(re.escape, keys))}): ", re.M)
    intro, passages = [], {}
    for paragraph in doc.split("\n\n"):
        marks = list(label.finditer(paragraph))
        intro.append(paragraph[:marks[0].start()] if marks else paragraph)
        for mark, after in zip(marks, marks[1:] + [None]):
            passages[mark.group(1)] = " ".join(paragraph[mark.end():after.start() if after else None].split())
    return " ".join(" ".join(intro).split()), passages


def _section(path: str, model: type[BaseModel]) -> list[str]:
    """The Markdown of one section and, after it, of each section inside it."""
    keys = {name: field.alias or name for name, field in model.model_fields.items()}
    intro, passages = field_docs(inspect.getdoc(model) if model.__doc__ else "", list(keys.values()))
    lines = [f"## `{path}`" if path else "## Top level", "", *([intro, ""] if intro else []),
             "| field | type | default | description |", "| --- | --- | --- | --- |"]
    inner = []
    for name, field in model.model_fields.items():
        key = keys[name]
        text = (field.description or passages.get(key, "")).replace("|", "\\|")
        lines.append(f"| `{key}` | {type_name(field.annotation)} | {_default(field)} | {text} |")
        sub = model_in(field.annotation)
        if sub is not None:
            inner.append((f"{path}.{key}" if path else key, sub))
    lines.append("")
    for sub_path, sub in inner:
        lines += _section(sub_path, sub)
    return lines


def reference() -> str:
    """The whole reference as Markdown."""
    head = ["# The experiment file", "",
            f"Generated from `ditplan/spec.py` by `{COMMAND}`; do not edit by hand.", ""]
    return "\n".join(head + _section("", ExperimentSpec))


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(reference())
