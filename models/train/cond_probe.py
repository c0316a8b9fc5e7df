"""Does the model read its key conditioning? Teacher-forced NLL on the opening tokens of JSB valid
pieces (where the context does not yet know the key), with the conditioning measured from the piece
itself (style chorale, everything known), then with one part of the key changed:

    .venv/bin/python models/train/cond_probe.py models/train/runs/NAME/checkpoints/best.pt

Prints the mean NLL per token for: the true conditioning; the mode flipped (tonic kept); the tonic
moved a tritone; mode and tonic unknown; the tonic unknown (the mode alone), as is and flipped. A model
that reads the mode scores the flipped mode worse; the last pair asks whether it reads the mode
without a tonic beside it.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import evaluate as E  # noqa: E402
from model import load_checkpoint  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--tokens", type=int, default=128, help="opening tokens scored per piece")
    ap.add_argument("--pieces", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, ck = load_checkpoint(args.checkpoint)

    def variant(d, r, m, k, how):
        if how == "mode flipped":
            m = np.where(m >= 0, 1 - m, m)
        elif how == "tonic moved a tritone":
            k = np.where(k >= 0, (k + 6) % 12, k)
        elif how == "mode and tonic unknown":
            m, k = np.full_like(m, -1), np.full_like(k, -1)
        elif how == "tonic unknown":
            k = np.full_like(k, -1)
        elif how == "tonic unknown, mode flipped":
            m, k = np.where(m >= 0, 1 - m, m), np.full_like(k, -1)
        # a model from before the key profile takes the first columns alone
        return C.cond_arrays(d, r, m, 0, tonic=k)[:, : ck["cfg"]["cond_dim"]]

    hows = ["true", "mode flipped", "tonic moved a tritone", "mode and tonic unknown", "tonic unknown",
            "tonic unknown, mode flipped"]
    totals = {h: [0.0, 0] for h in hows}
    for grid in E.load_jsb("valid")[: args.pieces]:
        tok, voi, step = C.piece_sequence(grid)
        n = min(args.tokens + 1, len(tok))
        d, r, m, k = C.features(C.tokens_to_pitch(grid))
        for how in hows:
            cond = variant(d[step[:n]], r[step[:n]], m[step[:n]], k[step[:n]], how)
            x = torch.from_numpy(tok[None, : n - 1])
            v = torch.from_numpy(voi[None, : n - 1])
            c = torch.from_numpy(cond[None, : n - 1].astype(np.float32))
            pk, pv = model.empty_cache(1)
            with torch.no_grad():
                lg, _, _ = model(x, v, c, pk, pv)
            y = torch.from_numpy(tok[1:n])
            totals[how][0] += float(F.cross_entropy(lg[0], y, reduction="sum"))
            totals[how][1] += n - 1
    for how in hows:
        s, n = totals[how]
        print(f"{how:<28} {s / n:.4f} nats/token ({n} tokens)")


if __name__ == "__main__":
    main()
