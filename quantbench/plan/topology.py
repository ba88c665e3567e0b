"""mistral.rs topology files: per-layer or per-tensor ISQ types (and devices) in YAML.

    0-16:            # layers 0..15 (END exclusive)
      isq: Q4K
    16:              # one layer
      isq: Q8_0
    '/mlp\\.down_proj/':   # a regex on the weight name, e.g. model.layers.3.mlp.down_proj.weight
      isq: Q6K
      device: cuda[0]

Semantics follow ``mistralrs-core/src/topology/mod.rs`` and what mistral.rs 0.9.5 writes: ranges
are applied in order of increasing END, then declaration order, so the later-applied range wins
on overlap; among regexes the last declared match wins; a regex match beats a layer range; an
explicit type is never promoted (promotion only touches the default type).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from quantbench.errors import FormatError, UnknownTypeError
from quantbench.plan.isq import IsqType, parse_isq

DEVICE_PATTERN = re.compile(r"^(cpu|cuda\[(\d+)\]|metal\[(\d+)\])$")


@dataclass(frozen=True)
class LayerTopology:
    isq: IsqType | None
    device: str | None


@dataclass
class Topology:
    layers: list[LayerTopology | None] = field(default_factory=list)
    patterns: list[tuple[re.Pattern[str], LayerTopology]] = field(default_factory=list)
    source: str = "<topology>"

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], device: str = "cpu") -> "Topology":
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise FormatError(f"{p}: cannot read topology file: {e}") from None
        return cls.from_str(text, source=str(p), device=device)

    @classmethod
    def from_str(cls, text: str, source: str = "<topology>", device: str = "cpu") -> "Topology":
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise FormatError(f"{source}: not valid YAML: {e}") from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise FormatError(f"{source}: a topology is a mapping of selectors to {{isq, device}}, got {type(doc).__name__}")
        ranges: list[tuple[int, int, int, LayerTopology]] = []
        patterns: list[tuple[re.Pattern[str], LayerTopology]] = []
        for index, (selector, body) in enumerate(doc.items()):
            sel = str(selector)
            where = f"{source}: selector {sel!r}"
            layer = _layer_topology(body, where, device)
            if len(sel) >= 2 and sel.startswith("/") and sel.endswith("/"):
                try:
                    patterns.append((re.compile(sel[1:-1]), layer))
                except re.error as e:
                    raise FormatError(f"{where}: invalid topology regex {sel[1:-1]!r}: {e}") from None
                continue
            start, end = _parse_range(sel, where)
            ranges.append((end, index, start, layer))
        ranges.sort(key=lambda r: (r[0], r[1]))
        cap = max((r[0] for r in ranges), default=0)
        layers: list[LayerTopology | None] = [None] * cap
        for end, _, start, layer in ranges:
            for i in range(start, end):
                layers[i] = layer
        return cls(layers, patterns, source)

    def layer_for(self, layer: int | None) -> LayerTopology | None:
        if layer is None or layer >= len(self.layers):
            return None
        return self.layers[layer]

    def match_for_name(self, name: str) -> LayerTopology | None:
        """The last-declared regex that matches ``name`` (unanchored search, like Rust ``is_match``)."""
        for regex, layer in reversed(self.patterns):
            if regex.search(name):
                return layer
        return None

    def isq_for(self, weight_name: str, layer: int | None) -> IsqType | None:
        """The explicit type for a module, or ``None`` to use the (promoted) default."""
        by_name = self.match_for_name(weight_name)
        if by_name is not None and by_name.isq is not None:
            return by_name.isq
        by_layer = self.layer_for(layer)
        return by_layer.isq if by_layer is not None else None


def _layer_topology(body, where: str, device: str) -> LayerTopology:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise FormatError(f"{where}: expected a mapping with 'isq' and/or 'device', got {body!r}")
    unknown = set(body) - {"isq", "device"}
    if unknown:
        raise FormatError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: isq, device")
    isq = None
    if body.get("isq") is not None:
        try:
            isq = parse_isq(str(body["isq"]), device)
        except UnknownTypeError as e:
            raise UnknownTypeError(f"{where}: {e}") from None
    dev = body.get("device")
    if dev is not None:
        dev = str(dev)
        if not DEVICE_PATTERN.match(dev):
            raise FormatError(f"{where}: device {dev!r} must match {DEVICE_PATTERN.pattern} (cpu, cuda[ORD], metal[ORD])")
    return LayerTopology(isq, dev)


def _parse_range(sel: str, where: str) -> tuple[int, int]:
    try:
        if "-" in sel:
            a, b = sel.split("-", 1)
            start, end = int(a), int(b)
        else:
            start = int(sel)
            end = start + 1
    except ValueError:
        raise FormatError(f"{where}: a selector is START-END, a layer number N, or /regex/") from None
    if start < 0:
        raise FormatError(f"{where}: layer numbers cannot be negative")
    if end <= start:
        raise FormatError(f"{where}: topology range end must be > start, got {end} <= {start}")
    return start, end
