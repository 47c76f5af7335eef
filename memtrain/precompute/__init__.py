"""Frozen-encoder memory precomputation.

With the encoder frozen, a memory model's memories are a pure function of the data: this package computes
them once and stores them as MDS *memory shards* next to the token shards, so decoders train at
decoder-only cost (``data.memories`` in a run config; docs/precompute.md).

``manifest``  what a memory-shard directory holds (``memtrain_memories.json``): encoder, tokenizer, chunk
              geometry, storage dtype, task memories, the token shards' index hashes; storage codecs
``job``       ``memtrain precompute``: units of work (one per token shard), parallel slices, resumable,
              merged into one streaming index per split
``cli``       the ``memtrain precompute`` subcommand

The reading side (memories aligned with token batches, checks against a run config) is
:mod:`memtrain.data.memories`.
"""
