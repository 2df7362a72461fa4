"""GradMem on SQuAD v1.1 with the cq_a layout: WRITE context + ' ' + question, READ 'Answer: ' + answer.

The reference implementation's script of this name, kept so that its command lines run unchanged: this is
`run_gradmemgpt_on_squad.py --layout cq_a` (same options, see that script; preset:
LAYOUT=cq_a bash scripts/run_gradmemgpt_on_squad.sh).
"""
from functools import partial

from run_gradmemgpt_on_squad import main_with_layout
from training_args import run_cli

main = partial(main_with_layout, "cq_a")

if __name__ == "__main__":
    run_cli(main)
