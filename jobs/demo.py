"""Demo: the local stack, a tiny SpeechLM, and one mixed-modal chat turn (text + spoken audio) through it.

    python -m jobs.demo [--steps 60] [--keep-stack]

1. starts the local stack (Ray head, MLflow server) on 127.0.0.1;
2. speaks a question with espeak-ng (16 kHz);
3. in a Ray task on that cluster: builds the tiny SpeechLM (random init, offline tokenizer), fits it to one
   text+audio example for a few steps (so the answer is not noise), and logs the run to MLflow;
4. asks the chat turn `[text, audio, text]` and prints the answer, the MLflow run and where to look.

The loss stays near 4.9 while the greedy answer is already exact: the tiny LM is random-init and trains only through
LoRA, so its frozen tied embeddings (std 0.02, width 64) cap how confident its logits can get. A pretrained LM, or
the full-LM mode, has no such ceiling.

What this shows is the plumbing (audio -> encoder -> adapter -> LM -> text, on Ray, tracked in MLflow). A model
that has learned anything general comes from the training job (jobs.train).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def fit_and_chat(question_audio: np.ndarray, steps: int, seed: int, tracking_uri: str) -> dict:
    import mlflow
    import torch

    from models.config import tiny
    from models.conversation import AudioPart, Conversation, TextPart, Turn
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    answer = "Two plus three is five."
    user = Turn("user", [TextPart("Listen:"), AudioPart(question_audio), TextPart("Answer briefly.")])
    example = Conversation([user, Turn.text("assistant", answer)])
    model = build_speechlm(tiny(), tokenizer=build_tiny_tokenizer([answer]))
    batch = model.processor([example])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("vtblender-demo")
    with mlflow.start_run(run_name="foundation-demo") as run:
        mlflow.log_params({"model": "tiny", "lm_mode": "lora", "steps": steps, "seed": seed,
                           **{f"params_{k}": v for k, v in model.parameter_counts().items()}})
        model.train()
        for step in range(steps):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            mlflow.log_metric("loss", loss.item(), step=step)
        model.eval()
        reply = model.generate([Conversation([user])], max_new_tokens=24)[0]
        mlflow.log_text(reply, "answer.txt")
        return {"answer": reply, "target": answer, "final_loss": loss.item(), "run_id": run.info.run_id,
                "experiment_id": run.info.experiment_id}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stack-root", default=".stack")
    ap.add_argument("--keep-stack", action="store_true", help="leave Ray and MLflow running for inspection")
    args = ap.parse_args(argv)

    import ray

    from data_ops.tts import EspeakTTS, TTSError
    from infra.stack import LocalStack, StackError

    t0 = time.time()
    stack = LocalStack(args.stack_root, services=("ray", "mlflow"))
    try:
        print("[demo] starting the local stack (Ray head, MLflow) on 127.0.0.1 ...", flush=True)
        stack.start()
        env = stack.env()
        tts = EspeakTTS()
        audio, voice = tts.synthesize("What is two plus three?", "en", np.random.default_rng(args.seed), voice="en-us")
        print(f"[demo] spoke the question with espeak-ng ({voice['voice']}): {len(audio) / 16000:.2f} s of audio")
        os.environ["RAY_AUTH_MODE"] = env["RAY_AUTH_MODE"]
        ray.init(address=stack.services["ray"].extra["gcs_address"], logging_level="ERROR",
                 log_to_driver=False)
        task = ray.remote(num_cpus=1)(fit_and_chat)
        out = ray.get(task.remote(audio, args.steps, args.seed, env["MLFLOW_TRACKING_URI"]))
        ray.shutdown()
        print("[demo] chat turn: user = [text 'Listen:', audio 'What is two plus three?', text 'Answer briefly.']")
        print(f"[demo] model answer: {out['answer']!r}  (fitted target {out['target']!r}, final loss "
              f"{out['final_loss']:.3f} after {args.steps} steps; the loss is capped for a random-init LM trained "
              "only through LoRA, see jobs/demo.py)")
        print(f"[demo] MLflow run {out['run_id']}: {env['MLFLOW_TRACKING_URI']}/#/experiments/"
              f"{out['experiment_id']}/runs/{out['run_id']}")
        print(f"[demo] Ray dashboard: {env['RAY_ADDRESS']}   logs: {stack.root / 'logs'}")
        print(f"[demo] done in {time.time() - t0:.0f} s")
        return 0
    except (StackError, TTSError) as e:
        print(f"[demo] error: {e}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.keep_stack:
            print("[demo] stack left running; stop it with: python -m infra.stack down")
        else:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
