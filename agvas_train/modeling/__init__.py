"""AG-VAS model components (one module per component, builders in ``build.py``)."""

from .agvas import AGVAS, TokenIds, anchor_state_positions, gather_anchor_states
from .build import build_model, count_parameters, image_processor_for

__all__ = ["AGVAS", "TokenIds", "anchor_state_positions", "gather_anchor_states", "build_model",
           "count_parameters", "image_processor_for"]
