"""LoRA files -> per-layer deltas applied to one concept's batch rows (never merged)."""

from .bind import LoraUse, bind_loras
from .network import Dense, LowRank, Network, load_network, parse_network

__all__ = ["Dense", "LoraUse", "LowRank", "Network", "bind_loras", "load_network", "parse_network"]
