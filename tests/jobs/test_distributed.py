"""What every rank shares: the process group a GPU run starts takes the host-side collectives the training loop
issues (NCCL takes CUDA tensors only), per-rank seeds, and the random state a checkpoint keeps.

No GPU here, so NCCL is played by a gloo group registered for CUDA tensors only: it refuses a CPU tensor with
NCCL's own error ("No backend type associated with device type cpu"), as the first test shows."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.training.distributed import (GPU_BACKEND, process_group_backend, reduce_over_ranks, rng_state,
                                       set_rng_state, worker_seed)


def _cuda_only_gloo(store, rank, size, timeout):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _rank(rank: int, store_path: str, backend: str, out) -> None:
    dist.Backend.register_backend("nccl_standin", _cuda_only_gloo, devices=["cuda"])
    dist.init_process_group(backend=backend, store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        result = {"mean": reduce_over_ranks([float(rank), 2.0 * rank], 2, "cpu"),
                  "max": reduce_over_ranks([float(rank)], 2, "cpu", op="max")}
        gathered = [None, None]
        dist.all_gather_object(gathered, ({"asr": {"epoch": rank}}, rng_state("cpu")))  # as report_checkpoint does
        result["gathered"] = [g[0] for g in gathered]
        out.put((rank, result))
    except RuntimeError as e:
        out.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(backend: str, tmp_path, target=_rank) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = str(tmp_path / f"store-{len(os.listdir(tmp_path))}")
    procs = [ctx.Process(target=target, args=(r, store, backend, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return results


def test_the_gpu_process_group_takes_the_host_side_collectives_that_nccl_alone_refuses(tmp_path):
    # NCCL alone (Ray Train's default for GPU workers): a CPU scalar's all-reduce fails, as it did at every log window
    refused = _run_two_ranks("nccl_standin", tmp_path)
    assert all("No backend type associated with device type cpu" in refused[r] for r in range(2)), refused
    # the training job's GPU backend: host tensors over gloo, CUDA tensors over NCCL
    assert process_group_backend(use_gpu=True) == GPU_BACKEND and process_group_backend(use_gpu=False) == "gloo"
    ok = _run_two_ranks(GPU_BACKEND.replace("nccl", "nccl_standin"), tmp_path)
    for r in range(2):
        assert ok[r]["mean"] == [0.5, 1.0] and ok[r]["max"] == [1.0], ok
        assert ok[r]["gathered"] == [{"asr": {"epoch": 0}}, {"asr": {"epoch": 1}}]


def test_each_rank_draws_its_own_dropout_and_every_run_the_same():
    seeds = [worker_seed(3, rank) for rank in range(4)]
    assert len(set(seeds)) == 4 and seeds == [worker_seed(3, rank) for rank in range(4)]
    assert worker_seed(4, 0) not in seeds

    def dropout_mask(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.nn.functional.dropout(torch.ones(256), p=0.5)

    assert not torch.equal(dropout_mask(seeds[0]), dropout_mask(seeds[1]))
    assert torch.equal(dropout_mask(seeds[1]), dropout_mask(worker_seed(3, 1)))


def test_random_state_round_trips_through_a_checkpoint():
    import json

    torch.manual_seed(5)
    saved = json.loads(json.dumps(rng_state("cpu")))  # as TrainState stores it
    want = torch.rand(4)
    torch.rand(100)
    set_rng_state(saved, "cpu")
    assert torch.equal(torch.rand(4), want) and saved["cuda"] is None


@pytest.mark.gpu
def test_the_gpu_random_state_round_trips_through_a_checkpoint():
    import json

    torch.manual_seed(5)
    saved = json.loads(json.dumps(rng_state("cuda:0")))
    want = torch.rand(4, device="cuda:0")
    torch.rand(100, device="cuda:0")
    set_rng_state(saved, "cuda:0")
    assert saved["cuda"] is not None and torch.equal(torch.rand(4, device="cuda:0"), want)


@pytest.mark.gpu
def test_the_gpu_backend_takes_host_and_device_tensors_on_a_gpu():
    """On a GPU machine, with the real NCCL: the training job's backend all-reduces a host scalar and a CUDA one."""
    dist.init_process_group(GPU_BACKEND, store=dist.HashStore(), rank=0, world_size=1)
    try:
        for device in ("cpu", "cuda:0"):
            t = torch.tensor([1.5], device=device)
            dist.all_reduce(t)
            assert t.item() == 1.5
    finally:
        dist.destroy_process_group()


def _ddp_rank(rank: int, store_path: str, synced: str, out) -> None:
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    from jobs.training.parallel import wrap_model

    # Ray Train's prepare_model without a Ray Train run around it: the DDP wrap it does on CPU
    ray.train.torch.prepare_model = lambda model, parallel_strategy_kwargs: DistributedDataParallel(
        model, **parallel_strategy_kwargs)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        model = torch.nn.Linear(4, 4)
        with torch.no_grad():
            model.weight.fill_(float(rank))  # rank 1's value marks whether DDP broadcast rank 0's over it
        wrapped = wrap_model(model, "ddp", 2, weights_synced=synced == "synced")
        out.put((rank, wrapped.module.weight[0, 0].item()))
    except Exception as e:  # noqa: BLE001
        out.put((rank, repr(e)))
    finally:
        dist.destroy_process_group()


def test_ddp_does_not_broadcast_the_model_again_when_the_ranks_already_hold_rank_0s_weights(tmp_path):
    # the training job's ranks get rank 0's weights from model_init's broadcast: DDP's own at wrap (init_sync) would
    # send the whole model a second time (~7.5 GB for the paper's). Here the ranks differ on purpose, so a broadcast
    # shows: rank 1 keeps its own weights when told they are synced, and gets rank 0's otherwise
    assert _run_two_ranks("synced", tmp_path, _ddp_rank) == {0: 0.0, 1: 1.0}
    assert _run_two_ranks("not synced", tmp_path, _ddp_rank) == {0: 0.0, 1: 0.0}


def test_workers_get_the_drivers_socket_interfaces():
    from jobs.training.ray_run import forwarded_worker_env

    driver = {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "ib0", "AWS_ACCESS_KEY_ID": "k", "HOME": "/root"}
    env = forwarded_worker_env(driver, "http://mlflow:5000")
    assert env["GLOO_SOCKET_IFNAME"] == "eth1" and env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["AWS_ACCESS_KEY_ID"] == "k"
    assert "HOME" not in env
