"""``python -m jbptt`` runs end to end, as a new user starts it."""

import subprocess
import sys


def test_demo_runs_and_prints_the_table():
  out = subprocess.run(
      [sys.executable, "-m", "jbptt", "--steps", "40", "--lag", "3"],
      capture_output=True, text=True, timeout=300, check=False,
  )
  assert out.returncode == 0, out.stderr
  for config in ("(8, 1)", "(8, 8)", "(4, 16)"):
    assert config in out.stdout
  assert "accuracy" in out.stdout


def test_demo_rejects_bad_arguments():
  out = subprocess.run(
      [sys.executable, "-m", "jbptt", "--steps", "0"],
      capture_output=True, text=True, timeout=120, check=False,
  )
  assert out.returncode == 2
  assert "--steps and --lag must be >= 1" in out.stderr
  assert "Traceback" not in out.stderr
