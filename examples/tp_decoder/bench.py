#!/usr/bin/python3
"""The tensor-parallel decoder (model.py) on both backends, in one run: prefill and
decode, bf16 and int8 weights, over 1, 2 and 4 ranks.

    /usr/bin/python3 examples/tp_decoder/bench.py --json decoder.json   # also decoder.png
    make bench-decoder JSON=decoder.json

For each rank count, every rank builds the four variants (backend x weights)
once; then, for each phase, the variants take turns, `--repeats` times, so
that a busy host slows them alike. Each figure is the median over the turns
of the slowest rank's time:

  prefill  a prompt of --prefill tokens (batch 1) into an empty cache: the
           whole forward pass to the first token's logits, in ms;
  decode   after a prompt of --context tokens, --steps greedy steps, per step
           (ms per token), at batch 1 and 8.

The JSON is a list of records: backend, weights, ranks, phase, batch,
tokens (the prompt's for prefill, the steps for decode), ms, and the model's
size and threads per rank. The table gives torch/tpfuse (same weights) and
tpfuse bf16/int8 (same backend) from the same run.
"""
import argparse
import json
import shutil
import statistics
import subprocess
import time

import torch.distributed as dist

import launch
import model

VARIANTS = [("tpfuse", "bf16"), ("torch", "bf16"), ("tpfuse", "int8"), ("torch", "int8")]


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where the records go (and FILE.png, the plot)")
    parser.add_argument("--size", choices=sorted(model.SIZES), default="0.5b")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batches")
    parser.add_argument("--prefill", type=int, default=512, help="prefill prompt tokens")
    parser.add_argument("--context", type=int, default=64, help="decode's prompt tokens")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per turn")
    parser.add_argument("--repeats", type=int, default=3, help="turns per variant")
    args = parser.parse_args(argv)
    config = model.SIZES[args.size]
    for ranks in args.ranks:
        try:
            model.check_split(config, ranks)
        except ValueError as e:
            parser.error(str(e))
    if max(args.prefill, args.context + args.steps) > config.max_seq:
        parser.error(f"--prefill, --context + --steps: expected at most {config.max_seq}")
    return args


def _slowest_median(mine, group):
    """Median over turns of the slowest rank's seconds."""
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return statistics.median(max(turn) for turn in zip(*everyone))


def _prefill(decoder, prompt):
    cache = decoder.new_cache(prompt.shape[0])
    dist.barrier()
    start = time.perf_counter()
    decoder.forward(prompt, cache, 0)
    return time.perf_counter() - start


def _decode(decoder, prompt, steps):
    cache = decoder.new_cache(prompt.shape[0])
    ids = decoder.forward(prompt, cache, 0).argmax(dim=-1)
    dist.barrier()
    start = time.perf_counter()
    for step in range(steps):
        ids = decoder.forward(ids[:, None], cache, prompt.shape[1] + step).argmax(dim=-1)
    return (time.perf_counter() - start) / steps


def _bench_ranks(rank, ranks, group, args):
    config = model.SIZES[args.size]
    weights = model.make_weights(config)
    decoders = {}
    for backend, kind in VARIANTS:
        shard = model.shard(weights, config, rank, ranks, quantize=kind == "int8")
        chosen = model.TpfuseBackend(group) if backend == "tpfuse" else model.TorchBackend(group)
        decoders[backend, kind] = model.Decoder(config, shard, chosen, rank=rank)
    del weights
    phases = [("prefill", 1, model.prompt_ids(config, 1, args.prefill))]
    phases += [("decode", b, model.prompt_ids(config, b, args.context)) for b in args.batches]
    records = []
    for phase, batch, prompt in phases:
        run = (lambda d, p=prompt: _prefill(d, p)) if phase == "prefill" else \
            (lambda d, p=prompt: _decode(d, p, args.steps))
        for decoder in decoders.values():
            run(decoder)  # packs the weights, warms the caches
        turns = {variant: [] for variant in decoders}
        for _ in range(args.repeats):
            for variant, decoder in decoders.items():
                turns[variant].append(run(decoder))
        for (backend, kind), mine in turns.items():
            records.append({
                "backend": backend, "weights": kind, "ranks": ranks, "phase": phase,
                "batch": batch, "tokens": args.prefill if phase == "prefill" else args.steps,
                "ms": 1e3 * _slowest_median(mine, group), "size": args.size,
                "threads_per_rank": launch.threads_per_rank(ranks)})
    return records


def _find(records, **keys):
    for r in records:
        if all(r[k] == v for k, v in keys.items()):
            return r["ms"]
    return None


def table(records):
    lines = [f'{"phase":>7} {"batch":>5} {"ranks":>5} {"weights":>7} {"torch ms":>10} '
             f'{"tpfuse ms":>10} {"torch/tpfuse":>12} {"bf16/int8 (tpfuse)":>18}']
    for r in records:
        if r["backend"] != "tpfuse":
            continue
        keys = {k: r[k] for k in ("phase", "batch", "ranks")}
        torch_ms = _find(records, backend="torch", weights=r["weights"], **keys)
        bf16_ms = _find(records, backend="tpfuse", weights="bf16", **keys)
        int8 = f"{bf16_ms / r['ms']:.2f}" if r["weights"] == "int8" else ""
        lines.append(f'{r["phase"]:>7} {r["batch"]:5d} {r["ranks"]:5d} {r["weights"]:>7} '
                     f'{torch_ms:10.2f} {r["ms"]:10.2f} {torch_ms / r["ms"]:12.2f} {int8:>18}')
    return "\n".join(lines)


def plot(records, path, size):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("plot skipped: gnuplot not found (apt-get install gnuplot-nox)")
        return
    rows = sorted({(r["phase"], r["batch"], r["ranks"]) for r in records},
                  key=lambda k: (k[0] != "prefill", k[1], k[2]))
    data = "$data << EOD\n"
    for phase, batch, ranks in rows:
        label = f"{phase} b={batch} p={ranks}"
        cells = [_find(records, backend=b, weights=w, phase=phase, batch=batch, ranks=ranks)
                 for b, w in VARIANTS]
        data += f'"{label}" ' + " ".join(f"{c:.3f}" for c in cells) + "\n"
    data += "EOD\n"
    series = [f"{'$data' if i == 0 else chr(39) * 2} using {i + 2}{':xtic(1)' if i == 0 else ''} "
              f"title '{b} {w}'" for i, (b, w) in enumerate(VARIANTS)]
    script = (
        "set terminal pngcairo size 1200,650 noenhanced font 'sans,10'\n"
        f"set output '{path}'\n"
        f"set title \"Tensor-parallel decoder ({size}): prefill (whole prompt) and decode "
        "(per token), median of the slowest rank\"\n"
        "set style data histograms\nset style histogram clustered gap 1\n"
        "set style fill solid 0.8 border -1\nset ylabel 'ms'\nset logscale y\n"
        "set xtics rotate by -30\nset grid ytics\n"
        f"{data}plot " + ", ".join(series) + "\n")
    subprocess.run([gnuplot], input=script.encode(), check=True)
    print(f"wrote {path}")


def main():
    args = parse()
    config = model.SIZES[args.size]
    print(f"model {args.size}: {config.parameters() / 1e6:.0f} M parameters, "
          f"{config.layers} layers, hidden {config.hidden}, ffn {config.ffn}, vocab {config.vocab}")
    records = []
    for ranks in args.ranks:
        start = time.perf_counter()
        records += launch.run(_bench_ranks, ranks, args)[0]
        print(f"{ranks} ranks: {time.perf_counter() - start:.0f} s", flush=True)
        with open(args.json, "w") as out:  # what is done so far, should a later job fail
            json.dump(records, out, indent=1)
    print(f"wrote {len(records)} records to {args.json}\n")
    print(f"prefill: {args.prefill} tokens, ms for the whole prompt; decode: ms per token "
          f"after {args.context} tokens of prompt")
    print(table(records))
    plot(records, args.json.rsplit(".", 1)[0] + ".png", args.size)


if __name__ == "__main__":
    main()
