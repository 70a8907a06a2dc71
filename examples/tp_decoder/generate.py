#!/usr/bin/python3
"""Greedy generation with the tensor-parallel decoder (model.py) over p ranks.

    /usr/bin/python3 examples/tp_decoder/generate.py --ranks 2 --tokens 32
    /usr/bin/python3 examples/tp_decoder/generate.py --ranks 2 --backend torch --weights int8

Prints the generated token ids (the same on every rank, and for every backend
and rank count: the tests check it), the time to the first token (the
prompt's prefill) and the milliseconds per later token.
"""
import argparse
import time

import torch

import launch
import model


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="tensor-parallel ranks (processes)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--backend", choices=["tpfuse", "torch"], default="tpfuse")
    parser.add_argument("--weights", choices=["bf16", "int8"], default="bf16")
    parser.add_argument("--size", choices=sorted(model.SIZES), default="0.5b")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the weights' seed")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="prefill with the sequence split over the ranks (tpfuse, bf16)")
    parser.add_argument("--comm-turn", type=int, default=0, help="tpfuse's tiles (0: its choice)")
    args = parser.parse_args(argv)
    check(args, parser.error)
    return args


def check(args, error):
    config = model.SIZES[args.size]
    try:
        model.check_split(config, args.ranks)
    except ValueError as e:
        error(str(e))
    if args.sequence_parallel and args.backend != "tpfuse":
        error("--sequence-parallel: expected --backend tpfuse (torch 1.13's gloo has no "
              "reduce_scatter), got --backend " + args.backend)
    if args.sequence_parallel and args.weights != "bf16":
        error("--sequence-parallel: expected --weights bf16 (npu_all_gather_base_mm has no "
              "weight-only mode), got --weights " + args.weights)
    if args.tokens < 1 or args.prompt_len < 1 or args.batch < 1:
        error("--tokens, --prompt-len, --batch: expected >= 1")
    if args.prompt_len + args.tokens > config.max_seq:
        error(f"--prompt-len + --tokens: expected at most {config.max_seq}, "
              f"got {args.prompt_len + args.tokens}")


def build(rank, ranks, group, args):
    """This rank's decoder for `args`."""
    config = model.SIZES[args.size]
    weights = model.shard(model.make_weights(config, args.seed), config, rank, ranks,
                          quantize=args.weights == "int8")
    if args.backend == "tpfuse":
        backend = model.TpfuseBackend(group, args.comm_turn, args.sequence_parallel)
    else:
        backend = model.TorchBackend(group)
    return model.Decoder(config, weights, backend, rank=rank)


def _generate(rank, ranks, group, args):
    decoder = build(rank, ranks, group, args)
    prompt = model.prompt_ids(decoder.config, args.batch, args.prompt_len)
    model.generate(decoder, prompt, 2)  # the first calls pack the weights
    ids, logits, first, per_token = model.generate(decoder, prompt, args.tokens)
    return ids, logits, first, per_token


def main():
    args = parse()
    config = model.SIZES[args.size]
    start = time.perf_counter()
    results = launch.run(_generate, args.ranks, args)
    ids, logits, first, per_token = results[0]
    same = all(torch.equal(r[1].view(torch.int16), logits.view(torch.int16)) for r in results)
    print(f"model {args.size} ({config.parameters() / 1e6:.0f} M parameters), {args.weights} "
          f"weights, {args.ranks} ranks, backend {args.backend}"
          f"{', sequence-parallel prefill' if args.sequence_parallel else ''}")
    for row in ids.tolist():
        print("tokens:", " ".join(map(str, row)))
    print(f"logits identical on every rank: {'yes' if same else 'NO'}")
    print(f"time to first token: {1e3 * max(r[2] for r in results):.1f} ms "
          f"(prompt of {args.prompt_len} tokens)")
    print(f"per token: {1e3 * max(r[3] for r in results):.2f} ms "
          f"(batch {args.batch}; {time.perf_counter() - start:.0f} s in all)")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
