"""Every ```python block of README.md and the guides runs.

The blocks of one page run in order, in one namespace, as a reader would
run them (a later block may use what an earlier one defined). Pages whose
code is tested elsewhere are left out: docs/guides/flax.md
(tests/test_flax.py), docs/guides/your-data.md (bash only) and
docs/guides/many-hosts.md (several processes, tests/test_multiprocess.py).
"""

import contextlib
import io
import os
import pathlib
import re

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/guides/streams.md", "docs/guides/padded.md",
         "docs/guides/checkpoint.md", "docs/guides/choosing-k.md",
         "docs/guides/memory.md", "docs/guides/sharding.md",
         "docs/guides/speed.md", "docs/guides/truncation.md")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def blocks(page: str) -> list[str]:
  return _BLOCK.findall((ROOT / page).read_text(encoding="utf-8"))


def test_the_pages_have_examples():
  assert all(blocks(page) for page in PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(tmp_path)  # examples that write files write them here
  namespace = {"__name__": f"docs_example_{pathlib.Path(page).stem}"}
  for i, code in enumerate(blocks(page)):
    source = compile(code, f"{page} (python block {i + 1})", "exec")
    with contextlib.redirect_stdout(io.StringIO()):
      exec(source, namespace)  # noqa: S102 -- the page's own example code
  assert os.getcwd() == str(tmp_path)
