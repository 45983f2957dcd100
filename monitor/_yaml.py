"""YAML for files an operator hands the sidecar (config, bundle.yaml, constitution), bounded.

``yaml.safe_load`` expands aliases by reference, so a 0.4 KB "billion laughs" file loads in
microseconds, but anything that walks or prints the result (an error message echoing the value)
costs what the expansion costs: 58 MB for one bad config key. ``load_yaml`` counts the nodes the
document stands for once its aliases are expanded (without expanding them) and refuses more than
``max_nodes``, and a recursive alias, before constructing anything.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

__all__ = ["MAX_NODES", "YamlError", "load_yaml"]

# The default bundle.yaml (40 KB) is ~4 000 nodes; a config file is a few dozen.
MAX_NODES = 200_000


class YamlError(ValueError):
    """Not valid YAML, or a document too large once its aliases are expanded."""


def load_yaml(text: str, max_nodes: int = MAX_NODES) -> Any:
    """The single document in ``text`` (None when empty); raises ``YamlError`` with a one-line reason."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set(), max_nodes)
        if size > max_nodes:
            raise YamlError(f"expected at most {max_nodes} nodes with aliases expanded, got more")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        context = f"{exc.context}: " if exc.context else ""
        raise YamlError(f"{context}{exc.problem}{_at(exc.problem_mark)}") from None
    except yaml.YAMLError as exc:
        raise YamlError(" ".join(str(exc).split())) from None
    except RecursionError:
        raise YamlError("expected a document nested less deeply") from None
    finally:
        loader.dispose()


def _expanded_size(node: Node, sizes: dict[int, int], open_: set[int], limit: int) -> int:
    """Nodes under ``node``, an alias counted as often as it is used; stops counting past ``limit``."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise YamlError(f"expected no recursive alias, got one{_at(node.start_mark)}")
    open_.add(key)
    total = 1
    if isinstance(node, SequenceNode):
        children: list[Node] = list(node.value)
    elif isinstance(node, MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, open_, limit)
        if total > limit:
            break
    open_.discard(key)
    sizes[key] = total
    return total


def _at(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
