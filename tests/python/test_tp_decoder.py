"""The tensor-parallel decoder example (examples/tp_decoder): the tiny model
split over 1, 2 and 4 ranks, on both backends, against the unsharded model in fp64."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "tp_decoder"
sys.path.insert(0, str(EXAMPLE))

import model  # noqa: E402

CONFIG = model.SIZES["tiny"]
PROMPT = model.prompt_ids(CONFIG, batch=2, length=12)
TOKENS = 6
# Attention in blocks of 5 queries: the prompt's 12 in 5, 5 and 2 (the
# fp64 reference in one block).
ATTENTION_BLOCK = 5
U_BF16 = 2.0 ** -8
U_FP32 = 2.0 ** -24
# bf16 roundings between the embedding and a logit. Per layer: the attention
# norm (2), q/k/v (1), rotary (1), attention's output (1), the output
# projection's partial and sum (2), the residual add (1), the MLP norm (2),
# gate/up (1), SiLU and the product (2), the down projection's partial and
# sum (2), the add (1), the next norm (2, counted with the next layer or as
# the final norm); then the LM head's partial and sum (2).
ROUNDINGS = 18 * CONFIG.layers + 2


def _quantized(weights):
    return weights == "int8"


def reference(weights):
    """The unsharded model in fp64 from the same (dequantised) weights: greedy
    ids, logits per step, and per logit sum_j |h_j w_vj| over the LM head's products."""
    shard = model.shard(model.make_weights(CONFIG), CONFIG, 0, 1, quantize=_quantized(weights))
    backend = _MagnitudeBackend(shard["lm_head"])
    decoder = model.Decoder(CONFIG, shard, backend, dtype=torch.float64)
    ids, logits, _, _ = model.generate(decoder, PROMPT, TOKENS)
    return ids, logits, torch.stack(backend.magnitudes)


class _MagnitudeBackend(model.ReferenceBackend):
    def __init__(self, lm_head):
        self.lm_head, self.magnitudes = lm_head, []

    def row(self, x, linear):
        if linear is self.lm_head:
            self.magnitudes.append(x.abs() @ linear.dense(torch.float64).abs().t())
        return super().row(x, linear)


@pytest.fixture(scope="module")
def golden():
    return {weights: reference(weights) for weights in ("bf16", "int8")}


def run_decoder(rank, world_size, backend, weights, comm_turn=0, sequence_parallel=False):
    shard = model.shard(model.make_weights(CONFIG), CONFIG, rank, world_size,
                        quantize=_quantized(weights))
    group = dist.group.WORLD
    if backend == "tpfuse":
        chosen = model.TpfuseBackend(group, comm_turn, sequence_parallel)
    else:
        chosen = model.TorchBackend(group)
    decoder = model.Decoder(CONFIG, shard, chosen, rank=rank, attention_block=ATTENTION_BLOCK)
    ids, logits, _, _ = model.generate(decoder, PROMPT, TOKENS)
    return ids, logits


def check_against_golden(results, golden_run, k=CONFIG.hidden):
    ref_ids, ref_logits, magnitudes = golden_run
    ids, logits = results[0]
    assert torch.equal(ids, ref_ids), f"generated {ids.tolist()}, unsharded fp64 {ref_ids.tolist()}"
    for rank, (rank_ids, rank_logits) in enumerate(results):
        assert torch.equal(rank_ids, ids), f"rank {rank}'s tokens differ from rank 0's"
        assert torch.equal(rank_logits.view(torch.int16), logits.view(torch.int16)), \
            f"rank {rank}'s logits are not bitwise rank 0's"
    # Each rounding perturbs a value by at most U_BF16 of itself, and reaches
    # a logit through the LM head's products; the fp32 sums add k + p ulps.
    bound = (ROUNDINGS * U_BF16 + (k + len(results)) * U_FP32) * magnitudes
    error = (logits.double() - ref_logits).abs()
    worst = (error / bound).max().item()
    assert worst <= 1, f"logit error {worst:.3g} of the bound (largest {error.max().item():.3g})"
    return worst


@pytest.mark.parametrize("weights", ["bf16", "int8"])
@pytest.mark.parametrize("backend", ["tpfuse", "torch"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sharded_generation_matches_unsharded(ranks, golden, world_size, backend, weights):
    results = ranks(world_size).run(run_decoder, backend, weights)
    check_against_golden(results, golden[weights])


@pytest.mark.parametrize("world_size", [2, 4])
def test_sequence_parallel_prefill_matches_unsharded(ranks, golden, world_size):
    results = ranks(world_size).run(run_decoder, "tpfuse", "bf16", 0, True)
    check_against_golden(results, golden["bf16"])


@pytest.mark.parametrize("weights", ["bf16", "int8"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_tpfuse_logits_do_not_depend_on_comm_turn(ranks, world_size, weights):
    pool = ranks(world_size)
    _, logits = pool.run(run_decoder, "tpfuse", weights, 0)[0]
    for comm_turn in (1, 2, 3, 8):
        _, tiled = pool.run(run_decoder, "tpfuse", weights, comm_turn)[0]
        assert torch.equal(tiled.view(torch.int16), logits.view(torch.int16)), \
            f"comm_turn={comm_turn} changed the logits"


def test_bound_is_tight_enough_to_catch_a_missing_rank(ranks, golden):
    """The bound is no blanket: logits from a model that drops one rank's share
    of a reduction (here: the torch backend without its all-reduce) break it."""
    results = ranks(2).run(run_without_all_reduce)
    with pytest.raises(AssertionError):
        check_against_golden(results, golden["bf16"])


def run_without_all_reduce(rank, world_size):
    shard = model.shard(model.make_weights(CONFIG), CONFIG, rank, world_size)
    backend = model.TorchBackend(dist.group.WORLD)
    backend.ranks = 1  # each rank keeps its partial sums
    decoder = model.Decoder(CONFIG, shard, backend, rank=rank, attention_block=ATTENTION_BLOCK)
    ids, logits, _, _ = model.generate(decoder, PROMPT, TOKENS)
    return ids, logits


def _generate_cli(*args):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, str(EXAMPLE / "generate.py"), "--size", "tiny", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_generate_cli_prints_the_unsharded_models_tokens():
    config = CONFIG
    prompt = model.prompt_ids(config, batch=1, length=16)
    shard = model.shard(model.make_weights(config), config, 0, 1)
    decoder = model.Decoder(config, shard, model.ReferenceBackend(), dtype=torch.float64)
    ids, _, _, _ = model.generate(decoder, prompt, 8)
    done = _generate_cli("--ranks", "2", "--tokens", "8")
    assert done.returncode == 0, done.stderr
    assert "tokens: " + " ".join(map(str, ids[0].tolist())) in done.stdout, done.stdout
    assert "logits identical on every rank: yes" in done.stdout
    assert "per token:" in done.stdout and "time to first token:" in done.stdout


def test_generate_cli_rejects_ranks_that_do_not_divide_the_heads():
    done = _generate_cli("--ranks", "3", "--tokens", "2")
    assert done.returncode == 2
    assert "ranks: expected a divisor of heads = 8, got 3" in done.stderr


def _naive_attention(decoder, qkv, cache, pos):
    """Causal grouped-query attention one query at a time, in fp64, over the
    cache as _attention left it (its keys are rotated there)."""
    b, s, _ = qkv.shape
    heads, kv_heads, hd = decoder.w["heads"], decoder.w["kv_heads"], decoder.w["head_dim"]
    q = decoder._rotate(qkv[..., :heads * hd].reshape(b, s, heads, hd), pos)
    keys, values = cache
    out = torch.zeros(b, s, heads, hd, dtype=torch.float64)
    for batch in range(b):
        for head in range(heads):
            kv = head // (heads // kv_heads)
            for i in range(s):
                seen = pos + i + 1
                scores = keys[batch, kv, :seen] @ q[batch, i, head] / hd ** 0.5
                out[batch, i, head] = torch.softmax(scores, dim=0) @ values[batch, kv, :seen]
    return out.reshape(b * s, heads * hd)


@pytest.mark.parametrize("block", [1, 5, 12, 64])
def test_attention_in_causal_blocks_is_attention(block):
    """Blocked attention against one query at a time: 3 positions already in
    the cache, then 12 more, in blocks of `block` queries (fp64, so the only
    differences are the order of the sums: 1e-12 is about 2^-52 times the
    hundreds of roundings on each path, with room)."""
    shard = model.shard(model.make_weights(CONFIG), CONFIG, 0, 1)
    decoder = model.Decoder(CONFIG, shard, model.ReferenceBackend(), dtype=torch.float64,
                            attention_block=block)
    width = (decoder.w["heads"] + 2 * decoder.w["kv_heads"]) * decoder.w["head_dim"]
    generator = torch.Generator().manual_seed(3)
    cache = decoder.new_cache(2)[0]
    decoder._attention(torch.randn(2, 3, width, generator=generator, dtype=torch.float64), cache, 0)
    qkv = torch.randn(2, 12, width, generator=generator, dtype=torch.float64)
    got = decoder._attention(qkv, cache, 3)
    want = _naive_attention(decoder, qkv, cache, 3)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), \
        f"largest difference {(got - want).abs().max().item():.3g}"
