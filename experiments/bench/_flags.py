"""absl flags for the bench scripts, defined when a script runs and not when it is imported.

``profile_step`` imports ``engine_step`` and both have ``--out``, ``--models``, ...: flags
defined at import would collide in absl's one global registry. Each script therefore puts
its ``flags.DEFINE_*`` calls in a ``define_flags()`` and ends with::

  if __name__ == "__main__":
    _flags.run(define_flags, main)

``main(args)`` gets the script's flags as attributes, a dash in a flag's name read as an
underscore (``--block-size`` is ``args.block_size``), as argparse gave them before.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from absl import app, flags


def run(
  define_flags: Callable[[], None],
  main: Callable[[types.SimpleNamespace], int | None],
  positional: bool = False,
):
  """Defines the script's flags, parses the command line and exits with ``main(args)``.

  Arguments that are not flags are refused, unless ``positional``: then they are
  ``args.positional`` (a list) for ``main`` to check.
  """
  before = set(flags.FLAGS)
  define_flags()
  names = sorted(set(flags.FLAGS) - before)

  def _main(argv):
    if len(argv) > 1 and not positional:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    values = {name.replace("-", "_"): flags.FLAGS[name].value for name in names}
    if positional:
      values["positional"] = list(argv[1:])
    return main(types.SimpleNamespace(**values))

  app.run(_main)
