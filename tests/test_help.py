"""`--help` of every entry point: each option has help text; options with a fixed set of values offer choices."""
import argparse
import importlib

import pytest

SCRIPTS = ("run_gradmemgpt_on_kv_retrieval", "run_gradmemgpt_on_babi", "run_gradmemgpt_on_squad",
           "run_gradmemgpt_on_squad_cq_a", "run_gradmemgpt_on_phonebook", "run_gradmemgpt_on_text_compression",
           "run_rmt_on_kv_retrieval", "run_rmt_on_squad", "run_rmt_on_phonebook", "run_rmt_on_babi",
           "run_gpt2_on_kv_retrieval", "run_gpt2_on_squad", "run_gpt2_on_phonebook", "run_gpt2_on_babi",
           "run_gradmemgpt_kv_curriculum", "evaluate_model", "predict", "convert_reference_checkpoint")
CHOICES = {"--grad_mode": {"none", "first", "second"}, "--mem_proj_mode": {"none", "proj", "per_sample"},
           "--fast_step": {"auto", "off"}, "--base_model": {"llama", "gpt2", "pythia", "mamba"},
           "--log_level": {"debug", "info", "warning", "error"}}


def help_parser(script: str, monkeypatch, capsys) -> argparse.ArgumentParser:
    """The parser that printed `script --help` (its help text is checked to be printed too)."""
    printed = []
    print_help = argparse.ArgumentParser.print_help

    def keep(self, file=None):
        printed.append(self)
        print_help(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", keep)
    with pytest.raises(SystemExit) as done:
        importlib.import_module(script).main(["--help"])
    assert done.value.code == 0 and "--" in capsys.readouterr().out
    return printed[-1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help(script, monkeypatch, capsys):
    parser = help_parser(script, monkeypatch, capsys)
    options = {action.option_strings[0]: action for action in parser._actions if action.option_strings}
    assert [name for name, action in options.items() if not action.help] == []
    if script == "run_gradmemgpt_on_kv_retrieval":
        assert set(CHOICES) <= set(options)
    for name, choices in CHOICES.items():
        if name in options:
            expected = {"none", "proj", "proj_rw"} if script.startswith("run_rmt") and name == "--mem_proj_mode" \
                else choices
            assert set(options[name].choices) == expected, name
    if "--lr_scheduler_type" in options:
        assert {"linear", "cosine", "constant_with_warmup"} <= set(options["--lr_scheduler_type"].choices)
