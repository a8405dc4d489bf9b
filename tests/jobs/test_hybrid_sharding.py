"""Hybrid sharding (`train.fsdp_shard_size`): four gloo ranks as two "nodes" of two, each pair holding one sharded
copy of the model. Each parameter is sharded over its pair and replicated across pairs, and two optimizer steps on
four different batches give the weights one process gets from the mean loss of the same four batches. The sharded
checkpoint they write loads back into a freshly built model, hybrid-sharded or sharded over all four ranks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

WORLD, SHARD = 4, 2
STEPS = 2


def _model_and_batches():
    from models.config import tiny
    from models.conversation import AudioPart, Conversation, TextPart, Turn
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    model = build_speechlm(tiny(), tokenizer=build_tiny_tokenizer())
    model.eval()  # no dropout: the ranks and the reference compute the same function
    rng = np.random.default_rng(0)
    batches = []
    for b in range(WORLD):
        convs = [Conversation([Turn("user", [TextPart("Listen:"),
                                             AudioPart(rng.uniform(-.3, .3, 8000 + 4000 * (b + i)).astype(np.float32))]),
                               Turn.text("assistant", f"answer {b} {i}")]) for i in range(2)]
        batches.append(model.processor(convs))
    return model, batches


def _optimizer(model):
    # plain SGD: the update is the averaged gradient itself, so any averaging error shows in the weights
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)


def _rank(rank: int, store_path: str, out) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard

    from jobs.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from jobs.training.parallel import full_state_dict, wrap_model

    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD)
    try:
        model, batches = _model_and_batches()
        wrap_model(model, "fsdp", WORLD, shard_size=SHARD, device_type="cpu")
        placements = {tuple(p.placements) for p in model.parameters()}
        opt = _optimizer(model)
        for _ in range(STEPS):
            model(**batches[rank]).loss.backward()
            opt.step()
            opt.zero_grad()
        full = full_state_dict(model)
        ckpt = Path(store_path).parent / "ckpt"
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        save_checkpoint(ckpt, model, opt, TrainState(STEPS, "s", sched.state_dict()), rank == 0, sharded=True)
        dist.barrier()
        reloaded = {}
        for shard_size in (SHARD, None):
            torch.manual_seed(1)
            fresh, _ = _model_and_batches()
            with torch.no_grad():  # other weights than the checkpoint's, so loading it must change them
                for p in fresh.parameters():
                    if p.requires_grad:
                        p.normal_()
            wrap_model(fresh, "fsdp", WORLD, shard_size=shard_size, device_type="cpu")
            fresh_opt = _optimizer(fresh)
            load_checkpoint(ckpt, fresh, fresh_opt, torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda _: 1.0))
            again = full_state_dict(fresh)
            reloaded[shard_size] = rank != 0 or all(torch.equal(again[n], full[n]) for n in _trainable_names(model))
        # numpy, not tensors: torch's queue shares tensors through memory that goes with this process
        trained = {n: t.numpy() for n, t in full.items() if n in _trainable_names(model)} if rank == 0 else None
        out.put((rank, {"placements": placements == {(Replicate(), Shard(0))}, "weights": trained,
                        "reloaded": reloaded}))
    except Exception as e:  # reported to the test, which fails naming it
        out.put((rank, {"error": repr(e)}))
    finally:
        dist.destroy_process_group()


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.integration
def test_hybrid_sharding_trains_as_one_process_on_the_mean_loss(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "store"), out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                os.kill(p.pid, 9)
    assert not any("error" in r for r in results.values()), results
    assert all(r["placements"] for r in results.values()), "a parameter is not (replicated, sharded) over the mesh"
    assert results[0]["reloaded"] == {SHARD: True, None: True}, "the checkpoint did not load back"

    model, batches = _model_and_batches()
    opt = _optimizer(model)
    for _ in range(STEPS):
        torch.stack([model(**b).loss for b in batches]).mean().backward()
        opt.step()
        opt.zero_grad()
    want = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    got = results[0]["weights"]
    assert set(got) == set(want) and len(want) > 10
    moved = max(float((torch.from_numpy(got[n]) - p0).abs().max()) for n, p0 in _model_and_batches()[0].named_parameters()
                if p0.requires_grad)
    assert moved > 1e-3  # the steps changed the weights, so equality below says something
    for n, w in want.items():
        torch.testing.assert_close(torch.from_numpy(got[n]), w, atol=2e-5, rtol=1e-4, msg=n)
