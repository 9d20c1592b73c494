"""The params files' JSON Schema and the params reference page, generated from :mod:`mcibi.spec.params`.

The dataclasses are the one source: their field types give the schema's types, allowed values and defaults, the
field comments its descriptions (a comment block right above a field and its trailing comment). Three committed
files are generated (``mcibi schema write``; the test suite checks them with ``mcibi schema check``'s function):

- ``workflow/schemas/params.schema.json``: the complete params of one experiment (``defaults.yaml`` merged with the
  experiment file): every key required, no other key allowed.
- ``workflow/schemas/params-layer.schema.json``: one params file as written (``defaults.yaml`` or an experiment
  file, each a part of the whole): the same keys, types and allowed values, none required. Editors validate and
  complete params YAML with it (the ``yaml-language-server`` modeline of the files).
- ``docs/params-reference.md``: every key with its type, allowed values and description.

The loader (:func:`mcibi.spec.params.load_params`) stays the authority: ranges and cross-field checks (the
dataset's class count, ``min_lr`` at most ``lr``, a stride within its window, ...) are its own, not the schema's.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import json
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

from mcibi.spec import params as params_module
from mcibi.spec.params import PROTOCOL_NAMES, EvalParams, ExperimentParams

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
COMPLETE_SCHEMA = "workflow/schemas/params.schema.json"
LAYER_SCHEMA = "workflow/schemas/params-layer.schema.json"
REFERENCE_PAGE = "docs/params-reference.md"
# the keys of dict-typed fields, where they are a closed set
_MAPPING_KEYS = {(EvalParams, "protocols"): PROTOCOL_NAMES}
# fields a params file never states (load_params fills them)
_NOT_IN_FILES = {(ExperimentParams, "name"), (ExperimentParams, "path")}


def layer_modeline() -> str:
    """The first line of a params file at ``params/<dataset>/<name>.yaml``: editors with the YAML language server
    (VS Code's YAML extension) validate and complete the file against :data:`LAYER_SCHEMA`."""
    return f"# yaml-language-server: $schema=../../{LAYER_SCHEMA}"


class SchemaError(ValueError):
    """The dataclasses cannot be described (a field without a comment, a type the loader does not read)."""


# ------------------------------------------------------------------------------------------------ descriptions
@functools.cache
def _field_comments() -> dict[str, dict[str, str]]:
    """Class name -> field name -> its comment text, read from the source of :mod:`mcibi.spec.params`."""
    source = Path(params_module.__file__).read_text(encoding="utf-8")
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()  # lines holding something besides a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = out.setdefault(node.name, {})
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line in comments and line not in code_lines:  # the comment block right above the field
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[stmt.lineno]] if stmt.lineno in comments else []
            fields[stmt.target.id] = " ".join(above + trailing)
    return out


def field_description(cls: type, name: str) -> str:
    """The description of one field: its comment in :mod:`mcibi.spec.params`."""
    text = _field_comments().get(cls.__name__, {}).get(name, "")
    if not text:
        raise SchemaError(f"{params_module.__file__}: field {cls.__name__}.{name} has no comment. Describe it "
                          "(a comment above the field or after it): it is the params reference's text.")
    return text


def _class_description(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


# ------------------------------------------------------------------------------------------------------ schema
def _literal_schema(values: tuple) -> dict:
    kinds = {type(v) for v in values}
    names = {bool: "boolean", int: "integer", str: "string"}
    out: dict[str, Any] = {"type": names[kinds.pop()]} if len(kinds) == 1 else {}
    return out | {"enum": list(values)}


def _type_schema(tp: Any, complete: bool, defs: dict, where: str) -> dict:
    """The schema of one field type, read as :func:`mcibi.spec.params._convert` reads it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # reserved before recursing
            defs[tp.__name__] = _object_schema(tp, complete, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise SchemaError(f"{where}: only 'X | None' unions are read by the loader, got {tp}.")
        return {"anyOf": [_type_schema(inner[0], complete, defs, where), {"type": "null"}]}
    if origin is Literal:
        return _literal_schema(args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _type_schema(args[0], complete, defs, where), "minItems": 1}
        return {"type": "array", "prefixItems": [_type_schema(a, complete, defs, where) for a in args],
                "minItems": len(args), "maxItems": len(args)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1], complete, defs, where)}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    raise SchemaError(f"{where}: no JSON Schema for the field type {tp}.")


def _object_schema(cls: type, complete: bool, defs: dict) -> dict:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and (cls, f.name) not in _NOT_IN_FILES]
    properties = {}
    for f in fields:
        prop = _type_schema(hints[f.name], complete, defs, f"{cls.__name__}.{f.name}")
        keys = _MAPPING_KEYS.get((cls, f.name))
        if keys:
            prop["propertyNames"] = {"enum": list(keys)}
        if complete and prop.get("type") == "object":
            prop["minProperties"] = 1  # the loader refuses an empty mapping
        prop = {"description": field_description(cls, f.name)} | prop
        if f.default is not dataclasses.MISSING:
            prop["default"] = f.default
        properties[f.name] = prop
    out: dict[str, Any] = {"type": "object", "description": _class_description(cls), "properties": properties}
    if complete:
        out["required"] = [f.name for f in fields]
    out["additionalProperties"] = False
    return out


def params_schema(complete: bool = True) -> dict:
    """JSON Schema (draft 2020-12) of the complete params of one experiment, or (``complete=False``) of one params
    file as written, where every key is optional (``defaults.yaml`` and the experiment file each hold a part)."""
    defs: dict[str, dict] = {}
    root = _object_schema(ExperimentParams, complete, defs)
    head = {
        "$schema": SCHEMA_DIALECT,
        "title": "mcibi experiment params" if complete else "mcibi params file",
        "description": (
            "The complete params of one experiment: params/<dataset>/defaults.yaml merged with the experiment file. "
            if complete else
            "One params file as written: params/<dataset>/defaults.yaml or an experiment file (merged over it), "
            "each holding a part of the params, so no key is required here. ") +
        "Generated from mcibi/spec/params.py by `mcibi schema write`; `mcibi validate` also checks ranges and "
        "cross-field rules.",
    }
    return head | {k: v for k, v in root.items() if k != "description"} | {"$defs": dict(sorted(defs.items()))}


def _json(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------------- reference
def _code(value: Any) -> str:
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def _markdown_text(text: str) -> str:
    """A description as table-cell text: no HTML tags read into ``<name>``, no cell split at ``|``."""
    return text.replace("<", "&lt;").replace("|", "\\|")


def _type_text(prop: dict, defs: dict) -> str:
    """A property's type and allowed values in words."""
    if "$ref" in prop:
        return "mapping"
    if "anyOf" in prop:
        return " or ".join(_type_text(p, defs) for p in prop["anyOf"])
    if "enum" in prop:
        return "one of " + ", ".join(_code(v) for v in prop["enum"])
    kind = prop.get("type")
    if kind == "array" and "prefixItems" in prop:
        return "[" + ", ".join(_type_text(p, defs) for p in prop["prefixItems"]) + "]"
    if kind == "array":
        return f"list of {_type_text(prop['items'], defs)} (at least {prop.get('minItems', 0)})"
    if kind == "object":
        return "mapping"
    return {"boolean": "true or false", "null": "null"}.get(kind, kind)


def _rows(schema: dict, defs: dict, prefix: str) -> list[tuple[str, str, str]]:
    """(dotted key, type, description) of every key under an object schema, depth first."""
    rows = []
    for name, prop in schema["properties"].items():
        key = f"{prefix}{name}"
        kind = _type_text(prop, defs)
        if "default" in prop:
            kind += f"; default {_code(prop['default'])}"
        rows.append((key, kind, prop["description"]))
        target = prop
        if "anyOf" in prop:
            target = next((p for p in prop["anyOf"] if "$ref" in p), prop)
        if "$ref" in target:
            rows += _rows(defs[target["$ref"].rsplit("/", 1)[1]], defs, f"{key}.")
        elif target.get("type") == "object":  # a mapping of named entries (evaluate.protocols)
            names = target.get("propertyNames", {}).get("enum")
            entry, inner = f"{key}.<name>", target["additionalProperties"]
            text = _class_description(getattr(params_module, inner["$ref"].rsplit("/", 1)[1]))
            rows.append((entry, _type_text(inner, defs), text + (f" Names: {', '.join(names)}." if names else "")))
            rows += _rows(defs[inner["$ref"].rsplit("/", 1)[1]], defs, f"{entry}.")
    return rows


def reference_markdown(schema: dict | None = None) -> str:
    """``docs/params-reference.md``: one table per top-level section of the (complete) schema."""
    schema = schema or params_schema(complete=True)
    defs = schema["$defs"]
    lines = [
        "# Params reference",
        "",
        "Every key of an experiment's params, generated from the dataclasses of `mcibi/spec/params.py` (their field "
        "comments are the descriptions) by `mcibi schema write`, with the JSON Schemas "
        f"[`{COMPLETE_SCHEMA}`](../{COMPLETE_SCHEMA}) and [`{LAYER_SCHEMA}`](../{LAYER_SCHEMA}); do not edit it by "
        "hand. How params files are merged and checked, and how an editor completes them: [Params](params.md).",
        "",
        "Every key is required once `params/<dataset>/defaults.yaml` and the experiment file are merged, and no "
        "other key is allowed. No key takes a value the files do not state; a default below is what an editor "
        "inserts on completion. `number` is an integer or a decimal (`0.01`, `1e-2`), never `.nan` or `.inf`; "
        "`integer` is a whole number (`1e3` reads as 1000).",
    ]
    for name, prop in schema["properties"].items():
        lines += ["", f"## {name}", "", prop["description"][:1].upper() + prop["description"][1:] + ".", ""]
        lines += ["| Key | Type | Description |", "| --- | --- | --- |"]
        rows = [(name, _type_text(prop, defs), prop["description"])] if "$ref" not in prop else []
        if "$ref" in prop:
            rows += _rows(defs[prop["$ref"].rsplit("/", 1)[1]], defs, f"{name}.")
        for key, kind, text in rows:
            lines.append(f"| `{key}` | {kind} | {_markdown_text(text)} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- files
def generated_files() -> dict[str, str]:
    """Path (relative to the repository root) -> text of every file generated from the params dataclasses."""
    complete = params_schema(complete=True)
    return {COMPLETE_SCHEMA: _json(complete), LAYER_SCHEMA: _json(params_schema(complete=False)),
            REFERENCE_PAGE: reference_markdown(complete)}


def write_schema_files(root: str | Path = ".") -> list[Path]:
    """Write the schemas and the reference page under the repository ``root`` (atomically); return their paths."""
    from mcibi.files import write_text

    written = []
    for rel, text in generated_files().items():
        write_text(Path(root) / rel, text)
        written.append(Path(root) / rel)
    return written


def check_schema_files(root: str | Path = ".") -> list[str]:
    """The generated files under ``root`` that differ from (or are missing against) what this module writes."""
    return [str(Path(root) / rel) for rel, text in generated_files().items()
            if not (Path(root) / rel).is_file() or (Path(root) / rel).read_text(encoding="utf-8") != text]
