"""jbptt: truncated backpropagation through time, TBPTT(k1, k2), in JAX."""

from jbptt._src.semantics import Update, schedule
from jbptt._src.trainer import Metrics, Trainer, TrainState, trainer
from jbptt._src.truncated_loss import truncated_loss
from jbptt._src.unroll import cell_loss, truncated_unroll, unroll

__version__ = "0.1.0"

__all__ = (
    "Metrics",
    "TrainState",
    "Trainer",
    "Update",
    "cell_loss",
    "schedule",
    "trainer",
    "truncated_loss",
    "truncated_unroll",
    "unroll",
)
