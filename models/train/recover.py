"""Rebuilds a run's best checkpoint from the model it exported, so a later stage can start from it
on a machine that never held the run's (git-ignored) checkpoints.

    .venv/bin/python models/train/recover.py models/roomscore-satb.onnx --run roomscore-satb-2

Parameters keep their own names, under the export wrapper's "model." prefix since session 9. In the
earlier graphs torch exported each Linear's weight transposed under a generated name
(onnx::MatMul_N); such a weight is named here by the bias its output is added to.
The rebuilt model is checked against the ONNX file before anything is written.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import evaluate as E  # noqa: E402
from model import Composer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def own(name):
    """A parameter's name in the model, from its name in the graph."""
    return name[len("model."):] if name.startswith("model.") else name


def state_dict_from_onnx(path, model):
    graph = onnx.load(path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    users = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    found = {}
    for n in graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits or not n.input[1].startswith("onnx::"):
            continue
        biases = [i for u in users.get(n.output[0], []) if u.op_type == "Add"
                  for i in u.input if i in inits and i.endswith(".bias")]
        if len(biases) != 1:
            raise SystemExit(f"{path}: cannot tell which layer {n.input[1]} belongs to (biases {biases})")
        found[own(biases[0][: -len(".bias")] + ".weight")] = inits[n.input[1]].T
    want = model.state_dict()
    for name in want:
        for stored in (name, "model." + name):
            if stored in inits:
                found.setdefault(name, inits[stored])
    missing = [k for k in want if k not in found]
    if missing:
        raise SystemExit(f"{path}: no weights found for {missing}")
    bad = [k for k in want if tuple(want[k].shape) != found[k].shape]
    if bad:
        raise SystemExit(f"{path}: shapes differ for {bad}")
    return {k: torch.tensor(np.ascontiguousarray(found[k])) for k in want}


def unscaled(state, model):
    """`state` with model.prescaled undone: each block's query weights and bias divided by
    1/sqrt(head_dim) again."""
    state = {k: v.clone() for k, v in state.items()}
    for i, blk in enumerate(model.blocks):
        s = math.sqrt(blk.dh)
        for part in ("weight", "bias"):
            state[f"blocks.{i}.qkv.{part}"][: blk.d] *= s
    return state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", help="the exported model (its .json card beside it)")
    ap.add_argument("--run", required=True, help="write runs/<RUN>/checkpoints/best.pt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    card = json.load(open(os.path.splitext(args.onnx)[0] + ".json"))
    a = card["architecture"]
    cfg = dict(vocab=card["vocabulary"]["size"], n_voice=C.N_VOICE_IDS, cond_dim=card["conditioning"]["dim"],
               d=a["d_model"], layers=a["layers"], heads=a["heads"], ff=a["ff"], max_pos=1024, dropout=0.1)
    model = Composer(**cfg)
    stored = state_dict_from_onnx(args.onnx, model)
    model.eval()

    # The first JSB valid piece, full pass: the rebuilt model must give the ONNX file's logits.
    tok, voi, step = C.piece_sequence(E.load_jsb("valid")[0])
    tok, voi = tok[: card["context_length"]], voi[: card["context_length"]]
    cond = np.broadcast_to(C.eval_cond(), (len(tok), C.COND_DIM)).astype(np.float32)[None]
    L, H, Dh = a["layers"], a["heads"], a["head_dim"]
    pk, pv = E.empty_past(L, H, Dh)
    sess = E.session(args.onnx)
    want = E.run(sess, tok[None], voi[None], cond, pk, pv, cache=False)[0]
    # Graphs exported since session 16 carry attention's scale in the query weights
    # (model.prescaled); the card does not say which kind a file is, so both readings are tried
    # and only one that reproduces the file is kept.
    for how, weights in (("as stored", stored), ("query scale taken out", unscaled(stored, model))):
        model.load_state_dict(weights)
        with torch.no_grad():
            got = model(torch.tensor(tok[None]), torch.tensor(voi[None]), torch.tensor(cond),
                        torch.tensor(pk), torch.tensor(pv))[0].numpy()
        diff = float(np.abs(got - want).max())
        print(f"rebuilt from {args.onnx} ({how}): logits differ from the ONNX file's by at most {diff:.2e}")
        if diff <= 1e-4:
            break
    else:
        raise SystemExit("the rebuilt model does not reproduce the ONNX file")

    out = os.path.join(HERE, "runs", args.run, "checkpoints", "best.pt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    summary = os.path.join(HERE, "runs", args.run, "summary.json")
    s = json.load(open(summary)) if os.path.exists(summary) else {}
    best = min(s.get("history", []), key=lambda h: h["valid_nll"], default={})
    torch.save(dict(model=model.state_dict(), cfg=s.get("cfg", cfg), args=s.get("args", dict(ctx=card["context_length"])),
                    step=best.get("step", s.get("steps")), tokens=best.get("tokens", s.get("tokens")),
                    best=s.get("best_valid_nll"), recovered_from=os.path.basename(args.onnx)), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
