"""Training components shared by the job entrypoints (`jobs.train`, `jobs.pretrain_encoder`, `jobs.ablation`) and
`bench/`, as `torchtune.training` serves torchtune's recipes. They know nothing of the entrypoints.

- `loop`: `Trainer`, one optimizer step over gradient-accumulated micro-batches (autocast, clipping, schedule);
- `optim`: per-module AdamW parameter groups, gradient clipping, transformers' warm-up + decay schedules;
- `batches`: the SFT micro-batches, read and tokenized in a thread ahead of the step, with their stream states;
- `checkpoint`: what a checkpoint holds (`TrainState`), save / load / start-from-weights;
- `metrics`: `MetricsWindow` (throughput, padding, data wait, per-type loss), logged by `tracking.logs.MlflowRunLogger`;
- `tokenizer`: the offline tokenizer trained on a corpus, and its transport to Ray workers;
- `sft`: the worker side of joint SFT on Ray Train (`train_loop_per_worker`);
- `ray_run`: the driver side (`run_training`: data check, MLflow run, `TorchTrainer` per stage, registration).

What evaluation uses too (the console settings, the content check) is in `jobs.common`; MLflow is `tracking`'s.
"""
