"""jbptt.Adaptive on delayed recall: k2 grows past the lag as it is learned."""

import dataclasses

import numpy as np

from jbptt._cli import config, experiment, tasks

LAG = 10


def test_adaptive_k2_grows_past_the_lag_as_recall_is_learned():
  task = tasks.delayed_recall(lag=LAG, vocab=4)
  settings = dataclasses.replace(config.TRAIN, task="recall", steps=3000,
                                 batch=16, hidden=32, lr=1e-2, seed=0)
  run = experiment.Config("adaptive", 4, "adaptive:0.1:2,4,8,16,32")
  result = experiment.run(task, run, settings)
  k2 = np.asarray(result.curve_k2)
  loss = np.asarray(result.curve_loss)
  assert len(k2) == 3000 // 4
  # Untrained, the per-lag norms decay fast: a k2 shorter than the lag.
  assert k2[0] < LAG
  assert loss[:20].mean() > 0.95 * np.log(4)  # at chance (4 symbols)
  # Trained, the loss is well below chance and k2 reaches past the lag.
  assert loss[-100:].mean() < 0.85 * np.log(4)
  assert result.final_accuracy > 0.4
  last = k2[-len(k2) // 4:]
  assert np.median(last) > LAG and np.all(last > LAG)
