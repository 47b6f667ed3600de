"""Class tables: the single source of truth for class names, id maps and palettes.

Every dataset, metric and figure reads its classes from here; nothing else defines a class list.
"""

DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
"""The ten digit classes shared by MNIST, USPS, SynDigits and UCIDigits; index == digit."""
