"""Deterministic cluster simulator that drives the real merger and applier."""

from .cluster import Cluster
from .runner import RunReport, SimFailure, run
from .workload import SimConfig, generate

__all__ = ["Cluster", "RunReport", "SimConfig", "SimFailure", "generate", "run"]
