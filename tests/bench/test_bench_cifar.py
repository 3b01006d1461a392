"""bench_cifar's statistics and run bookkeeping: the paired comparison, McNemar's test and --merge.

The bench itself needs CIFAR-10 and hours; these check the pieces that turn its runs into the numbers quoted in
bench/RESULTS.md, on tiny ONNX classifiers run by the real onnxruntime.
"""

import importlib.util
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import binomtest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cifar", os.path.join(ROOT, "bench", "bench_cifar.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _linear_onnx(path: str, w: np.ndarray) -> None:
    """A classifier x -> x @ w, enough for onnxruntime to give per-sample answers."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "lin", [x], [y],
                              [numpy_helper.from_array(w.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _toy_task(seed: int, n: int, d: int, k: int):
    """n random inputs labelled by a random linear map: noisy copies of the map are classifiers of known quality."""
    g = np.random.default_rng(seed)
    x = torch.from_numpy(g.standard_normal((n, d)).astype(np.float32))
    w_true = g.standard_normal((d, k))
    y = torch.from_numpy((x.numpy() @ w_true).argmax(1))
    return g, x, y, w_true, torch.utils.data.TensorDataset(x, y)


@pytest.mark.parametrize("b,c", [(0, 0), (5, 5), (0, 7), (602, 473), (604, 459), (317, 262), (13, 2)])
def test_mcnemar_p_is_the_exact_two_sided_binomial_test(bench, b, c):
    want = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert bench.mcnemar_p(b, c) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_paired_rows_match_each_mixed_row_with_the_uniform_row_of_its_plan_and_seed(bench, tmp_path):
    g, x, y, w_true, ds = _toy_task(0, 300, 6, 4)
    weights = {"u0": w_true + 0.8 * g.standard_normal((6, 4)), "m0": w_true + 0.3 * g.standard_normal((6, 4)),
               "u1": w_true + 1.0 * g.standard_normal((6, 4)), "m1": w_true + 0.5 * g.standard_normal((6, 4))}
    hits = {}
    for name, w in weights.items():
        os.makedirs(tmp_path / name)
        _linear_onnx(str(tmp_path / name / "model.onnx"), w)
        hits[name] = (x.numpy() @ w).argmax(1) == y.numpy()
    # a merge of a seed-0 run and a seed-1 run: the two mixed rows share a key, the uniform rows too
    def row(key, uniform, w, seed, out):
        return {"key": key, "label": key, "uniform": uniform, "w": w, "a": w, "seed": seed, "out": str(tmp_path / out)}

    rows = [row("w2a2_uniform", True, 2, 0, "u0"), row("w2a2_mixed", False, 2, 0, "m0"),
            row("w2a2_uniform", True, 2, 1, "u1"), row("w2a2_mixed", False, 2, 1, "m1"),
            row("w3a3_mixed", False, 3, 0, "m0")]  # no W3A3 baseline: not paired
    pairs = bench.paired_rows(rows, ds, threads=1)
    assert [q["uniform"] for q in pairs] == ["w2a2_uniform", "w2a2_uniform [seed 1]"]
    for q, (m, u) in zip(pairs, [("m0", "u0"), ("m1", "u1")]):
        hm, hu = hits[m], hits[u]
        b, c = int((hm & ~hu).sum()), int((~hm & hu).sum())
        assert (q["both"], q["mixed_only"], q["uniform_only"]) == (int((hm & hu).sum()), b, c)
        assert q["diff"] == pytest.approx(100.0 * (hm.mean() - hu.mean()))
        assert q["acc_mixed"] == pytest.approx(100.0 * hm.mean())
        assert q["se"] == pytest.approx(100.0 * np.sqrt(b + c - (b - c) ** 2 / 300) / 300)
    assert pairs[0]["diff"] != pairs[1]["diff"]  # the seed-1 pair was not served the seed-0 models' answers


def test_seed_means_average_each_plans_gain_over_its_seeds(bench, tmp_path):
    g, x, y, w_true, ds = _toy_task(1, 400, 5, 3)
    hits, rows = {}, []
    for seed in range(3):
        for name, noise, uniform in [("u", 1.0, True), ("m", 0.4, False), ("lone", 0.6, False)]:
            if name == "lone" and seed:
                continue  # a plan run on one seed only gets no mean
            w = w_true + noise * g.standard_normal((5, 3))
            d = tmp_path / f"{name}{seed}"
            os.makedirs(d)
            _linear_onnx(str(d / "model.onnx"), w)
            hits[name, seed] = (x.numpy() @ w).argmax(1) == y.numpy()
            label = name + (f" [seed {seed}]" if seed else "")  # as the bench labels a --seed N run's rows
            # "lone" is the same row key at another weight-alpha: a different plan, not pooled with "m"
            rows.append({"key": "w2a2_uniform" if uniform else "w2a2_mixed", "label": label, "uniform": uniform,
                         "w": 2, "a": 2, "seed": seed, "out": str(d), "acc_fq": 80.0 + seed + (0 if uniform else 1.5),
                         "weight_alpha": 0.03 if name == "lone" else 0.4})
    found: dict = {}
    pairs = bench.paired_rows(rows, ds, threads=1, hits=found)
    means = bench.seed_means(pairs, found)
    assert [q["label"] for q in means] == ["m"] and means[0]["seeds"] == [0, 1, 2]
    gains = [100.0 * (hits["m", s].mean() - hits["u", s].mean()) for s in range(3)]
    assert means[0]["diff"] == pytest.approx(np.mean(gains))
    assert means[0]["sd_seeds"] == pytest.approx(np.std(gains, ddof=1))
    d = np.mean([hits["m", s].astype(float) - hits["u", s] for s in range(3)], axis=0)
    assert means[0]["se_images"] == pytest.approx(100.0 * d.std() / np.sqrt(400))
    assert means[0]["fq_diff"] == pytest.approx(1.5)
    assert "mean over seeds" in bench.fmt_paired(pairs, means)


FP = {"acc": 90.0, "params": 269722, "gbitops": 41.5, "kb": 1053.6}


def _run(d, spec, seed, rows):
    os.makedirs(d)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump({"meta": {"spec": spec, "args": {"seed": seed}}, "fp": FP, "rows": rows}, f)


def test_merge_keeps_the_data_spec_and_each_rows_seed(bench, tmp_path):
    row = {"key": "w2a2_uniform", "label": "u", "uniform": True, "w": 2, "a": 2, "group": "uniform",
           "acc_fq": 80.0, "acc_onnx": 80.0, "bitops": 1e8, "size": 1e4, "lr": 0.02,
           "times": dict.fromkeys(bench.STAGES, 1.0)}
    _run(tmp_path / "s0", "cifar10:/d", 0, [row])
    _run(tmp_path / "s1", "cifar10:/d", 1, [row])
    assert bench.merge([str(tmp_path / "s0"), str(tmp_path / "s1")], str(tmp_path / "m")) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["meta"]["spec"] == "cifar10:/d"
    assert [r["seed"] for r in merged["rows"]] == [0, 1]


def test_merge_of_runs_on_different_data_is_a_one_line_error(bench, tmp_path, capsys):
    _run(tmp_path / "a", "cifar10:/a", 0, [])
    _run(tmp_path / "b", "cifar10:/b", 0, [])
    with pytest.raises(SystemExit) as e:
        bench.merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "different data" in err and "\n" not in err
    assert not (tmp_path / "m").exists()


def test_with_method_rescores_only_the_default_mixed_rows(bench):
    jobs = bench.make_jobs([(3, 3), (2, 4)], 0.02, ["impq"], True, lambda w, a: 1e8 * w * a)
    out = bench.with_method(jobs, "hutchinson")
    by_key = {j["key"]: j for j in out}
    assert by_key["w3a3_mixed_channel"]["sensitivity"] == "hutchinson"
    assert "(hutchinson, kernel-wise)" in by_key["w3a3_mixed_channel"]["label"]
    assert by_key["w3a3_uniform"]["sensitivity"] == "fisher"  # uniform rows search nothing
    assert by_key["w2a4_mixed_impq"]["sensitivity"] == "impq"  # the method comparison keeps its own method
    assert [j["key"] for j in out] == [j["key"] for j in jobs]
    assert jobs[0]["sensitivity"] == "fisher"  # the input is not modified


def test_an_unknown_sensitivity_method_is_a_one_line_error(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--sensitivity", "nope", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--sensitivity 'nope'" in err and "hutchinson" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_merge_takes_reduced_runs_of_the_same_source_and_limits_as_one_data_set(bench, tmp_path, capsys):
    """Each --train-limit run writes its own identical copy (OUT/data), so their specs differ; the GPU script's
    rehearsal merges two such runs. Different limits are still different data."""
    def run(d, limit):
        os.makedirs(d)
        meta = {"spec": f"cifar10:{d}/data", "args": {"seed": 0, "data": "/src/cifar10", "train_limit": limit,
                                                      "test_limit": None, "out": str(d)}}
        (d / "results.json").write_text(json.dumps({"meta": meta, "fp": FP, "rows": []}))

    run(tmp_path / "a", 256)
    run(tmp_path / "b", 256)
    assert bench.merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m")) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["meta"]["spec"] == f"cifar10:{tmp_path / 'a'}/data"  # a spec --paired can load, not the key
    capsys.readouterr()
    run(tmp_path / "c", 512)
    with pytest.raises(SystemExit) as e:
        bench.merge([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "m2"))
    assert e.value.code == 2 and "different data" in capsys.readouterr().err


def test_the_lr_sweep_is_narrowed_by_rows_like_every_other_row(bench):
    settings = [("sgd", 0.02), ("sgd", 0.01), ("adam", 1e-4)]
    every = bench.sweep_jobs(settings, [(2, 4)], None, 3)
    assert [j["key"] for j in every] == ["w2a4_uniform_sgd0.02", "w2a4_uniform_sgd0.01", "w2a4_uniform_adam0.0001"]
    assert all(j["group"] == "lr-sweep" and j["seed"] == 3 and j["uniform"] for j in every)
    assert [(j["opt"], j["lr"]) for j in every] == settings
    assert bench.sweep_jobs(settings, [(2, 4)], {"none"}, 0) == []
    assert [j["key"] for j in bench.sweep_jobs(settings, [(2, 4)], {"w2a4_uniform_sgd0.01", "w2a4_mixed"}, 0)] \
        == ["w2a4_uniform_sgd0.01"]
    assert bench.sweep_jobs(settings[:1], [(2, 4)], None, 0) == []  # one setting: nothing to choose
    assert bench.sweep_jobs(settings, [(3, 3)], None, 0) == []  # the sweep is on W2A4


def test_a_float_model_only_run_trains_and_compiles_nothing_else(bench, tmp_path):
    """``--rows none`` with the default four QAT settings: the float model, its accuracy, and no sweep."""
    g = np.random.default_rng(0)
    data = tmp_path / "cifar"
    data.mkdir()
    for name, n in (("train-0.npz", 96), ("test.npz", 40)):
        np.savez(data / name, x=g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=g.integers(0, 10, n).astype(np.uint8))
    out = tmp_path / "out"
    rc = bench.main(["--data", str(data), "--device", "cpu", "--fp-epochs", "1", "--batch-size", "32",
                     "--threads", "1", "--plans", "w2a4", "--rows", "none", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["rows"] == [] and "lr_selected" not in res["meta"]
    assert res["meta"]["train"] == 96 and res["meta"]["test"] == 40
    assert (out / "resnet20_fp.pt").is_file()
    assert float((out / "fp.done").read_text()) == pytest.approx(res["fp"]["acc"], abs=0.005)
