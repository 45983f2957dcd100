"""The constitution: written principles a critic checks outputs against (a YAML file).

``Constitution.load()`` reads the default in ``monitor/assets/constitution.yaml``; users pass their
own file. Every field is validated and a bad file is refused with the principle and the field named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from monitor.errors import ConfigError

CATEGORIES = ("harmlessness", "helpfulness", "honesty")
DEFAULT_CONSTITUTION = Path(__file__).resolve().parent.parent / "assets" / "constitution.yaml"


@dataclass(frozen=True)
class Principle:
    """One principle. ``question`` is asked so that "yes" means the response violates it."""

    id: str
    category: str
    statement: str
    question: str
    critique_prompt: str
    revision_prompt: str


@dataclass(frozen=True)
class Constitution:
    """Principles indexed by id and by category.

    >>> c = Constitution.load()
    >>> len(c.principles), c.by_id["no_sycophancy"].category, len(c.by_category("harmlessness"))
    (10, 'honesty', 3)
    """

    principles: tuple[Principle, ...]

    @property
    def by_id(self) -> dict[str, Principle]:
        return {p.id: p for p in self.principles}

    def by_category(self, category: str) -> tuple[Principle, ...]:
        if category not in CATEGORIES:
            raise ValueError(f"category: expected one of {list(CATEGORIES)}, got {category!r}")
        return tuple(p for p in self.principles if p.category == category)

    def select(self, ids: list[str] | None) -> tuple[Principle, ...]:
        """The principles named by ``ids`` (all when None); unknown ids are an error."""
        if ids is None:
            return self.principles
        unknown = [i for i in ids if i not in self.by_id]
        if unknown:
            raise ValueError(f"principles: unknown ids {unknown}; known: {sorted(self.by_id)}")
        return tuple(self.by_id[i] for i in ids)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Constitution:
        file = Path(path) if path is not None else DEFAULT_CONSTITUTION
        try:
            doc: Any = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"constitution {file}: not readable YAML: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("principles"), list) or not doc["principles"]:
            raise ConfigError(f"constitution {file}: principles: expected a non-empty list")
        out = []
        for i, p in enumerate(doc["principles"]):
            where = f"constitution {file}: principles[{i}]"
            if not isinstance(p, dict):
                raise ConfigError(f"{where}: expected a mapping")
            for key in ("id", "category", "statement", "question", "critique_prompt", "revision_prompt"):
                if not isinstance(p.get(key), str) or not p[key].strip():
                    raise ConfigError(f"{where}.{key}: expected a non-empty string, got {p.get(key)!r}")
            if p["category"] not in CATEGORIES:
                raise ConfigError(f"{where}.category: expected one of {list(CATEGORIES)}, got {p['category']!r}")
            out.append(Principle(**{k: str(p[k]).strip() for k in Principle.__dataclass_fields__}))
        ids = [p.id for p in out]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"constitution {file}: principle ids must be unique, got {ids}")
        return cls(tuple(out))
