"""bench/kv_write_curvature.py: the power iteration finds the extreme eigenvalues of each WRITE step's inner-loss
Hessian (checked against the full Hessian in float64), along the model's own WRITE, and refuses other WRITEs."""
import pytest
import torch

from bench import kv_write_curvature as kc
from test_evaluate_kv_checkpoints import tiny_checkpoint


def tiny(tmp_path, **options):
    return tiny_checkpoint(tmp_path / "N2", hidden_size=8, lr=0.5, **options)


def test_power_iteration_finds_the_extreme_eigenvalues_of_each_write_step(tmp_path):
    model, tokenizer = kc.load(tiny(tmp_path))
    model.double()
    with torch.no_grad():
        model.mem.normal_(0, 0.3)  # a Hessian with eigenvalues of both signs
    model.config.eval_lr = 20.0  # a step long enough to move the second step's Hessian
    ids = torch.randint(3, 60, (3, 9), generator=torch.Generator().manual_seed(1))
    ids[2, 6:] = tokenizer.pad_token_id  # a shorter context, padded
    steps = kc.write_curvature(model, ids, tokenizer.pad_token_id, iterations=400, seed=0)
    assert len(steps) == 2
    # the same WRITE by hand, with the full Hessian of each sample's inner loss in its memory
    K, lr = model.write_steps()
    mask = ids != tokenizer.pad_token_id
    embeds = model.get_input_embeddings()(ids).detach()
    memory = model.mem.detach().expand(3, -1, -1).clone()
    for top, bottom in steps:
        for b in range(3):
            def loss(m, b=b):
                return model._inner_loss([m.view(1, *memory.shape[1:])], embeds[b:b + 1], ids[b:b + 1],
                                         mask[b:b + 1], mask[b:b + 1].sum(dim=1)).sum()
            flat = memory[b].flatten()
            eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))
            assert (top[b].item(), bottom[b].item()) == (pytest.approx(eigenvalues[-1].item(), rel=1e-5, abs=1e-9),
                                                         pytest.approx(eigenvalues[0].item(), rel=1e-5, abs=1e-9))
        m = memory.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model._inner_loss([m], embeds, ids, mask, mask.sum(dim=1)).sum(), m)
        memory = (m - lr * grad).detach()
    assert any(bottom.min() < 0 for _, bottom in steps)  # the test covers a negative end of the spectrum


def test_the_table_and_refusals(tmp_path, capsys):
    folder = tiny(tmp_path)
    (result,) = kc.main([str(folder), "--samples", "3", "--batch_size", "2", "--iterations", "5"])
    assert (result["K"], result["inner_lr"], len(result["steps"]), len(result["product"])) == (2, 0.5, 2, 3)
    gains = torch.tensor([step["gain"] for step in result["steps"]])
    assert torch.allclose(gains.prod(dim=0), torch.tensor(result["product"]))
    assert f"| {folder} | 2 / 0.5 | product of the 2 gains |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not plain SGD"):
        kc.load(tiny(tmp_path / "adam", use_adam=True))
    with pytest.raises(SystemExit):
        kc.main([str(folder), "--iterations", "1"])
