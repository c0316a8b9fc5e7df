"""Evaluate an exported roomscore model (ONNX, through onnxruntime) on the JSB Chorales splits.

    .venv/bin/python models/train/evaluate.py models/roomscore-satb.onnx [--splits test,valid]

Protocol (also in the model card): each piece is the sequence BOS + raster-scanned S,A,T,B tokens;
every token after BOS is scored once, teacher-forced, as -log p (natural log) under the model's
softmax; the figure is total nats / number of scored tokens over the whole split. Conditioning is
unknown (density/register/mode flags 0) with style = chorale one-hot at every position. Pieces
longer than the context are scored in windows (common.eval_windows): start 0, ctx/2, ctx, ... while
start+ctx < L, plus a last window [L-ctx, L); each window is a fresh full pass (P = 0, no BOS
inserted, positions from 0); a target is scored by the first window containing it.
"""
import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
JSB = os.path.abspath(os.path.join(HERE, "..", "..", "..", "shared", "data", "jsb-chorales", "Jsb16thSeparated.json"))


def load_jsb(split):
    jsb = json.load(open(JSB))
    out = []
    for piece in jsb[split]:
        g = np.array([[int(round(x)) for x in step] for step in piece], np.int64)
        out.append(C.grid_to_tokens(g))
    return out


def session(path, threads=1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def cache_heads(card):
    """Heads of the graph's cache: a transposition mixture folds its shifts' caches into the head
    axis (the card's transposition_mix.cache_heads)."""
    return (card.get("transposition_mix") or {}).get("cache_heads", card["architecture"]["heads"])


def empty_past(layers, heads, dh):
    z = np.zeros((layers, 1, heads, 0, dh), np.float32)
    return z, z.copy()


def run(sess, tokens, voices, cond, past_k, past_v, cache=True, past_len=None):
    """One pass through the graph -> (logits, present_k, present_v), the cache packed [L,1,H,P,dh]
    here whichever way the graph takes it. The current graph takes past_len and a cache of any
    capacity per layer (past_k_0..L-1, past_v_0..L-1) and gives the new tokens' keys and values
    (new_k_*, new_v_*), which are appended here (past_len below the capacity: the rest of the cache is
    ignored); earlier graphs took the cache as it was, packed
    (past_k, past_v) or per layer, and gave it back whole (present_*). cache=False returns
    (logits, None, None)."""
    names = {i.name for i in sess.get_inputs()}
    feed = dict(tokens=tokens, voices=voices, cond=cond)
    if "past_k" in names:
        feed.update(past_k=past_k, past_v=past_v)
        outs = ["logits", "present_k", "present_v"] if cache else ["logits"]
        r = sess.run(outs, feed)
        return (r[0], r[1], r[2]) if cache else (r[0], None, None)
    L = past_k.shape[0]
    P = past_k.shape[3] if past_len is None else past_len
    appends = "past_len" in names
    if appends:
        feed["past_len"] = np.array([P], np.int64)
        if "pos" in names:
            # Card format 3: the rotary position of the first new token, apart from the slots in
            # use; a cache grown from position 0 has them equal.
            feed["pos"] = np.array([P], np.int64)
        if past_k.shape[3] == 0:
            # One masked position: a zero-size cache would be the only zero-size tensor in the graph.
            past_k = past_v = np.zeros(past_k.shape[:3] + (1,) + past_k.shape[4:], np.float32)
    for i in range(L):
        feed[f"past_k_{i}"] = np.ascontiguousarray(past_k[i])
        feed[f"past_v_{i}"] = np.ascontiguousarray(past_v[i])
    kind = "new" if appends else "present"
    outs = ["logits"] + ([f"{kind}_k_{i}" for i in range(L)] + [f"{kind}_v_{i}" for i in range(L)] if cache else [])
    r = sess.run(outs, feed)
    if not cache:
        return r[0], None, None
    k, v = np.stack(r[1:1 + L]), np.stack(r[1 + L:])
    if appends:
        k = np.concatenate([past_k[:, :, :, :P], k], axis=3)
        v = np.concatenate([past_v[:, :, :, :P], v], axis=3)
    return r[0], k, v


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def score_piece(sess, tok_grid, ctx, dims, cvec=None):
    """Returns (sum of nats, count, per-window list) for one piece by the protocol."""
    L_, H, Dh = dims
    tok, voi, _ = C.piece_sequence(tok_grid)
    cvec = C.eval_cond() if cvec is None else cvec
    total, count, wins = 0.0, 0, []
    for s, e, f in C.eval_windows(len(tok), ctx):
        pk, pv = empty_past(L_, H, Dh)
        T = e - s
        cond = np.broadcast_to(cvec, (1, T, C.COND_DIM)).astype(np.float32)
        logits = run(sess, tok[None, s:e], voi[None, s:e], cond, pk, pv, cache=False)[0][0]
        lp = log_softmax(logits.astype(np.float64))
        j = np.arange(f, e)
        nll = -lp[j - s - 1, tok[j]]
        total += float(nll.sum())
        count += len(j)
        wins.append([int(s), int(e), int(f)])
    return total, count, wins


def score_piece_ring(sess, tok_grid, card, cvec=None):
    """(sum of nats, count) for one piece decoded as the engine decodes it (card format 3): a token
    a pass into a ring of context - 1 slots, each token overwriting the oldest once it is full,
    the keys turned back when the positions reach the graph's rotation tables. Every token after
    BOS is scored once, as by the protocol, which scores fresh windows instead."""
    import ring

    a = card["architecture"]
    heads = cache_heads(card)
    L, dh, slots, top = a["layers"], a["head_dim"], card["context_length"] - 1, card["max_positions"]
    inv = ring.inv_freq(card)
    tok, voi, _ = C.piece_sequence(tok_grid)
    cvec = C.eval_cond() if cvec is None else cvec
    cond = np.asarray(cvec, np.float32).reshape(1, 1, -1)
    pk = [np.zeros((1, heads, slots, dh), np.float32) for _ in range(L)]
    pv = [np.zeros((1, heads, slots, dh), np.float32) for _ in range(L)]
    names = ["logits"] + [f"new_k_{i}" for i in range(L)] + [f"new_v_{i}" for i in range(L)]
    total, pos = 0.0, 0
    for i in range(len(tok) - 1):
        used = min(i, slots)
        if pos + 1 > top:
            by = pos - used
            pk = [ring.turn(k, -by, inv) for k in pk]
            pos -= by
        feed = dict(tokens=tok[None, i:i + 1], voices=voi[None, i:i + 1], cond=cond,
                    past_len=np.array([used], np.int64), pos=np.array([pos], np.int64))
        for j in range(L):
            feed[f"past_k_{j}"], feed[f"past_v_{j}"] = pk[j], pv[j]
        out = sess.run(names, feed)
        total -= float(log_softmax(out[0][0, 0].astype(np.float64))[tok[i + 1]])
        slot = i % slots
        for j in range(L):
            pk[j][:, :, slot] = out[1 + j][:, :, 0]
            pv[j][:, :, slot] = out[1 + L + j][:, :, 0]
        pos += 1
    return total, len(tok) - 1


def score_split(sess, pieces, ctx, dims, desc="eval"):
    total, count = 0.0, 0
    for g in tqdm(pieces, desc=desc, leave=False):
        t, c, _ = score_piece(sess, g, ctx, dims)
        total += t
        count += c
    return total / count, count


def baselines(train, test):
    """Per-voice unigram (add-1 over the vocabulary) and per-voice first-order Markov
    (interpolated: p(x|prev) = (c(prev,x) + 1 * p_uni(x)) / (c(prev) + 1); first step: unigram),
    counted on `train`, scored on `test` over the same tokens the model scores (the BOS is not scored)."""
    V = C.VOCAB_SIZE
    uni = np.ones((4, V))
    big = np.zeros((4, V, V))
    for g in train:
        g = g.astype(np.int64)
        for v in range(4):
            np.add.at(uni[v], g[:, v], 1)
            np.add.at(big[v], (g[:-1, v], g[1:, v]), 1)
    puni = uni / uni.sum(1, keepdims=True)
    nu, nm, n = 0.0, 0.0, 0
    for g in test:
        g = g.astype(np.int64)
        for v in range(4):
            x = g[:, v]
            nu -= np.log(puni[v, x]).sum()
            pm = (big[v, x[:-1], x[1:]] + puni[v, x[1:]]) / (big[v, x[:-1]].sum(1) + 1)
            nm -= np.log(puni[v, x[0]]) + np.log(pm).sum()
            n += len(x)
    return nu / n, nm / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", nargs="?", default=os.path.join(HERE, "..", "roomscore-satb.onnx"))
    ap.add_argument("--splits", default="test,valid")
    ap.add_argument("--ring", action="store_true",
                    help="also score each split as the engine decodes (card format 3): a token a pass "
                         "into a ring of context - 1 slots; slower, and not the benchmark's protocol")
    args = ap.parse_args()
    card = json.load(open(os.path.splitext(args.onnx)[0] + ".json"))
    ctx = card["context_length"]
    a = card["architecture"]
    heads = cache_heads(card)
    dims = (a["layers"], heads, a["head_dim"])
    sess = session(args.onnx)
    for split in args.splits.split(","):
        nll, n = score_split(sess, load_jsb(split), ctx, dims, desc=split)
        print(f"JSB {split}: mean NLL {nll:.4f} nats/token over {n} tokens")
        if args.ring:
            total, count = 0.0, 0
            for g in tqdm(load_jsb(split), desc=f"{split} (ring)", leave=False):
                t, c = score_piece_ring(sess, g, card)
                total, count = total + t, count + c
            print(f"JSB {split}, decoded a token a pass into a ring of {ctx - 1} slots: mean NLL "
                  f"{total / count:.4f} nats/token over {count} tokens")
    bu, bm = baselines(load_jsb("train"), load_jsb("test"))
    print(f"baselines on test (counted on train): per-voice unigram {bu:.3f}, per-voice Markov {bm:.3f}")


if __name__ == "__main__":
    main()
