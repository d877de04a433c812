"""Graph helpers of the ComfyUI test double: cache signatures and ComfyUI's execution order.

``Signatures`` gives each node the key ComfyUI's classic cache uses (class,
literal inputs, upstream signatures, and the node id when the class takes a
UNIQUE_ID). ``ExecutionList`` is comfy_execution/graph.py's topological
dissolve, with its output-first node picking, so nodes run in ComfyUI's order.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from .nodes import NODE_CLASSES


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int))


class Signatures:
    """Cache keys: a node's class and inputs, with links replaced by the upstream node's key."""

    def __init__(self, prompt: dict, sim):
        self.prompt, self.sim, self.memo = prompt, sim, {}

    def get(self, node_id: str) -> str:
        if node_id not in self.memo:
            self.memo[node_id] = "cycle"
            node = self.prompt.get(node_id)
            if not isinstance(node, dict):
                self.memo[node_id] = json.dumps(["missing", node_id])
            else:
                cls = NODE_CLASSES.get(node.get("class_type"))
                inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
                parts = []
                for name in sorted(inputs):
                    value = inputs[name]
                    if is_link(value):
                        parts.append([name, "link", self.get(value[0]), value[1]])
                    else:
                        parts.append([name, "value", value])
                own_id = node_id if cls is not None and cls.has_unique_id(self.sim) else None
                changed = cls.is_changed(self.sim, inputs) if cls is not None else None
                if changed is not None:  # IS_CHANGED (LoadImage: the file's hash) joins the key
                    parts.append(["is_changed", changed])
                self.memo[node_id] = json.dumps([node.get("class_type"), own_id, parts], default=repr)
        return self.memo[node_id]


class ExecutionList:
    """ComfyUI's topological dissolve (comfy_execution/graph.py), including its node-picking order."""

    def __init__(self, prompt: dict, is_cached: Callable[[str], bool]):
        self.prompt, self.is_cached = prompt, is_cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, bool]] = {}

    def add_node(self, node_id: str) -> None:
        stack, links = [node_id], []
        while stack:
            unique_id = stack.pop()
            if unique_id in self.pending:
                continue
            self.pending[unique_id] = True
            self.block_count[unique_id] = 0
            self.blocking[unique_id] = {}
            for value in self.prompt[unique_id]["inputs"].values():
                if is_link(value):
                    if not self.is_cached(value[0]):
                        stack.append(value[0])
                    links.append((value[0], unique_id))
        for from_id, to_id in links:
            if not self.is_cached(from_id):
                self.add_node(from_id)
                if to_id not in self.blocking[from_id]:
                    self.blocking[from_id][to_id] = True
                    self.block_count[to_id] += 1

    def is_empty(self) -> bool:
        return not self.pending

    def _is_output(self, node_id: str) -> bool:
        return NODE_CLASSES[self.prompt[node_id]["class_type"]].output_node

    def stage(self) -> str | None:
        available = [n for n in self.pending if self.block_count[n] == 0]
        if not available:
            return None
        for node_id in available:
            if self._is_output(node_id):
                return node_id
        for node_id in available:
            if any(self._is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in available:
            if any(self._is_output(b2) for b in self.blocking[node_id] for b2 in self.blocking[b]):
                return node_id
        return available[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for blocked in self.blocking.pop(node_id):
            self.block_count[blocked] -= 1
