"""``dsrh config --explain KEY``: a key's meaning, type, default and allowed values, read from the schema.

The meaning is the comment written above the field in ``config.py`` (read with :mod:`ast` and the source
lines, so the schema stays the only place it is written); a section's meaning is its class docstring.
Allowed values come from the validation tables of ``config.py`` (choices, ranges) and the loss registry.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
from typing import Dict, List, Optional, Tuple

__all__ = ["field_docs", "explain", "all_keys"]


def _class_fields(tree: ast.Module, lines: List[str]) -> Dict[str, Dict[str, str]]:
    """``class name -> field name -> comment text`` (the ``#`` lines directly above each field)."""
    out: Dict[str, Dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs: Dict[str, str] = {}
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                comment: List[str] = []
                i = stmt.lineno - 2  # the line above, 0-based
                while i >= 0 and lines[i].strip().startswith("#"):
                    comment.insert(0, lines[i].strip().lstrip("#").strip())
                    i -= 1
                trailing = lines[stmt.lineno - 1].split("#", 1)
                if len(trailing) == 2 and "=" in trailing[0]:
                    comment.append(trailing[1].strip())
                docs[stmt.target.id] = " ".join(comment)
        out[node.name] = docs
    return out


def field_docs() -> Dict[str, Tuple[str, str, object]]:
    """Every config key (``section.key``, sections too) -> ``(meaning, type, default)``."""
    from omegaconf import OmegaConf

    from .. import config as config_mod

    src = inspect.getsource(config_mod)
    by_class = _class_fields(ast.parse(src), src.splitlines())
    defaults = OmegaConf.structured(config_mod.Config)
    out: Dict[str, Tuple[str, str, object]] = {}

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            nested = getattr(config_mod, str(f.type), None)
            if dataclasses.is_dataclass(nested):
                doc = inspect.getdoc(nested) or ""
                if doc.startswith(nested.__name__ + "("):  # the signature dataclasses write when there is no docstring
                    doc = ""
                out[key] = (doc or by_class.get(cls.__name__, {}).get(f.name, ""), "section", None)
                walk(nested, key + ".")
            else:
                value = OmegaConf.select(defaults, key)
                if OmegaConf.is_list(value):
                    value = list(value)
                out[key] = (by_class.get(cls.__name__, {}).get(f.name, ""), str(f.type), value)

    walk(config_mod.Config, "")
    return out


def all_keys() -> List[str]:
    return sorted(field_docs())


def _allowed(key: str) -> Optional[str]:
    from .. import config as config_mod

    choices = getattr(config_mod, "_CHOICES", {})
    if key in choices:
        return ", ".join(repr(c) for c in choices[key])
    if key == "loss.ranking":
        from ..losses.registry import ranking_names

        return ", ".join(repr(c) for c in ranking_names())
    if key in getattr(config_mod, "_POSITIVE", ()):
        return "> 0"
    if key in getattr(config_mod, "_NON_NEGATIVE", ()):
        return ">= 0"
    return None


def explain(key: str) -> str:
    """The text ``dsrh config --explain KEY`` prints; raises ConfigError for an unknown key (with suggestions)."""
    from ..config import ConfigError

    docs = field_docs()
    key = key.strip().lstrip("-")
    if key not in docs:
        close = difflib.get_close_matches(key, list(docs), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `dsrh config` prints every key"
        raise ConfigError(f"config key {key!r} does not exist{hint}")
    meaning, typ, default = docs[key]
    if typ == "section":
        lines = [f"{key}: {meaning or '(a section)'}", "keys:"]
        width = max(len(k) for k in docs if k.startswith(key + "."))
        for k, (m, t, d) in docs.items():
            if k.startswith(key + ".") and "." not in k[len(key) + 1:]:
                first = m if len(m) <= 90 else m[:87].rstrip() + "..."
                lines.append(f"  {k.ljust(width)}  {t if t != 'section' else '(section)'}"
                             + (f" = {d!r}" if t != "section" else "") + (f"  {first}" if first else ""))
        return "\n".join(lines)
    lines = [f"{key}", f"  meaning: {meaning or '(no comment above this field in config.py)'}", f"  type:    {typ}",
             f"  default: {default!r}"]
    allowed = _allowed(key)
    if allowed:
        lines.append(f"  allowed: {allowed}")
    return "\n".join(lines)
