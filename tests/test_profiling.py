"""scripts/profiling.py: kernel categories and per-device busy time from trace events."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("profiling", os.path.join(ROOT, "scripts/profiling.py"))
profiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profiling)


@pytest.mark.parametrize("name, cat", [
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "collective"), ("all-reduce-start.3", "collective"), ("psum_647_0_fusion_1", "collective"),
    ("sgmv_shrink_paged_x3", "lora"), ("paged_attention_decode", "attention"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_coopA_NNT", "matmul"), ("loop_add_fusion", "other")])
def test_category(name, cat):
    assert profiling.category(name) == cat


def test_by_category_splits_devices_and_steps():
    # Two devices, two steps: overlapping kernels count once in busy time, fully in their category.
    k = [("GPU:0", "nvjet_gemm", 0.0, 10.0), ("GPU:0", "ncclDevKernel_AllReduce", 5.0, 10.0),
         ("GPU:0", "loop_fusion", 30.0, 4.0), ("GPU:1", "nvjet_gemm", 0.0, 20.0)]
    out = profiling.by_category(k, steps=2)
    d0 = out["per_device"]["GPU:0"]
    assert d0["us_per_step"] == {"matmul": 5.0, "collective": 5.0, "other": 2.0}
    assert d0["busy_us_per_step"] == (15.0 + 4.0) / 2 and d0["span_us_per_step"] == 34.0 / 2
    assert out["mean_us_per_step"]["matmul"] == (5.0 + 10.0) / 2
    assert out["top"]["other"][0]["name"] == "loop_fusion"
