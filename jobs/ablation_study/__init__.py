"""The ablation miniature's components (the paper's Table 4 at CPU size), which the `jobs.ablation` entrypoint
composes; they import no entrypoint, and none connects to Ray (the caller does). Modules:

- `config.py`: the ablation config (`AblationConfig`, `load_config`) and a shipped recipe adapted to a run of it
  (`adapt_recipe`);
- `cache.py`: which steps one seed has done and from which inputs (`SeedState`, `step_inputs`, `recipe_inputs`);
- `memory.py`: the machine's peak memory while a seed runs (`PeakMemory`);
- `claims.py`: the paper's claims checked on the measured metrics (`check_claims`, `spoken_instruction_matches`);
- `pipeline.py`: one seed, corpora to `result.json` (`run_seed`, with `export_text_lm`, `pretrain_encoder_logged`,
  `evaluate_models`);
- `report.py`: a seed's summary and every seed's numbers side by side (`summary`, `seeds_table`).
"""
