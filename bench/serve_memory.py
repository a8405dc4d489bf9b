"""Benchmark (not a test): a serving replica's resident memory with 1 vs 3 fine-tunes of one base LM loaded, with
the base shared (`services.model_store.ModelStore`, what the chat app does) and as whole copies (the baseline).

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
    """Load dirs[0], then the rest, each answering once; RSS after each stage."""
    import torch

    from services.model_store import process_rss_bytes as rss_bytes
    from services.model_store import ModelStore

    torch.set_num_threads(1)
    from models.conversation import Conversation, Turn

    def load_and_answer(d):
        # answering touches every weight: safetensors are memory-mapped, so a weight counts in RSS once read
        served = store.load(d)
        served.generate([Conversation([Turn.text("user", "hello")])], max_new_tokens=2)
        return served

    store = ModelStore(share_bases=share)
    gc.collect()
    start = rss_bytes()
    held = [load_and_answer(dirs[0])]
    gc.collect()
    one = rss_bytes()
    held += [load_and_answer(d) for d in dirs[1:]]
    gc.collect()
    three = rss_bytes()
    counts = held[0].model.parameter_counts()
    return {"start": start, "one": one, "three": three, "stats": store.stats(),
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
    for way, label in (("whole", "whole copies (baseline)"), ("shared", "shared base (ModelStore)")):
        r = results[way]
        growth = r["three"] - r["one"]
        print(f"{label:28s}{r['one'] / mib:12.1f}{r['three'] / mib:12.1f}{growth / mib:14.1f}{growth / own:14.2f}")
    ratio = (results["whole"]["three"] - results["whole"]["one"]) / max(1, results["shared"]["three"] -
                                                                      results["shared"]["one"])
    print(f"growth whole / shared: {ratio:.2f}x; target for shared: growth / own <= 3.3; "
          f"loaded: {results['shared']['stats']}")


if __name__ == "__main__":
    main()
