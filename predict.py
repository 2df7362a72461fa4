"""Answer queries about a context with a trained memory model (GradMem, RMT): WRITE the context once, then READ
each query from the memory alone and decode the answer greedily.

    python predict.py --model runs/N8-K2V2-V62_1M/<run_name>/run_142 --context '!ab:12!!cd:34!|' \
        --query '?!ab:' --query '?!cd:' --stop '|' --save_memory memory.pt
    python predict.py --model <same> --memory memory.pt --queries queries.jsonl --stop '|'

Prints one JSON line per query ({"query", "answer"}). --queries reads a jsonl file of {"query": ...} lines.
--save_memory writes the written memory ([1, M, d], torch.save); --memory reads one back instead of writing a context
(it must come from the same model). Decoding stops at the tokenizer's EOS, at a --stop token, or after
--max_new_tokens.
"""
import argparse
import json
import logging
from typing import Optional, Sequence

import torch

from evaluate_model import is_memory_model, load_trained_model
from training_args import add_log_level_argument, run_cli, setup_logging
from training_collators import single_token_ids

logger = logging.getLogger("gradmem")


def read_queries(args: argparse.Namespace) -> list:
    """The --query texts, then the "query" of every line of the --queries jsonl file."""
    queries = list(args.query or [])
    if args.queries is not None:
        with open(args.queries) as f:
            queries += [json.loads(line)["query"] for line in f if line.strip()]
    if not queries:
        raise ValueError("give at least one --query TEXT or a --queries FILE.jsonl")
    return queries


def encode(tokenizer, text: str) -> list:
    """A query's ids as the training collator makes them (special tokens included), without a trailing EOS (in
    training it follows the answer)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    while ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def write_memory(model, tokenizer, context: str) -> torch.Tensor:
    """The memory [1, M, d] written from the context (tokenised as the training collator does)."""
    device = next(model.parameters()).device
    context_ids = torch.tensor([tokenizer(context, add_special_tokens=True)["input_ids"]], device=device)
    with torch.no_grad():  # the inner steps still take their gradients (GradMem enables them itself)
        return model.write(context_ids)[0]


def load_memory(model, path: str, device) -> torch.Tensor:
    """A memory saved by --save_memory; it must have this model's memory shape [1, M, d]."""
    memory = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(memory, torch.Tensor) or tuple(memory.shape) != (1, *model.mem.shape):
        shape = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
        raise ValueError(f"{path} holds {shape}, not a memory of this model (1, {', '.join(map(str, model.mem.shape))}); "
                         "write it with --save_memory and the same --model")
    return memory


@torch.no_grad()
def answer(model, memory: torch.Tensor, query_ids: list, max_new_tokens: int, stop_ids: set) -> list:
    """Greedy answer ids to one query from [memory; query]. READ's logits[:, j] predict token j, so each step reads
    the sequence with a placeholder at the position to predict."""
    placeholder = model.pad_token_id
    ids = list(query_ids)
    new = []
    for _ in range(max_new_tokens):
        inputs = torch.tensor([ids + [placeholder]], device=memory.device)
        token = int(model.read(memory, inputs)[0, -1].argmax())
        new.append(token)
        if token in stop_ids:
            break
        ids.append(token)
    return new


def stop_token_ids(tokenizer, stops: Sequence[str]) -> set:
    return ({tokenizer.eos_token_id} - {None}) | set(single_token_ids(tokenizer, stops, what="--stop"))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run folder or checkpoint folder of a memory model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--context", help="the context text to write into memory")
    source.add_argument("--memory", help="a memory file written by --save_memory (instead of --context)")
    parser.add_argument("--query", action="append", help="a query text (repeat for several)")
    parser.add_argument("--queries", help="a jsonl file with one {\"query\": TEXT} per line")
    parser.add_argument("--save_memory", help="write the memory written from --context to this file (torch.save)")
    parser.add_argument("--stop", action="append", default=[], help="a token that ends an answer (repeatable; "
                                                                   "the KV tasks: '|'); EOS always does")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="longest answer in tokens (default: 16)")
    add_log_level_argument(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if args.save_memory and args.memory:
        raise ValueError("--save_memory writes the memory of --context; with --memory there is nothing new to save")
    queries = read_queries(args)
    model, tokenizer = load_trained_model(args.model)
    if not is_memory_model(model):
        raise ValueError(f"{args.model} is not a memory model (GradMem, RMT): predict.py writes a context into memory")
    device = next(model.parameters()).device
    if args.memory is not None:
        memory = load_memory(model, args.memory, device)
    else:
        memory = write_memory(model, tokenizer, args.context)
    if args.save_memory:
        torch.save(memory.cpu(), args.save_memory)
        logger.info("memory %s written to %s", tuple(memory.shape), args.save_memory)
    stops = stop_token_ids(tokenizer, args.stop)
    results = []
    for query in queries:
        ids = answer(model, memory, encode(tokenizer, query), args.max_new_tokens, stops)
        results.append({"query": query, "answer": tokenizer.decode(ids)})
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    run_cli(main)
