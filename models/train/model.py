"""roomscore's composer: a small decoder-only transformer over S/A/T/B raster tokens.

Inputs beside every token: its voice id (0..3 = S,A,T,B, 4 = start) and a float conditioning
vector. Rotary positions; the key/value cache is an explicit input and the new tokens' keys and
values an output (`Decoder`), so the same graph does a full pass (nothing cached) and incremental
decoding. Only simple ops are used (MatMul/Gemm, Softmax, LayerNormalization, Concat, Slice,
Gather, Tanh, elementwise) so it exports cleanly to ONNX opset 17 and runs under onnxruntime and
tract. sin/cos tables and the position index are constants.
"""
import copy
import math
import os

import torch
import torch.nn as nn

import common as C

RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")
ROPE_BASE = 10000.0  # rotary: dims i and i + dh/2 turn by position * ROPE_BASE ** (-i / (dh/2)); in the card


class Block(nn.Module):
    def __init__(self, d, h, ff, dropout):
        super().__init__()
        self.d = d
        self.h = h
        self.dh = d // h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, batch, rope, bias, past_k, past_v):
        # Training and the PyTorch reference; the ONNX graph runs `decode`, the same arithmetic
        # on one sequence. x [B*T, d], the sequences one after another; rope = (cos, signed sin,
        # swap) for the T new positions; bias [T, P+T]; past_k/v [B,H,P,dh].
        q, k, v = self.attention_inputs(x, batch, rope)
        k_all = torch.cat([past_k, k], dim=2)
        v_all = torch.cat([past_v, v], dim=2)
        att = torch.matmul(q, k_all.transpose(-1, -2)) * (1.0 / math.sqrt(self.dh)) + bias
        att = torch.softmax(att, dim=-1)
        att = self.drop(att)
        o = torch.matmul(att, v_all).transpose(1, 2).reshape(-1, self.d)
        return self.mlp(x + self.drop(self.proj(o))), k_all, v_all

    def attention_inputs(self, x, batch, rope):
        """q, k, v [B,H,T,dh] of rows x [B*T, d], q and k rotated to their positions."""
        cos, sin, swap = rope
        y = self.ln1(x)
        qkv = self.qkv(y).reshape(batch, -1, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)  # [3,B,H,T,dh]
        # q and k rotated together: x * cos + swap_halves(x) * [-sin, sin] is the rotation of
        # dims i and i + dh/2 by the position's angle, in four nodes for both.
        qk = qkv[:2]
        qk = qk * cos + torch.matmul(qk, swap) * sin
        return qk[0], qk[1], qkv[2]

    def mlp(self, x):
        """The residual MLP half of the block (dropout is off in the exported graph)."""
        y = self.fc1(self.ln2(x))
        y = 0.5 * y * (1.0 + torch.tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))  # GELU (tanh)
        return x + self.drop(self.fc2(y))

    def decode(self, x, batch, rope, bias_past, bias_new, past_k, past_v):
        """The exported graph's block: x [B*T, d], the sequences one after another; past_k/v
        [B,H,C,dh], a cache of capacity C whose first past_len positions hold keys and values
        (bias_past [T, C] masks the rest); bias_new [T, T] is causal. Returns x and only the new
        tokens' keys and values [B,H,T,dh]: the caller writes them into its cache in place. A
        graph that concatenated past and new and gave the whole cache back copied it twice per
        token, which at full context was most of a token's time. The batch is guidance's pair
        (conditioned and unconditional, same tokens and positions), one pass for both."""
        # Rows stay 2-D so each Linear exports as one Gemm, and reshapes take -1 rather than
        # sizes read from the input (five nodes more each): much of a step is per-node overhead.
        # q arrives scaled by 1/sqrt(dh): Decoder folds it into the query weights.
        q, k, v = self.attention_inputs(x, batch, rope)
        att = torch.cat([torch.matmul(q, past_k.transpose(-1, -2)) + bias_past,
                         torch.matmul(q, k.transpose(-1, -2)) + bias_new], -1)
        att = torch.softmax(att, dim=-1)
        cap = past_k.shape[2]
        o = torch.matmul(att[..., :cap], past_v) + torch.matmul(att[..., cap:], v)
        return self.mlp(x + self.proj(o.transpose(1, 2).reshape(-1, self.d))), k, v


class Composer(nn.Module):
    def __init__(self, vocab, n_voice, cond_dim, d=256, layers=4, heads=4, ff=1024, max_pos=1024, dropout=0.1):
        super().__init__()
        self.cfg = dict(
            vocab=vocab, n_voice=n_voice, cond_dim=cond_dim, d=d, layers=layers, heads=heads, ff=ff,
            max_pos=max_pos, dropout=dropout,
        )
        self.layers = layers
        self.heads = heads
        self.dh = d // heads
        self.tok = nn.Embedding(vocab, d)
        self.voice = nn.Embedding(n_voice, d)
        self.cond = nn.Linear(cond_dim, d)
        self.blocks = nn.ModuleList([Block(d, heads, ff, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.drop = nn.Dropout(dropout)
        half = self.dh // 2
        inv = 1.0 / (ROPE_BASE ** (torch.arange(half, dtype=torch.float32) / half))
        ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = torch.cos(ang), torch.sin(ang)
        self.register_buffer("cos_t", torch.cat([cos, cos], -1), persistent=False)
        self.register_buffer("sin_t", torch.cat([-sin, sin], -1), persistent=False)
        swap = torch.zeros(self.dh, self.dh)
        swap[torch.arange(half) + half, torch.arange(half)] = 1.0
        swap[torch.arange(half), torch.arange(half) + half] = 1.0
        self.register_buffer("swap", swap, persistent=False)
        self.register_buffer("pos_t", torch.arange(max_pos, dtype=torch.float32), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def empty_cache(self, batch=1):
        z = torch.zeros(self.layers, batch, self.heads, 0, self.dh, device=self.cos_t.device)
        return z, z.clone()

    def forward(self, tokens, voices, cond, past_k, past_v):
        """tokens/voices int64 [B,T]; cond float [B,T,C]; past_k/v [L,B,H,P,dh].
        Returns logits [B,T,V], present_k/v [L,B,H,P+T,dh]. Positions run P .. P+T-1."""
        T = tokens.shape[1]
        P = past_k.shape[3]
        batch = tokens.shape[0]
        d = self.cfg["d"]
        x = (self.tok(tokens) + self.voice(voices) + self.cond(cond)).reshape(-1, d)
        x = self.drop(x)
        rope = (self.cos_t[P : P + T], self.sin_t[P : P + T], self.swap)
        qpos = self.pos_t[P : P + T]
        kpos = self.pos_t[: P + T]
        # causal bias: 0 where key pos <= query pos, -1e9 * (k - q) (<= -1e9) otherwise
        bias = torch.clamp(kpos.unsqueeze(0) - qpos.unsqueeze(1), min=0.0) * -1e9
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            x, k, v = blk(x, batch, rope, bias, past_k[i], past_v[i])
            ks.append(k)
            vs.append(v)
        return self.head(self.ln_f(x)).reshape(batch, -1, self.cfg["vocab"]), torch.stack(ks), torch.stack(vs)


class Decoder(nn.Module):
    """The exported graph: inputs tokens, voices, cond [B, T(, C)], past_len [1] and the cache,
    past_k_0..L-1 then past_v_0..L-1, each [B, H, capacity, dh] with its first past_len
    positions in use; outputs logits [B, T, V] and the new tokens' keys and values, new_k_0..L-1
    then new_v_0..L-1, each [B, H, T, dh]. The new tokens sit at positions past_len ..
    past_len+T-1. Nothing in it depends on the capacity, so one buffer of the context length can
    serve every step: decoding writes each new key and value after the last, rollback only
    lowers past_len. B is 1, or 2 under guidance (every sequence of a batch at the same length)."""

    def __init__(self, model):
        super().__init__()
        self.model = prescaled(model)

    def forward(self, tokens, voices, cond, past_len, *past):
        m = self.model
        L, d = m.layers, m.cfg["d"]
        batch, T = past[0].shape[0], tokens.shape[1]
        x = (m.tok(tokens) + m.voice(voices) + m.cond(cond)).reshape(-1, d)
        qpos = past_len + torch.arange(T)
        rope = (m.cos_t[qpos], m.sin_t[qpos], m.swap)
        kpos = torch.arange(past[0].shape[2])
        bias_past = (kpos.unsqueeze(0) >= past_len).float().expand(T, -1) * -1e9
        tpos = torch.arange(T)
        bias_new = torch.clamp(tpos.unsqueeze(0) - tpos.unsqueeze(1), min=0).float() * -1e9
        ks, vs = [], []
        for i, blk in enumerate(m.blocks):
            x, k, v = blk.decode(x, batch, rope, bias_past, bias_new, past[i], past[L + i])
            ks.append(k)
            vs.append(v)
        return (m.head(m.ln_f(x)).reshape(batch, -1, m.cfg["vocab"]), *ks, *vs)


def prescaled(model):
    """A copy of `model` whose query weights carry attention's 1/sqrt(head_dim) (rotary turns are
    linear, so scaling before them is the same). Scaling q in the graph instead leaves a Mul that
    ONNX Runtime fuses into the cached product as FusedMatMul's alpha, and that path ran the
    product over a 512-position cache about 3.5x slower (154 against 44 us per layer at 12
    heads, models/README.md): at full context, a third of a mixture step."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for blk in model.blocks:
            s = 1.0 / math.sqrt(blk.dh)
            blk.qkv.weight[: blk.d] *= s
            blk.qkv.bias[: blk.d] *= s
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


class TransposeMix(nn.Module):
    """The composer read as a mixture over transpositions of its input: each shift k runs the same
    network on the context moved by k semitones (tokens, register, tonic and key profile with it),
    its next-token distribution is moved back by -k, and the mixture is the mean of the K
    distributions. Training transposed every window by up to +-5 semitones, so each shift is a
    fair reading of the same music, and their mean is better calibrated than any one (JSB valid
    0.3268 alone, 0.3167 over -1/0/+1 on g7, each calibrated). The cost is K sequences per step,
    carried on the batch axis. A pitch moved out of the vocabulary is clamped on the way in; on the way out a
    token a shift cannot reach gets no mass from that shift (each shift's distribution is
    normalised over the tokens it can reach), so every mixture is a distribution.

    The cache is the base model's, its K copies folded into the head axis ([B, K*H, P, dh]), so a
    caller sees one sequence per stream with K*H heads and needs nothing else to know."""

    def __init__(self, model, shifts):
        super().__init__()
        tok_map, back, back_mask, cond_mats, cond_lo, cond_hi = (
            torch.from_numpy(a) for a in C.transpose_mix_tables(shifts))
        self.model = model
        self.shifts = list(shifts)
        self.k = len(self.shifts)
        self.layers = model.layers
        self.heads = model.heads * self.k  # cache heads
        self.dh = model.dh
        self.cfg = model.cfg
        self.register_buffer("tok_map", tok_map, persistent=False)  # [K, V] int64: token -> moved token
        self.register_buffer("back", back, persistent=False)  # [K, V, V]: moved logits -> original order
        self.register_buffer("back_mask", back_mask, persistent=False)  # [K, 1, V]: 0 or -1e9
        self.register_buffer("cond_mats", cond_mats, persistent=False)  # [K, C, C]: cond -> moved cond
        self.register_buffer("cond_lo", cond_lo, persistent=False)  # [C]
        self.register_buffer("cond_hi", cond_hi, persistent=False)  # [C]

    def empty_cache(self, batch=1):
        z = torch.zeros(self.layers, batch, self.heads, 0, self.dh)
        return z, z.clone()

    def spread(self, tokens, voices, cond):
        """[B, T(, C)] -> the K moved copies, [B*K, T(, C)], each sequence's shifts together."""
        B, T = tokens.shape
        tk = self.tok_map[:, tokens].transpose(0, 1).reshape(B * self.k, T)
        vv = voices.unsqueeze(1).expand(B, self.k, T).reshape(B * self.k, T)
        cc = torch.matmul(cond.unsqueeze(1), self.cond_mats)
        cc = torch.max(torch.min(cc, self.cond_hi), self.cond_lo).reshape(B * self.k, T, -1)
        return tk, vv, cc

    def components(self, logits, B):
        """The base logits [B*K, T, V] in the original token order, [B, K, T, V], unreachable
        tokens at -1e9."""
        T, V = logits.shape[1], logits.shape[2]
        return torch.matmul(logits.reshape(B, self.k, T, V), self.back) + self.back_mask

    def mix(self, comp):
        """[B, K, T, V] -> the mixture's log-probabilities [B, T, V] (a stable log-mean-exp, written
        out so tract runs it too)."""
        lp = torch.log_softmax(comp, dim=-1)
        top = lp.max(dim=1, keepdim=True)[0]
        out = top + torch.log(torch.exp(lp - top).sum(dim=1, keepdim=True) * (1.0 / self.k))
        return out.squeeze(1)

    def forward(self, tokens, voices, cond, past_k, past_v, components=False):
        """As Composer.forward, past_k/v [L, B, K*H, P, dh]; components=True returns the K
        components' logits [B, K, T, V] instead of the mixture (temperature fitting)."""
        B = tokens.shape[0]
        L, H, P = self.layers, self.model.heads, past_k.shape[3]
        tk, vv, cc = self.spread(tokens, voices, cond)
        pk = past_k.reshape(L, B * self.k, H, P, self.dh)
        pv = past_v.reshape(L, B * self.k, H, P, self.dh)
        lg, nk, nv = self.model(tk, vv, cc, pk, pv)
        comp = self.components(lg, B)
        n = nk.shape[3]
        nk, nv = nk.reshape(L, B, self.heads, n, self.dh), nv.reshape(L, B, self.heads, n, self.dh)
        return (comp if components else self.mix(comp)), nk, nv


class MixDecoder(nn.Module):
    """The exported graph of a TransposeMix: Decoder's inputs and outputs, the cache [B, K*H,
    capacity, dh] per layer, logits the mixture's log-probabilities."""

    def __init__(self, mix):
        super().__init__()
        self.mix = mix
        self.dec = Decoder(mix.model)

    def forward(self, tokens, voices, cond, past_len, *past):
        m = self.mix
        B, T = tokens.shape
        H = m.model.heads
        tk, vv, cc = m.spread(tokens, voices, cond)
        moved = [p.reshape(B * m.k, H, p.shape[2], m.dh) for p in past]
        out = self.dec(tk, vv, cc, past_len, *moved)
        comp = m.components(out[0], B)
        return (m.mix(comp), *[n.reshape(B, m.heads, T, m.dh) for n in out[1:]])


def checkpoint_path(run):
    """The checkpoint a training run selected (best JSB valid NLL): runs/<run>/checkpoints/best.pt."""
    return os.path.join(RUNS, run, "checkpoints", "best.pt")


def read_checkpoint(path):
    """A checkpoint as train.py saved it (cfg, model, args, step, ...), on the CPU. Not weights
    only: it carries the run's arguments and history, which PyTorch 2.6 and later refuse to read
    by default."""
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(path, **cfg):
    """The Composer a checkpoint holds, in eval mode, with the checkpoint itself: (model, ck).
    `cfg` overrides the saved configuration (dropout=0.0 for a teacher)."""
    ck = read_checkpoint(path)
    model = Composer(**dict(ck["cfg"], **cfg))
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck
