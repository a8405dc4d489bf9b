"""Training components shared by the job entrypoints (`jobs.train`, `jobs.pretrain_encoder`, `jobs.ablation`) and
`bench/`, as `torchtune.training` serves torchtune's recipes. They know nothing of entrypoints or of the recipe
YAML beyond the typed values they are given.

- `loop`: `Trainer`, one optimizer step over gradient-accumulated micro-batches (autocast, clipping, schedule);
- `optim`: per-module AdamW parameter groups and gradient clipping; the warm-up + decay schedule (transformers');
- `checkpoint`: what a checkpoint holds (`TrainState`), save / load / start-from-weights;
- `metrics`: `MetricsWindow` (throughput, padding, data wait, per-type loss) and `MlflowRunLogger` (explicit client);
- `content`: the content check run during training (is the audio path carrying content?);
- `tokenizer`: the offline tokenizer trained on a corpus, and its transport to Ray workers;
- `ray_run`: the driver side of a Ray Train run (MLflow run by name, `TorchTrainer` per stage, registration).
"""
