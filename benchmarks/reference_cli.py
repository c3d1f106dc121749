"""The command line of the reference model's trainer (``train_reference.py``): its options, checked."""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CURRICULUM = (("early", 0.5275), ("short", 0.21), ("long", 0.2625))  # default share of --steps per stage


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """``train_reference.py``'s options; a bad value exits with what is allowed and the fix."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seed", type=int, default=1, help="train bench seed and init seed (test bench: seed 0)")
    p.add_argument("--out", type=Path, default=ROOT / "stream/models/reference", help="model folder to write")
    p.add_argument("--steps", type=int, default=8000, help="answer-token steps (one clip each), all stages")
    p.add_argument("--warmup-steps", type=int, default=2000, help="single-frame vision warm-up steps (64 frames)")
    p.add_argument("--plot", type=Path, help="write the loss curves PNG here")
    p.add_argument("--data", type=Path, default=ROOT / "out/reference_data", help="generated benches go here")
    p.add_argument("--lr", type=float, default=4e-4, help="peak learning rate of the answer-token stages (AdamW, "
                   "warm-up + cosine)")
    p.add_argument("--warmup-lr", type=float, default=1e-3, help="peak learning rate of the vision warm-up")
    p.add_argument("--questions", type=int, nargs="+", default=[32], metavar="N", help="questions per step (from "
                   "one clip): one number for every stage, or three (EARLY SHORT LONG, as --curriculum)")
    p.add_argument("--train-clips", type=int, nargs=2, default=(240, 480), help="short and long training clips")
    p.add_argument("--test-items", type=int, default=480, help="items of the held-out test bench (seed 0)")
    p.add_argument("--vision-scale", type=float, default=1.0, help="learning-rate factor of the vision tower and "
                   "projector in the answer-token stages (after their warm-up)")
    p.add_argument("--occupied-weight", type=float, default=5.0, help="probe loss weight of a token cell an object "
                   "covers, relative to an empty one")
    p.add_argument("--shape-weight", type=float, default=5.0, help="probe loss weight of the shape term")
    p.add_argument("--present-weight", type=float, default=10.0, help="probe loss weight of the frame summary")
    p.add_argument("--aux-weight", type=float, default=0.5, help="the probes' loss kept on in the answer-token "
                   "stages, this times")
    p.add_argument("--state-weight", type=float, default=0.2, help="weight of the stream-state probes on the LLM "
                   "(what the stream so far holds, at each frame's last token; 0 = off)")
    p.add_argument("--count-drills", type=int, default=0, help="extra counting questions per training clip, "
                   "answers 0-4 equally often, from the timeline (reference_data.count_drills; 0 = off)")
    p.add_argument("--early-drills", action=argparse.BooleanOptionalAction, default=True, help="the first stage "
                   "also trains on every real-time question the bench's rules allow at each of a clip's first 8 "
                   "seconds (reference_data.load_clips)")
    p.add_argument("--early-clips", choices=("short", "all"), default="all", help="the first stage's clips: the "
                   "24-32 s ones, or the 40-96 s ones' first 8 frames too")
    p.add_argument("--state-layer", type=int, default=2, help="decoder layer whose output the stream-state probes read")
    p.add_argument("--curriculum", type=float, nargs=3, default=[share for _, share in CURRICULUM],
                   metavar=("EARLY", "SHORT", "LONG"), help="share of --steps on questions within the first 8 frames, "
                   "on 24-32 s streams and on 40-96 s streams (sums to 1)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False, help="mirror half of each "
                   "vision warm-up batch left-right (labels mirrored too)")
    p.add_argument("--ema", type=float, nargs="*", default=[], metavar="DECAY", help="also save moving averages "
                   "of the weights over the answer-token stages, one per decay, to OUT-emaDECAY")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the machine's 2 cores)")
    g = p.add_argument_group("lookup stage", "fine-tune a trained model (--init) on shortcut-proof layouts with a "
                             "pointer loss, then --steps steps at --lr on long clips (reference_layouts.py)")
    g.add_argument("--init", type=Path, help="model folder to fine-tune (e.g. the seed run's); no warm-up, no probes")
    g.add_argument("--layouts", type=int, default=6000, help="fresh 4-second layout windows")
    g.add_argument("--layout-steps", type=int, default=3000, help="steps of the lookup stage")
    g.add_argument("--layout-lr", type=float, default=2e-4, help="its peak learning rate (warm-up + cosine)")
    g.add_argument("--layout-long-share", type=float, default=0.14, help="share of its steps on long clips")
    g.add_argument("--layout-seed", type=int, default=99, help="seed of the layouts and of the steps' draws")
    g.add_argument("--init-clips", type=int, default=200, help="long training clips these stages use (the first N)")
    g.add_argument("--pointer", type=float, nargs=3, default=(1, 3, 0.5), metavar=("LAYER", "HEAD", "WEIGHT"),
                   help="the head trained to attend to the asked object, and its loss weight")
    args = p.parse_args(argv)
    if args.init is not None and not all((args.init / f).is_file() for f in ("config.json", "training.json")):
        p.error(f"--init {args.init}: a model folder written by this trainer is needed (config.json and "
                "training.json there). Fix: --init out/reference-seed (the --out of a seed run)")
    if not 0 < args.layout_long_share < 1:
        p.error(f"--layout-long-share {args.layout_long_share}: a share strictly between 0 and 1 is allowed. "
                "Fix: e.g. --layout-long-share 0.14")
    if min(args.curriculum) < 0 or abs(sum(args.curriculum) - 1) > 1e-6:
        p.error(f"--curriculum {' '.join(map(str, args.curriculum))}: three shares >= 0 that sum to 1 are allowed. "
                f"Fix: e.g. --curriculum 0.5275 0.21 0.2625")
    if len(args.questions) not in (1, 3) or min(args.questions) < 1:
        p.error(f"--questions {' '.join(map(str, args.questions))}: one or three numbers >= 1 are allowed (per step; "
                f"three = per stage). Fix: e.g. --questions 32 or --questions 32 32 16")
    if any(not 0 < d < 1 for d in args.ema):
        p.error(f"--ema {' '.join(map(str, args.ema))}: decays between 0 and 1 (exclusive) are allowed. "
                f"Fix: e.g. --ema 0.998 0.999")
    return args
