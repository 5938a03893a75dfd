"""The `t2i-reward` command line.

    t2i-reward score [--config FILE | --profile NAME] --prompt TEXT IMAGE... [--json]
    t2i-reward bench [--config FILE | --profile NAME] --images N --batch-size B [--json]
    t2i-reward serve [--config FILE | --profile NAME] [--host H] [--port P] [--prompts-index DIR] [--ray]
    t2i-reward prompts build --source SRC --out DIR [--model NAME] [--text-field F]
    t2i-reward prompts search --index DIR TOPIC... [-n N] [--diversity D]
    t2i-reward prompts generate TOPIC... [-n N] [--seed S] [--model M] [--expansion E] [--max-new-tokens T]
    t2i-reward train-reward --data SRC [--image-root DIR] --out DIR [--clip SPEC] [--aux-weight W] ...
    t2i-reward eval-preference [--config FILE | --profile NAME] --data SRC [--image-root DIR] [--out DIR]
    t2i-reward fit-mixture [--config FILE | --profile NAME] --data SRC [--image-root DIR] --out FILE
    t2i-reward calibrate [--config FILE | --profile NAME] --prompts FILE --images DIR --out FILE [--batch-size N]
    t2i-reward worker [--config FILE | --profile NAME] [--prompts-index DIR] [--burst]
    t2i-reward finetune [--config FILE | --profile NAME] [--prompts-index DIR] --spec job.json [--out DIR]
    t2i-reward profiles | experts

Errors caused by the input (bad images, unknown profiles, missing checkpoints) print one line on
stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="YAML config file (docs/configuration.md)")
    g.add_argument("--profile", help="built-in profile: default, light, tiny, random-full, ig-rewarding")


def _rewarder(args, **overrides):
    from t2i_reward.rewarders import create_rewarder

    return create_rewarder(args.config, profile=args.profile, **overrides)


def cmd_score(args) -> int:
    rewarder = _rewarder(args)
    result = rewarder.score(args.prompt, args.images)
    if args.json:
        out = {
            "mean_reward": result.mean_reward,
            "component_rewards": result.component_rewards,
            "images": [{"total": i.total, "components": i.components} for i in result.images],
            "experts": result.experts,
        }
        print(json.dumps(out))
        return 0
    if rewarder.random_weights:
        print("NOTE: some experts have random weights; these scores are for testing only")
    names = list(result.component_rewards)
    print(f"{'image':40s} {'total':>9s} " + " ".join(f"{n:>12s}" for n in names))
    for path, s in zip(args.images, result.images):
        print(f"{str(path)[-40:]:40s} {s.total:9.4f} " + " ".join(f"{s.components[n]:12.4f}" for n in names))
    print(f"{'mean':40s} {result.mean_reward:9.4f} " + " ".join(f"{result.component_rewards[n]:12.4f}" for n in names))
    return 0


def cmd_bench(args) -> int:
    import numpy as np
    from PIL import Image

    rewarder = _rewarder(args, max_batch_size=args.batch_size, max_images=max(args.images, 1))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(args.images)]
    prompt = "a photo of a cat sitting on a red sofa, highly detailed"
    rewarder.score(prompt, images[: min(len(images), args.batch_size)])  # warm-up
    t = time.perf_counter()
    for _ in range(args.repeat):
        rewarder.score(prompt, images)
    dt = (time.perf_counter() - t) / args.repeat
    result = {
        "images": args.images,
        "batch_size": args.batch_size,
        "seconds": dt,
        "device": str(rewarder.device),
        "dtype": str(rewarder.dtype).removeprefix("torch."),
        "experts": list(rewarder.experts),
        "images_per_s": args.images / dt,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.images} images in {dt:.3f} s on {result['device']} ({result['dtype']}): {result['images_per_s']:.2f} images/s")
    return 0


def cmd_serve(args) -> int:
    from t2i_reward.service.app import create_app
    from t2i_reward.service.server import serve
    from t2i_reward.service.settings import Settings

    overrides = {"reward_config": args.config, "profile": args.profile, "host": args.host, "port": args.port,
                 "prompts_index": args.prompts_index}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = Settings(**overrides)
    if args.ray:  # the same API as a Ray Serve application, each pool of experts its own deployment
        try:
            from t2i_reward.service.ray_serve import run
        except ImportError as e:
            print(f"t2i-reward serve --ray needs Ray Serve: pip install '.[ray]' ({e})", file=sys.stderr)
            return 2
        run(settings)
        return 0
    serve(create_app(settings), settings)  # uvicorn with the connection limits (service/server.py)
    return 0


def cmd_prompts_build(args) -> int:
    from t2i_reward.prompter import build_index, read_prompts

    prompts = read_prompts(args.source, args.text_field)
    print(f"{len(prompts)} distinct prompts from {args.source}", file=sys.stderr)
    t = time.perf_counter()
    meta = build_index(prompts, args.out, model=args.model, approx_threshold=args.approx_threshold,
                       source=args.source, progress=True, batch_size=args.batch_size)
    if meta["rebuilt"]:
        print(f"wrote a {meta['kind']} index of {meta['count']} prompts ({meta['dim']}-dim, {meta['model']}) to {args.out} "
              f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    else:
        print(f"{args.out} already holds these {meta['count']} prompts with {meta['model']}; nothing to do", file=sys.stderr)
    return 0


def cmd_prompts_search(args) -> int:
    from t2i_reward.prompter import PromptIndex

    index = PromptIndex.load(args.index)
    found, scores = index.search(args.topics, args.n, args.diversity)
    print(json.dumps({"prompts": found, "scores": scores}, ensure_ascii=False))
    return 0


def cmd_prompts_generate(args) -> int:
    from t2i_reward.prompter.generate import PromptGenerator

    generator = PromptGenerator(args.model, args.expansion, device=args.device, cache_dir=args.cache_dir)
    for prompts in generator.generate(args.topics, args.n, args.seed, args.max_new_tokens):
        for prompt in prompts:
            print(prompt)
    return 0


def _seed(text: str) -> int:
    from t2i_reward.prompter.generate import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {value}")
    return value


def _new_tokens(text: str) -> int:
    from t2i_reward.prompter.generate import MAX_NEW_TOKENS

    value = _positive(text)
    if value > MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_NEW_TOKENS}, got {value}")
    return value


def _prompt_count(text: str) -> int:
    value = _positive(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be at most 100, got {value}")
    return value


def cmd_train_reward(args) -> int:
    from t2i_reward.rewarders.training import TrainRewardConfig, train_reward

    fields = {k: getattr(args, k) for k in ("data", "image_root", "out", "clip", "epochs", "batch_size", "lr",
                                             "val_fraction", "aux_weight", "aux_negatives", "seed", "device")}
    if args.cache_dir:
        fields["cache_dir"] = args.cache_dir
    try:
        cfg = TrainRewardConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as e:
        raise _bad(f"invalid training options: {e}")
    metrics = train_reward(cfg)
    print(json.dumps({k: metrics[k] for k in ("train_prompts", "val_prompts", "train_pairs", "val_pairs", "best_epoch", "best_val_accuracy")}))
    print(f"wrote {args.out}/model.safetensors, config.json, metrics.json and training_curve.png", file=sys.stderr)
    return 0


def _bad(message: str):
    from t2i_reward.rewarders.errors import InvalidRequestError

    return InvalidRequestError(message)


def cmd_eval_preference(args) -> int:
    from t2i_reward.rewarders.training import evaluate_preferences, load_preference_data, markdown_table

    records = load_preference_data(args.data, args.image_root, split=args.split)
    rewarder = _rewarder(args)
    results = evaluate_preferences(records, rewarder, args.out, n_boot=args.bootstrap, seed=args.seed)
    print(markdown_table(results), end="")
    if rewarder.random_weights:
        print("NOTE: some experts have random weights; these accuracies are for testing only")
    return 0


def cmd_fit_mixture(args) -> int:
    from t2i_reward.rewarders.training import fit_mixture, load_preference_data, write_fitted_config

    records = load_preference_data(args.data, args.image_root, split=args.split)
    rewarder = _rewarder(args)
    report = fit_mixture(records, rewarder, args.val_fraction, args.seed)
    write_fitted_config(report["weights"], args.out, args.config, rewarder.config.profile)
    print(json.dumps(report))
    print(f"wrote {args.out}: use it with --config", file=sys.stderr)
    return 0


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _calibration_pairs(prompts_file: str, images_dir: str) -> tuple[list[str], list[str]]:
    """(prompts, image paths) from a JSONL/JSON/CSV file with `prompt` and `image` fields (paths relative to
    `images_dir`), or from a text file with one prompt per line, paired with the image files of `images_dir`
    in sorted filename order."""
    import csv
    from pathlib import Path

    src, root = Path(prompts_file), Path(images_dir)
    if not root.is_dir():
        raise _bad(f"--images {images_dir}: not a directory")
    try:
        text = src.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(f"cannot read --prompts {prompts_file}: {e}")
    suffix = src.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json", ".csv"):
        if suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise _bad(f"{prompts_file}: not valid JSON ({e})")
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise _bad(f"{prompts_file} line {n}: not valid JSON ({e})")
        prompts, paths = [], []
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("image"), str):
                raise _bad(f"{prompts_file} record {n}: needs string fields 'prompt' and 'image'")
            prompts.append(row["prompt"])
            paths.append(str(root / row["image"]))
        return prompts, paths
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    paths = sorted(str(p) for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(prompts) != len(paths):
        raise _bad(f"{prompts_file} has {len(prompts)} prompts but {images_dir} has {len(paths)} image files: "
                   "a text file pairs one prompt per line with the images in sorted filename order")
    return prompts, paths


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from t2i_reward.rewarders.calibration import calibrate

    prompts, paths = _calibration_pairs(args.prompts, args.images)
    # calibration=None: the config may already name the file this command is about to write
    rewarder = _rewarder(args, calibration=None)
    cal = calibrate(rewarder, prompts, paths, batch_size=args.batch_size, source=Path(args.prompts).name)
    try:
        cal.save(args.out)
    except OSError as e:
        raise _bad(f"cannot write --out {args.out}: {e}")
    print(f"{'expert':14s} {'n':>6s} {'mean':>10s} {'std':>10s} {'5%':>10s} {'50%':>10s} {'95%':>10s}")
    for name, e in cal.experts.items():
        q = e.quantiles
        print(f"{name:14s} {e.n:6d} {e.mean:10.4f} {e.std:10.4f} {q[5]:10.4f} {q[50]:10.4f} {q[95]:10.4f}")
    if rewarder.random_weights:
        print("NOTE: some experts have random weights; this calibration is for testing only")
    print(f"wrote {args.out} ({cal.n_images} images): use it with `calibration: {args.out}` in the config", file=sys.stderr)
    return 0


def _finetune_settings(args):
    """The worker's and the finetune command's settings: the environment, then the flags."""
    from t2i_reward.finetune import FinetuneSettings

    overrides = {"reward_config": args.config, "profile": args.profile, "prompts_index": args.prompts_index}
    return FinetuneSettings(**{k: v for k, v in overrides.items() if v is not None})


def cmd_worker(args) -> int:
    from t2i_reward.finetune.worker import run_worker

    settings = _finetune_settings(args)
    print(f"worker: queue at {settings.redis_url}, jobs in {settings.jobs_dir}, rewards from "
          f"{settings.reward_service_url or 'rewarders in-process'}", file=sys.stderr)
    run_worker(settings, burst=args.burst)
    # the jobs' state is in Redis and their files are closed: leave without the interpreter's teardown, which
    # spends seconds garbage-collecting the models (a stopping worker has a bound to keep: shutdown_timeout_s)
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_finetune(args) -> int:
    from pathlib import Path

    from t2i_reward.finetune import JobCancelled, JobSpec, run_job
    from t2i_reward.finetune.worker import JobRunner

    try:
        spec = JobSpec.model_validate_json(Path(args.spec).read_text())
    except OSError as e:
        raise _bad(f"cannot read the job spec: {e}")
    except ValueError as e:
        raise _bad(f"invalid job spec: {e}")
    try:
        spec, ctx = JobRunner(_finetune_settings(args)).context(spec, Path(args.out))
    except ValueError as e:
        raise _bad(str(e))
    try:
        result = run_job(spec, ctx)
    except JobCancelled:
        return 130
    if result["main_process"]:  # under accelerate launch / torchrun, one summary from the main process
        print(json.dumps({"status": result["status"], "error": result.get("error"), "artifacts": result["artifacts"],
                          "eval": result["metrics"]["eval"], "processes": result["metrics"]["processes"]}))
    return 0 if result["status"] == "succeeded" else 1


def cmd_profiles(args) -> int:
    from t2i_reward.rewarders import list_profiles

    for name, doc in list_profiles().items():
        print(f"{name:14s} {doc}")
    return 0


def cmd_experts(args) -> int:
    from t2i_reward.rewarders import list_experts

    print("\n".join(list_experts()))
    return 0


def _add_data_args(p: argparse.ArgumentParser, split: str | None = None) -> None:
    p.add_argument("--data", required=True, help="ImageRewardDB-format JSON/JSONL, or a hub dataset id (org/name[:subset])")
    p.add_argument("--image-root", help="folder the image paths are relative to (default: the data file's)")
    if split is not None:
        p.add_argument("--split", default=split, help=f"hub dataset split (default {split})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i-reward", description="Reward models for text-to-image generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score images against a prompt")
    _add_config_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt the images were generated from")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("bench", help="images per second of the whole mixture on random images")
    _add_config_args(p)
    p.add_argument("--images", type=_positive, default=32, help="images per timed call")
    p.add_argument("--batch-size", type=_positive, default=8, help="most images per forward pass")
    p.add_argument("--size", type=_positive, default=512, help="side of the random square images")
    p.add_argument("--repeat", type=_positive, default=1, help="timed calls (averaged)")
    p.add_argument("--json", action="store_true", help="print one JSON object (images_per_s last)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="run the reward service (FastAPI on uvicorn)")
    _add_config_args(p)
    p.add_argument("--host", help="address to bind (default 127.0.0.1, or T2I_SERVICE_HOST)")
    p.add_argument("--port", type=_positive, help="port (default 8000, or T2I_SERVICE_PORT)")
    p.add_argument("--prompts-index", help="prompt index directory for /prompts (default: the built-in corpus)")
    p.add_argument("--ray", action="store_true", help="run on Ray Serve (pip install .[ray]): the cluster at RAY_ADDRESS, "
                   "or a local one; each pool of experts its own deployment (the config's ray: section)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("prompts", help="build or query a prompt index, or generate prompts")
    psub = p.add_subparsers(dest="prompts_command", required=True)
    b = psub.add_parser("build", help="embed a prompt corpus into a FAISS index")
    b.add_argument("--source", default="THUDM/ImageRewardDB",
                   help="hub dataset id, or a local .json/.jsonl/.csv/.tsv/.parquet/.txt file (default THUDM/ImageRewardDB)")
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--model", default="all-MiniLM-L6-v2", help="sentence-transformers model name or path (default: the packaged all-MiniLM-L6-v2)")
    b.add_argument("--text-field", help="field holding the prompt (default: 'prompt', else 'text')")
    b.add_argument("--approx-threshold", type=_positive, default=200_000, help="above this many prompts, build an HNSW index instead of an exact one")
    b.add_argument("--batch-size", type=_positive, default=256, help="prompts per embedding batch")
    b.set_defaults(func=cmd_prompts_build)
    q = psub.add_parser("search", help="prompts for topics, as JSON")
    q.add_argument("--index", required=True, help="index directory")
    q.add_argument("topics", nargs="+", help="topics")
    q.add_argument("-n", type=_positive, default=5, help="prompts per topic")
    q.add_argument("--diversity", type=float, default=0.0, help="MMR diversity in [0, 1]")
    q.set_defaults(func=cmd_prompts_search)
    g = psub.add_parser("generate", help="prompts generated from topics (MagicPrompt, then the optional expansion), one a line")
    g.add_argument("topics", nargs="+", help="topics; each prompt starts with its topic")
    g.add_argument("-n", type=_prompt_count, default=5, help="prompts per topic (at most 100)")
    g.add_argument("--seed", type=_seed, default=0, help="sampling seed: the same seed gives the same prompts (default 0)")
    g.add_argument("--model", default="Gustavosta/MagicPrompt-Stable-Diffusion",
                   help="MagicPrompt model: hub id, local folder, or 'tiny' (random, for tests)")
    g.add_argument("--expansion", default="none",
                   help="Fooocus-style expansion model folder (with positive.txt), 'tiny', or 'none' (default)")
    g.add_argument("--max-new-tokens", type=_new_tokens, default=60, help="most tokens added per stage (at most 77)")
    g.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    g.add_argument("--cache-dir", help="where 'tiny' models are built (default: T2I_REWARD_CACHE_DIR or ~/.cache/t2i-reward)")
    g.set_defaults(func=cmd_prompts_generate)

    p = sub.add_parser("train-reward", help="train the MLP reward model on preference data")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="output directory for the checkpoint the mlp expert loads")
    p.add_argument("--clip", help="CLIP for the embeddings (default ViT-L-14/openai; 'tiny' offline)")
    p.add_argument("--epochs", type=_positive, help="default 20")
    p.add_argument("--batch-size", type=_positive, help="pairs per step, default 256")
    p.add_argument("--lr", type=float, help="Adam learning rate, default 1e-5")
    p.add_argument("--val-fraction", type=float, help="share of prompts held out, default 0.1")
    p.add_argument("--aux-weight", type=float, help="weight of Lee et al.'s auxiliary prompt-classification loss (default 0: off)")
    p.add_argument("--aux-negatives", type=_positive, help="perturbed prompts per image for the auxiliary loss, default 4")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, ...")
    p.add_argument("--cache-dir", help="embedding and model cache (default ~/.cache/t2i-reward)")
    p.set_defaults(func=cmd_train_reward)

    p = sub.add_parser("eval-preference", help="preference accuracy of every expert, CLIP score and the mixture")
    _add_config_args(p)
    _add_data_args(p, split="test")
    p.add_argument("--out", default="preference-eval", help="folder for the table, JSON and bar chart")
    p.add_argument("--bootstrap", type=_positive, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval_preference)

    p = sub.add_parser("fit-mixture", help="learn mixture weights from preferences (logistic regression)")
    _add_config_args(p)
    _add_data_args(p, split="train")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of prompts held out to report accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="YAML config to write (the current config with the fitted weights)")
    p.set_defaults(func=cmd_fit_mixture)

    p = sub.add_parser("calibrate", help="measure each expert's score distribution on your images (for percentiles)")
    _add_config_args(p)
    p.add_argument("--prompts", required=True,
                   help="JSONL/JSON/CSV with 'prompt' and 'image' fields (paths relative to --images), or a text file "
                        "with one prompt per line, paired with the images of --images in sorted filename order")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--batch-size", type=_positive, help="images decoded and scored per call (default: the config's max_batch_size)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("worker", help="run fine-tuning jobs from the Redis queue (one at a time)")
    _add_config_args(p)
    p.add_argument("--prompts-index", help="prompt index for jobs given by topics (default: the built-in corpus)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("finetune", help="run one fine-tuning job directly (works under accelerate launch)")
    _add_config_args(p)
    p.add_argument("--prompts-index", help="prompt index for a spec given by topics (default: the built-in corpus)")
    p.add_argument("--spec", required=True, help="job spec JSON (the body of POST /jobs)")
    p.add_argument("--out", default="finetune-out", help="output directory (checkpoints, LoRA, report)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("profiles", help="list the built-in profiles")
    p.set_defaults(func=cmd_profiles)
    p = sub.add_parser("experts", help="list the registered experts")
    p.set_defaults(func=cmd_experts)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from t2i_reward.rewarders.errors import RewardError

    try:
        return args.func(args)
    except RewardError as e:
        print(f"t2i-reward: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
