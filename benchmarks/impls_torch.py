"""The PyTorch and Keras peers (optional: ``pip install -e ".[bench]"``).

The same model as the JAX side (an LSTM of ``hidden`` units and a linear
read-out, squared error, Adam), on the same data, on CUDA when present; for
the language-model case, ``LM_IMPLS`` (at the end).
"""

from __future__ import annotations

import numpy as np

LR = 1e-3


def _torch():
  import torch

  torch.manual_seed(0)
  return torch, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(torch, device):
  if device.type == "cuda":
    torch.cuda.synchronize()


class _TorchBase:
  def __init__(self, case):
    torch, self.device = _torch()
    self.torch = torch
    self.case = case
    self.readout = torch.nn.Linear(case.hidden, 1).to(self.device)
    self.h = torch.zeros(case.batch, case.hidden, device=self.device)
    self.c = torch.zeros(case.batch, case.hidden, device=self.device)
    self.cache = {}

  def tensors(self, xs, ys):
    key = id(xs)
    if key not in self.cache:
      self.cache = {key: (self.torch.tensor(np.asarray(xs), device=self.device),
                          self.torch.tensor(np.asarray(ys), device=self.device))}
    return self.cache[key]


class TorchLSTMChunked(_TorchBase):
  """``nn.LSTM`` (fused kernel) over each chunk, ``detach`` between (k1 = k2)."""

  name = "PyTorch nn.LSTM chunked"

  def __init__(self, case):
    if case.k1 != case.k2:
      raise NotImplementedError("chunking gives only k1 = k2")
    super().__init__(case)
    torch = self.torch
    self.lstm = torch.nn.LSTM(case.dim, case.hidden).to(self.device)
    self.opt = torch.optim.Adam(
        list(self.lstm.parameters()) + list(self.readout.parameters()), lr=LR)

  def run(self, xs, ys):
    x, y = self.tensors(xs, ys)
    k = self.case.k1
    h, c = self.h[None], self.c[None]
    for t in range(0, x.shape[0], k):
      out, (h, c) = self.lstm(x[t:t + k], (h.detach(), c.detach()))
      loss = ((self.readout(out) - y[t:t + k]) ** 2).mean()
      self.opt.zero_grad()
      loss.backward()
      self.opt.step()
    self.h, self.c = h[0].detach(), c[0].detach()
    _sync(self.torch, self.device)


class TorchCellLoop(_TorchBase):
  """``nn.LSTMCell`` stepped in Python, ``detach`` every k1 steps (k1 = k2)."""

  name = "PyTorch LSTMCell loop"

  def __init__(self, case):
    if case.k1 != case.k2:
      raise NotImplementedError("detach every k steps gives only k1 = k2")
    super().__init__(case)
    torch = self.torch
    self.cell = torch.nn.LSTMCell(case.dim, case.hidden).to(self.device)
    self.opt = torch.optim.Adam(
        list(self.cell.parameters()) + list(self.readout.parameters()), lr=LR)

  def run(self, xs, ys):
    x, y = self.tensors(xs, ys)
    k = self.case.k1
    h, c = self.h, self.c
    for t0 in range(0, x.shape[0], k):
      h, c = h.detach(), c.detach()
      losses = []
      for t in range(t0, min(t0 + k, x.shape[0])):
        h, c = self.cell(x[t], (h, c))
        losses.append(((self.readout(h) - y[t]) ** 2).mean())
      loss = sum(losses) / len(losses)
      self.opt.zero_grad()
      loss.backward()
      self.opt.step()
    self.h, self.c = h.detach(), c.detach()
    _sync(self.torch, self.device)


class TorchForumRecipe(_TorchBase):
  """The well-known PyTorch forum TBPTT(k1, k2) recipe: one step at a time,
  every k1 steps a backward of the last output's loss, pushed back through
  the stored states one step per ``backward`` call, k2 steps deep.

  Two repairs make it run at all with an LSTM and k1 < k2: the stored steps
  use a snapshot of the weights (Adam's in-place step would invalidate the
  graphs the next windows still need), whose gradients are added to the
  weights; and the stored states' ``.grad`` are cleared before each window
  (otherwise overlapping windows accumulate each other's gradients).
  """

  name = "PyTorch forum recipe"

  def __init__(self, case):
    super().__init__(case)
    torch = self.torch
    self.cell = torch.nn.LSTMCell(case.dim, case.hidden).to(self.device)
    self.opt = torch.optim.Adam(
        list(self.cell.parameters()) + list(self.readout.parameters()), lr=LR)
    self.states = [(None, (self.h, self.c), None)]
    self.snapshot = self._snapshot()

  def _snapshot(self):
    return {k: v.detach().clone().requires_grad_()
            for k, v in self.cell.named_parameters()}

  def run(self, xs, ys):
    from torch.func import functional_call

    x, y = self.tensors(xs, ys)
    k1, k2 = self.case.k1, self.case.k2
    states = self.states
    for j in range(x.shape[0]):
      h, c = (s.detach().requires_grad_() for s in states[-1][1])
      new = functional_call(self.cell, self.snapshot, (x[j], (h, c)))
      states.append(((h, c), new, self.snapshot))
      while len(states) > k2:
        del states[0]
      if (j + 1) % k1 == 0:
        for inputs, _, _ in states:
          for leaf in inputs or ():
            leaf.grad = None
        loss = ((self.readout(new[0]) - y[j]) ** 2).mean()
        self.opt.zero_grad()
        loss.backward(retain_graph=True)
        for i in range(k2 - 1):
          if states[-i - 2][0] is None:
            break
          grads = [s.grad for s in states[-i - 1][0]]
          pairs = [(o, g) for o, g in zip(states[-i - 2][1], grads)
                   if g is not None]
          self.torch.autograd.backward([o for o, _ in pairs],
                                       [g for _, g in pairs], retain_graph=True)
        snaps = {id(snap): snap for _, _, snap in states if snap is not None}
        for name, param in self.cell.named_parameters():
          param.grad = sum(snap[name].grad for snap in snaps.values()
                           if snap[name].grad is not None)
        for snap in snaps.values():
          for v in snap.values():
            v.grad = None
        self.opt.step()
        self.snapshot = self._snapshot()
    self.states = [(None, tuple(s.detach() for s in states[-1][1]), None)]
    _sync(self.torch, self.device)


class KerasStateful:
  """Keras 3 stateful ``LSTM`` on the JAX backend, ``train_on_batch`` per
  chunk of k steps (k1 = k2)."""

  name = "Keras 3 stateful LSTM (JAX)"

  def __init__(self, case):
    if case.k1 != case.k2:
      raise NotImplementedError("stateful chunking gives only k1 = k2")
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
      raise NotImplementedError("Keras is not on the JAX backend here")
    self.k = case.k1
    inputs = keras.Input(batch_shape=(case.batch, case.k1, case.dim))
    h = keras.layers.LSTM(case.hidden, return_sequences=True, stateful=True)(inputs)
    self.model = keras.Model(inputs, keras.layers.Dense(1)(h))
    self.model.compile(optimizer=keras.optimizers.Adam(LR), loss="mse")

  def run(self, xs, ys):
    x = np.swapaxes(np.asarray(xs), 0, 1)  # Keras is batch-major
    y = np.swapaxes(np.asarray(ys), 0, 1)
    for t in range(0, x.shape[1], self.k):
      loss = self.model.train_on_batch(x[:, t:t + self.k], y[:, t:t + self.k])
    float(loss)


IMPLS = [TorchLSTMChunked, TorchCellLoop, TorchForumRecipe, KerasStateful]


class TorchWordLM:
  """PyTorch's word_language_model recipe (pytorch/examples,
  ``word_language_model/main.py`` and ``model.py``), on the language-model
  case: ``nn.Embedding``, ``nn.LSTM`` over the whole chunk of k steps, the
  hidden state ``detach``ed between chunks (``repackage_hidden``), an
  ``nn.Linear`` decoder over the chunk's outputs, ``nn.CrossEntropyLoss`` and
  an optimizer step per chunk (k1 = k2).

  To match the JAX side: Adam (the recipe has SGD at lr 20), no gradient
  clipping (the recipe clips at 0.25), no dropout, one LSTM layer.
  """

  name = "PyTorch word_language_model"

  def __init__(self, case):
    if not case.vocab:
      raise NotImplementedError("the language-model case only")
    if case.k1 != case.k2:
      raise NotImplementedError("chunking gives only k1 = k2")
    torch, self.device = _torch()
    self.torch, self.case = torch, case
    nn = torch.nn
    self.encoder = nn.Embedding(case.vocab, case.dim).to(self.device)
    self.rnn = nn.LSTM(case.dim, case.hidden).to(self.device)
    self.decoder = nn.Linear(case.hidden, case.vocab).to(self.device)
    self.modules = (self.encoder, self.rnn, self.decoder)
    self.criterion = nn.CrossEntropyLoss()
    self.opt = torch.optim.Adam(
        [p for m in self.modules for p in m.parameters()], lr=LR)
    zeros = lambda: torch.zeros(1, case.batch, case.hidden, device=self.device)
    self.hidden = (zeros(), zeros())
    self.cache = {}

  def tensors(self, xs, ys):
    key = id(xs)
    if key not in self.cache:
      as_long = lambda a: self.torch.tensor(np.asarray(a), dtype=self.torch.long,
                                            device=self.device)
      self.cache = {key: (as_long(xs), as_long(ys))}
    return self.cache[key]

  def run(self, xs, ys):
    data, targets = self.tensors(xs, ys)
    k, vocab = self.case.k1, self.case.vocab
    hidden = self.hidden
    for i in range(0, data.shape[0], k):
      hidden = tuple(h.detach() for h in hidden)  # repackage_hidden
      self.opt.zero_grad()
      output, hidden = self.rnn(self.encoder(data[i:i + k]), hidden)
      decoded = self.decoder(output)
      loss = self.criterion(decoded.view(-1, vocab), targets[i:i + k].reshape(-1))
      loss.backward()
      self.opt.step()
    self.hidden = tuple(h.detach() for h in hidden)
    _sync(self.torch, self.device)


LM_IMPLS = [TorchWordLM]
