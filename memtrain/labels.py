"""The label value of positions that no loss and no metric counts (pads, delimiters, a chunk's context)."""

IGNORE_INDEX = -100
