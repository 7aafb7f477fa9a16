"""``schedule_diagram``: a text picture of the TBPTT(k1, k2) schedule."""

from __future__ import annotations

from jbptt._src import semantics

__all__ = ("schedule_diagram",)


def schedule_diagram(n: int, k1: int, k2: int, losses: str = "new") -> str:
  """A text picture of TBPTT(k1, k2) on ``n`` steps, one line per update.

  The rows draw :func:`jbptt.schedule`. In each row, the columns of steps
  ``1..n`` read: ``o`` a loss injected by this update, ``-`` a step its
  gradient passes through without a loss, ``|`` the state it is truncated at
  (held constant), ``.`` a step it does not touch. Column 0 is the initial
  state ``h_0``.

  Args:
    n: the sequence length (positive int).
    k1: steps between updates (positive int).
    k2: how many steps each update backpropagates through (positive int).
    losses: ``"new"``, ``"window"`` or ``"last"``: which losses an update
      injects (see :func:`jbptt.schedule`).

  Returns:
    The picture: a title line, a legend, the step numbers (mod 10), one row
    per update and a closing line stating the truncation rule.

  Raises:
    ValueError: ``n``, ``k1`` or ``k2`` is not a positive int, or ``losses``
      is not one of the three.

  Examples:
    >>> print(schedule_diagram(6, 3, 4))  # doctest: +NORMALIZE_WHITESPACE
    TBPTT(k1=3, k2=4), losses 'new', n=6: 2 updates
      o loss injected   - backpropagated through   | held constant
      (truncation point)   . untouched
             123456
    t=3   |ooo...
    t=6   ..|-ooo
    column 0 is the initial state; each loss at tau is backpropagated to the
    state after step s = max(0, min(t - k2, tau - 1))
  """
  n = semantics.check_positive_int("n", n)
  k1 = semantics.check_positive_int("k1", k1)
  k2 = semantics.check_positive_int("k2", k2)
  losses = semantics.check_losses(losses)
  updates = semantics.schedule(n, k1, k2, losses)
  width = len(str(n))
  lines = [
      f"TBPTT(k1={k1}, k2={k2}), losses {losses!r}, n={n}: "
      f"{len(updates)} update{'s' * (len(updates) != 1)}",
      "  o loss injected   - backpropagated through   | held constant "
      "(truncation point)   . untouched",
  ]
  prefix = lambda t: f"t={t:>{width}}   "
  digits = "".join(str(j % 10) for j in range(1, n + 1))
  lines.append(" " * (len(prefix(0)) + 1) + digits)
  for u in updates:
    row = ["."] * (n + 1)  # index 0 is the initial state h_0
    for tau, s in u.injected:
      for j in range(s + 1, tau + 1):
        if row[j] != "o":
          row[j] = "-"
    for tau, _ in u.injected:
      row[tau] = "o"
    for s in {s for _, s in u.injected}:
      if row[s] == ".":
        row[s] = "|"
    lines.append(prefix(u.t) + "".join(row))
  lines.append(
      "column 0 is the initial state; each loss at tau is backpropagated to "
      "the state after step s = max(0, min(t - k2, tau - 1))"
      if losses == "new" else
      "column 0 is the initial state; every loss is backpropagated to the "
      "state after step max(0, t - k2)")
  return "\n".join(lines)
