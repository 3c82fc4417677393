"""clusterrep: continuous, clock-independent replication of a cluster shared volume."""

__version__ = "0.1.0"
