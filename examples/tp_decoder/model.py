"""A Llama-style decoder, split over p ranks Megatron-style, on two backends.

The model: token embedding, then per layer RMSNorm -> rotary attention with a
KV cache (grouped-query heads) -> residual add -> RMSNorm -> SwiGLU MLP ->
residual add, then a final RMSNorm and an LM head. Weights come from a fixed
seed (make_weights); nothing is downloaded.

Tensor parallelism over p ranks: the QKV and gate/up projections are split
by output columns (heads, MLP channels) and need no communication; the
output and down projections are split by input rows (K) and their partial
products are all-reduced; so is the LM head, split along the hidden size, so
that every rank gets the whole vocabulary's logits. Two backends compute the
same model:

  TorchBackend   torch.matmul (F.linear) + dist.all_reduce, then the residual
                 add and the next RMSNorm: what tensor-parallel code on CPUs
                 writes today. gloo cannot all-reduce bf16 in torch 1.13, so
                 the partials travel as fp32 and are rounded back.
  TpfuseBackend  the row-parallel projections through
                 tpfuse.npu_mm_all_reduce_add_rms_norm (projection, all-reduce,
                 residual add and the next norm in one call) and
                 npu_mm_all_reduce_base (the LM head, where no norm follows);
                 the column-parallel ones through npu_mm_all_reduce_base on a
                 group of this rank alone, which makes it a plain GEMM on
                 tpfuse's engines (packed weights, weight-only int8). With
                 sequence parallelism, prefill runs through
                 npu_all_gather_base_mm / npu_mm_reduce_scatter_base.

Int8 weights are per-channel weight-only quantisation of the same bf16
weights: q = round(w / s), s = max|w| / 127 per output channel (in bf16).
tpfuse runs them in its weight-only mode; TorchBackend dequantises them once
and runs bf16, as a CPU user without an int8 GEMM does.

ReferenceBackend runs the unsharded model in fp64 from the same weights:
the golden model the tests compare the sharded ones with.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 32000
    hidden: int = 1024
    layers: int = 28
    heads: int = 16
    kv_heads: int = 8
    ffn: int = 4096
    max_seq: int = 2048
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def head_dim(self):
        return self.hidden // self.heads

    def parameters(self):
        hd = self.head_dim
        attention = self.hidden * (self.heads + 2 * self.kv_heads) * hd + self.heads * hd * self.hidden
        layer = attention + 3 * self.hidden * self.ffn + 2 * self.hidden
        return self.layers * layer + 2 * self.vocab * self.hidden + self.hidden


# "0.5b": 505 M parameters. "tiny": the tests' model, every dimension
# divisible by 4 ranks.
SIZES = {
    "0.5b": Config(),
    "tiny": Config(vocab=256, hidden=64, layers=2, heads=8, kv_heads=4, ffn=128, max_seq=256),
}


def check_split(config, ranks):
    """Raises ValueError unless the model's heads and channels split evenly over `ranks`."""
    for name in ("heads", "kv_heads", "ffn", "hidden"):
        value = getattr(config, name)
        if value % ranks:
            raise ValueError(f"ranks: expected a divisor of {name} = {value}, got {ranks}")


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


def make_weights(config, seed=0):
    """The whole model's bf16 weights, from `seed`: a dict of layer dicts and the rest.

    Linear weights are [out, in] (torch's Linear layout). Projections are
    scaled so that every sublayer sees unit-RMS inputs; the output and down
    projections so that the layers together add about half the embedding's
    RMS to the residual stream. The LM head maps each token's embedding to
    the logit of a fixed successor (a random permutation): untrained
    weights give near-ties between logits, which greedy decoding would break
    by rounding; with it, each step has a clear winner, shifted by what the
    layers add, and sharded runs must agree on it.
    """
    g = torch.Generator().manual_seed(seed)
    d, hd, c = config.hidden, config.head_dim, config
    out_scale = 0.5 / math.sqrt(2 * c.layers)

    def bf16(t):
        return t.to(torch.bfloat16)

    layers = []
    for _ in range(c.layers):
        layers.append({
            "attn_norm": bf16(1 + 0.1 * _randn(g, d)),
            "q": bf16(_randn(g, c.heads * hd, d) / math.sqrt(d)),
            "k": bf16(_randn(g, c.kv_heads * hd, d) / math.sqrt(d)),
            "v": bf16(_randn(g, c.kv_heads * hd, d) / math.sqrt(d)),
            "o": bf16(_randn(g, d, c.heads * hd) * out_scale / math.sqrt(c.heads * hd)),
            "mlp_norm": bf16(1 + 0.1 * _randn(g, d)),
            "gate": bf16(_randn(g, c.ffn, d) / math.sqrt(d)),
            "up": bf16(_randn(g, c.ffn, d) / math.sqrt(d)),
            "down": bf16(_randn(g, d, c.ffn) * out_scale / math.sqrt(c.ffn)),
        })
    embed = _randn(g, c.vocab, d)
    successor = torch.randperm(c.vocab, generator=g)
    lm_head = torch.empty_like(embed)
    lm_head[successor] = embed / math.sqrt(d)
    return {"embed": bf16(embed), "layers": layers, "final_norm": bf16(1 + 0.1 * _randn(g, d)),
            "lm_head": bf16(lm_head)}


class Linear:
    """One rank's piece of a linear layer: weight [n, k] bf16, or int8 with per-channel scale."""

    def __init__(self, weight, quantize):
        self.weight, self.scale, self._bf16 = weight.contiguous(), None, None
        if quantize:
            self.scale = (weight.float().abs().amax(dim=1) / 127).clamp_min(1e-8).bfloat16()
            self.weight = (weight.float() / self.scale.float()[:, None]).round().clamp(-127, 127)
            self.weight = self.weight.to(torch.int8).contiguous()

    def dense(self, dtype=torch.bfloat16):
        """The weight as `dtype` ([n, k]), dequantised: what a backend without int8
        runs (made once for bf16)."""
        if self.scale is None:
            return self.weight.to(dtype)
        if dtype != torch.bfloat16:
            return (self.weight.double() * self.scale.double()[:, None]).to(dtype)
        if self._bf16 is None:
            self._bf16 = self.dense(torch.float64).bfloat16()
        return self._bf16

    def quant_args(self):
        return {} if self.scale is None else {"antiquant_scale": self.scale}


def shard(weights, config, rank, ranks, quantize=False):
    """Rank `rank`'s weights of `ranks`: QKV and gate/up by output columns (fused
    into one GEMM each), output and down projections and the LM head by input rows."""
    check_split(config, ranks)
    hd = config.head_dim

    def rows(t):
        step = t.shape[0] // ranks
        return t[rank * step:(rank + 1) * step]

    def cols(t):
        step = t.shape[1] // ranks
        return t[:, rank * step:(rank + 1) * step]

    layers = []
    for w in weights["layers"]:
        qkv = torch.cat([rows(w["q"]), rows(w["k"]), rows(w["v"])])
        layers.append({
            "attn_norm": w["attn_norm"], "mlp_norm": w["mlp_norm"],
            "qkv": Linear(qkv, quantize),
            "o": Linear(cols(w["o"]), quantize),
            "gate_up": Linear(torch.cat([rows(w["gate"]), rows(w["up"])]), quantize),
            "down": Linear(cols(w["down"]), quantize),
        })
    return {"embed": weights["embed"], "layers": layers, "final_norm": weights["final_norm"],
            "lm_head": Linear(cols(weights["lm_head"]), quantize),
            "heads": config.heads // ranks, "kv_heads": config.kv_heads // ranks, "head_dim": hd,
            "hidden_slice": slice(rank * config.hidden // ranks, (rank + 1) * config.hidden // ranks)}


def rms_norm(y, gamma, eps):
    """t = round(y * rstd), out = round(t * gamma), rstd in fp32 (fp64 for fp64): the
    rounding of Llama's RMSNorm in bf16, and of tpfuse's fused norm."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    h = y.to(acc)
    t = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(y.dtype)
    return (t.to(acc) * gamma.to(acc)).to(y.dtype)


class ReferenceBackend:
    """The unsharded model in fp64: products, sums and norms without rounding."""
    ranks, sequence_parallel = 1, False

    def column(self, x, linear):
        return F.linear(x, linear.dense(torch.float64))

    def row(self, x, linear):
        return F.linear(x, linear.dense(torch.float64))

    def row_add_norm(self, x, linear, residual, gamma, eps):
        y = residual + self.row(x, linear).view(residual.shape)
        return y, rms_norm(y, gamma, eps)


class TorchBackend:
    """torch.matmul + dist.all_reduce (fp32 on the wire: gloo has no bf16 in torch 1.13)."""
    sequence_parallel = False

    def __init__(self, group):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.ranks = dist.get_world_size(group)

    def column(self, x, linear):
        return F.linear(x, linear.dense())

    def row(self, x, linear):
        partial = F.linear(x, linear.dense())
        if self.ranks == 1:
            return partial
        summed = partial.float()
        self.dist.all_reduce(summed, group=self.group)
        return summed.to(partial.dtype)

    def row_add_norm(self, x, linear, residual, gamma, eps):
        y = residual + self.row(x, linear).view(residual.shape)
        return y, rms_norm(y, gamma, eps)


_alone_by_group = {}


def _alone(group):
    """The hcom of a group of this rank alone, made once per group: tpfuse's GEMM
    without a collective (every rank takes part in making every rank's group,
    torch's rule for new_group)."""
    import torch.distributed as dist
    import tpfuse
    hcom = _alone_by_group.get(group)
    if hcom is None:
        size = dist.get_world_size(group)
        members = [dist.distributed_c10d.get_global_rank(group, r) for r in range(size)]
        alone = [dist.new_group([m]) for m in members] if size > 1 else [group]
        hcom = _alone_by_group[group] = tpfuse.get_comm_name(alone[dist.get_rank(group)])
    return hcom


class TpfuseBackend:
    """tpfuse's operators: fused row-parallel layers, column-parallel GEMMs on a
    group of this rank alone, and the sequence-parallel pair for prefill."""

    def __init__(self, group, comm_turn=0, sequence_parallel=False):
        import torch.distributed as dist
        import tpfuse
        self.tpfuse, self.comm_turn = tpfuse, comm_turn
        self.ranks = dist.get_world_size(group)
        self.hcom = tpfuse.get_comm_name(group)
        self.local_hcom = _alone(group)
        self.sequence_parallel = sequence_parallel
        self.dist, self.group = dist, group
        self.last = dist.distributed_c10d.get_global_rank(group, self.ranks - 1)

    def column(self, x, linear):
        return self.tpfuse.npu_mm_all_reduce_base(x, linear.weight.t(), self.local_hcom,
                                                  **linear.quant_args())

    def row(self, x, linear):
        return self.tpfuse.npu_mm_all_reduce_base(x, linear.weight.t(), self.hcom,
                                                  comm_turn=self.comm_turn, **linear.quant_args())

    def row_add_norm(self, x, linear, residual, gamma, eps):
        return self.tpfuse.npu_mm_all_reduce_add_rms_norm(
            x, linear.weight.t(), residual, gamma, self.hcom, epsilon=eps,
            comm_turn=self.comm_turn, **linear.quant_args())

    def gather_column(self, x, linear):
        """All ranks' rows of x [m, k] in rank order, times this rank's columns."""
        output, _ = self.tpfuse.npu_all_gather_base_mm(
            x, linear.weight.t(), self.hcom, self.ranks, gather_output=False,
            comm_turn=self.comm_turn)
        return output

    def broadcast_from_last(self, t):
        """t from the group's last rank, in place (as bytes: gloo has no bf16 in torch 1.13)."""
        self.dist.broadcast(t.view(torch.uint8), src=self.last, group=self.group)

    def reduce_scatter_row(self, x, linear):
        """This rank's rows of the all-reduced x @ weight (x [m, k], m a multiple of the ranks)."""
        return self.tpfuse.npu_mm_reduce_scatter_base(x, linear.weight.t(), self.hcom,
                                                      self.ranks, comm_turn=self.comm_turn)


class Decoder:
    """One rank's part of the model (`shard`'s weights) on a backend, in `dtype`.
    Attention takes the queries `attention_block` positions at a time."""

    def __init__(self, config, weights, backend, dtype=torch.bfloat16, rank=0, attention_block=64):
        self.config, self.w, self.backend, self.dtype, self.rank = config, weights, backend, dtype, rank
        self.attention_block = attention_block
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        if dtype == torch.float64:
            self.w = dict(weights, embed=weights["embed"].double(),
                          final_norm=weights["final_norm"].double())
        hd = config.head_dim
        inv = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angles = torch.outer(torch.arange(config.max_seq, dtype=torch.float64), inv)
        self.cos, self.sin = angles.cos().to(self.acc), angles.sin().to(self.acc)

    def new_cache(self, batch):
        """Keys and values per layer, [batch, kv_heads, max_seq, hd]; attention reads only
        the positions written so far, so they start uninitialised."""
        shape = (batch, self.w["kv_heads"], self.config.max_seq, self.w["head_dim"])
        return [(torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype))
                for _ in self.w["layers"]]

    @torch.no_grad()
    def forward(self, tokens, cache, pos):
        """The last position's logits [batch, vocab] for `tokens` [batch, s] at
        positions pos.., appending their keys and values to `cache`."""
        batch, s = tokens.shape
        if pos + s > self.config.max_seq:
            raise ValueError(f"tokens: expected at most max_seq = {self.config.max_seq} "
                             f"positions, got {pos + s}")
        if self.backend.sequence_parallel and s > 1:
            return self._forward_sequence_parallel(tokens, cache, pos)
        c, layers = self.config, self.w["layers"]
        x = self.w["embed"][tokens].to(self.dtype)
        h = rms_norm(x, layers[0]["attn_norm"], c.eps)
        for i, layer in enumerate(layers):
            rows = h.view(batch * s, c.hidden)
            qkv = self.backend.column(rows, layer["qkv"]).view(batch, s, -1)
            a = self._attention(qkv, cache[i], pos)
            x, h = self.backend.row_add_norm(a, layer["o"], x, layer["mlp_norm"], c.eps)
            act = self._swiglu(self.backend.column(h.view(batch * s, c.hidden), layer["gate_up"]))
            x, h = self.backend.row_add_norm(act, layer["down"], x, self._next_norm(i), c.eps)
        return self._logits(h[:, -1, :])

    def _forward_sequence_parallel(self, tokens, cache, pos):
        """Prefill with the sequence split over the ranks: each rank keeps the
        residual stream of its s/p positions; the column-parallel GEMMs gather
        every rank's rows first, the row-parallel ones reduce-scatter."""
        c, layers, p, b = self.config, self.w["layers"], self.backend.ranks, tokens.shape[0]
        s = tokens.shape[1]
        if s % p:
            raise ValueError(f"tokens: with sequence parallelism, expected a prompt length "
                             f"divisible by the ranks ({p}), got {s}")
        mine = s // p
        x = self.w["embed"][tokens[:, self.rank * mine:(self.rank + 1) * mine]].to(self.dtype)
        h = rms_norm(x, layers[0]["attn_norm"], c.eps)

        def gathered(h, linear):
            # Rows come back rank by rank: [p, b, s/p, n] -> [b, s, n].
            out = self.backend.gather_column(h.reshape(b * mine, c.hidden), linear)
            return out.view(p, b, mine, -1).transpose(0, 1).reshape(b, s, -1)

        def scattered(a, linear):
            # This rank's rows: the products of rank order [p, b, s/p, k].
            rows = a.view(b, p, mine, -1).transpose(0, 1).reshape(b * s, -1)
            return self.backend.reduce_scatter_row(rows, linear).view(b, mine, c.hidden)

        for i, layer in enumerate(layers):
            a = self._attention(gathered(h, layer["qkv"]), cache[i], pos)
            x = x + scattered(a.view(b, s, -1), layer["o"])
            h = rms_norm(x, layer["mlp_norm"], c.eps)
            act = self._swiglu(gathered(h, layer["gate_up"]).view(b * s, -1))
            x = x + scattered(act.view(b, s, -1), layer["down"])
            h = rms_norm(x, self._next_norm(i), c.eps)
        # The last position lives on the last rank.
        last = h[:, -1, :].contiguous()
        self.backend.broadcast_from_last(last)
        return self._logits(last)

    def _next_norm(self, i):
        layers = self.w["layers"]
        return layers[i + 1]["attn_norm"] if i + 1 < len(layers) else self.w["final_norm"]

    def _swiglu(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate.to(self.acc)).to(self.dtype) * up

    def _logits(self, last):
        """The LM head, split along the hidden size: every rank's slice, all-reduced."""
        return self.backend.row(last[:, self.w["hidden_slice"]].contiguous(), self.w["lm_head"])

    def _rotate(self, t, pos):
        """Rotary embedding of t [b, s, heads, hd] at positions pos.., in the accumulation dtype."""
        s, half = t.shape[1], t.shape[-1] // 2
        cos = self.cos[pos:pos + s, None, :]
        sin = self.sin[pos:pos + s, None, :]
        t = t.to(self.acc)
        t1, t2 = t[..., :half], t[..., half:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1).to(self.dtype)

    def _attention(self, qkv, layer_cache, pos):
        """Causal attention of this rank's heads; qkv [b, s, (heads + 2 kv_heads) * hd]."""
        b, s, _ = qkv.shape
        heads, kv_heads, hd = self.w["heads"], self.w["kv_heads"], self.w["head_dim"]
        group, end = heads // kv_heads, pos + s
        q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        q = self._rotate(q.reshape(b, s, heads, hd), pos)
        k = self._rotate(k.reshape(b, s, kv_heads, hd), pos)
        keys, values = layer_cache
        keys[:, :, pos:end] = k.transpose(1, 2)
        values[:, :, pos:end] = v.reshape(b, s, kv_heads, hd).transpose(1, 2)
        # The query heads that share a key-value head become rows of one
        # product, [b * kv_heads, group * s, hd], so no key is copied per head.
        queries = q.view(b, s, kv_heads, group, hd).permute(0, 2, 3, 1, 4).to(self.acc)
        kk = keys[:, :, :end].reshape(b * kv_heads, end, hd).to(self.acc)
        vv = values[:, :, :end].reshape(b * kv_heads, end, hd).to(self.acc)
        # Causal blocks of queries: a block reads the keys up to its last
        # position only, so a prompt's products skip most of the masked half.
        blocks = []
        for q0 in range(0, s, self.attention_block):
            q1 = min(s, q0 + self.attention_block)
            rows = queries[:, :, :, q0:q1].reshape(b * kv_heads, group * (q1 - q0), hd)
            seen = pos + q1
            if q1 - q0 > 1:
                future = torch.full((q1 - q0, seen), float("-inf"), dtype=self.acc)
                scores = torch.baddbmm(future.triu(pos + q0 + 1).repeat(group, 1), rows,
                                       kk[:, :seen].transpose(1, 2), alpha=1 / math.sqrt(hd))
            else:
                scores = torch.bmm(rows, kk[:, :seen].transpose(1, 2)).mul_(1 / math.sqrt(hd))
            out = torch.bmm(torch.softmax(scores, dim=-1), vv[:, :seen])
            blocks.append(out.view(b, kv_heads, group, q1 - q0, hd))
        out = torch.cat(blocks, dim=3) if len(blocks) > 1 else blocks[0]
        return out.permute(0, 3, 1, 2, 4).reshape(b * s, heads * hd).to(self.dtype)


def generate(decoder, prompt, tokens):
    """Greedy generation: (new token ids [batch, tokens], logits [tokens, batch, vocab],
    seconds to the first token, seconds per later token)."""
    import time
    batch = prompt.shape[0]
    cache = decoder.new_cache(batch)
    start = time.perf_counter()
    logits = decoder.forward(prompt, cache, 0)
    first = time.perf_counter() - start
    out, all_logits, pos = [], [logits], prompt.shape[1]
    next_ids = logits.argmax(dim=-1)
    out.append(next_ids)
    start = time.perf_counter()
    for _ in range(tokens - 1):
        logits = decoder.forward(next_ids[:, None], cache, pos)
        pos += 1
        all_logits.append(logits)
        next_ids = logits.argmax(dim=-1)
        out.append(next_ids)
    per_token = (time.perf_counter() - start) / max(1, tokens - 1)
    return torch.stack(out, dim=1), torch.stack(all_logits), first, per_token


def prompt_ids(config, batch, length, seed=1):
    """A fixed prompt: `batch` rows of `length` token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab, (batch, length), generator=g)
