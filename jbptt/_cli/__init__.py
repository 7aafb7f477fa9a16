"""The ``jbptt`` command-line program and the demo code it runs (not public API).

* :mod:`jbptt._cli.main`: the command, ``compare``, ``train`` and ``schedule``.
* :mod:`jbptt._cli.config`: :class:`RunConfig`, a run's settings and the
  command's defaults.
* :mod:`jbptt._cli.experiment`: training runs on the built-in tasks.
* :mod:`jbptt._cli.tasks`: the built-in tasks and user data files.
"""

__all__ = ()
