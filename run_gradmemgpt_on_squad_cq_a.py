"""GradMem on SQuAD v1.1 with the cq_a layout: WRITE context + ' ' + question, READ 'Answer: ' + answer.

The reference implementation's script of this name, kept so that its command lines run unchanged: this is
`run_gradmemgpt_on_squad.py --layout cq_a` (same options, see that script; preset:
LAYOUT=cq_a bash scripts/run_gradmemgpt_on_squad.sh).
"""
from typing import Optional, Sequence

from answer_task_runs import fixed_layout_args, train_gradmem
from answer_tasks import SquadDataArgs
from training_args import run_cli


def main(args: Optional[Sequence[str]] = None) -> dict:
    return train_gradmem(SquadDataArgs, fixed_layout_args("cq_a", args))


if __name__ == "__main__":
    run_cli(main)
