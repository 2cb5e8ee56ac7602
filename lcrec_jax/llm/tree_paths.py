"""Get and set leaves of nested param dicts by a path of keys, e.g. ``("layers_0", "mlp")``."""

from __future__ import annotations

from typing import Any, Mapping


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  """``tree[path[0]]...[path[-1]] = value``, creating intermediate dicts."""
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
  """The leaf at ``path``; ``KeyError`` naming the whole path when it is missing."""
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      raise KeyError(f"params lack {'/'.join(path)}")
    tree = tree[p]
  return tree
