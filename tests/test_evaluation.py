"""Generated-answer exact match: greedy decoding feeds back the model's own tokens (not the labels), agrees with
GradMemGPT.generate, and scores each sample on its own."""
import torch

from evaluation import generate_answer_tokens, generated_exact_match
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
