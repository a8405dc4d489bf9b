"""Training components shared by the job entrypoints (`jobs.train`, `jobs.pretrain_encoder`, `jobs.ablation`) and
`bench/`, as `torchtune.training` serves torchtune's recipes. They know nothing of the entrypoints. Every module:

- `plan`: the recipe resolved once, by the driver, into the run's plan (`RunPlan`, a `StagePlan` per stage: model
  config, ratios, batch sizes, lrs, step range, run folder; the fingerprint; the corpora's manifests);
- `preflight`: the pre-launch checks and what they show (model, data, model summary, memory plan, a run folder of
  another recipe, cluster and paths), the same for `jobs.train --check` and `run_training`;
- `memory_plan`: per worker, what one step holds and which GPU sizes fit, from the model's shapes;
- `ray_run`: the driver side (`run_training`: plan, checks, MLflow run, `TorchTrainer` per stage, gate, registry);
- `sft`: the worker side of joint SFT on Ray Train (`train_loop_per_worker`), reading only the plan;
- `model_init`: the stage's model on every rank, its weights read by rank 0 alone and broadcast;
- `parallel`: DDP, or FSDP's `fully_shard` per layer (hybrid sharding over groups of ranks);
- `distributed`: the process group's backend, reductions over ranks, per-rank seeds and random state;
- `loop`: `Trainer`, one optimizer step over gradient-accumulated micro-batches (autocast, clipping, schedule);
- `optim`: per-module AdamW parameter groups, gradient clipping, transformers' warm-up + decay schedules;
- `batches`: the SFT micro-batches, read and tokenized in a thread ahead of the step, with their stream states;
- `checkpoint`: what a checkpoint holds (`TrainState`), save / load / start-from-weights;
- `metrics`: `MetricsWindow` (throughput, padding, data wait, per-type loss);
- `flops`: model FLOPs of a step, counted, and MFU;
- `tokenizer`: the offline tokenizer trained on a corpus, and its transport to Ray workers;
- `promotion`: the promotion gate (content gap, text retention) and its verdict;
- `encoder_pretraining`: CTC pretraining of a config-built speech encoder.

MLflow is `tracking/`'s; what training and evaluation both use (console, the content check) is `jobs/common/`'s.
"""
