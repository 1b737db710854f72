"""One union-find for grouping images (duplicates; patients joined by a near-duplicate pair).

Hand-written rather than scipy's connected_components: the components are the same, but which member names
a group decides the group ids, and those feed the splitters, so the existing splits depend on this order."""
from __future__ import annotations

from typing import Hashable, Iterable


class UnionFind:
    """Disjoint sets over hashable items; ``union(a, b)`` puts a's root under b's root."""

    def __init__(self, items: Iterable[Hashable]):
        self.parent = {x: x for x in items}

    def find(self, x: Hashable) -> Hashable:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving: roots are unchanged, only shortcuts are added
            x = parent[x]
        return x

    def union(self, a: Hashable, b: Hashable) -> None:
        self.parent[self.find(a)] = self.find(b)
