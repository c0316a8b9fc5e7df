"""Cheap levers on a trained checkpoint, scored on JSB valid by the eval protocol (PyTorch), before
spending a training stage on them:

    .venv/bin/python models/train/levers.py CKPT --ctx 192,256,384,512
        # the same weights read with other context lengths (rotary positions past the trained
        # length are extrapolated)
    .venv/bin/python models/train/levers.py CKPT --temperature 0.95,1.0,1.05
        # a logit temperature fitted on valid (1.0 = the model as exported)
    .venv/bin/python models/train/levers.py CKPT OTHER.pt [...] --average
        # the weights of several checkpoints averaged (stochastic weight averaging)
    .venv/bin/python models/train/levers.py CKPT --shifts="0;-1,0,1;-2,-1,0,1,2" --temperature 1.1,1.17
        # transposition mixtures (model.TransposeMix), each scored at each temperature (and at
        # each --ctx, if given)
    .venv/bin/python models/train/levers.py CKPT --no-style
        # the protocol's conditioning (style chorale, all else unknown) against all unknown, style
        # too: how well the model has learned the benchmark's own conditioning

Never pick a lever by the test split: these read valid only.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import train as T  # noqa: E402
from model import Composer, read_checkpoint  # noqa: E402

VALID = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "jsb_valid.npz")


def load(paths):
    cks = [read_checkpoint(p) for p in paths]
    state = {k: sum(ck["model"][k].float() for ck in cks) / len(cks) for k in cks[0]["model"]}
    model = Composer(**dict(cks[0]["cfg"], dropout=0.0))
    model.load_state_dict(state)
    model.eval()
    return model, cks[0]["args"].get("ctx", 384)


@torch.no_grad()
def valid_logits(model, ctx, cvec=None, **kw):
    """Each scored valid target's logits, windowed as the eval protocol does, under `cvec` (default:
    the protocol's conditioning); `kw` goes to the model (a TransposeMix's components=True gives
    [K, N, V] rather than [N, V])."""
    z = np.load(VALID)
    off = z["offsets"]
    cvec = torch.from_numpy(C.eval_cond() if cvec is None else cvec)
    logits, targets = [], []
    for i in range(len(off) - 1):
        tok, voi, _ = C.piece_sequence(z["tokens"][off[i] : off[i + 1]])
        for s, e, f in C.eval_windows(len(tok), ctx):
            x = torch.from_numpy(tok[s:e])[None]
            v = torch.from_numpy(voi[s:e])[None]
            pk, pv = model.empty_cache(1)
            lg, _, _ = model(x, v, cvec.expand(1, e - s, C.COND_DIM), pk, pv, **kw)
            logits.append(lg[0][..., f - s - 1 : e - s - 1, :])
            targets.append(torch.from_numpy(tok[f:e]))
    return torch.cat(logits, -2), torch.cat(targets)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--ctx", default=None, help="comma-separated context lengths (default: trained)")
    ap.add_argument("--temperature", default=None, help="comma-separated logit temperatures")
    ap.add_argument("--average", action="store_true", help="average the checkpoints' weights")
    ap.add_argument("--no-style", action="store_true",
                    help="score with the protocol's conditioning and with everything unknown, style too")
    ap.add_argument("--shifts", default=None,
                    help="semicolon-separated shift sets of transposition mixtures, e.g. \"0;-1,0,1\" (with "
                         "--temperature: each shift's logits divided by it before the mixture)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if len(args.checkpoints) > 1 and not args.average:
        ap.error("several checkpoints are only read together with --average")
    model, trained_ctx = load(args.checkpoints)
    print(f"{len(args.checkpoints)} checkpoint(s), trained context {trained_ctx}")
    if args.no_style:
        for name, cvec in [("style chorale (the protocol)", None), ("all unknown", np.zeros(C.COND_DIM, np.float32))]:
            logits, y = valid_logits(model, trained_ctx, cvec)
            print(f"{name}: valid {float(F.cross_entropy(logits, y)):.5f} ({len(y)} tokens)", flush=True)
        return
    if args.shifts:
        # Scored as export.py fits the mixture's temperature: every shift's logits once, then each
        # temperature on them.
        import export as X
        from model import TransposeMix

        temps = [float(x) for x in (args.temperature or "1.0").split(",")]
        ctxs = [int(x) for x in args.ctx.split(",")] if args.ctx else [trained_ctx]
        for spec in args.shifts.split(";"):
            shifts = [int(x) for x in spec.split(",")]
            mix = TransposeMix(model, shifts).eval()
            for ctx in ctxs:
                comps, y = X.valid_components(mix, ctx)
                for t in temps:
                    nll = X.mixture_nll(comps, y, t)
                    print(f"shifts {spec} context {ctx} temperature {t}: valid {nll:.5f} ({len(y)} tokens)",
                          flush=True)
        return
    if args.temperature:
        logits, y = valid_logits(model, trained_ctx)
        for t in (float(x) for x in args.temperature.split(",")):
            print(f"temperature {t}: valid {float(F.cross_entropy(logits / t, y)):.5f} ({len(y)} tokens)")
        return
    for ctx in [int(x) for x in args.ctx.split(",")] if args.ctx else [trained_ctx]:
        nll, n = T.score_split(model, VALID, ctx, batch=8)
        print(f"context {ctx}: valid {nll:.5f} ({n} tokens)", flush=True)


if __name__ == "__main__":
    main()
