"""Measurements: held-out evaluation, retention probes, capacity curves, reports and the reproduction.

``evaluate``  metrics of any model on its objectives (per chunk, with normal / zeroed / shuffled memories)
``report``    loading checkpoints, metric tables, report files
``probe``     the information-retention probe (``memtrain probe``)
``capacity``  tokens per memory vector against chunk length (``memtrain capacity``)
``repro``     the paper's measurements in miniature (``memtrain repro``)
``data``      re-packed shards, the random-token control, the information-less baselines
``plots``     small PNG plots
``cli``       the ``probe``, ``capacity`` and ``repro`` subcommands
"""
