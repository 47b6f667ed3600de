"""``python -m dam_lightning`` and the ``dam-lightning`` script: the command-line interface
(``dam_lightning.cli``). The top-level ``--help`` is answered before Lightning and torch are
imported (seconds of imports for a page of text); nothing here may import them at module level.
"""

from __future__ import annotations

import sys

from dam_lightning.overview import top_level_help, wants_top_level_help


def main() -> None:
    """Print the top-level help at once, or run the command (``dam_lightning.cli.main``)."""
    if wants_top_level_help(sys.argv[1:]):
        print(top_level_help())
        return
    from dam_lightning.cli import main as run_command

    run_command()


if __name__ == "__main__":
    main()
