"""The prefix cache (rank 0): a token-level radix tree over KV slots, as SGLang's RadixAttention.

Each edge of the tree holds a run of token ids and the pool slots holding their K/V (on every
stage: a slot index means the same token everywhere, so the stages need no cache of their own,
they only follow the slot indices of the step messages). A request that starts with a cached
prefix reads those slots instead of recomputing them.

Reference counts: a request locks the deepest node it reads, which counts on that node and every
ancestor; a node with no reference is evictable, least recently used leaves first. Slots leave
the tree only by eviction, so a slot that any running request still reads is never freed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence


class Node:
    """A run of tokens and their slots below `parent`; `refs` counts the requests reading it."""

    __slots__ = ("parent", "children", "tokens", "slots", "refs", "last_used")

    def __init__(self, parent: Node | None, tokens: list[int], slots: list[int], last_used: int) -> None:
        self.parent = parent
        self.children: dict[int, Node] = {}
        self.tokens = tokens
        self.slots = slots
        self.refs = 0
        self.last_used = last_used

    def __repr__(self) -> str:
        return f"Node({len(self.tokens)} tokens, refs={self.refs})"


class PrefixCache:
    """Cached token runs and their slots. The tree owns its slots: only `evict` hands them back."""

    def __init__(self) -> None:
        self._clock = itertools.count(1)
        self.root = Node(None, [], [], 0)
        self.root.refs = 1  # the root holds no tokens and is never evicted
        self.cached_tokens = 0
        self.evictable_tokens = 0

    # -- lookup --------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> tuple[Node, list[int]]:
        """The longest cached prefix of `tokens`: the node where it ends and its slots.

        A match that ends inside an edge splits it there, so the match always ends on a node
        that a request can lock.
        """
        node, slots, i = self.root, [], 0
        now = next(self._clock)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _common_length(child.tokens, tokens, i)
            if k < len(child.tokens):
                child = self._split(child, k)
            child.last_used = now
            slots.extend(child.slots)
            node, i = child, i + k
        return node, slots

    # -- insertion -----------------------------------------------------------------------------
    def insert(
        self, tokens: Sequence[int], slots: Sequence[int], start: Node | None = None, depth: int = 0
    ) -> tuple[Node, list[int]]:
        """Caches `tokens` (whose K/V sit in `slots`, one each) below what is cached already.

        `start` (a node whose path is tokens[:depth], locked by the caller) skips the walk down
        to it: a request that grows only inserts its new tokens. Returns the node where the
        sequence ends and the slots the tree took over: those of the tokens it did not hold yet.
        Slots of tokens it held already stay with the caller.
        """
        if len(tokens) != len(slots):
            raise ValueError(f"{len(tokens)} tokens but {len(slots)} slots")
        node, i = start or self.root, depth if start is not None else 0
        now = next(self._clock)
        if start is not None and start is not self.root and start.refs == 1 and not start.children and i < len(tokens):
            # The caller's own leaf (only it reads it): its edge grows in place, so a request that
            # decodes n tokens leaves one node, not a chain of n that every eviction walks.
            grown = list(slots[i:])
            start.tokens.extend(tokens[i:])
            start.slots.extend(grown)
            start.last_used = now
            self.cached_tokens += len(grown)
            return start, grown
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = Node(node, list(tokens[i:]), list(slots[i:]), now)
                node.children[tokens[i]] = leaf
                self.cached_tokens += len(leaf.tokens)
                self.evictable_tokens += len(leaf.tokens)
                return leaf, leaf.slots
            k = _common_length(child.tokens, tokens, i)
            if k < len(child.tokens):
                child = self._split(child, k)
            child.last_used = now
            node, i = child, i + k
        return node, []

    def _split(self, child: Node, k: int) -> Node:
        """Cuts `child`'s edge after k tokens; returns the new upper part (same refs)."""
        upper = Node(child.parent, child.tokens[:k], child.slots[:k], child.last_used)
        upper.refs = child.refs
        upper.parent.children[upper.tokens[0]] = upper
        child.tokens, child.slots, child.parent = child.tokens[k:], child.slots[k:], upper
        upper.children[child.tokens[0]] = child
        return upper

    # -- references ----------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        """A request reads the path to `node`: none of it may be evicted."""
        while node is not self.root:
            if node.refs == 0:
                self.evictable_tokens -= len(node.tokens)
            node.refs += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            if node.refs <= 0:
                raise RuntimeError(f"{node} unlocked more often than locked")
            node.refs -= 1
            if node.refs == 0:
                self.evictable_tokens += len(node.tokens)
            node = node.parent

    # -- eviction ------------------------------------------------------------------------------
    def evict(self, n: int) -> list[int]:
        """Frees n slots (or all evictable ones), least recently used leaves first. A leaf longer
        than what is still needed loses only its last tokens: the prefix it keeps stays reusable."""
        leaves = [(leaf.last_used, id(leaf), leaf) for leaf in self._leaves() if leaf.refs == 0]
        heapq.heapify(leaves)
        freed: list[int] = []
        while leaves and len(freed) < n:
            _, _, leaf = heapq.heappop(leaves)
            need = n - len(freed)
            if need < len(leaf.tokens):
                freed.extend(leaf.slots[-need:])
                del leaf.tokens[-need:], leaf.slots[-need:]
                self.cached_tokens -= need
                self.evictable_tokens -= need
                break
            freed.extend(leaf.slots)
            self.cached_tokens -= len(leaf.tokens)
            self.evictable_tokens -= len(leaf.tokens)
            parent = leaf.parent
            del parent.children[leaf.tokens[0]]
            if parent is not self.root and not parent.children and parent.refs == 0:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))
        return freed

    def _leaves(self) -> list[Node]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                leaves.append(node)
        return leaves

    def nodes(self) -> list[Node]:
        """Every node but the root (for checks and tests)."""
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out


def _common_length(edge: Sequence[int], tokens: Sequence[int], start: int) -> int:
    k, limit = 0, min(len(edge), len(tokens) - start)
    while k < limit and edge[k] == tokens[start + k]:
        k += 1
    return k
