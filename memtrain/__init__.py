"""memtrain: train, measure and scale memory models for language."""

__version__ = "0.1.0"
