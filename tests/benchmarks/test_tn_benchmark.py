"""Tests of the TN benchmark: timing/memory helpers, baselines, wiring, analysis and the CLI."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from kfac_tn import tn
from kfac_tn.benchmarks import tn as bench
from kfac_tn.benchmarks._timing import Memory, measure_memory, time_call, time_calls
from kfac_tn.benchmarks.layers import CATEGORIES, ConvLayer, benchmark_layers
from kfac_tn.tn.spec import conv_spec


def make_layer(cin, cout, spatial, kernel, stride, padding, dilation, groups, bias) -> ConvLayer:
    spec = conv_spec(spatial, kernel, stride, padding, dilation, groups)
    return ConvLayer(
        net="test",
        name=f"k{kernel}s{stride}p{padding}d{dilation}g{groups}",
        in_channels=cin,
        out_channels=cout,
        input_spatial=tuple(spatial),
        kernel_size=tuple(kernel),
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
        groups=groups,
        bias=bias,
        category=spec.layer_category,
    )


LAYERS = {
    "general_groups_bias": make_layer(4, 6, (5, 6), (2, 3), (2, 1), (1, 0), (1, 2), 2, True),
    "general_3x3": make_layer(3, 5, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1, False),
    "dense_1x1": make_layer(4, 3, (4, 5), (1, 1), (1, 1), (0, 0), (1, 1), 1, True),
    "dense_patchify": make_layer(2, 4, (8, 8), (4, 4), (4, 4), (0, 0), (1, 1), 1, False),
    "down_1x1_s2": make_layer(4, 2, (6, 7), (1, 1), (2, 2), (0, 0), (1, 1), 1, False),
    "mixed_1x3": make_layer(4, 4, (5, 5), (1, 3), (1, 1), (0, 1), (1, 1), 2, True),
}
LAYER_IDS = list(LAYERS)


def test_layer_categories_cover_the_paper_classes():
    assert {la.category for la in LAYERS.values()} == set(CATEGORIES)


# ------------------------------------------------------------------------------------------
# timing and memory helpers
# ------------------------------------------------------------------------------------------


def test_time_call_counts_calls():
    calls = []
    timing = time_call(lambda: calls.append(1), repeats=4, warmup=2, min_round_s=0.0)
    # warm-up 2, one calibration call (it already exceeds a 0 s round), 4 rounds of 1 call
    assert len(calls) == 2 + 1 + 4
    assert timing.number == 1 and len(timing.rounds) == 4
    assert timing.min_s <= timing.median_s <= max(timing.rounds)


def test_time_call_measures_wall_time():
    timing = time_call(lambda: time.sleep(0.003), repeats=3, warmup=0, min_round_s=0.0)
    assert timing.min_s >= 0.003


def test_time_calls_interleaves_rounds_in_rotated_order():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timings = time_calls(calls, repeats=3, warmup=1, min_round_s=0.0)
    assert list(timings) == ["a", "b", "c"]
    # per call: 1 warm-up + 1 calibration; then rounds rotate the order
    assert order[:6] == ["a", "a", "b", "b", "c", "c"]
    assert order[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"repeats": 0}, "Invalid repeats: 0"), ({"warmup": -1}, "Invalid warmup: -1")],
    ids=["repeats", "warmup"],
)
def test_timing_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_call(lambda: None, **kwargs)
    with pytest.raises(ValueError, match=match):
        time_calls({"a": lambda: None}, **kwargs)


def test_cpu_memory_of_known_allocations():
    def fn():
        scratch = torch.empty(2**21)  # 8 MiB of float32, freed before returning
        out = torch.ones(1024)  # 4 KiB, returned
        del scratch
        return out

    mem = measure_memory(fn, "cpu")
    assert mem == Memory(peak_bytes=2**23 + 4096, retained_bytes=4096)
    assert mem.aux_bytes == 2**23


def test_cpu_memory_inputs_are_not_counted():
    x = torch.randn(2, 3, 8, 8)

    mem = measure_memory(lambda: F.unfold(x, 3), "cpu")
    assert mem.retained_bytes == 2 * 3 * 9 * 36 * 4  # the output only, not x
    assert mem.aux_bytes < 2 * 3 * 9 * 36 * 4


def test_memory_rejects_unknown_device():
    with pytest.raises(ValueError, match="Invalid device: 'meta'"):
        measure_memory(lambda: None, "meta")


# ------------------------------------------------------------------------------------------
# the standard baselines, against independent references (float64)
# ------------------------------------------------------------------------------------------


def loop_unfold(layer: ConvLayer, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input ``[N, C·ΠK, ΠO]`` by explicit loops over (c, k, o) (2-d only)."""
    n, c = x.shape[:2]
    (p1, p2), (s1, s2), (d1, d2) = layer.padding, layer.stride, layer.dilation
    (k1, k2), (o1, o2) = layer.kernel_size, layer.output_spatial
    xp = F.pad(x, (p2, p2, p1, p1))
    cols = torch.zeros(n, c, k1, k2, o1, o2, dtype=x.dtype)
    for a, b, i, j in itertools.product(range(k1), range(k2), range(o1), range(o2)):
        cols[:, :, a, b, i, j] = xp[:, :, s1 * i + d1 * a, s2 * j + d2 * b]
    return cols.reshape(n, c * k1 * k2, o1 * o2)


def loop_factor(layer: ConvLayer, x: torch.Tensor, reduce: bool) -> torch.Tensor:
    """Per-group KFAC input factor from :func:`loop_unfold`, with an explicit ones row for bias."""
    u = loop_unfold(layer, x)
    n, cd, o = u.shape
    g = layer.groups
    blocks = []
    for group in range(g):
        ug = u[:, group * cd // g : (group + 1) * cd // g]
        if layer.bias:
            ug = torch.cat([ug, torch.ones(n, 1, o, dtype=u.dtype)], dim=1)
        if reduce:
            mean = ug.mean(dim=2)
            blocks.append(sum(torch.outer(mean[i], mean[i]) for i in range(n)) / n)
        else:
            blocks.append(
                sum(torch.outer(ug[i, :, j], ug[i, :, j]) for i in range(n) for j in range(o))
                / (n * o)
            )
    return torch.stack(blocks)


@pytest.fixture
def inputs_of():
    def make(layer: ConvLayer, batch: int = 3):
        return bench.make_inputs(layer, batch, torch.float64, torch.device("cpu"), seed=1)

    return make


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYER_IDS)
def test_standard_unfold_and_factors_match_loops(layer, inputs_of):
    t = inputs_of(layer)
    assert_close(bench.make_call("unfold", "standard", layer, t)(), loop_unfold(layer, t["x"]))
    expand = bench.make_call("kfac_expand_factor", "standard", layer, t)()
    reduce = bench.make_call("kfac_reduce_factor", "standard", layer, t)()
    assert_close(expand, loop_factor(layer, t["x"], reduce=False))
    assert_close(reduce, loop_factor(layer, t["x"], reduce=True))


@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYER_IDS)
def test_standard_conv_and_vjps_match_autograd(layer, inputs_of):
    t = inputs_of(layer)
    x = t["x"].clone().requires_grad_(True)
    w = t["weight"].clone().requires_grad_(True)
    y = F.conv2d(x, w, t["bias"], layer.stride, layer.padding, layer.dilation, layer.groups)
    gx, gw = torch.autograd.grad(y, (x, w), t["v"])
    assert_close(bench.make_call("conv", "standard", layer, t)(), y.detach())
    assert_close(bench.make_call("conv_input_vjp", "standard", layer, t)(), gx)
    assert_close(bench.make_call("conv_weight_vjp", "standard", layer, t)(), gw)


# ------------------------------------------------------------------------------------------
# the engine calls (argument wiring), against the baselines (float64)
# ------------------------------------------------------------------------------------------

ENGINE_CASES = [
    (routine, impl, name)
    for routine in bench.ROUTINES
    for impl in ("tn", "tn_simplified", "auto", "engine_standard")
    for name in LAYER_IDS
]


@pytest.mark.parametrize(
    ("routine", "impl", "name"), ENGINE_CASES, ids=["-".join(c) for c in ENGINE_CASES]
)
def test_engine_call_matches_standard(routine, impl, name, inputs_of):
    if getattr(tn, routine, None) is None:
        pytest.skip(f"kfac_tn.tn.{routine} not available yet")
    layer = LAYERS[name]
    t = inputs_of(layer)
    expected = bench.make_call(routine, "standard", layer, t)()
    assert_close(bench.make_call(routine, impl, layer, t)(), expected)


# ------------------------------------------------------------------------------------------
# the benchmark loop and its analysis
# ------------------------------------------------------------------------------------------


def test_run_rows_and_errors():
    layers = [LAYERS["general_3x3"], LAYERS["down_1x1_s2"]]
    routines = ["kfac_reduce_factor", "conv"]
    rows, failures = bench.run(
        layers, routines, ["tn", "auto"], batch_size=2, repeats=1, dtype=torch.float64
    )
    for row in rows:
        assert set(bench.ROW_KEYS) <= set(row)
        assert row["time_s"] > 0 and row["peak_mem_bytes"] >= 0
        assert row["batch_size"] == 2 and row["dtype"] == "float64" and row["device"] == "cpu"
        if row["impl"] == "standard":
            assert row["rel_err"] is None
        else:
            assert row["rel_err"] <= 1e-10
    measured = {(r["layer"], r["routine"], r["impl"]) for r in rows}
    failed = {(f.routine, f.impl) for f in failures}
    for layer, routine in itertools.product(layers, routines):
        assert (layer.name, routine, "standard") in measured
        if getattr(tn, routine, None) is not None:
            assert {(layer.name, routine, i) for i in ("tn", "auto")} <= measured
        else:
            assert (routine, "(engine)") in failed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"routines": ["fold"]}, "Invalid routine: 'fold'"),
        ({"impls": ["fast"]}, "Invalid impl: 'fast'"),
        ({"batch_size": 0}, "Invalid batch_size: 0"),
    ],
    ids=["routine", "impl", "batch_size"],
)
def test_run_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.run([LAYERS["general_3x3"]], **kwargs)


def synthetic_rows(routine: str, entries) -> list[dict]:
    """Rows for ``routine`` from (layer, category, std time, auto time, std mem, auto mem, unf)."""
    rows = []
    for layer, category, t_std, t_auto, m_std, m_auto, unfolded in entries:
        for impl, t, m in (("standard", t_std, m_std), ("auto", t_auto, m_auto)):
            rows.append(
                {
                    "net": "n",
                    "layer": layer,
                    "category": category,
                    "routine": routine,
                    "impl": impl,
                    "batch_size": 32,
                    "device": "cpu",
                    "dtype": "float32",
                    "time_s": t,
                    "peak_mem_bytes": m,
                    "label": layer,
                    "count": 1,
                    "min_time_s": t,
                    "round_times_s": [t],
                    "out_bytes": 0,
                    "unfolded_bytes": unfolded,
                    "rel_err": 0.0,
                    "threads": 2,
                }
            )
    return rows


MIB = 2**20


def test_speedups_join_standard_rows():
    rows = synthetic_rows(
        "kfac_reduce_factor",
        [("a", "general", 4.0, 1.0, 100, 5, MIB), ("b", "dense", 1.0, 2.0, 0, 0, MIB)],
    )
    joined = {r["layer"]: r for r in bench.speedups(rows)}
    assert set(joined) == {"a", "b"}
    assert joined["a"]["speedup"] == 4.0 and joined["a"]["mem_ratio"] == 0.05
    assert joined["b"]["speedup"] == 0.5 and joined["b"]["mem_ratio"] == 1.0


def test_speedups_with_min_statistic():
    rows = synthetic_rows("conv", [("a", "general", 4.0, 1.0, 1, 1, 1)])
    for row in rows:
        row["min_time_s"] = {"standard": 3.0, "auto": 2.0}[row["impl"]]
        # per-round ratios 1, 3, 10: median 3 (the ratio of the rounds' medians is 4 / 1)
        row["round_times_s"] = {"standard": [1.0, 6.0, 4.0], "auto": [1.0, 2.0, 0.4]}[row["impl"]]
    assert [r["speedup"] for r in bench.speedups(rows, "median")] == [4.0]
    assert [r["speedup"] for r in bench.speedups(rows, "min")] == [1.5]
    assert [r["speedup"] for r in bench.speedups(rows, "paired")] == [3.0]
    with pytest.raises(ValueError, match="Invalid stat: 'mean'"):
        bench.speedups(rows, "mean")


def targets_by_name(rows):
    return {t.target: t for t in bench.check_targets(rows)}


def test_targets_pass_and_fail_as_specified():
    reduce_ok = [
        ("a", "general", 4.0, 1.0, 100 * MIB, 5 * MIB, 2 * MIB),
        ("b", "dense", 3.0, 1.0, 100, 50, MIB // 2),  # small unfolded input: memory not in scope
        ("c", "down", 1.0, 0.5, 100, 1, 2 * MIB),
    ]
    expand_ok = [("a", "dense", 1.0, 1.0, 100, 99, MIB), ("b", "general", 1.0, 1.05, 0, 10, MIB)]
    t = targets_by_name(
        synthetic_rows("kfac_reduce_factor", reduce_ok)
        + synthetic_rows("kfac_expand_factor", expand_ok)
    )
    assert t["kfac_reduce_factor: median speed-up >= 3"].passed
    assert t["kfac_reduce_factor: every layer speed-up >= 1.0"].passed
    mem = t["kfac_reduce_factor: aux. memory <= 10% of standard where unfolded input >= 1 MiB"]
    assert mem.passed and "over 2 layers" in mem.detail
    assert t["kfac_expand_factor: every layer speed-up >= 0.95"].passed
    assert t["kfac_expand_factor: aux. memory < standard on dense and down layers"].passed
    assert t["conv: every layer speed-up >= 0.95"].passed is None  # not measured
    diag = t["(diagnostic) kfac_reduce_factor: aux. memory <= 10% of the unfolded input (>= 1 MiB)"]
    assert not diag.passed and "n:a 2.50" in diag.detail  # 5 MiB aux on a 2 MiB unfolded input

    reduce_bad = [
        ("a", "general", 2.0, 1.0, 100, 11, 2 * MIB),  # memory ratio 0.11 > 0.10
        ("b", "general", 0.9, 1.0, 100, 1, 2 * MIB),  # slower than standard
        ("c", "down", 5.0, 1.0, 100, 1, 2 * MIB),
    ]
    expand_bad = [("a", "down", 1.0, 1.1, 100, 100, MIB)]  # 0.91 speed-up, equal memory
    t = targets_by_name(
        synthetic_rows("kfac_reduce_factor", reduce_bad)
        + synthetic_rows("kfac_expand_factor", expand_bad)
    )
    assert not t["kfac_reduce_factor: median speed-up >= 3"].passed  # median 2
    every = t["kfac_reduce_factor: every layer speed-up >= 1.0"]
    assert not every.passed and "n:b 0.90" in every.detail
    assert not t[
        "kfac_reduce_factor: aux. memory <= 10% of standard where unfolded input >= 1 MiB"
    ].passed
    assert not t["kfac_expand_factor: every layer speed-up >= 0.95"].passed
    assert not t["kfac_expand_factor: aux. memory < standard on dense and down layers"].passed


def test_summary_table_lists_median_min_and_worst_layer():
    rows = synthetic_rows(
        "kfac_reduce_factor",
        [("a", "general", 4.0, 1.0, 1, 1, 1), ("b", "general", 1.0, 2.0, 1, 1, 1)],
    )
    table = bench.summary_table(rows)
    assert "threads=2" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("kfac_reduce_factor  general"))
    fields = line.split()
    assert fields[2:7] == ["auto", "2", f"{(4.0 + 0.5) / 2:.2f}", "0.50", "4.00"]
    assert "n:b" in line


def test_quick_layers_cover_every_category_with_few_layers():
    pytest.importorskip("torchvision")
    layers = benchmark_layers()
    quick = bench.quick_layers(layers)
    assert len(quick) <= 2 * len(CATEGORIES)
    assert {la.category for la in quick} == set(CATEGORIES)
    assert all(la in layers for la in quick)


def test_select_layers_by_pattern_and_limit():
    layers = list(LAYERS.values())
    assert bench.select_layers(layers, ["test:k(1, 1)*"]) == [
        LAYERS["dense_1x1"],
        LAYERS["down_1x1_s2"],
    ]
    assert bench.select_layers(layers, None, 2) == layers[:2]


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


CLI_ROUTINES = ["conv", "kfac_reduce_factor"]


def test_cli_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--nets", "2c2d", "--routines", *CLI_ROUTINES, "--batch-size", "2"]
    argv += ["--repeats", "1", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["layer"] for r in rows} == {"features.0", "features.3"}
    for row in rows:
        assert set(bench.ROW_KEYS) <= set(row)
        assert row["category"] == "general" and row["net"] == "2c2d"
        assert row["time_s"] > 0 and row["peak_mem_bytes"] >= 0 and row["threads"] == 1
    assert {r["routine"] for r in rows} == set(CLI_ROUTINES)
    impls = {(r["routine"], r["impl"]) for r in rows}
    for routine in CLI_ROUTINES:
        if getattr(tn, routine, None) is not None:
            assert {(routine, i) for i in ("standard", "tn", "tn_simplified", "auto")} <= impls
    for name in ("speedup.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "issue #2 targets for impl=auto" in printed
    assert "threads=1" in printed
    assert (out / "summary.txt").read_text().strip() in printed


@pytest.mark.slow
def test_cli_quick_run(tmp_path):
    pytest.importorskip("torchvision")
    assert bench.main(["--quick", "--batch-size", "8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["category"] for r in rows} == set(CATEGORIES)
    assert len({(r["net"], r["layer"]) for r in rows}) <= 2 * len(CATEGORIES)
