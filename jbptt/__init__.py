"""jbptt: truncated backpropagation through time, TBPTT(k1, k2), in JAX."""

from jbptt._src.diagram import schedule_diagram
from jbptt._src.gradient import Recompute, StoredStates
from jbptt._src.packing import PackedState, pack_state
from jbptt._src.semantics import Update, schedule
from jbptt._src.steps import CellLoss, WeightedLoss, cell_loss
from jbptt._src.trainer import Metrics, Trainer, TrainState, capacity, trainer
from jbptt._src.truncated_loss import truncated_loss
from jbptt._src.truncation import Adaptive, AdaptiveState, Randomized
from jbptt._src.unroll import truncated_unroll

__version__ = "1.0.0"

__all__ = (
    "Adaptive",
    "AdaptiveState",
    "CellLoss",
    "Metrics",
    "PackedState",
    "Randomized",
    "Recompute",
    "StoredStates",
    "TrainState",
    "Trainer",
    "Update",
    "WeightedLoss",
    "capacity",
    "cell_loss",
    "pack_state",
    "schedule",
    "schedule_diagram",
    "trainer",
    "truncated_loss",
    "truncated_unroll",
)
