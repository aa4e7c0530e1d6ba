"""Declarative field mappings: YAML specs, the transform library and the engine that runs them."""

from __future__ import annotations

from integration.mappings.engine import MappingResult, map_chunk, map_chunks
from integration.mappings.spec import CompiledMapping, MappingSpec, load_mapping, load_mappings

__all__ = [
    "CompiledMapping",
    "MappingResult",
    "MappingSpec",
    "load_mapping",
    "load_mappings",
    "map_chunk",
    "map_chunks",
]
