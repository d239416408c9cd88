"""stepprobe: step-level hidden-state probes that prune failing reasoning traces in stock vLLM.

Layout: the core (this folder) holds what every stage shares: paths, configs, the CLI,
provenance, layer naming, step boundaries and the default model. Each pipeline stage
lives in its component subpackage:

- ``stepprobe.data_collection``: ``collect`` (traces) and ``record`` (hidden states, HDF5)
- ``stepprobe.probes``: probe architectures, feature specs, scorer checkpoints
- ``stepprobe.training``: ``train``, ``sweep``, ``tune``, ``export``
- ``stepprobe.inference``: ``run`` and ``bench`` (the vLLM pruning runner)

For notebooks: ``from stepprobe import api`` (:mod:`stepprobe.api`: load a scorer and score a
hidden-state file, build and run any stage from a config).
"""

__version__ = "0.1.0"
