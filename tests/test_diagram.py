"""``schedule_diagram``: the picture of ``schedule`` and its argument checks."""

import pytest

from jbptt._src import semantics
from jbptt._src.diagram import schedule_diagram


def _rows(text):
  return [line for line in text.splitlines() if line.startswith("t=")]


def test_k1_greater_than_k2():
  (row,) = _rows(schedule_diagram(6, 6, 2))
  # losses 1..4 see one step each, 5..6 go back to the state after step 4
  assert row.endswith("|oooooo")


@pytest.mark.parametrize("n,k1,k2", [(10, 4, 6), (7, 3, 3), (9, 2, 5), (5, 8, 2)])
@pytest.mark.parametrize("losses", ["new", "window", "last"])
def test_rows_draw_the_schedule(n, k1, k2, losses):
  updates = semantics.schedule(n, k1, k2, losses)
  text = schedule_diagram(n, k1, k2, losses)
  assert text.splitlines()[0] == (
      f"TBPTT(k1={k1}, k2={k2}), losses {losses!r}, n={n}: "
      f"{len(updates)} update{'s' * (len(updates) != 1)}")
  rows = _rows(text)
  assert len(rows) == len(updates)
  for row, u in zip(rows, updates):
    cells = row[-(n + 1):]
    assert row.startswith(f"t={u.t:>{len(str(n))}}")
    assert {j for j, c in enumerate(cells) if c == "o"} == {
        tau for tau, _ in u.injected}
    reached = {j for tau, s in u.injected for j in range(s + 1, tau + 1)}
    assert {j for j, c in enumerate(cells) if c in "o-"} == reached
    cuts = {s for _, s in u.injected} - reached
    assert {j for j, c in enumerate(cells) if c == "|"} == cuts


@pytest.mark.parametrize("args,message", [
    ((0, 2, 2), "n must be a positive int, got n=0"),
    ((4, 2.0, 2), "k1 must be a positive int, got k1=2.0"),
    ((4, 2, -1), "k2 must be a positive int, got k2=-1"),
    ((4, 2, True), "k2 must be a positive int, got k2=True"),
    ((4, 2, 2, "all"), "losses must be one of ('new', 'window', 'last'), "
     "got losses='all'"),
])
def test_bad_arguments(args, message):
  with pytest.raises(ValueError) as e:
    schedule_diagram(*args)
  assert message in str(e.value)
