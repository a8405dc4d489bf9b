"""The components of the evaluation and comparison jobs (`jobs.evaluate`, `jobs.compare`, the ablation's evaluation
steps): suites (`suite`), batch inference, scoring and logging (`run`), and the comparison table and chart
(`compare`). They know nothing of the entrypoints that use them."""
