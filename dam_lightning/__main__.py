"""``python -m dam_lightning`` runs the command-line interface."""

from dam_lightning.cli import main

if __name__ == "__main__":
    main()
