"""MkDocs hooks of jbptt's documentation site (``hooks:`` in mkdocs.yml).

* Files outside ``docs/`` join the site: the notebooks (rendered by
  mkdocs-jupyter, not executed) and the benchmark plots.
* ``<!-- jbptt:include PATH -->`` in a page is replaced by the repository
  file ``PATH`` (README.md, CHANGELOG.md, benchmarks/README.md), its relative
  links rewritten to the site's pages, so that each text has one source.
* ``<!-- jbptt:cli -->`` is replaced by the reference of the ``jbptt``
  command, generated from its argparse parser (``jbptt._cli.main.parser``),
  so that the page cannot drift from the code.
* Every public name (``__all__`` of ``jbptt``, ``jbptt.flax``,
  ``jbptt.sharding``, ``jbptt.checkpoint``, ``jbptt.diagnostics``) must have
  a docstring of its own and appear on an API page; otherwise a warning,
  which ``mkdocs build --strict`` turns into a failed build.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import pathlib
import posixpath
import re

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.jbptt_docs")

ROOT = pathlib.Path(__file__).resolve().parents[2]
PUBLIC_MODULES = ("jbptt", "jbptt.flax", "jbptt.sharding", "jbptt.checkpoint",
                  "jbptt.diagnostics")
# Repository files shown as a page of their own, by their page in docs/.
PAGES = {"README.md": "index.md", "CHANGELOG.md": "changelog.md",
         "benchmarks/README.md": "benchmarks.md"}
# Repository files copied into the site under their own paths.
EXTRA_FILES = ("notebooks/*.ipynb", "benchmarks/results-*/*.png")

_INCLUDE = re.compile(r"<!-- jbptt:include (\S+) -->")
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


@event_priority(100)  # before mkdocs-jupyter wraps the notebooks
def on_files(files, config):
  for pattern in EXTRA_FILES:
    for path in sorted(ROOT.glob(pattern)):
      uri = path.relative_to(ROOT).as_posix()
      files.append(File(uri, str(ROOT), config["site_dir"],
                        config["use_directory_urls"]))
  return files


def on_pre_build(config):
  check_docstrings(pathlib.Path(config["docs_dir"]))


def on_page_markdown(markdown, page, config, files):
  markdown = _INCLUDE.sub(lambda m: include(m.group(1), page, files), markdown)
  if "<!-- jbptt:cli -->" in markdown:
    markdown = markdown.replace("<!-- jbptt:cli -->", cli_reference())
  return markdown


# -- includes ---------------------------------------------------------------


def include(path: str, page, files) -> str:
  """The repository file ``path`` with its links pointing into the site."""
  source = ROOT / path
  if not source.is_file():
    log.warning("%s includes %s, which does not exist", page.file.src_uri, path)
    return ""
  here = posixpath.dirname(page.file.src_uri)

  def rewrite(m):
    target = m.group(2)
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
      return m.group(0)
    file_part, _, anchor = target.partition("#")
    repo = posixpath.normpath(posixpath.join(posixpath.dirname(path), file_part))
    uri = PAGES.get(repo) or (repo[len("docs/"):] if repo.startswith("docs/")
                              else repo)
    if files.get_file_from_path(uri) is None:
      log.warning("%s (included in %s) links to %s, which is not part of the "
                  "site", path, page.file.src_uri, target)
      return m.group(0)
    new = posixpath.relpath(uri, here or ".") + (f"#{anchor}" if anchor else "")
    return m.group(1) + new + m.group(3)

  return _LINK.sub(rewrite, source.read_text(encoding="utf-8"))


# -- the command line -------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser):
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      helps = {a.dest: a.help for a in action._choices_actions}
      for name, sub in action.choices.items():
        yield name, helps.get(name, ""), sub


def _option_row(action: argparse.Action) -> str:
  flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
  if action.choices:
    value = " \\| ".join(f"`{c}`" for c in action.choices)
  elif action.nargs == 0:
    value = "(a flag)"
  else:
    value = f"`{action.metavar or action.dest.upper()}`"
  needs = "yes" if action.required else ""
  text = (action.help or "").replace("|", "\\|")
  return f"| {flags} | {value} | {needs} | {text} |"


def cli_reference() -> str:
  """Markdown for every subcommand of ``jbptt``: usage, options, help."""
  from jbptt._cli.main import parser as make_parser

  os.environ["COLUMNS"] = "96"  # argparse wraps its help at the terminal width
  parser = make_parser()
  lines = [parser.description or "", ""]
  for name, help_text, sub in _subcommands(parser):
    lines += [f"## `jbptt {name}`", "", (help_text or "").capitalize() + ".", "",
              "```text", sub.format_usage().strip(), "```", "",
              "| option | value | required | what it is |", "|---|---|---|---|"]
    lines += [_option_row(a) for a in sub._actions
              if a.help != argparse.SUPPRESS
              and not isinstance(a, argparse._HelpAction)]
    groups = [g for g in sub._mutually_exclusive_groups]
    for g in groups:
      lines += ["", "Only one of " + ", ".join(
          f"`{a.option_strings[0]}`" for a in g._group_actions) + "."]
    lines += [""]
  return "\n".join(lines)


# -- docstrings of the public names -----------------------------------------


def _own_doc(obj) -> str:
  """``obj``'s docstring, not one Python made up (NamedTuple, dataclass)."""
  if inspect.isclass(obj):
    doc = obj.__dict__.get("__doc__") or ""
    if re.match(rf"{re.escape(obj.__name__)}\(", doc):  # generated signature
      return ""
    return doc.strip()
  return (getattr(obj, "__doc__", None) or "").strip()


def _rendered(docs_dir: pathlib.Path) -> set[str]:
  """The identifiers that the API pages render (``::: name`` lines)."""
  found = set()
  for page in (docs_dir / "api").glob("*.md"):
    found |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
  return found


def check_docstrings(docs_dir: pathlib.Path) -> None:
  rendered = _rendered(docs_dir)
  for module_name in PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    if not (module.__doc__ or "").strip():
      log.warning("module %s has no docstring", module_name)
    for name in module.__all__:
      path = f"{module_name}.{name}"
      obj = getattr(module, name)
      if not _own_doc(obj):
        log.warning("public name %s has no docstring", path)
      if path not in rendered and module_name not in rendered:
        log.warning("public name %s is on no API page (docs/api/*.md)", path)
      if inspect.isclass(obj):
        for attr, member in vars(obj).items():
          if attr.startswith("_") or not (inspect.isfunction(member)
                                          or isinstance(member, property)):
            continue
          if not _own_doc(member):
            log.warning("public method %s.%s has no docstring", path, attr)
