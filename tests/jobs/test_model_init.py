"""Rank 0 reads the weights, the other ranks receive them (`jobs.training.model_init`), on two gloo ranks on CPU:
the model each rank ends with is the model every rank built before (same seed: the same adapter, LoRA and random
init; the pretrained LM's weights exactly), sharded (FSDP) or whole (DDP), and rank 1 never reads a weight file:
its `lm.pretrained` folder holds the LM's config alone, and the previous stage's checkpoint is not given to it."""

from __future__ import annotations

import io
import os
from datetime import timedelta
import shutil

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.training.checkpoint import STATE, TrainState, load_initial_weights, save_checkpoint
from models.config import tiny
from models.speechlm import build_speechlm

SEED = 3


def _configs(tmp_path, tokenizer) -> dict:
    """(name, [rank 0's config, rank 1's], strategy, rank 0's init folder or None) of each case."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tiny("lora")
    kw = dict(base.lm.config, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))
    lm.to(torch.bfloat16).save_pretrained(tmp_path / "lm")  # as Gemma's are: the model is built in fp32 from it
    (tmp_path / "lm-config-only").mkdir()
    shutil.copy(tmp_path / "lm" / "config.json", tmp_path / "lm-config-only" / "config.json")

    def pretrained(folder):
        cfg = tiny("lora")
        cfg.lm.pretrained, cfg.lm.config = str(folder), {}
        return cfg

    by_rank = [pretrained(tmp_path / "lm"), pretrained(tmp_path / "lm-config-only")]
    random_init = [tiny("full"), tiny("full")]
    # a previous stage's checkpoint (whole layout): the LM trained fully, its weights moved off the pretrained ones
    torch.manual_seed(1)
    previous = build_speechlm(pretrained(tmp_path / "lm").model_copy(update={"lm": tiny("full").lm}),
                              tokenizer=tokenizer)
    with torch.no_grad():
        for p in previous.parameters():
            p.add_(0.25)
    opt = torch.optim.AdamW(previous.parameters())
    save_checkpoint(tmp_path / "previous", previous, opt,
                    TrainState(1, "s1", torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).state_dict(), [{}], [[0]]),
                    is_rank0=True)
    return [("fsdp, pretrained LM, LoRA", by_rank, "fsdp", None), ("ddp, pretrained LM, LoRA", by_rank, "ddp", None),
            ("fsdp, random-init LM trained fully", random_init, "fsdp", None),
            ("fsdp, pretrained LM, LoRA, from the previous stage", by_rank, "fsdp", tmp_path / "previous")]


def _rank(rank: int, store: str, cases, tokenizer, out) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from jobs.training.model_init import build_on_ranks

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a crashed rank fails the other soon
    try:
        for name, cfgs, strategy, init_dir in cases:
            core, measured = build_on_ranks(cfgs[rank], tokenizer, SEED, rank, 2, torch.device("cpu"),
                                            sharded=strategy == "fsdp", init_dir=init_dir if rank == 0 else None,
                                            measure=lambda m: sum(p.numel() for p in m.parameters()))
            if strategy == "fsdp":
                state = get_model_state_dict(core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                shards = {n: p.to_local().numel() for n, p in core.named_parameters()}
            else:
                state, shards = core.state_dict(), {n: p.numel() for n, p in core.named_parameters()}
            tied = core.lm.get_input_embeddings().weight is core.lm.get_output_embeddings().weight
            buf = io.BytesIO()  # bytes, not tensors: the queue would pass those in shared memory that dies with us
            torch.save({"state": {k: v.clone() for k, v in state.items()},
                        "buffers": {k: b.clone() for k, b in core.named_buffers()}}, buf)
            out.put((rank, name, buf.getvalue(), sum(shards.values()), measured, tied))
    finally:
        dist.destroy_process_group()


def test_rank0_reads_the_weights_and_every_rank_ends_with_todays_model(tmp_path, tokenizer):
    cases = _configs(tmp_path, tokenizer)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "store"), cases, tokenizer, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2 * len(cases)):
        rank, name, state, local, measured, tied = out.get(timeout=120)
        results[(rank, name)] = torch.load(io.BytesIO(state)), local, measured, tied
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)

    for name, cfgs, strategy, init_dir in cases:
        torch.manual_seed(SEED)
        today = build_speechlm(cfgs[0], tokenizer=tokenizer)  # what every rank built before, reading every file
        if init_dir is not None:
            assert load_initial_weights(today, init_dir)
        want = today.state_dict()
        total = sum(p.numel() for p in today.parameters())
        ranks = [0] if strategy == "fsdp" else [0, 1]  # a sharded model's full state is gathered on rank 0
        for rank in ranks:
            state = results[(rank, name)][0]["state"]
            assert set(state) == set(want), (name, rank, set(state) ^ set(want))
            for k, v in want.items():
                torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=f"{name}, rank {rank}: {k}")
        for rank in range(2):  # the buffers no state dict holds (rotary frequencies, ...): computed on every rank
            buffers = results[(rank, name)][0]["buffers"]
            assert set(buffers) == {k for k, _ in today.named_buffers()}
            assert all(torch.equal(buffers[k], b) for k, b in today.named_buffers()), (name, rank)
        for rank in range(2):
            _, local, measured, tied = results[(rank, name)]
            assert measured == total and tied, (name, rank)  # rank 0's measurement reached both; ties kept
            # FSDP: each rank holds about half the weights (the shards, padded); DDP: the whole model
            assert (local < 0.6 * total) if strategy == "fsdp" else local == total, (name, rank, local, total)
    assert not os.path.exists(tmp_path / "lm-config-only" / "model.safetensors")


def _resume_rank(rank: int, store: str, folders, tokenizer, out) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from jobs.training.checkpoint import load_checkpoint

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(SEED + rank)  # different weights on each rank: the checkpoint's must replace both
        core = build_speechlm(tiny("lora"), tokenizer=tokenizer)
        model = DistributedDataParallel(core, find_unused_parameters=True)
        opt = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        state = load_checkpoint(folders[rank], model, opt, sched)
        buf = io.BytesIO()
        torch.save({"weights": {n: p.detach().clone() for n, p in core.named_parameters() if p.requires_grad},
                    "optimizer": opt.state_dict()["state"], "step": state.step}, buf)
        out.put((rank, buf.getvalue()))
    finally:
        dist.destroy_process_group()


def test_a_ddp_resume_is_read_by_rank0_alone_and_received_by_the_others(tmp_path, tokenizer):
    torch.manual_seed(0)
    saved = build_speechlm(tiny("lora"), tokenizer=tokenizer)
    opt = torch.optim.AdamW([p for p in saved.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sum(p.pow(2).sum() for p in saved.parameters() if p.requires_grad).backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt", saved, opt, TrainState(7, "main", sched.state_dict(), [{}, {}], [[0], [0]]),
                    is_rank0=True)
    (tmp_path / "train-state-only").mkdir()  # rank 1's copy: the train state alone, no weights to read
    shutil.copy(tmp_path / "ckpt" / STATE, tmp_path / "train-state-only" / STATE)

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    folders = [tmp_path / "ckpt", tmp_path / "train-state-only"]
    procs = [ctx.Process(target=_resume_rank, args=(r, str(tmp_path / "store"), folders, tokenizer, out))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    want_opt = opt.state_dict()["state"]
    for rank in range(2):
        got = torch.load(io.BytesIO(results[rank]))
        assert got["step"] == 7
        for n, p in saved.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(got["weights"][n], p.detach(), rtol=0, atol=0, msg=f"rank {rank}: {n}")
        assert got["optimizer"].keys() == want_opt.keys()
        for k in want_opt:
            for field in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(got["optimizer"][k][field], want_opt[k][field]), (rank, k, field)


def test_one_process_without_a_process_group_builds_the_same_model(tokenizer, tmp_path):
    from jobs.training.model_init import build_on_ranks

    assert not dist.is_initialized()
    cfg = tiny("lora")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    cfg.lm.tokenizer = str(tmp_path / "tokenizer")  # no tokenizer given: the LM's, as `build_speechlm` takes it
    core, _ = build_on_ranks(cfg, None, SEED, 0, 1, torch.device("cpu"), sharded=False)
    torch.manual_seed(SEED)
    today = build_speechlm(cfg)
    want, got = today.state_dict(), core.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())
    # the buffers no state dict holds (rotary frequencies, the mel filterbank) are computed as before, and the
    # model answers as before
    want, got = dict(today.named_buffers()), dict(core.named_buffers())
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())
    from jobs.training.sft import probe_conversation

    batch = core.processor([probe_conversation()])
    batch.pop("labels")
    today.eval(), core.eval()
    with torch.no_grad():
        assert torch.equal(core(**batch).logits, today(**batch).logits)


def test_rank0s_model_leaves_a_bf16_lm_unwritten_in_the_models_dtype(tmp_path, tokenizer):
    """Rank 0's model with values (`read_lm_weights=False`) holds a bf16 checkpoint's LM in fp32 from the start:
    a cast to fp32 after the build would write (and so take memory for) every weight before any is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(tiny("lora").lm.config, vocab_size=len(tokenizer))
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))
    lm.to(torch.bfloat16).save_pretrained(tmp_path / "lm")
    cfg = tiny("lora")
    cfg.lm.pretrained, cfg.lm.config = str(tmp_path / "lm"), {}
    built = build_speechlm(cfg, tokenizer=tokenizer, read_lm_weights=False).lm.get_base_model()
    assert {p.dtype for p in built.parameters()} == {torch.float32}
