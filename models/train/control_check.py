"""Quick Python check that the conditioning steers the model (the engine's `roomscore model control`
is the reference measurement). Samples with the KV cache through onnxruntime, sweeping one attribute
at a time (others unknown, style chorale), and measures the generated grid with the same feature code
as the training data (common.features). Prints Spearman's rho between asked and measured.

    .venv/bin/python models/train/control_check.py models/roomscore-satb.onnx --steps 64 --reps 2
    .venv/bin/python models/train/control_check.py models/train/runs/NAME/checkpoints/last.pt --only mode
        # a checkpoint in training, exported to a temporary ONNX file first
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import evaluate as E  # noqa: E402


def generate(sess, dims, cvec, steps, rng, temperature=1.0, top_p=0.95, max_hold=0, guidance=1.0):
    L_, H, Dh = dims
    pk, pv = E.empty_past(L_, H, Dh)
    uk, uv = E.empty_past(L_, H, Dh)  # the unconditional pass's cache (guidance only)
    uncond1 = np.zeros((1, 1, len(cvec)), np.float32)
    tok = np.array([[C.BOS]], np.int64)
    voi = np.array([[C.VOICE_START]], np.int64)
    out = []
    cond1 = cvec[None, None, :].astype(np.float32)
    for _ in range(steps * 4):
        lg, pk, pv = E.run(sess, tok, voi, cond1, pk, pv)
        x = lg[0, -1].astype(np.float64)
        if guidance != 1.0:
            # classifier-free guidance: uncond + w (cond - uncond); the all-unknown vector is the
            # unconditional model the condition dropout trained
            lu, uk, uv = E.run(sess, tok, voi, uncond1, uk, uv)
            xu = lu[0, -1].astype(np.float64)
            x = xu + guidance * (x - xu)
        x = x / temperature
        x[C.BOS] = -np.inf
        v = len(out) % 4  # the voice of the token about to be sampled (S, A, T, B, S, ...)
        # As the engine's max_hold_beats: a voice may not repeat its token more than max_hold steps.
        held = 0
        while max_hold and len(out) - 4 * (held + 1) >= 0 and out[len(out) - 4 * (held + 1)] == out[len(out) - 4]:
            held += 1
        if max_hold and held >= max_hold and np.isfinite(x).sum() > 1:
            x[out[-4]] = -np.inf
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        q /= q.sum()
        t = int(rng.choice(len(q), p=q))
        out.append(t)
        tok = np.array([[t]], np.int64)
        voi = np.array([[v]], np.int64)  # voices[i] is the voice of tokens[i] itself
    return np.array(out).reshape(steps, 4)


def ranks(x):
    """Ranks from 0, tied values sharing the mean of their ranks (as scipy's rankdata): the sweep
    asks each value many times, and ranking those ties by order would rank noise."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a, b):
    """Spearman's rho: Pearson's correlation of the ranks."""
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "roomscore-satb.onnx"),
                    help="an .onnx file with its card beside it, or a training checkpoint (.pt)")
    ap.add_argument("--only", choices=["sweeps", "mode"], default=None, help="run one half of the check")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight; 1 = none")
    ap.add_argument("--max-hold-beats", type=float, default=0.0, help="as the scene setting; 0 = no limit")
    args = ap.parse_args()
    if args.onnx.endswith(".pt"):
        from export import export
        from model import load_checkpoint

        model, _ = load_checkpoint(args.onnx)
        path = os.path.join(tempfile.mkdtemp(), "check.onnx")
        export(model, path)
        dims = (model.layers, model.heads, model.dh)
        sess = E.session(path)
    else:
        card = json.load(open(os.path.splitext(args.onnx)[0] + ".json"))
        dims = (card["architecture"]["layers"], card["architecture"]["heads"], card["architecture"]["head_dim"])
        sess = E.session(args.onnx)
    rng = np.random.default_rng(args.seed)
    max_hold = int(round(max(args.max_hold_beats, 0.0) * C.STEPS_PER_BEAT))  # as gen::steps_in
    res = {}

    def sample(cvec):
        return C.tokens_to_pitch(generate(sess, dims, cvec, args.steps, rng, max_hold=max_hold,
                                          guidance=args.guidance, temperature=args.temperature))

    sweeps = (("density", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), ("register", [54.0, 58.0, 62.0, 66.0, 70.0]))
    for attr, values in sweeps if args.only != "mode" else ():
        asked, got = [], []
        for val in values:
            for _ in range(args.reps):
                cvec = np.array(C.cond_vector(style="chorale", **{attr: val}), np.float32)
                g = sample(cvec)
                d, r, m, _ = C.features(g)
                meas = float(np.mean(d)) if attr == "density" else float(np.nanmean(r))
                asked.append(val)
                got.append(meas)
        res[attr] = dict(rho=round(spearman(np.array(asked), np.array(got)), 3),
                         pairs=[[a, round(b, 2)] for a, b in zip(asked, got)])
        print(attr, res[attr])
    asks = (("key unknown", [None] * (args.reps * 2)), ("with tonic", [(i * 7) % 12 for i in range(args.reps * 2)]))
    for label, tonics in asks if args.only != "sweeps" else ():
        hits, keys, n = 0, 0, 0
        per_mode = {}
        for mode in (1, 0):
            before = hits
            for tonic in tonics:
                cvec = np.array(C.cond_vector(style="chorale", mode=mode, tonic=tonic), np.float32)
                g = sample(cvec)
                hist = np.zeros(12)
                for p in g[g >= 0]:
                    hist[p % 12] += 1
                heard_mode, heard_tonic = C._ks_key(hist)
                hits += int(heard_mode == mode)
                keys += int(heard_mode == mode and tonic is not None and heard_tonic == tonic)
                n += 1
            per_mode["major" if mode else "minor"] = f"{hits - before}/{len(tonics)}"
        res[label] = dict(mode_agreement=round(hits / n, 3), key_agreement=round(keys / n, 3), n=n, **per_mode)
        print("mode", label, res[label])


if __name__ == "__main__":
    main()
