"""Measuring the machine at hand: op calibration tables, the local-device probe, the local cluster.

- ``calibration``: the torch-free table format (op key → measured seconds), tagged with its device;
- ``profiler``: times a captured graph's ops on the local device and writes a table;
- ``op_call``: rebuilds one captured op as a runnable call with random inputs;
- ``probe``: describes the local device as a ``GPUSpec`` in a second;
- ``local_cluster``: measures this machine as a cluster of N gloo ranks (compute per rank with N
  processes at once, collective and point-to-point alpha-beta fits) and writes a cluster YAML.

Importing this package does not import torch; the modules that need it load it themselves.
"""
