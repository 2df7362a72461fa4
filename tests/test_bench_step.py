"""bench/bench_step.py on the CPU: its rows parse (lean ops as an optional fourth field) and its paper model takes
the lean_ops option (the timings need a GPU and are not tested)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_step import DEFAULT_ROWS, LONG_ROWS, paper_kv_model, parse_row  # noqa: E402


def test_rows_parse_with_lean_ops_as_a_fourth_field():
    assert parse_row("graph:fused_double_bwd:bf16") == ("graph", "fused_double_bwd", "bf16", False)
    assert parse_row("graph:fused_double_bwd:bf16:lean") == ("graph", "fused_double_bwd", "bf16", True)
    lean_rows = [parse_row(row) for row in DEFAULT_ROWS + LONG_ROWS if parse_row(row)[3]]
    assert {precision for _, _, precision, _ in lean_rows} == {"fp32", "tf32", "bf16"}
    for bad in ("graph:eager", "graph:eager:fp64", "graph:eager:fp32:fast", "fast:eager:fp32"):
        with pytest.raises(SystemExit, match="bad row"):
            parse_row(bad)


def test_paper_model_with_lean_ops():
    model = paper_kv_model("exact_eager", device="cpu", lean_ops=True)
    assert model.config.lean_ops
    patched = [m for m in model.modules() if "forward" in vars(m)]
    assert len(patched) == 4 + 4 * 2 + 1  # the MLPs, two norms per layer, the final norm


def test_kernel_split_by_kind_and_name():
    """The profile's split: each launch counted once, under the first kind its name matches (the lean ops' Triton
    kernels are not attention, though `_swiglu_fwd_kernel` contains `_fwd_kernel`), and the names costliest first."""
    from bench_step import kernel_split

    kernels = [("_swiglu_fwd_kernel", 1.0), ("_rms_norm_bwd_kernel", 0.5), ("_fwd_kernel", 2.0), ("_fwd_kernel", 2.0),
               ("nvjet_tst_128x64", 3.0), ("void at::native::vectorized_elementwise_kernel<4>", 0.25),
               ("some_new_kernel", 0.1)]
    by_kind, by_name = kernel_split(kernels)
    assert by_kind == {"lean ops": [1.5, 2], "attention": [4.0, 2], "matmul": [3.0, 1], "reduction": [0.0, 0],
                       "elementwise": [0.25, 1], "other": [0.1, 1]}
    assert by_name[:2] == [(4.0, 2, "_fwd_kernel"), (3.0, 1, "nvjet_tst_128x64")] and len(by_name) == 6


def test_device_kernels_leave_out_user_annotations():
    """A record_function range on the GPU timeline (the optimizer step's) overlaps the kernels it launched: counting
    it as a kernel added 1.4-3.6 ms to a 17 ms step's GPU-busy time."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from bench_step import device_kernels

    def event(name, us, device_type=DeviceType.CUDA, annotation=False):
        return FunctionEvent(id=0, name=name, thread=0, start_us=0, end_us=us, device_type=device_type,
                             use_device="cuda", is_user_annotation=annotation)

    events = [event("_fwd_kernel", 2000), event("Optimizer.step#AdamW.step", 3000, annotation=True),
              event("aten::mm", 500, device_type=DeviceType.CPU)]
    assert device_kernels(events) == [("_fwd_kernel", 2.0)]
