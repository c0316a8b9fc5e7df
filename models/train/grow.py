"""Deepens or widens a trained run: new transformer blocks go in between the parent's (--after),
or every block's MLP gets more units (--ff), each new part starting silent, so the grown model
computes exactly what its parent did and training only has to teach the new parts (and adjust the
old ones) instead of learning the music again.

    .venv/bin/python models/train/grow.py --from roomscore-satb-7 --name roomscore-satb-7-grown --after 1,3
    .venv/bin/python models/train/train.py --name roomscore-satb-8 --init-from roomscore-satb-7-grown \
        --new-lr-mult 3 ...

A new block's attention output projection and its MLP's second layer start at zero, so its residual
branch adds nothing; its other weights get the usual initialisation, so gradients reach them as soon
as those two layers move. The grown checkpoint is scored on JSB valid and must match the parent's
best before it is written.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import Composer, checkpoint_path, load_checkpoint  # noqa: E402
from train import score_split  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="parent", required=True, help="runs/<PARENT>/checkpoints/best.pt")
    ap.add_argument("--name", required=True, help="writes runs/<NAME>/checkpoints/best.pt and summary.json")
    ap.add_argument("--after", default="",
                    help="comma list of the parent's block indices that each get a new block after them")
    ap.add_argument("--ff", type=int, default=0,
                    help="widen every block's MLP to this many units (the new ones read the input at the usual "
                         "initialisation and write through zero weights, so they too start silent)")
    ap.add_argument("--ctx", type=int, default=512, help="context of the valid check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    pdir = os.path.join(HERE, "runs", args.parent)
    parent, pst = load_checkpoint(checkpoint_path(args.parent))
    pcfg = pst["cfg"]
    after = sorted({int(i) for i in args.after.split(",") if i.strip()})
    if after and (after[0] < 0 or after[-1] >= pcfg["layers"]):
        raise SystemExit(f"--after {args.after}: block indices must lie in 0..{pcfg['layers'] - 1}")
    ff = args.ff or pcfg["ff"]
    if ff < pcfg["ff"]:
        raise SystemExit(f"--ff {ff}: the parent's MLP has {pcfg['ff']} units; growing cannot shrink it")
    if not after and ff == pcfg["ff"]:
        raise SystemExit("nothing to grow: give --after and/or --ff")

    cfg = dict(pcfg, layers=pcfg["layers"] + len(after), ff=ff)
    grown = Composer(**cfg)

    # Order of the grown blocks: each parent block, then a new one where asked.
    order, new_idx = [], []
    for i in range(pcfg["layers"]):
        order.append(i)
        if i in after:
            new_idx.append(len(order))
            order.append(None)
    state = grown.state_dict()
    pstate = parent.state_dict()
    for k in pstate:
        if not k.startswith("blocks."):
            state[k] = pstate[k]
    for j, src in enumerate(order):
        if src is None:
            state[f"blocks.{j}.proj.weight"].zero_()
            state[f"blocks.{j}.proj.bias"].zero_()
            state[f"blocks.{j}.fc2.weight"].zero_()
            state[f"blocks.{j}.fc2.bias"].zero_()
            continue
        prefix = f"blocks.{src}."
        for name, t in pstate.items():
            if not name.startswith(prefix):
                continue
            key = f"blocks.{j}." + name[len(prefix):]
            if name.endswith(("fc1.weight", "fc1.bias")):
                state[key][: t.shape[0]] = t  # new units: fresh rows, zero bias (the init)
            elif name.endswith("fc2.weight"):
                state[key].zero_()
                state[key][:, : t.shape[1]] = t
            else:
                state[key] = t
    grown.load_state_dict(state)

    valid = os.path.join(DATA, "jsb_valid.npz")
    v_parent, n = score_split(parent, valid, args.ctx, desc="parent")
    v_grown, _ = score_split(grown, valid, args.ctx, desc="grown")
    print(f"JSB valid NLL at ctx {args.ctx}: parent {v_parent:.6f}, grown {v_grown:.6f} ({n} tokens)")
    if abs(v_parent - v_grown) > 1e-5:
        raise SystemExit("the grown model does not compute its parent's function; nothing written")

    psum_path = os.path.join(pdir, "summary.json")
    psum = json.load(open(psum_path)) if os.path.exists(psum_path) else {}
    psum["name"] = args.parent
    run = os.path.join(HERE, "runs", args.name)
    os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
    record = dict(steps=0, tokens=0, train_minutes=0.0, best_valid_nll=v_grown, cfg=cfg,
                  grown=dict(from_layers=pcfg["layers"], new_blocks=new_idx, after=after, from_ff=pcfg["ff"], ff=ff,
                             init="new blocks: attention out-projection and MLP fc2 zero (identity branch)"),
                  parent=psum)
    torch.save(dict(model=grown.state_dict(), cfg=cfg, step=0, tokens=0, best=v_grown, elapsed=0.0,
                    history=[], args=vars(args), parent=psum, new_blocks=new_idx),
               os.path.join(run, "checkpoints", "best.pt"))
    json.dump(record, open(os.path.join(run, "summary.json"), "w"), indent=1)
    print(f"wrote runs/{args.name}: {cfg['layers']} blocks, new ones at {new_idx}, MLP {ff} units")


if __name__ == "__main__":
    main()
