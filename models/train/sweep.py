"""Train several configurations at once on one lent GPU, and bring back each one's best weights.

A GPU is lent to some sessions only, for minutes (models/README, "Training on a lent GPU"). On
such a machine, from the repository root, with models/train/data and the parents' best.pt
carried:

    python3 models/train/sweep.py run --overwrite --out "$OUT" --budget-min 6.5 --deadline-s 470

Each configuration in SWEEP is a train.py run (runs/<name>/) on the one GPU, all at once. At the
end, or at the deadline (SIGTERM: a run evaluates once more and writes its summary), each run's
best weights, its record and its logs go to OUT/<name>.npz: model weights only, so that a file
stays under the device's 16 MB limit, and numpy, so that this machine's older PyTorch reads what
a newer one wrote. --overwrite clears the runs' committed records first (on the device, copies).
Back here:

    .venv/bin/python models/train/sweep.py restore DIR

rebuilds runs/<name>/ (checkpoints/best.pt, summary.json, train.log, and the git-ignored
stdout.txt with the progress bars) for export.py.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")
# What a checkpoint carries beside its weights, packed and restored alike. new_blocks (read by
# train.py --init-from, for --new-lr-mult) and recovered_from (export.py) come from grow.py and
# recover.py parents.
RECORD = ("cfg", "args", "step", "tokens", "best", "elapsed", "history", "parent", "new_blocks", "recovered_from")

# Stage 13's recipe (runs/roomscore-satb-13/summary.json) with a GPU's batch; the comment above
# each run says what it tries.
RECIPE = ["--ctx", "512", "--weights", "chorale=0.75,quartet=0.1,palestrina=0.08,folk=0.07", "--bos-share", "0.3",
          "--style-only-share", "0.25", "--mode-only-share", "0.25", "--start-weight", "4", "--cond-lr-mult", "4",
          "--wd", "0.05", "--min-lr-frac", "0.05"]
SWEEP = {
    # stage 13 + more tokens than a CPU stage sees: the safe step
    "roomscore-satb-g1": ["--init-from", "roomscore-satb-13", "--lr", "3e-4", "--warmup", "100", "--batch", "32",
                          "--dropout", "0.1", "--seed", "101"],
    # the same with stronger dropout: train 0.292 against valid 0.337 says it overfits JSB
    "roomscore-satb-g2": ["--init-from", "roomscore-satb-13", "--lr", "3e-4", "--warmup", "100", "--batch", "32",
                          "--dropout", "0.2", "--seed", "102"],
    # today's size from scratch, in one schedule instead of stage 13's nine warm restarts
    "roomscore-satb-g3": ["--d", "192", "--layers", "4", "--heads", "4", "--ff", "768", "--lr", "1e-3", "--warmup",
                          "200", "--batch", "48", "--dropout", "0.15", "--seed", "103"],
    # deeper: 6 layers, 2.7M parameters (stage 8's 6 layers stepped about 1.5x as long)
    "roomscore-satb-g4": ["--d", "192", "--layers", "6", "--heads", "4", "--ff", "768", "--lr", "8e-4", "--warmup",
                          "200", "--batch", "48", "--dropout", "0.2", "--seed", "104"],
    # wider: d 256, 3.2M parameters (about 1.8x the multiply-adds a token: an estimate, not timed)
    "roomscore-satb-g5": ["--d", "256", "--layers", "4", "--heads", "4", "--ff", "1024", "--lr", "8e-4", "--warmup",
                          "200", "--batch", "48", "--dropout", "0.2", "--seed", "105"],
    # deeper with more dropout
    "roomscore-satb-g6": ["--d", "192", "--layers", "6", "--heads", "4", "--ff", "768", "--lr", "8e-4", "--warmup",
                          "200", "--batch", "48", "--dropout", "0.3", "--seed", "106"],
}
# The second call of the same session: g1 (valid 0.3344) went on at lower rates.
SWEEP2 = {
    "roomscore-satb-g7": ["--init-from", "roomscore-satb-g1", "--lr", "2e-4", "--warmup", "50", "--batch", "32",
                          "--dropout", "0.1", "--seed", "107"],
    "roomscore-satb-g8": ["--init-from", "roomscore-satb-g1", "--lr", "1e-4", "--warmup", "50", "--batch", "32",
                          "--dropout", "0.1", "--seed", "108"],
    "roomscore-satb-g9": ["--init-from", "roomscore-satb-g1", "--lr", "2e-4", "--warmup", "50", "--batch", "64",
                          "--dropout", "0.1", "--seed", "109"],
    "roomscore-satb-g10": ["--init-from", "roomscore-satb-g1", "--lr", "2e-4", "--warmup", "50", "--batch", "32",
                           "--dropout", "0.05", "--seed", "110"],
}
# Prepared in session 13 for the next lent GPU, not yet run: g7 grown (grow.py, which checks that
# each grown model scores g7's valid NLL exactly), trained on beside g7 itself, so that a gain can
# be told from more tokens. The step each would cost is in models/README ("Not done").
SWEEP3 = {
    # every block's MLP 768 -> 1024 units: the cheapest growth measured (ort plain p99 3.0-4.0 ms)
    "roomscore-satb-g11": ["--init-from", "roomscore-satb-g7-wide", "--lr", "2e-4", "--warmup", "50", "--batch", "32",
                           "--dropout", "0.1", "--seed", "111"],
    # a fifth block after block 1, at 3x the rate (it starts as the identity)
    "roomscore-satb-g12": ["--init-from", "roomscore-satb-g7-grown5", "--lr", "2e-4", "--new-lr-mult", "3",
                           "--warmup", "50", "--batch", "32", "--dropout", "0.1", "--seed", "112"],
    # g7 on, the same tokens: the control
    "roomscore-satb-g13": ["--init-from", "roomscore-satb-g7", "--lr", "2e-4", "--warmup", "50", "--batch", "32",
                           "--dropout", "0.1", "--seed", "113"],
}
# Session 15: the transposition mixture (models/roomscore-satb-mix.onnx, JSB valid 0.3167 against
# g7's 0.3268) taught to one network, so that one pass a token scores what three do. The teacher is
# g7 read over its input moved by the shifts named, each at the temperature levers.py fitted on
# valid for that set (+-1: 1.12, +-2: 1.10); its distributions take --distill-weight of the loss.
TEACH1 = ["--distill-from", "roomscore-satb-g7", "--distill-shifts=-1,0,1", "--distill-temperature", "1.12"]
TEACH2 = ["--distill-from", "roomscore-satb-g7", "--distill-shifts=-2,-1,0,1,2", "--distill-temperature", "1.10"]
SWEEP4 = {
    # CPU run d1's teacher and weight at twice its rate (d1 had 5e-5), for about seven times its tokens
    "roomscore-satb-d2": ["--init-from", "roomscore-satb-g7", "--lr", "1e-4", "--warmup", "50", "--batch", "32",
                          "--dropout", "0.1", "--seed", "202", "--distill-weight", "0.7"] + TEACH1,
    # the better teacher (five shifts: valid 0.3139), its distributions nearly all of the loss
    "roomscore-satb-d3": ["--init-from", "roomscore-satb-g7", "--lr", "1e-4", "--warmup", "50", "--batch", "32",
                          "--dropout", "0.1", "--seed", "203", "--distill-weight", "0.9"] + TEACH2,
    # the same at twice the rate
    "roomscore-satb-d4": ["--init-from", "roomscore-satb-g7", "--lr", "2e-4", "--warmup", "50", "--batch", "32",
                          "--dropout", "0.1", "--seed", "204", "--distill-weight", "0.9"] + TEACH2,
    # a wider student (MLP 768 -> 1024 units, grow.py): room for what the teacher knows
    "roomscore-satb-d5": ["--init-from", "roomscore-satb-g7-wide", "--lr", "2e-4", "--warmup", "50", "--batch", "32",
                          "--dropout", "0.1", "--seed", "205", "--distill-weight", "0.9"] + TEACH2,
    # a deeper student (a fifth block after block 1, at 3x the rate)
    "roomscore-satb-d6": ["--init-from", "roomscore-satb-g7-grown5", "--lr", "2e-4", "--new-lr-mult", "3",
                          "--warmup", "50", "--batch", "32", "--dropout", "0.1", "--seed", "206",
                          "--distill-weight", "0.9"] + TEACH2,
    # the control: g7 on the same tokens without a teacher, so that a gain can be told from more tokens
    "roomscore-satb-d7": ["--init-from", "roomscore-satb-g7", "--lr", "1e-4", "--warmup", "50", "--batch", "32",
                          "--dropout", "0.1", "--seed", "207"],
}

# Prepared in session 15 for the next lent GPU, not yet run: what SWEEP4 says is left, a deeper
# student taught for longer. Two runs share the GPU, so each sees about twice d6's tokens. The
# parents come from g7 by grow.py (--after 1; --after 1,3); a sixth block needs int8 weights to keep
# the step inside 5 ms (models/README, "Not done").
SWEEP5 = {
    # d6 again with the GPU shared by two
    "roomscore-satb-d8": ["--init-from", "roomscore-satb-g7-grown5", "--lr", "2e-4", "--new-lr-mult", "3",
                          "--warmup", "50", "--batch", "32", "--dropout", "0.1", "--seed", "208",
                          "--distill-weight", "0.9"] + TEACH2,
    # six blocks
    "roomscore-satb-d9": ["--init-from", "roomscore-satb-g7-grown6", "--lr", "2e-4", "--new-lr-mult", "3",
                          "--warmup", "50", "--batch", "32", "--dropout", "0.1", "--seed", "209",
                          "--distill-weight", "0.9"] + TEACH2,
}


def run(args):
    os.makedirs(args.out, exist_ok=True)
    sweep = {1: SWEEP, 2: SWEEP2, 3: SWEEP3, 4: SWEEP4, 5: SWEEP5}[args.set]
    for name in sweep:
        # train.py appends to its log, and a stopped run would pack an old summary as its own.
        old = [f for f in ("train.log", "summary.json", "checkpoints") if os.path.exists(os.path.join(RUNS, name, f))]
        if old and not args.overwrite:
            sys.exit(f"runs/{name} already holds {', '.join(old)}: pass --overwrite to clear them (on a lent GPU "
                     f"they are copies of the committed records)")
        for f in old:
            p = os.path.join(RUNS, name, f)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    procs = {}
    for name, extra in sweep.items():
        os.makedirs(os.path.join(RUNS, name), exist_ok=True)
        cmd = [sys.executable, os.path.join(HERE, "train.py"), "--name", name, "--device", args.device,
               "--threads", "2", "--budget-min", str(args.budget_min), "--eval-every-min",
               str(args.eval_every_min)] + RECIPE + extra
        out = open(os.path.join(RUNS, name, "stdout.txt"), "w")
        procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        print(f"started {name}: {' '.join(extra)}", flush=True)
    t0 = time.time()
    while any(p.poll() is None for p in procs.values()):
        if time.time() - t0 > args.deadline_s:
            for name, p in procs.items():
                if p.poll() is None:
                    print(f"deadline: stopping {name}", flush=True)
                    p.send_signal(signal.SIGTERM)
            for name, p in procs.items():
                try:
                    p.wait(timeout=args.grace_s)
                except subprocess.TimeoutExpired:
                    print(f"{name}: no end within {args.grace_s:.0f} s of SIGTERM, killed", flush=True)
                    p.kill()
                    p.wait()
            break
        time.sleep(5)
    for name, p in procs.items():
        print(f"{name}: exit {p.poll()}", flush=True)
        pack(name, args.out, [n for n in procs if n != name])


def pack(name, out, shared_with):
    from model import read_checkpoint

    run_dir = os.path.join(RUNS, name)
    best = os.path.join(run_dir, "checkpoints", "best.pt")
    if not os.path.exists(best):
        print(f"{name}: no best.pt", flush=True)
        return
    ck = read_checkpoint(best)
    meta = {k: ck.get(k) for k in RECORD}
    # Its tokens/s were measured with these runs on the same GPU.
    meta["shared_gpu_with"] = shared_with
    for fname in ("summary.json", "train.log", "stdout.txt"):
        p = os.path.join(run_dir, fname)
        text = open(p, errors="replace").read() if os.path.exists(p) else None
        # The logs' ends: stdout.txt is mostly progress bars. The summary must stay whole JSON.
        meta[fname] = text[-200_000:] if text is not None and fname != "summary.json" else text
    arrays = {f"w/{k}": v.detach().cpu().float().numpy() for k, v in ck["model"].items()}
    # UTF-8 bytes: numpy's own strings take 4 bytes a character, against the 16 MB a file may have.
    meta_bytes = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(os.path.join(out, f"{name}.npz"), meta=meta_bytes, **arrays)
    print(f"{name}: packed, best valid {ck.get('best'):.4f} at step {ck.get('step')}", flush=True)


def restore(args):
    import torch

    for f in sorted(os.listdir(args.dir)):
        if not f.endswith(".npz"):
            continue
        name = f[: -len(".npz")]
        z = np.load(os.path.join(args.dir, f))
        meta = json.loads(z["meta"].tobytes().decode())
        model = {k[2:]: torch.from_numpy(z[k].copy()) for k in z.files if k.startswith("w/")}
        run_dir = os.path.join(RUNS, name)
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        ck = {k: meta.get(k) for k in RECORD}
        ck["model"] = model
        torch.save(ck, os.path.join(run_dir, "checkpoints", "best.pt"))
        if meta.get("summary.json") is not None:
            summary = json.loads(meta["summary.json"])
            if isinstance(summary.get("machine"), dict):
                summary["machine"]["shared_gpu_with"] = meta.get("shared_gpu_with")
            meta["summary.json"] = json.dumps(summary, indent=1)
        for fname in ("summary.json", "train.log", "stdout.txt"):
            if meta.get(fname) is not None:
                open(os.path.join(run_dir, fname), "w").write(meta[fname])
        print(f"{name}: best valid {meta['best']:.4f} at step {meta['step']} ({meta['tokens']} tokens)")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--budget-min", type=float, default=6.5)
    r.add_argument("--eval-every-min", type=float, default=0.75)
    r.add_argument("--deadline-s", type=float, default=470)
    r.add_argument("--grace-s", type=float, default=45, help="after SIGTERM, how long a run may take to end")
    r.add_argument("--overwrite", action="store_true", help="clear the runs' existing records first")
    r.add_argument("--device", default="cuda")
    r.add_argument("--set", type=int, choices=(1, 2, 3, 4, 5), default=1,
                   help="SWEEP (1), SWEEP2 (2: on from g1's best weights), SWEEP3 (3: g7 grown, prepared), "
                        "SWEEP4 (4: the transposition mixture distilled), SWEEP5 (5: deeper students, prepared)")
    s = sub.add_parser("restore")
    s.add_argument("dir")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else restore(args)


if __name__ == "__main__":
    main()
