"""Benchmark (not a test): a serving replica's resident memory (its own and its vLLM engines' processes) with 1 vs 3
fine-tunes of one base LM loaded, sharing one engine (`models.engine.EngineStore`, what the chat app does: each
fine-tune adds its LoRA and its audio tower) and on an engine each (the baseline).

    python -m bench.serve_memory [--lm-hidden 512] [--lm-layers 8]

Saves three fine-tunes of one random base (the `tiny` encoder and adapter, an LM made larger so that it outweighs
what a fine-tune trains, as a real LM does), then, for each way of loading, in a fresh process: resident set size
(RSS) after loading one fine-tune and after loading all three. Prints the growth from 1 to 3, one fine-tune's own
weights (encoder + modality adapter + LoRA) and the base's, and the growth as a multiple of a fine-tune's own size
(the chat app's target: at most 3x plus 10%).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def child(dirs: list[str], share: bool) -> dict:
    """Load dirs[0], then the rest, each answering an audio prompt once (which reads its tower); RSS of this process
    and the engine processes it started after each stage."""
    import numpy as np

    from models.conversation import AudioPart, Conversation, TextPart, Turn
    from models.speechlm import SpeechLM
    from models.engine import BlockingRunner, EngineSettings, EngineStore
    from services.replica_memory import process_rss_bytes

    def rss() -> int:
        gc.collect()
        return process_rss_bytes() + process_rss_bytes(children=True)

    run = BlockingRunner()
    conv = Conversation([Turn("user", [AudioPart(np.zeros(16000, dtype=np.float32)), TextPart("What is it?")])])
    settings = EngineSettings(kv_cache_gib=0.25, cpu_threads=1)
    stores = [EngineStore(settings)] if share else [EngineStore(settings) for _ in dirs]
    start = rss()
    held = []
    for i, d in enumerate(dirs):
        held.append(stores[0 if share else i].load(d))
        run(held[-1].answer(conv, 2))
        if i == 0:
            one = rss()
    three = rss()
    counts = SpeechLM.from_pretrained(dirs[0]).parameter_counts()
    for store in stores:
        store.shutdown()
    run.close()
    return {"start": start, "one": one, "three": three, "stats": [st.stats() for st in stores],
            "own_params": counts["encoder"] + counts["adapter"] + counts["lora"], "base_params": counts["lm"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lm-hidden", type=int, default=512)
    ap.add_argument("--lm-layers", type=int, default=8)
    ap.add_argument("--child", choices=["shared", "whole"])
    ap.add_argument("--dirs", nargs="*")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.dirs, args.child == "shared")))
        return

    from models.config import tiny
    from tests.services.serve_app import save_fine_tunes

    cfg = tiny()
    cfg.lm.config.update(hidden_size=args.lm_hidden, intermediate_size=4 * args.lm_hidden,
                         num_hidden_layers=args.lm_layers)
    root = Path(tempfile.mkdtemp(prefix="vtb-serve-memory-"))
    dirs = [str(d) for d in save_fine_tunes(root, ["a", "b", "c"], config=cfg).values()]
    results = {}
    for way in ("whole", "shared"):
        out = subprocess.run([sys.executable, "-m", "bench.serve_memory", "--child", way, "--dirs", *dirs],
                             check=True, capture_output=True, text=True).stdout
        results[way] = json.loads(out.strip().splitlines()[-1])
    mib = 1 << 20
    own = results["shared"]["own_params"] * 4  # float32 on CPU
    base = results["shared"]["base_params"] * 4
    print(f"\n3 fine-tunes of one base LM (hidden {args.lm_hidden}, {args.lm_layers} layers), CPU, float32")
    print(f"one fine-tune's own weights (encoder + adapter + LoRA): {own / mib:.1f} MiB; "
          f"the base LM: {base / mib:.1f} MiB")
    print(f"{'':28s}{'RSS 1 (MiB)':>12s}{'RSS 3 (MiB)':>12s}{'growth (MiB)':>14s}{'growth / own':>14s}")
    for way, label in (("whole", "an engine each (baseline)"), ("shared", "one shared engine")):
        r = results[way]
        growth = r["three"] - r["one"]
        print(f"{label:28s}{r['one'] / mib:12.1f}{r['three'] / mib:12.1f}{growth / mib:14.1f}{growth / own:14.2f}")
    ratio = (results["whole"]["three"] - results["whole"]["one"]) / max(1, results["shared"]["three"] -
                                                                      results["shared"]["one"])
    print(f"growth engine each / shared: {ratio:.2f}x; target for shared: growth / own <= 3.3; "
          f"loaded: {results['shared']['stats']}")


if __name__ == "__main__":
    main()
