"""The GPU benchmark's smoke mode (``benchmarks/bench_lco_gpu.py --device cpu --tiny``) and its FLOP count.

The smoke mode runs on the session's `ci` bundle, so it exports nothing: it proves the script's every
stage (FLOP count, fp32 and fp16 sessions, IOBinding timing, memory, end-to-end Hernia LCO) runs and
prints the figures the GPU run records in BENCHMARKS.md.
"""

from __future__ import annotations

import re

import onnx
from onnx import TensorProto, helper

from benchmarks.bench_lco_gpu import graph_flops, main


def test_flops_are_counted_from_conv_and_matmul_shapes():
    """Conv 3→4 channels, 3×3, on 8×8 (padded): 4·8·8 outputs × 27 products; then [B, 256] @ [256, 7]."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.0] * 108)
    dense = helper.make_tensor("d", TensorProto.FLOAT, [256, 7], [0.0] * 1792)
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 256])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["y", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "d"], ["out"])],
        "flops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 7])], initializer=[weight, dense, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    per_image = 2 * 4 * 8 * 8 * 27 + 2 * 7 * 256
    assert graph_flops(model, batch=1) == (per_image, 0)
    assert graph_flops(model, batch=3) == (3 * per_image, 0)


def test_tiny_cpu_smoke_run_prints_every_figure(ci_bundle, capsys):
    assert main(["--device", "cpu", "--tiny", "--bundle", str(ci_bundle), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    print(out)
    gflop = float(re.search(r"lco_step ([0-9.e+-]+) GFLOP per image-step \(0 nodes", out).group(1))
    assert abs(gflop * 1e9 - graph_flops(onnx.load(str(ci_bundle / "lco_step.onnx")))[0]) <= 1e-3 * gflop * 1e9
    rows = re.findall(r"^\s+(fp32|fp16)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+n/a\s+([0-9.]+)$", out, re.MULTILINE)
    assert {(precision, int(batch)) for precision, batch, *_ in rows} >= {("fp32", 1), ("fp32", 2)}
    for _, _, ms, tflops, rss in rows:
        assert float(ms) > 0 and float(tflops) > 0 and float(rss) > 0.01  # GiB
    rate = re.search(r"LCO end to end, Hernia: ([0-9.]+) images/s \(2 images.*?([0-9.]+) Adam steps", out)
    assert rate and float(rate.group(1)) > 0 and 0 <= float(rate.group(2)) <= 3
