"""How the engine tests start vLLM: in the test process, where a multi-process engine would add
only its start-up (a test that compares what the worker computes, or a rerun after a killed CLI
command)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def in_process_engines():
    """Engines started inside this block run in the test process: vLLM's in-process client and
    one-process executor (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) instead of an engine-core process
    and a worker process, each of which imports vLLM again (about half of an engine's start here).
    The plugin's worker code is the same; what it skips is the pickling of records between
    processes, which the multi-process engines of test_engine, test_tensor_parallel, test_serve and
    the fault tests keep covering (each killed command there is a real CLI process; only the rerun
of the killed bench and the self-check engine run here).

    An in-process engine changes its process: vLLM caches its environment variables and freezes
    the GC heap (EngineCore), binds torch threads and replaces ``torch.set_num_threads`` with a
    warning (CPUWorker), may bind CPUs, sets ``VLLM_DIST_IDENT`` and a one-rank process group. All of it is undone
    on leaving, so later (multi-process) engines and tests see the process as it was."""
    import gc

    import torch
    import vllm.envs as envs

    environ = dict(os.environ)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    affinity = os.sched_getaffinity(0)
    envs.disable_envs_cache()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        from vllm.distributed import parallel_state

        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()
        envs.disable_envs_cache()
        os.environ.clear()
        os.environ.update(environ)
        gc.unfreeze()
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, affinity)
