#!/usr/bin/env python
"""One variant of the conditioning ablation (docs/conditioning.md): stage 2 on a fixed autoencoder,
then the shapes suite, recorded with its command.

    python bench/ablation.py NAME --vae runs/base/vae [--oracle] [--threads 2] -- key=value ...

Runs ``training/train_ldm.py --config docs/ablation/base.yaml`` (or ``--config``) into
``runs/ablation/NAME`` with the overrides after ``--``, then ``latentdiff eval`` (shapes suite,
``--images-per-prompt`` images per prompt, 25 DPM-Solver++ steps, the model's guidance) on its
pipeline, and appends one record (the command, wall-clock minutes of stage 2, images seen,
overall / per task / unseen, the last caption gap) to ``docs/ablation/records.jsonl``. ``--oracle``
conditions the U-Net on :class:`oracle_text_encoder.OracleTextEncoder` instead of the text encoder.

Stage 2's minutes depend on what else the machine runs: compare variants at equal steps, and
measure step costs on a quiet machine (``--cost-only`` times 30 steps without exporting).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "docs", "ablation", "records.jsonl")


def _oracle_main(argv: list[str]) -> None:
    """Stage 2 with the oracle in place of the text encoder (frozen, cached)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    sys.path.insert(0, os.path.join(ROOT, "training"))
    import latentdiff.models.builders
    from oracle_text_encoder import OracleTextEncoder

    def build_oracle(config):
        return OracleTextEncoder(hidden_size=config.text_encoder.hidden_size)

    latentdiff.models.builders.build_text_encoder = build_oracle
    import train_ldm

    train_ldm.build_text_encoder = build_oracle
    train_ldm.main(argv)


def _oracle_eval(model: str, out: str, images_per_prompt: int) -> dict:
    """``latentdiff eval`` on a pipeline folder whose text encoder is the oracle."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from oracle_text_encoder import OracleTextEncoder

    from latentdiff.eval.adherence import evaluate_adherence, format_report, model_holdout, select_prompts
    from latentdiff.eval.suite import shapes_suite
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.models.schedulers import scheduler_from_name
    from latentdiff.models.tokenizer import clip_tokenizer

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    oracle = OracleTextEncoder(hidden_size=unet.config.cross_attention_dim)
    with open(os.path.join(model, "scheduler", "scheduler_config.json"), encoding="utf-8") as file:
        scheduler_config = json.load(file)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    pipeline = LatentPipeline(vae=vae, text_encoder=oracle, tokenizer=clip_tokenizer(), unet=unet,
                              scheduler=scheduler_from_name("dpm", scheduler.config))
    with open(os.path.join(model, "latentdiff.json"), encoding="utf-8") as file:
        guidance = json.load(file).get("guidance_scale", 4.0)
    holdout, _ = model_holdout(model)
    results = evaluate_adherence(pipeline, select_prompts(shapes_suite(holdout)), images_per_prompt=images_per_prompt,
                                 steps=25, scheduler="dpm", guidance=guidance)
    print(format_report(results))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as file:
        json.dump(results.to_json(), file, indent=1)
    torch.manual_seed(0)
    return results.to_json()


DEFAULT_CONFIG = "docs/ablation/base.yaml"
TASK_COLUMNS = ("single_object", "color", "shape", "position", "counting", "two_objects", "relation", "color_binding")


def table(records_file: str = RECORDS) -> str:
    """The records as one markdown table: adherence per task, caption gap in the top band, cost."""
    header = ("| variant | overall | " + " | ".join(TASK_COLUMNS) + " | unseen | caption gap t750-1000 "
              "(true / empty / shuffled) | images seen | stage-2 min |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    with open(records_file, encoding="utf-8") as file:
        records = [json.loads(line) for line in file if line.strip()]
    for record in records:
        gap = record.get("caption_gap")
        top = f"{gap['true'][-1]:.3f} / {gap['empty'][-1]:.3f} / {gap['shuffled'][-1]:.3f}" if gap else "-"
        tasks = " | ".join(f"{record['tasks'].get(task, 0):.2f}" for task in TASK_COLUMNS)
        unseen = f"{record['unseen']:.2f}" if record["unseen"] is not None else "-"
        lines.append(f"| {record['name']} | **{record['overall']:.3f}** | {tasks} | {unseen} | {top} | "
                     f"{record['images_seen']:,} | {record['stage2_minutes'] or '-'} |")
    return "\n".join(lines)


def _checkout_commit() -> str:
    """The checkout's short commit, with "+ uncommitted" when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    return commit + (" + uncommitted" if git("status", "--porcelain", "--untracked-files=no") else "")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        print(table(sys.argv[2] if len(sys.argv) > 2 else RECORDS))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--_oracle-train":
        _oracle_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--_oracle-eval":
        _oracle_eval(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--vae", required=True, help="stage-1 autoencoder folder shared by every variant")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base config of every variant (the pre-ablation default)")
    parser.add_argument("--oracle", action="store_true", help="condition on the oracle instead of the text encoder")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--note", default="", help="what the variant changes, in words")
    parser.add_argument("--skip-train", action="store_true", help="evaluate an existing run again")
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = overrides

    output_dir = os.path.join("runs", "ablation", args.name)
    overrides = [f"output_dir={output_dir}", f"model.vae.pretrained={args.vae}", "train.checkpointing_steps=0",
                 *args.overrides]
    if args.oracle:
        overrides += ["model.text_encoder.train=false", "train.cache=true"]
    train = [sys.executable, "bench/ablation.py", "--_oracle-train"] if args.oracle else [sys.executable, "training/train_ldm.py"]
    train += ["--config", args.config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    # The code the run starts from (a run takes tens of minutes; the checkout may move on before the record is written).
    commit = _checkout_commit()
    minutes = None
    if not args.skip_train:
        print("+", shlex.join(train), flush=True)
        start = time.perf_counter()
        subprocess.run(train, check=True, env=env, cwd=ROOT)
        minutes = (time.perf_counter() - start) / 60
    pipeline = os.path.join(output_dir, "pipeline")
    out = os.path.join(pipeline, "eval")
    if args.oracle:
        subprocess.run([sys.executable, "bench/ablation.py", "--_oracle-eval", pipeline, out, str(args.images_per_prompt)],
                       check=True, env=env, cwd=ROOT)
    else:
        subprocess.run(["latentdiff", "eval", pipeline, "--suite", "shapes", "--images-per-prompt",
                        str(args.images_per_prompt), "--steps", "25", "--scheduler", "dpm", "--out", out],
                       check=True, env=env, cwd=ROOT)
    with open(os.path.join(ROOT, out, "results.json"), encoding="utf-8") as file:
        results = json.load(file)
    summary = results.get("summary", results)
    gap_file = os.path.join(ROOT, output_dir, "caption_gap.json")
    gap = json.load(open(gap_file, encoding="utf-8"))[-1] if os.path.isfile(gap_file) else None
    with open(os.path.join(ROOT, output_dir, "config.yaml"), encoding="utf-8") as file:
        import yaml

        config = yaml.safe_load(file)
    record = {
        "name": args.name,
        "note": args.note,
        "command": f"OMP_NUM_THREADS={args.threads} " + shlex.join(
            ["python", "bench/ablation.py", args.name, "--vae", args.vae]
            + (["--config", args.config] if args.config != DEFAULT_CONFIG else [])
            + (["--oracle"] if args.oracle else [])
            + ["--images-per-prompt", str(args.images_per_prompt), "--", *args.overrides]
        ),
        "commit": commit,
        "steps": config["train"]["max_steps"],
        "batch_size": config["train"]["batch_size"],
        "images_seen": config["train"]["max_steps"] * config["train"]["batch_size"],
        "stage2_minutes": round(minutes, 2) if minutes is not None else None,
        "images_per_prompt": args.images_per_prompt,
        "overall": summary["overall"],
        "unseen": summary["unseen"],
        "right_count": summary.get("right_count"),
        "tasks": {task: entry["accuracy"] for task, entry in summary["tasks"].items()},
        "caption_gap": gap,
    }
    os.makedirs(os.path.dirname(RECORDS), exist_ok=True)
    with open(RECORDS, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
    print(json.dumps({k: record[k] for k in ("name", "overall", "unseen", "tasks", "stage2_minutes")}, indent=1))


if __name__ == "__main__":
    main()
