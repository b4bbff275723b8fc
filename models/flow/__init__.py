"""The flow family: BAGEL-style flow matching on one shared-weight backbone (`model`)."""
from reca.models.flow.model import FlowConfig, FlowModel, SiglipShape

__all__ = ["FlowConfig", "FlowModel", "SiglipShape"]
