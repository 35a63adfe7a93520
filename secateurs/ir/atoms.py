"""Channel atoms: a union-find over tensor dimensions with structured refinement.

Every dimension of every tensor in the captured graph is an *atom*. Op rules unify atoms that must keep
the same channels (a conv's output channels and the next batch norm's weight), and refine an atom into
a row-major *product* of smaller atoms (``hidden = heads x head_dim``, a grouped conv's
``channels = groups x per_group``) or into a *sum* of segments (the output of ``cat``). After the
analysis, the atoms that have no refinement are the leaves: each leaf is one coupled channel group whose
indices can be removed together from every tensor dimension that contains it. A dimension's flat index
maps onto its leaves through its refinement tree, so removing a head removes ``head_dim`` consecutive
rows, and removing a channel before ``flatten`` removes ``H*W`` consecutive features.

Refinements that cannot be reconciled (a sum against a product, sizes that do not divide) freeze the
atoms involved instead of guessing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["AtomTable", "Refinement", "RefinementConflict"]


class RefinementConflict(Exception):  # noqa: N818 - internal signal, caught by the rule engine
    """Two structures for the same channels cannot be reconciled (e.g. a sum against a product)."""


@dataclasses.dataclass(frozen=True)
class Refinement:
    """How an atom class splits into smaller atoms.

    Attributes:
        kind: ``"prod"`` (row-major product; flat index = ((i0 * s1) + i1) * s2 + ...) or ``"sum"``
            (consecutive segments).
        parts: The child atom ids, outermost / first segment first.

    """

    kind: str
    parts: tuple[int, ...]


class AtomTable:
    """Union-find over dimension atoms, with product / sum refinements stored on class roots."""

    def __init__(self) -> None:
        """Create an empty table."""
        self._parent: list[int] = []
        self._size: list[int] = []
        self._refine: dict[int, Refinement] = {}
        self._freeze: list[tuple[int, str, bool | None]] = []
        self.where = "graph"
        self._mixed: list[tuple[int, str]] = []
        self._tags: list[tuple[int, str]] = []
        # leaves / coords of a class change only when classes merge (unify): cached until then
        self._leaves: dict[int, list[int]] = {}
        self._coords: dict[tuple[int, int], np.ndarray | None] = {}

    # ----------------------------------------------------------------- basics
    def new(self, size: int) -> int:
        """Create a fresh atom of ``size`` channels and return its id."""
        self._parent.append(len(self._parent))
        self._size.append(int(size))
        return len(self._parent) - 1

    def __len__(self) -> int:
        """Number of atoms ever created."""
        return len(self._parent)

    def find(self, atom: int) -> int:
        """Return the root of ``atom``'s class (with path halving)."""
        parent = self._parent
        while parent[atom] != atom:
            parent[atom] = parent[parent[atom]]
            atom = parent[atom]
        return atom

    def size(self, atom: int) -> int:
        """Number of channels of ``atom``."""
        return self._size[atom]

    def refinement(self, atom: int) -> Refinement | None:
        """The refinement of ``atom``'s class, or None for a leaf."""
        return self._refine.get(self.find(atom))

    # --------------------------------------------------------------- freezing
    def freeze(self, atom: int, reason: str, *, channel: bool | None = True) -> None:
        """Mark ``atom`` (and, once the analysis ends, every leaf under it) as never prunable.

        ``channel=False`` says the dim is not a channel at all (a kernel window, a spatial size), as
        opposed to channels frozen by a limitation or a graph boundary; reports list only the latter.
        ``channel=None``: not a channel by itself (a dim of a constant of the analysis), but reported as one
        when an op ties it to a weight's dim, since that weight's channels are then frozen by it.
        """
        self._freeze.append((atom, reason, channel))

    def tag(self, atom: int, kind: str) -> None:
        """Record that ``atom`` is a known structure (``heads``, ``kv_groups``) for the group classifier."""
        self._tags.append((atom, kind))

    def tagged_leaves(self) -> dict[int, set[str]]:
        """Map every leaf under a tagged atom to its tags."""
        out: dict[int, set[str]] = {}
        for atom, kind in self._tags:
            for leaf in self.leaves(atom):
                out.setdefault(leaf, set()).add(kind)
        return out

    def mark_mixed(self, atom: int, where: str) -> None:
        """Record that ``atom``'s channels enter a cross-channel statistic (a norm, a mean, a softmax)."""
        self._mixed.append((atom, where))

    def mixed_leaves(self) -> dict[int, str]:
        """Map every leaf whose channels enter a cross-channel statistic to where that happens first."""
        out: dict[int, str] = {}
        for atom, where in self._mixed:
            for leaf in self.leaves(atom):
                out.setdefault(leaf, where)
        return out

    def frozen_leaves(self) -> dict[int, tuple[str, bool | None]]:
        """Map every frozen leaf root to the first (reason, is_channel) recorded for it.

        A channel reason wins over a ``channel=None`` one, which wins over a non-channel one, so a boundary is
        never hidden.
        """
        rank = {True: 2, None: 1, False: 0}
        out: dict[int, tuple[str, bool | None]] = {}
        for atom, reason, channel in self._freeze:
            for leaf in self.leaves(atom):
                if leaf not in out or rank[channel] > rank[out[leaf][1]]:
                    out[leaf] = (reason, channel)
        return out

    # ------------------------------------------------------------ refinement
    def product(self, atoms: Sequence[int]) -> int:
        """Return an atom equal to the row-major product of ``atoms`` (size-1 atoms are dropped)."""
        parts = tuple(a for a in atoms if self._size[a] != 1)
        if len(parts) == 1:
            return parts[0]
        size = int(np.prod([self._size[a] for a in parts])) if parts else 1
        atom = self.new(size)
        if parts:
            self._refine[atom] = Refinement("prod", parts)
        return atom

    def concat(self, atoms: Sequence[int]) -> int:
        """Return an atom equal to the concatenation of ``atoms`` (empty segments are dropped)."""
        parts = tuple(a for a in atoms if self._size[a] != 0)
        if len(parts) == 1:
            return parts[0]
        atom = self.new(sum(self._size[a] for a in parts))
        if parts:
            self._refine[atom] = Refinement("sum", parts)
        return atom

    def split(self, atom: int, kind: str, sizes: Sequence[int]) -> tuple[int, ...]:
        """Refine ``atom`` into fresh parts of ``sizes`` (product or sum) and return the part ids.

        If the atom is already refined, the new structure is unified with the old one.
        """
        parts = tuple(self.new(s) for s in sizes)
        other = self.product(parts) if kind == "prod" else self.concat(parts)
        self.unify(atom, other)
        return parts

    def unify(self, a: int, b: int) -> None:
        """Declare that atoms ``a`` and ``b`` are the same channels, in the same order.

        Raises:
            RefinementConflict: The sizes differ or the two structures cannot be reconciled.

        """
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            raise RefinementConflict(f"sizes {self._size[ra]} and {self._size[rb]} differ")
        self._leaves.clear()
        self._coords.clear()
        fa, fb = self._refine.pop(ra, None), self._refine.pop(rb, None)
        self._parent[rb] = ra
        if fa is None:
            if fb is not None:
                self._refine[ra] = fb
            return
        self._refine[ra] = fa
        if fb is not None and fb != fa:
            self._unify_refinements(fa, fb)

    def _flat_parts(self, ref: Refinement) -> list[int]:
        """Expand nested refinements of the same kind into one flat list of parts."""
        out: list[int] = []
        for part in ref.parts:
            sub = self._refine.get(self.find(part))
            if sub is not None and sub.kind == ref.kind:
                out.extend(self._flat_parts(sub))
            else:
                out.append(part)
        return out

    def _unify_refinements(self, fa: Refinement, fb: Refinement) -> None:
        if fa.kind != fb.kind:
            fa, fb = self._sum_as_product(fa), self._sum_as_product(fb)
        left, right = self._flat_parts(fa), self._flat_parts(fb)
        i = j = 0
        while i < len(left) and j < len(right):
            x, y = left[i], right[j]
            sx, sy = self._size[x], self._size[y]
            if sx == sy:
                self.unify(x, y)
                i, j = i + 1, j + 1
                continue
            small, big, swap = (x, y, False) if sx < sy else (y, x, True)
            s_small, s_big = self._size[small], self._size[big]
            if fa.kind == "prod":
                if s_big % s_small:
                    raise RefinementConflict(f"factor {s_small} does not divide {s_big}")
                head, rest = self.split(big, "prod", (s_small, s_big // s_small))
            else:
                head, rest = self.split(big, "sum", (s_small, s_big - s_small))
            self.unify(small, head)
            if swap:
                left[i] = rest
                j += 1
            else:
                right[j] = rest
                i += 1
        if i != len(left) or j != len(right):
            raise RefinementConflict("structures cover different channels")

    def _sum_as_product(self, ref: Refinement) -> Refinement:
        """View a sum of k equal segments as (k x segment), coupling the segments' channels.

        The segment index becomes a frozen atom: removing a whole segment would change the number of
        segments, which is a literal of the op that made them.
        """
        if ref.kind == "prod":
            return ref
        parts = self._flat_parts(ref)
        size = self._size[parts[0]]
        if len(parts) < 2 or any(self._size[p] != size for p in parts):
            raise RefinementConflict("a concatenation of unequal parts meets a reshape of the same channels")
        for p in parts[1:]:
            self.unify(parts[0], p)
        count = self.new(len(parts))
        self.freeze(count, f"segment index of a split or concatenation that is also reshaped at {self.where}")
        return Refinement("prod", (count, parts[0]))

    # ----------------------------------------------------------------- leaves
    def leaves(self, atom: int) -> list[int]:
        """All leaf roots under ``atom`` (itself if it is a leaf), outermost first."""
        root = self.find(atom)
        hit = self._leaves.get(root)
        if hit is not None:
            return list(hit)
        ref = self._refine.get(root)
        if ref is None:
            return [root]
        out: list[int] = []
        seen: set[int] = set()
        for part in ref.parts:
            for leaf in self.leaves(part):
                if leaf not in seen:
                    seen.add(leaf)
                    out.append(leaf)
        self._leaves[root] = out
        return list(out)

    def coords(self, atom: int, leaf: int) -> np.ndarray | None:
        """For each flat index of ``atom``, the index along ``leaf`` (-1 where the leaf is absent).

        Returns None when ``leaf`` is not under ``atom`` at all. The array is read-only (it is cached).
        """
        root = self.find(atom)
        key = (root, leaf)
        if key in self._coords:
            return self._coords[key]
        out = self._coords_of(root, leaf)
        if out is not None:
            out.setflags(write=False)
        self._coords[key] = out
        return out

    def _coords_of(self, root: int, leaf: int) -> np.ndarray | None:
        if root == leaf:
            return np.arange(self._size[root])
        ref = self._refine.get(root)
        if ref is None:
            return None
        subs = [self.coords(p, leaf) for p in ref.parts]
        if all(s is None for s in subs):
            return None
        if ref.kind == "sum":
            return np.concatenate(
                [s if s is not None else np.full(self._size[p], -1) for s, p in zip(subs, ref.parts, strict=True)]
            )
        shape = [self._size[p] for p in ref.parts]
        hit = [k for k, s in enumerate(subs) if s is not None]
        if len(hit) > 1:
            # The same leaf twice in one product cannot be sliced rectangularly.
            raise RefinementConflict("a leaf appears twice in one product")
        k = hit[0]
        view = [1] * len(shape)
        view[k] = shape[k]
        sub = subs[k]
        assert sub is not None
        return np.ascontiguousarray(np.broadcast_to(sub.reshape(view), shape).reshape(-1))

    def keep_mask(self, atom: int, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Boolean mask over ``atom``'s flat indices, given per-leaf keep masks (missing = keep all)."""
        mask = np.ones(self._size[self.find(atom)], dtype=bool)
        for leaf in self.leaves(atom):
            if leaf not in keep:
                continue
            idx = self.coords(atom, leaf)
            if idx is None:
                continue
            hit = idx >= 0
            mask[hit] &= keep[leaf][idx[hit]]
        return mask

    def sized(self, atom: int, kept: dict[int, int], memo: dict[int, int] | None = None) -> int:
        """Size of ``atom`` when each leaf ``l`` in ``kept`` keeps ``kept[l]`` channels."""
        root = self.find(atom)
        if memo is not None and root in memo:
            return memo[root]
        ref = self._refine.get(root)
        if ref is None:
            value = kept.get(root, self._size[root])
        else:
            sizes = [self.sized(p, kept, memo) for p in ref.parts]
            value = int(np.prod(sizes)) if ref.kind == "prod" else int(sum(sizes))
        if memo is not None:
            memo[root] = value
        return value

    def others_in_product(self, atom: int, leaf: int) -> int:
        """Product of the sizes beside ``leaf`` along ``atom`` (1 where it is not in a product)."""
        idx = self.coords(atom, leaf)
        if idx is None:
            return 1
        count = int((idx == 0).sum())
        return max(count, 1)

    def all_roots(self) -> Iterable[int]:
        """Every class root."""
        return (a for a in range(len(self._parent)) if self._parent[a] == a)
