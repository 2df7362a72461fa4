"""Make a local GPT-2-style backbone folder (byte-level BPE tokenizer trained on your texts + a fresh GPT-2) that
`--pretrained_model <folder>` accepts, for machines without hub access (tests, air-gapped GPU machines); or, with
`--tokenizer_only`, just the tokenizer, for a backbone built from scratch by the run scripts
(`--base_model llama --tokenizer_path <folder>`, which needs `--pad_token`).

    python make_local_gpt2.py --texts data/phonebook_N8 --out data/gpt2_local --n_layer 4 --n_embd 256
    python make_local_gpt2.py --texts data/phonebook_N8 --out data/tok_phonebook --tokenizer_only --pad_token \\
        --split_digits

`--texts` takes `save_to_disk` datasets (every string column of every split is used) or folders of .txt files.
The model is randomly initialised: this gives the *format* of a pretrained backbone (tokenizer with an EOS and no
pad token, GPT-2 config, weights), not a pretrained one. The tokenizer mirrors GPT-2's: byte-level BPE, no prefix
space, untrimmed offsets, `<|endoftext|>` as BOS/EOS/UNK and no pad token (GradMem's loader falls back to EOS).
Two options depart from GPT-2 for models trained from scratch on a small task:
  --split_digits  every digit is a token of its own (with the space before it, if any: ' 415' -> ' 4', '1', '5'), so a
                  number is tokenised the same way wherever it stands and a model copies it digit by digit (GPT-2's
                  BPE merges random digit groups of its training text);
  --pad_token     adds a `<pad>` token (from-scratch backbones take their pad id from the tokenizer, and the run
                  scripts refuse a `--tokenizer_path` without one).
"""
import argparse
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<pad>"
DIGIT = Regex(r" ?[0-9]")  # one digit, with the space before it


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, split_digits: bool = False,
                        pad_token: bool = False) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on `texts` (options: see the module docstring)."""
    bpe = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(DIGIT, behavior="isolated"), byte_level])
    else:
        bpe.pre_tokenizer = byte_level
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [EOS, PAD] if pad_token else [EOS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   **({"pad_token": PAD} if pad_token else {}))


def save_local_tokenizer(out: str, texts: Iterable[str], vocab_size: int = 1000, split_digits: bool = False,
                         pad_token: bool = False) -> PreTrainedTokenizerFast:
    """Train the tokenizer on `texts` and save it into `out`."""
    tokenizer = train_bpe_tokenizer(texts, vocab_size, split_digits=split_digits, pad_token=pad_token)
    Path(out).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return tokenizer


def save_local_gpt2(out: str, texts: Iterable[str], vocab_size: int = 1000, n_layer: int = 2, n_head: int = 2,
                    n_embd: int = 32, n_positions: int = 256, dropout: float = 0.0, seed: int = 0,
                    split_digits: bool = False, pad_token: bool = False) -> str:
    """Train the tokenizer on `texts`, build a fresh GPT-2 of the given size and save both into `out`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = save_local_tokenizer(out, texts, vocab_size, split_digits=split_digits, pad_token=pad_token)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def read_texts(sources: Sequence[str]) -> list:
    """Every string of every split of `save_to_disk` datasets, and every .txt file under folders."""
    texts = []
    for source in sources:
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"--texts {source}: no such folder (a save_to_disk dataset or a folder of .txt files)")
        txt_files = sorted(path.rglob("*.txt"))
        if txt_files:
            texts += [f.read_text(encoding="utf-8") for f in txt_files]
            continue
        import datasets

        data = datasets.load_from_disk(str(path))
        splits = data.values() if isinstance(data, datasets.DatasetDict) else [data]
        for split in splits:
            for name, feature in split.features.items():
                if getattr(feature, "dtype", None) in ("string", "large_string"):
                    texts += [t for t in split[name] if t]
    if not texts:
        raise ValueError(f"no text found in {list(sources)}")
    return texts


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", nargs="+", required=True, help="save_to_disk datasets or folders of .txt files")
    parser.add_argument("--out", required=True, help="folder to write (tokenizer + model)")
    parser.add_argument("--vocab_size", type=int, default=1000)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_head", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=32)
    parser.add_argument("--n_positions", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split_digits", action="store_true",
                        help="every digit a token of its own (with the space before it), not BPE digit groups")
    parser.add_argument("--pad_token", action="store_true", help="add a <pad> token (GPT-2 has none)")
    parser.add_argument("--tokenizer_only", action="store_true",
                        help="save the tokenizer alone (for --base_model ... --tokenizer_path; the model options "
                             "are then not used)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} exists and is not empty; pass --overwrite to replace its files")
    if args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    texts = read_texts(args.texts)
    if args.tokenizer_only:
        tokenizer = save_local_tokenizer(args.out, texts, args.vocab_size, args.split_digits, args.pad_token)
        print(f"saved a local tokenizer ({len(tokenizer)} tokens) to {args.out}")
        return args.out
    out = save_local_gpt2(args.out, texts, args.vocab_size, args.n_layer, args.n_head, args.n_embd,
                          args.n_positions, args.dropout, args.seed, args.split_digits, args.pad_token)
    print(f"saved a local GPT-2 backbone to {out}")
    return out


if __name__ == "__main__":
    main()
