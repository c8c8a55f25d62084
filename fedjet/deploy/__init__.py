"""Deployment helpers: generate a NATS topology (hub cluster, a leaf node per cloud, NKEYs, TLS)."""

from fedjet.deploy.manifest import Topology, load_topology
from fedjet.deploy.topology import TopologyConfig, generate

__all__ = ["Topology", "TopologyConfig", "generate", "load_topology"]
