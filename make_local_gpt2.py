"""Make a local GPT-2-style backbone folder (byte-level BPE tokenizer trained on your texts + a fresh GPT-2) that
`--pretrained_model <folder>` accepts, for machines without hub access (tests, air-gapped GPU machines).

    python make_local_gpt2.py --texts data/phonebook_N8 --out data/gpt2_local --n_layer 4 --n_embd 256

`--texts` takes `save_to_disk` datasets (every string column of every split is used) or folders of .txt files.
The model is randomly initialised: this gives the *format* of a pretrained backbone (tokenizer with an EOS and no
pad token, GPT-2 config, weights), not a pretrained one. The tokenizer mirrors GPT-2's: byte-level BPE, no prefix
space, untrimmed offsets, `<|endoftext|>` as BOS/EOS/UNK and no pad token (GradMem's loader falls back to EOS).
"""
import argparse
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def save_local_gpt2(out: str, texts: Iterable[str], vocab_size: int = 1000, n_layer: int = 2, n_head: int = 2,
                    n_embd: int = 32, n_positions: int = 256, dropout: float = 0.0, seed: int = 0) -> str:
    """Train the tokenizer on `texts`, build a fresh GPT-2 of the given size and save both into `out`."""
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=eos_id, eos_token_id=eos_id)
    Path(out).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
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
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} exists and is not empty; pass --overwrite to replace its files")
    if args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    out = save_local_gpt2(args.out, read_texts(args.texts), args.vocab_size, args.n_layer, args.n_head,
                          args.n_embd, args.n_positions, args.dropout, args.seed)
    print(f"saved a local GPT-2 backbone to {out}")
    return out


if __name__ == "__main__":
    main()
