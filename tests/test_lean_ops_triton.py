"""lean_ops_triton: under TRITON_INTERPRET=1 (one subprocess runs every check_* below, as attn_double_bwd's kernel
tests do), lean_ops' Functions on the Triton path give the torch formulas' outputs, gradients and double gradients
(float32, tight), pass gradcheck and gradgradcheck in float64, keep lean_ops' dtypes for half inputs, and fall back
to torch for shapes the kernels do not take; without the interpreter the CPU runs the torch formulas."""
import contextlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import lean_ops

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = lean_ops.importlib.util.find_spec("triton") is not None
LAUNCHERS = ("swiglu_forward", "swiglu_backward", "swiglu_double_backward", "rms_norm_forward", "rms_norm_backward",
             "rms_norm_double_backward")


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()


@contextlib.contextmanager
def counted_launches():
    """Counts calls of lean_ops_triton's launch functions by name (lean_ops calls them through the module)."""
    import lean_ops_triton

    counts = dict.fromkeys(LAUNCHERS, 0)
    originals = {name: getattr(lean_ops_triton, name) for name in LAUNCHERS}

    def counting(name):
        def launch(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return launch

    for name in LAUNCHERS:
        setattr(lean_ops_triton, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(lean_ops_triton, name, original)


@contextlib.contextmanager
def torch_formulas():
    lean_ops.use_triton = False
    try:
        yield
    finally:
        lean_ops.use_triton = True


def three_levels(fn, inputs, seed=1, double_of=None):
    """(out, first-order grads, double grads): grads of <out, c> w.r.t. inputs (create_graph), then the grads of
    <grads, c'> w.r.t. inputs and c (only the grads indexed by double_of, default all: a None cotangent at the
    double backward for the others)."""
    out = fn(*inputs)
    cot = randn(*out.shape, dtype=out.dtype, seed=seed)
    grads = torch.autograd.grad(out, inputs, cot, create_graph=True)
    chosen = range(len(grads)) if double_of is None else double_of
    cots = [randn(*grads[i].shape, dtype=grads[i].dtype, seed=seed + 1 + i) for i in chosen]
    doubles = torch.autograd.grad([grads[i] for i in chosen], [*inputs, cot], cots, allow_unused=True)
    return [out.detach()], [g.detach() for g in grads], [None if d is None else d.detach() for d in doubles]


def assert_levels_close(a, b, rtol, atol):
    for level_a, level_b, level in zip(a, b, ("forward", "backward", "double backward")):
        for i, (x, y) in enumerate(zip(level_a, level_b)):
            if x is None or y is None:
                assert x is None and y is None, f"{level} {i}: one is None"
                continue
            assert x.dtype == y.dtype, f"{level} {i}: {x.dtype} vs {y.dtype}"
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol * max(1.0, y.abs().max().item()),
                                       msg=lambda m: f"{level} {i}: {m}")


def rms_norm(x, weight):
    return lean_ops.rms_norm(x, weight, 1e-5)


def swiglu_linear(g, u, weight):
    return lean_ops.swiglu_linear(g, u, weight)


# (name, function, input shapes, double_of) with row counts that are not powers of two and a row width that is not
# one (RMSNorm: several programs of 2 rows, the last one half empty)
CASES = [
    ("swiglu", lean_ops.swiglu, [(5, 7), (5, 7)], None),
    ("swiglu_only_ddg", lean_ops.swiglu, [(2, 3, 5), (2, 3, 5)], [0]),
    ("swiglu_only_ddu", lean_ops.swiglu, [(2, 3, 5), (2, 3, 5)], [1]),
    ("swiglu_linear", swiglu_linear, [(5, 7), (5, 7), (3, 7)], None),
    ("swiglu_linear_no_ddw", swiglu_linear, [(2, 3, 7), (2, 3, 7), (3, 7)], [0, 1]),
    ("rms_norm", rms_norm, [(5, 6), (6,)], None),
    ("rms_norm_only_p", rms_norm, [(2, 3, 8), (8,)], [0]),
    ("rms_norm_only_q", rms_norm, [(2, 3, 8), (8,)], [1]),
]


# ----------------------------------------------------------------------------------------------------------------
# checks run under TRITON_INTERPRET=1 (see test_under_the_interpreter)


def check_float32_levels_equal_the_torch_formulas():
    import lean_ops_triton

    lean_ops_triton.MAX_ROWS_PER_PROGRAM = 2
    for name, fn, shapes, double_of in CASES:
        inputs = [randn(*shape, seed=i, scale=2.0) for i, shape in enumerate(shapes)]
        with counted_launches() as counts:
            triton_levels = three_levels(fn, inputs, double_of=double_of)
        assert all(counts[n] == 1 for n in LAUNCHERS if n.startswith(name.split("_")[0])), (name, counts)
        with torch_formulas():
            torch_levels = three_levels(fn, inputs, double_of=double_of)
        assert_levels_close(triton_levels, torch_levels, rtol=1e-5, atol=1e-6)


def check_float64_gradcheck_and_gradgradcheck():
    import lean_ops_triton

    lean_ops_triton.MAX_ROWS_PER_PROGRAM = 2
    F64 = torch.float64
    cases = [(lean_ops.swiglu, [(3, 5), (3, 5)]), (swiglu_linear, [(3, 5), (3, 5), (4, 5)]),
             (rms_norm, [(5, 6), (6,)])]
    for fn, shapes in cases:
        inputs = [randn(*shape, dtype=F64, seed=i, scale=2.0) for i, shape in enumerate(shapes)]
        with counted_launches() as counts:
            assert gradcheck(fn, inputs)
            assert gradgradcheck(fn, inputs)
        assert sum(counts.values()) > 0
        with torch_formulas():
            torch_levels = three_levels(fn, inputs)
        assert_levels_close(three_levels(fn, inputs), torch_levels, rtol=1e-12, atol=1e-12)
    # a frozen down projection: no weight gradient, the same input gradients
    g, u, weight = randn(3, 5, dtype=F64), randn(3, 5, dtype=F64, seed=1), randn(4, 5, dtype=F64, seed=2).detach()
    assert gradgradcheck(swiglu_linear, (g, u, weight))


def check_half_inputs_keep_lean_ops_dtypes():
    for dtype in (torch.bfloat16, torch.float16):
        cases = [(lean_ops.swiglu, [randn(5, 7, dtype=dtype), randn(5, 7, dtype=dtype, seed=1)]),
                 (swiglu_linear, [randn(5, 7, dtype=dtype), randn(5, 7, dtype=dtype, seed=1),
                                  randn(3, 7, dtype=dtype, seed=2)]),
                 (rms_norm, [randn(5, 6, dtype=dtype), randn(6, dtype=dtype, seed=1)]),
                 (rms_norm, [randn(5, 6, dtype=dtype), randn(6, seed=1)])]  # a float32 weight: a float32 output
        for fn, inputs in cases:
            with counted_launches() as counts:
                triton_levels = three_levels(fn, inputs)
            assert sum(counts.values()) > 0
            with torch_formulas():
                torch_levels = three_levels(fn, inputs)
            assert_levels_close(triton_levels, torch_levels, rtol=2e-2, atol=2e-2)  # dtypes equal, values to rounding


def check_shapes_the_kernels_do_not_take_use_the_torch_formulas():
    cases = [(lean_ops.swiglu, [(2, 3, 5), (1, 3, 5)]), (lean_ops.swiglu, [(2, 3, 5), (5,)]),
             (swiglu_linear, [(2, 3, 5), (1, 3, 5), (4, 5)]), (rms_norm, [(3, 6), (1,)])]
    for fn, shapes in cases:
        inputs = [randn(*shape, dtype=torch.float64, seed=i) for i, shape in enumerate(shapes)]
        with counted_launches() as counts:
            triton_levels = three_levels(fn, inputs)
            assert gradgradcheck(fn, inputs)
        assert sum(counts.values()) == 0, counts
        with torch_formulas():
            assert_levels_close(triton_levels, three_levels(fn, inputs), rtol=0, atol=0)


def check_a_llama_with_lean_ops_gives_the_same_second_order_gradients():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    lean_ops.use_lean_ops(model)
    ids = torch.randint(3, 20, (2, 5), generator=torch.Generator().manual_seed(0))

    def second_order():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        loss = model(inputs_embeds=embeds, labels=ids).loss
        (d_embeds,) = torch.autograd.grad(loss, embeds, create_graph=True)
        params = [p for name, p in model.named_parameters() if "embed_tokens" not in name]
        return torch.autograd.grad(loss + d_embeds.square().sum(), params)

    with counted_launches() as counts:
        triton_grads = second_order()
    assert all(counts[name] > 0 for name in LAUNCHERS), counts
    with torch_formulas():
        torch_grads = second_order()
    for a, b in zip(triton_grads, torch_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


CHECKS = sorted(name for name in dir(sys.modules[__name__]) if name.startswith("check_"))


def run_checks():
    """Runs every check_* and prints one JSON line each (the subprocess of test_under_the_interpreter)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    module = sys.modules[__name__]
    for name in CHECKS:
        try:
            getattr(module, name)()
            result = {"check": name, "ok": True}
        except Exception:  # noqa: BLE001 - reported to the parent test
            result = {"check": name, "ok": False, "error": traceback.format_exc()}
        print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def interpreter_results():
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    results = {r["check"]: r for r in (json.loads(line) for line in res.stdout.splitlines() if line.startswith("{"))}
    assert res.returncode == 0 and results, res.stderr[-4000:]
    return results


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("check", CHECKS)
def test_under_the_interpreter(interpreter_results, check):
    result = interpreter_results[check]
    assert result["ok"], result.get("error")


def test_the_cpu_runs_the_torch_formulas_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 4)
    assert lean_ops._kernels(x, x) is None
    # (the positive case runs in the interpreter's subprocess: importing lean_ops_triton here under
    # TRITON_INTERPRET=1 would leave interpreted kernels in this process)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert lean_ops._kernels(x, x, fits=False) is None
    assert lean_ops._kernels(x, torch.zeros(0)) is None  # empty tensors
    assert lean_ops._kernels(x.long()) is None
    monkeypatch.setattr(lean_ops, "use_triton", False)
    assert lean_ops._kernels(x, x) is None


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    run_checks()
