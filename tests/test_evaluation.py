"""Generated-answer exact match: greedy decoding feeds back the model's own tokens (not the labels), agrees with
GradMemGPT.generate (memory models) and with transformers' greedy generate (plain causal LMs), and scores each sample
on its own."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from evaluation import generate_answer_tokens, generate_answer_tokens_causal, generated_exact_match
from test_fast_step import PAD, VOCAB, tiny_model


class CountingModel(torch.nn.Module):
    """read() predicts 'previous token + 1' at every position: a model whose teacher-forced and generated answers
    differ as soon as one answer token is wrong."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def write(self, context_ids):
        return torch.zeros(context_ids.shape[0], 1, 1), {}

    def read(self, memory, ids):
        previous = torch.cat([ids[:, :1], ids[:, :-1]], dim=1)
        return torch.nn.functional.one_hot((previous + 1) % VOCAB, VOCAB).float()


def test_decoding_feeds_back_generated_tokens():
    model = CountingModel()
    query = torch.tensor([[3, 4, 9, 9, 9], [7, 8, 8, 2, PAD]])
    labels = torch.tensor([[-100, -100, 9, 9, 9], [-100, -100, 8, 2, -100]])
    generated = generate_answer_tokens(model, model.write(query)[0], query, labels)
    assert generated.tolist() == [[3, 4, 5, 6, 7], [7, 8, 9, 10, PAD]]  # from its own earlier tokens
    metrics = generated_exact_match(model, [{"context_input_ids": query, "query_input_ids": query, "labels": labels}])
    assert metrics["generated_exact_match"] == 0.0 and metrics["generated_samples"] == 2
    right = torch.tensor([[-100, -100, 5, 6, 7], [-100, -100, 9, 10, -100]])
    query_right = torch.where(right != -100, right, query)
    metrics = generated_exact_match(model, [{"context_input_ids": query, "query_input_ids": query_right,
                                             "labels": right}], ignore_ids=[10])
    assert metrics["generated_exact_match"] == 1.0 and metrics["generated_token_accuracy"] == 1.0


def test_agrees_with_gradmem_generate_and_is_per_sample():
    model = tiny_model(K=1).eval()
    g = torch.Generator().manual_seed(3)
    context = torch.randint(1, VOCAB, (4, 7), generator=g)
    query = torch.randint(1, VOCAB, (4, 6), generator=g)
    labels = torch.full_like(query, -100)
    labels[:, 3:] = query[:, 3:]
    memory = model.write(context)[0]
    ours = generate_answer_tokens(model, memory, query, labels)
    theirs = model.generate(memory, query[:, :3], max_new_tokens=3)
    assert torch.equal(ours[:, 3:], theirs)
    rows = [generate_answer_tokens(model, model.write(context[i:i + 1])[0], query[i:i + 1], labels[i:i + 1])
            for i in range(4)]
    assert torch.equal(torch.cat(rows), ours)


def test_causal_lm_decoding_agrees_with_greedy_generate():
    """A full-context LM's answers: rows of different lengths (right padded) decode as each row alone would, and as
    transformers' greedy generate does."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=PAD)).eval()
    g = torch.Generator().manual_seed(1)
    lengths, n_answer = [9, 6, 12], 3
    ids = torch.full((3, 16), PAD)
    labels = torch.full((3, 16), -100)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=g)
        labels[row, length - n_answer:length] = ids[row, length - n_answer:length]
    ours = generate_answer_tokens_causal(model, ids, labels)
    for row, length in enumerate(lengths):
        prompt = ids[row:row + 1, :length - n_answer]
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_answer,
                                do_sample=False, pad_token_id=PAD)
        assert torch.equal(ours[row, :length], theirs[0])
        assert torch.equal(ours[row, length:], ids[row, length:])  # pads untouched
    metrics = generated_exact_match(model, [{"input_ids": ids, "attention_mask": ids != PAD, "labels": labels}])
    right = [bool(torch.equal(ours[r, :n], ids[r, :n])) for r, n in enumerate(lengths)]
    assert metrics["generated_exact_match"] == pytest.approx(sum(right) / 3) and metrics["generated_samples"] == 3
    labels[0, 0] = 5
    with pytest.raises(ValueError, match="position 0"):
        generate_answer_tokens_causal(model, ids, labels)
