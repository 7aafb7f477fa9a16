"""jbptt: truncated backpropagation through time, TBPTT(k1, k2), in JAX."""

from jbptt._src.semantics import Update
from jbptt._src.semantics import schedule
from jbptt._src.trainer import Metrics
from jbptt._src.trainer import Trainer
from jbptt._src.trainer import TrainState
from jbptt._src.trainer import trainer
from jbptt._src.truncated_loss import truncated_loss
from jbptt._src.unroll import truncated_unroll
from jbptt._src.unroll import unroll
from jbptt._src.unroll import cell_loss

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
