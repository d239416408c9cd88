"""The tests' shared builders, one module per thing built (tests import them as
``from helpers.synthetic_h5 import make_synthetic``: pytest puts ``tests/`` on the path, since
its root conftest.py sits in a folder without ``__init__.py``, whatever the working directory,
so the mutation harness's copies find them too).

- :mod:`helpers.synthetic_h5`: synthetic hidden-state files (training and refusal tests);
- :mod:`helpers.traces_file`: traces files for the recorder and the refusal tests;
- :mod:`helpers.scheduler_harness`: the pruning scheduler on vLLM's real classes, no engine;
- :mod:`helpers.engine_modes`: engines started inside the test process;
- :mod:`helpers.parity`: the live-equals-recorder check of the engine tests.
"""
