"""Python client for Convoy: `from client import Convoy`."""

from client.sdk import Convoy, ConvoyError, parse_sse
from client.types import Checkpoint, Event, FeatureMapLayer, Job, MetricPoint

__all__ = ["Checkpoint", "Convoy", "ConvoyError", "Event", "FeatureMapLayer", "Job",
           "MetricPoint", "parse_sse"]
