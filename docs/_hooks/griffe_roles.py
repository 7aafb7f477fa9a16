"""A griffe extension: Sphinx roles in docstrings as mkdocstrings cross-references.

jbptt's docstrings are written to read well in ``help()``: ``:func:`name```,
``:class:`name``` and friends name other objects. This turns each into an
autorefs link, ``[`name`][full.path]``, resolving a relative name in the
docstring's own module (and class); a name that resolves to nothing stays as
written, so that autorefs reports it and ``mkdocs build --strict`` fails.
A private name (``jbptt._src.adjoint``) that exists but is not on a page
(not in the ``linked_private`` option) becomes plain code: a public docstring
may point a reader of the source to the implementation.
RST links ```text <url>`_`` become Markdown links.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`(~?)([\w.]+)`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>]+)>`_")


def _resolve(obj: griffe.Object, target: str) -> str:
  if target.split(".")[0] == obj.package.name:
    return target
  head = target.split(".")[0]
  scope = obj
  while scope is not None:
    members = getattr(scope, "members", {})
    if head in members:
      return f"{scope.path}.{target}"
    scope = scope.parent
  return target


def _exists(pkg: griffe.Module, path: str) -> bool:
  try:
    pkg[path.split(".", 1)[1]]
  except (KeyError, IndexError, ValueError, griffe.AliasResolutionError):
    return False
  return True


def _private(path: str) -> bool:
  return any(part.startswith("_") for part in path.split(".")[1:])


def _convert(obj: griffe.Object, linked_private) -> None:
  doc = obj.docstring
  if doc is None:
    return

  def role(m):
    short, target = m.group(1), m.group(2)
    text = target.rsplit(".", 1)[-1] if short else target
    full = _resolve(obj, target)
    if (_private(full) and full not in linked_private
        and _exists(obj.package, full)):
      return f"`{text}`"
    return f"[`{text}`][{full}]"

  doc.value = _RST_LINK.sub(r"[\1](\2)", _ROLE.sub(role, doc.value))


class SphinxRoles(griffe.Extension):
  """Converts the roles of every docstring of the loaded package."""

  def __init__(self, linked_private: list[str] | None = None) -> None:
    super().__init__()
    self.linked_private = set(linked_private or ())

  def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
    seen = set()

    def walk(obj):
      if obj.is_alias or id(obj) in seen:
        return
      seen.add(id(obj))
      _convert(obj, self.linked_private)
      for member in obj.members.values():
        walk(member)

    walk(pkg)
