"""Give an exported graph (card format 2) the input `pos`, the rotary position of its first new
token, apart from `past_len`, which then only says how many cache slots are in use. Writes card
format 3.

    .venv/bin/python models/train/ring.py models/roomscore-satb-mix.onnx [--positions 2048]

export.py runs it as its last step; by hand it upgrades a graph exported before (the shipped
ones were, in session 25).

Why: a format-2 graph places new tokens at positions past_len .., so a full cache had to slide:
drop its oldest 64 positions and turn every kept key back, into another buffer. The step that
swapped that buffer in ran 1.3-2.0 ms slower than the steps around it (models/README.md), and it
came every 16 steps, so it set the step's p99. With `pos` the engine keeps one buffer as a ring:
each new token's keys and values overwrite the oldest slot, every token hears the 511 before it,
and no step moves the cache. Attention sums over the slots in use whatever their order, and
rotary scores depend on the difference of positions only, so a slot's place in the buffer does
not matter.

The graph looks its rotations up in tables of `max_positions` rows; this extends them (the rows
there stay bit for bit, the new ones are computed in float64), so the engine turns every key
back (in place, once) only when `pos` reaches the end of the table: at 2048 rows, first after
2,048 tokens, then every 1,537 (384 steps).

Checks, written into the card's `evaluation.verification.ring`: with pos = past_len the graph gives
the logits, keys and values of the graph it came from, over an empty cache and after 64 cached
tokens (0.0 apart); a pass at positions moved on by k gives the logits of the same pass at its own
positions, given a cache whose keys were turned by k (rotary is relative); and a cache whose
slots are rolled round, as a ring's are, gives the same logits.
"""
import argparse
import datetime
import hashlib
import json
import os
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate as E  # noqa: E402

FORMAT = 3


def fail(msg):
    sys.exit(f"ring.py: {msg}")


def rotary_tables(graph, max_pos, head_dim):
    """The two Constant nodes the positions index: (cos node, sin node), [max_pos, head_dim]
    each, cos duplicated across the halves, sin as [-sin, sin] (the layout export.py writes)."""
    found = {}
    for n in graph.node:
        if n.op_type != "Constant" or not n.attribute or n.attribute[0].name != "value":
            continue
        t = numpy_helper.to_array(n.attribute[0].t)
        if t.shape != (max_pos, head_dim) or t.dtype != np.float32:
            continue
        half = head_dim // 2
        if np.array_equal(t[:, :half], t[:, half:]):
            found["cos"] = n
        elif np.array_equal(t[:, :half], -t[:, half:]):
            found["sin"] = n
    if set(found) != {"cos", "sin"}:
        fail(f"no rotary tables of shape [{max_pos}, {head_dim}] in the graph")
    return found["cos"], found["sin"]


def extend_tables(cos_node, sin_node, rows, inv_freq):
    old = {}
    for name, node in (("cos", cos_node), ("sin", sin_node)):
        t = numpy_helper.to_array(node.attribute[0].t)
        old[name] = t
    n = old["cos"].shape[0]
    # The rows there must be the rotation card's rotary describes, or a key turned back by the
    # engine would not match what the graph computes.
    want = np.arange(n)[:, None] * inv_freq[None, :]
    half = len(inv_freq)
    err = max(np.abs(old["cos"][:, :half] - np.cos(want)).max(), np.abs(old["sin"][:, half:] - np.sin(want)).max())
    if err > 1e-4:
        fail(f"the rotary tables are not cos/sin of position * inv_freq (off by {err:.2e})")
    a = np.arange(n, rows)[:, None] * inv_freq[None, :]
    c, s = np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)
    new = {"cos": np.concatenate([old["cos"], np.concatenate([c, c], 1)]),
           "sin": np.concatenate([old["sin"], np.concatenate([-s, s], 1)])}
    for name, node in (("cos", cos_node), ("sin", sin_node)):
        node.attribute[0].t.CopyFrom(numpy_helper.from_array(new[name], node.attribute[0].t.name))
    return err


def add_pos(model, card):
    g = model.graph
    if any(i.name == "pos" for i in g.input):
        fail("the graph already takes pos")
    a = card["architecture"]
    cos_n, sin_n = rotary_tables(g, card["max_positions"], a["head_dim"])
    tables = {cos_n.output[0], sin_n.output[0]}
    # The positions: the Add of past_len and Range(T) whose sum indexes the tables.
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    adds = [n for n in consumers.get("past_len", []) if n.op_type == "Add"
            and any(c.op_type == "Gather" and c.input[0] in tables for c in consumers.get(n.output[0], []))]
    if len(adds) != 1:
        fail(f"expected one Add of past_len that indexes the rotary tables, found {len(adds)}")
    add = adds[0]
    add.input[list(add.input).index("past_len")] = "pos"
    at = [i.name for i in g.input].index("past_len") + 1
    g.input.insert(at, helper.make_tensor_value_info("pos", TensorProto.INT64, [1]))
    return cos_n, sin_n


def inv_freq(card):
    r = card["rotary"]
    half = card["architecture"]["head_dim"] // 2
    return r["base"] ** (-np.arange(half) / half)


def turn(k, by, inv):
    """Keys [..., head_dim] turned by `by` positions (rotate-half pairs)."""
    half = len(inv)
    c, s = np.cos(by * inv).astype(np.float32), np.sin(by * inv).astype(np.float32)
    x1, x2 = k[..., :half], k[..., half:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], -1)


def verify(src_path, dst_path, card):
    import common as C

    a = card["architecture"]
    heads = E.cache_heads(card)
    L, dh = a["layers"], a["head_dim"]
    old, new = E.session(src_path), E.session(dst_path)
    pieces = E.load_jsb("valid")
    tok, voi, _ = C.piece_sequence(pieces[0])
    T = 96
    tok, voi = np.asarray(tok[:T], np.int64)[None], np.asarray(voi[:T], np.int64)[None]
    rng = np.random.default_rng(0)
    cond = rng.random((1, T, C.COND_DIM)).astype(np.float32)
    names = [o.name for o in new.get_outputs()]

    def feed(tk, vc, cd, past_len, pos, pk, pv):
        f = dict(tokens=tk, voices=vc, cond=cd, past_len=np.array([past_len], np.int64))
        if pos is not None:
            f["pos"] = np.array([pos], np.int64)
        for i in range(L):
            f[f"past_k_{i}"], f[f"past_v_{i}"] = pk[i], pv[i]
        return f

    empty = [np.zeros((1, heads, 1, dh), np.float32)] * L
    r = 64
    first_old = old.run(names, feed(tok[:, :r], voi[:, :r], cond[:, :r], 0, None, empty, empty))
    first_new = new.run(names, feed(tok[:, :r], voi[:, :r], cond[:, :r], 0, 0, empty, empty))
    same = max(float(np.abs(x - y).max()) for x, y in zip(first_old, first_new))
    pk = [first_new[1 + i] for i in range(L)]
    pv = [first_new[1 + L + i] for i in range(L)]
    rest = (tok[:, r:], voi[:, r:], cond[:, r:])
    at_own = new.run(names, feed(*rest, r, r, pk, pv))
    # The rewired Add with a position other than 0: format 2 read it from past_len.
    at_old = old.run(names, feed(*rest, r, None, pk, pv))
    same = max(same, max(float(np.abs(x - y).max()) for x, y in zip(at_old, at_own)))
    inv = inv_freq(card)
    worst = 0.0
    for k in (1000, card["max_positions"] - T):
        moved = new.run(names, feed(*rest, r, r + k, [turn(x, k, inv) for x in pk], pv))
        worst = max(worst, float(np.abs(moved[0] - at_own[0]).max()))
    rolled = new.run(names, feed(*rest, r, r, [np.roll(x, 17, axis=2) for x in pk],
                                 [np.roll(x, 17, axis=2) for x in pv]))
    order = float(np.abs(rolled[0] - at_own[0]).max())
    return same, worst, order


def rewrite(onnx_path, positions=2048):
    """Rewrites the format-2 graph at `onnx_path` and its card in place (export.py calls this
    last)."""
    args = argparse.Namespace(onnx=onnx_path, positions=positions)
    card_path = os.path.splitext(args.onnx)[0] + ".json"
    card = json.load(open(card_path))
    if card["format_version"] != 2:
        fail(f"{card_path}: format_version {card['format_version']}, this rewrites format 2")
    if not card.get("rotary"):
        fail(f"{card_path}: no rotary section; the ring turns keys back by it")
    if args.positions <= card["max_positions"]:
        fail(f"--positions {args.positions}: the tables already have {card['max_positions']} rows")
    model = onnx.load(args.onnx)
    cos_n, sin_n = add_pos(model, card)
    table_err = extend_tables(cos_n, sin_n, args.positions, inv_freq(card))
    onnx.checker.check_model(model)
    tmp = args.onnx + ".ring.tmp"
    onnx.save(model, tmp)
    before_max = card["max_positions"]
    card["max_positions"] = args.positions
    same, moved, order = verify(args.onnx, tmp, card)
    print(f"pos = past_len against the graph before: {same:.1e}; moved on by k positions: {moved:.1e}; "
          f"slots rolled round: {order:.1e}")
    if same != 0.0 or moved > 1e-4 or order > 1e-4:
        os.remove(tmp)
        fail("the rewritten graph does not agree with the one it came from")
    data = open(tmp, "rb").read()
    ctx = card["context_length"]
    card.update(
        format_version=FORMAT,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        positions=(
            "rotary; the T new tokens take positions pos .. pos+T-1 and attend to the first past_len "
            "cache slots and to each other, causally. Keep pos+T <= max_positions (the rows of the "
            f"rotary tables) and past_len+T <= context_length ({ctx}, the trained length). The engine "
            f"keeps a ring of context_length - 1 slots: once full, each new token's keys and values "
            "overwrite the oldest slot's, so every token hears the context_length - 1 before it; "
            "when pos reaches max_positions it turns every cached key back by as many positions as "
            "it lowers pos (see rotary)"),
    )
    o = card["onnx"]
    names = [d["name"] for d in o["inputs"]]
    o["inputs"].insert(names.index("past_len") + 1, dict(name="pos", dtype="int64", shape=[1]))
    o["cache"] = (
        "one key and one value buffer per layer, [B, heads, capacity, head_dim], of which the first "
        "past_len slots are in use (the rest is masked, whatever it holds), in any order: "
        "past_k_0..L-1 then past_v_0..L-1 in; out, only the T new tokens' keys and values, "
        "new_k_0..L-1 then new_v_0..L-1, [B, heads, T, head_dim], which the caller writes into free "
        "slots or over the oldest")
    o["empty_cache"] = "past_len = 0 with a capacity of 1 (one masked position), pos = 0"
    o["rollback"] = ("put back the slots the taken-back tokens overwrote, lower past_len and pos, "
                     "and decode again")
    card["evaluation"]["verification"]["ring"] = dict(
        pos_equal_past_len_vs_format_2_max_abs=same,
        moved_positions_vs_own_logits_max_abs=moved,
        slots_rolled_vs_in_order_logits_max_abs=order,
        rotary_table_rows=[before_max, args.positions],
        rotary_table_vs_float64_max_abs=float(table_err),
        rewritten_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    # The graph and its card go in one after the other, each whole: a card never names a file
    # that is not there.
    with open(card_path + ".ring.tmp", "w") as f:
        json.dump(card, f, indent=1)
    os.replace(tmp, args.onnx)
    os.replace(card_path + ".ring.tmp", card_path)
    print(f"{args.onnx}: format {FORMAT}, pos input, rotary tables {before_max} -> {args.positions} rows")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx", help="a format-2 graph with its card beside it; both are rewritten")
    ap.add_argument("--positions", type=int, default=2048, help="rows of the rotary tables after")
    args = ap.parse_args()
    rewrite(args.onnx, args.positions)


if __name__ == "__main__":
    main()
