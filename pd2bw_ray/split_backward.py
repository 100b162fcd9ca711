"""A backward split in two passes over one autograd graph, as Zero Bubble needs: ``I`` computes the
gradient of a stage's inputs, ``W`` the gradients of its weights later, without running the
input-gradient chain a second time.

The graph from a stage's roots (its outputs, or the loss) down to its inputs is the *input side*.
Each weight reaches it at one or more *boundary* nodes: the first input-side nodes on the weight's
way up to the roots (a Linear's addmm, a LayerNorm's backward). ``I`` runs the input side and
records the gradient arriving at every boundary node; ``W`` starts from those recorded gradients
and runs only the part of the graph below the boundaries that leads to the weights.

Weights that share a boundary node form a group and get their gradients from one
``autograd.grad`` call; different groups never meet, so no work is done twice. When one
boundary node of a group lies above another on the input side, the lower node's gradient is
pinned to its recorded value during ``W`` (otherwise the path between the two would be counted
twice). A weight with no boundary (its path to the roots bypasses the inputs, or the stage has no
input that needs a gradient: the first stage) takes its gradient from the roots, which ``I``
kept. The same method is used by ``torch.distributed.pipelining``'s zero-bubble schedules.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.autograd.graph import GradientEdge, Node


def grad_node(t: torch.Tensor) -> Node | None:
    """The node that receives ``t``'s gradient: its ``grad_fn``, or for a leaf its gradient
    accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    if not t.requires_grad:
        return None
    return t.view_as(t).grad_fn.next_functions[0][0]


@dataclass(eq=False)
class WeightGroup:
    """Weights (their indices) whose gradients come from the same boundary nodes."""

    weights: list[int]
    boundaries: list[Node]
    grads: dict[Node, tuple[Any, ...]] = field(default_factory=dict)   # recorded by ``I``


@dataclass(eq=False)
class SplitBackward:
    """One microbatch's split backward: the graph's roots with their gradients, and the weight
    groups whose boundary gradients ``input_pass`` records."""

    roots: list[torch.Tensor]
    root_grads: list[torch.Tensor] | None
    groups: list[WeightGroup]
    from_roots: list[int]           # weights with no boundary: their gradient starts at the roots

    def input_pass(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """``I``: the gradient of each input (None where unused), recording every boundary's."""
        if not self.roots or not inputs:
            return [None] * len(inputs)
        handles = []
        for group in self.groups:
            for node in group.boundaries:
                handles.append(node.register_prehook(_recorder(group, node)))
        try:
            return list(torch.autograd.grad(self.roots, list(inputs), self.root_grads,
                                            retain_graph=True, allow_unused=True))
        finally:
            for h in handles:
                h.remove()

    def recorded_bytes(self) -> int:
        """Bytes of the distinct storages of the boundary gradients ``input_pass`` recorded:
        what the split holds between ``I`` and ``W`` on top of the graph's activations."""
        storages = {}
        for group in self.groups:
            for grads in group.grads.values():
                for g in grads:
                    if isinstance(g, torch.Tensor):
                        st = g.untyped_storage()
                        storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())

    def weight_pass(self, weights: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """``W``: the gradient of each weight (None where it has none), from the recorded
        boundary gradients (and the roots, for weights without a boundary)."""
        out: list[torch.Tensor | None] = [None] * len(weights)
        for group in self.groups:
            edges, grads = [], []
            for node in group.boundaries:
                for i, g in enumerate(group.grads.get(node, ())):
                    if g is not None:
                        edges.append(GradientEdge(node, i))
                        grads.append(g)
            if not edges:
                continue
            handles = []
            if len(group.boundaries) > 1:   # pin each boundary to what I recorded there
                for node in group.boundaries:
                    if node in group.grads:
                        handles.append(node.register_prehook(_pinned(group.grads[node])))
            try:
                got = torch.autograd.grad(edges, [GradientEdge(grad_node(weights[k]), 0)
                                                  for k in group.weights],
                                          grads, retain_graph=True, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
            for k, g in zip(group.weights, got):
                out[k] = g
            group.grads.clear()
        if self.from_roots and self.roots:
            got = torch.autograd.grad(self.roots, [weights[k] for k in self.from_roots],
                                      self.root_grads, retain_graph=True, allow_unused=True)
            for k, g in zip(self.from_roots, got):
                out[k] = g
        return out


def _recorder(group: WeightGroup, node: Node):
    def hook(grad_outputs):
        group.grads[node] = tuple(grad_outputs)
    return hook


def _pinned(grads: tuple[Any, ...]):
    def hook(grad_outputs):
        return grads
    return hook


def plan_split(roots: Sequence[torch.Tensor], root_grads: Sequence[torch.Tensor] | None,
               inputs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> SplitBackward:
    """Find each weight's boundary nodes in the graph of ``roots`` and group the weights."""
    root_nodes = [n for n in (grad_node(r) for r in roots) if n is not None]
    # consumers[n]: the nodes that send gradient into n (edges reversed), over the whole graph
    consumers: dict[Node, list[Node]] = {}
    seen = set(root_nodes)
    queue = deque(root_nodes)
    while queue:
        node = queue.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            consumers.setdefault(nxt, []).append(node)
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    # the input side: every node on a path from the roots to an input
    input_side: set[Node] = set()
    queue = deque(n for n in (grad_node(x) for x in inputs) if n is not None and n in seen)
    input_side.update(queue)
    while queue:
        node = queue.popleft()
        for up in consumers.get(node, ()):
            if up not in input_side:
                input_side.add(up)
                queue.append(up)
    by_boundary: dict[Node, WeightGroup] = {}
    from_roots: list[int] = []
    for k, w in enumerate(weights):
        acc = grad_node(w) if w.requires_grad else None
        if acc is None or acc not in seen:
            continue    # not used by this microbatch: no gradient
        boundaries: dict[Node, None] = {}     # in the order found: a deterministic sum
        reaches_root = acc in root_nodes
        visited = {acc}
        queue = deque([acc])
        while queue:
            node = queue.popleft()
            for up in consumers.get(node, ()):
                if up in visited:
                    continue
                visited.add(up)
                if up in input_side:
                    boundaries[up] = None
                else:
                    reaches_root |= up in root_nodes
                    queue.append(up)
        if not input_side or reaches_root or not boundaries:
            # a path to the roots that misses the input side: take it all from the roots
            from_roots.append(k)
            continue
        groups = {id(by_boundary[b]): by_boundary[b] for b in boundaries if b in by_boundary}
        merged = WeightGroup([k], list(boundaries))
        for g in groups.values():
            merged.weights += g.weights
            merged.boundaries += [b for b in g.boundaries if b not in boundaries]
        for b in merged.boundaries:
            by_boundary[b] = merged
    groups = list({id(g): g for g in by_boundary.values()}.values())
    for g in groups:
        g.weights.sort()
    return SplitBackward(list(roots), None if root_grads is None else list(root_grads), groups,
                         from_roots)
