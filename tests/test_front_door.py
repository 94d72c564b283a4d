"""The front door (issue S12 item 3): nonsense is refused, every problem named where the
user wrote it, all at once; `sim validate` and `sim run` agree."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from servesim.sim.cli import main
from servesim.sim.cost_model import RooflineConfig
from servesim.sim.power import PowerConfig
from servesim.sim.specs import HardwareSpec
from servesim.sim.types import ConfigError
from servesim.sim.yamlio import DuplicateKeyError, safe_load
from servesim.traces.readers import read_trace

REPO = Path(__file__).resolve().parent.parent
H100 = REPO / "sim" / "data" / "hardware" / "h100-sxm.yaml"
PROFILE = REPO / "profiles" / "h100-llama-3.2-1b.yaml"

SMALL = """\
name: small
model: llama-3.2-1b
hardware: h100-sxm
workload:
  synthetic:
    num_requests: 4
    arrival: {kind: poisson, rate_req_s: 10}
    prompt_len: 100
    output_len: 5
output: {plots: false, timeline: false}
variants:
  - name: a
"""


def _exp(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _problems(capsys) -> list[str]:
    """The problem lines `sim` printed (after its 'error: N problems found' line)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("error: "))
    n = int(re.match(r"error: (\d+) problem", lines[start]).group(1))
    probs = [ln.strip() for ln in lines[start + 1:] if ln.startswith("  ")]
    assert len(probs) == n, err
    return probs


def _validate(capsys, *argv) -> list[str]:
    assert main(["validate", *map(str, argv)]) == 2
    return _problems(capsys)


# ---------------------------------------------------------------------- every float finite


def test_inf_and_nan_anywhere_in_the_config_are_all_reported_together(tmp_path, capsys):
    exp = _exp(tmp_path, SMALL.replace("hardware: h100-sxm\n", """hardware: h100-sxm
cost_model: {roofline: {flops_efficiency: .inf, bandwidth_efficiency: -.inf}}
kv_cache: {free_gpu_memory_fraction: .nan, activation_reserve_gb: .inf}
scheduler: {swap_space_gb: .inf}
power: {idle_w: .inf}
speculative: {proposer: ngram, acceptance: .inf}
""").replace("rate_req_s: 10", "rate_req_s: .inf").replace("  - name: a\n", """  - name: a
  - name: b
    kv_cache: {host_cache_size_gb: .nan}
"""))
    probs = _validate(capsys, exp)
    where = {p.split(": ")[1] for p in probs}
    assert where == {"cost_model.roofline.flops_efficiency", "cost_model.roofline.bandwidth_efficiency",
                     "kv_cache.free_gpu_memory_fraction", "kv_cache.activation_reserve_gb", "scheduler.swap_space_gb",
                     "power.idle_w", "speculative.acceptance", "workload.synthetic.arrival.rate_req_s",
                     "variants[1].kv_cache.host_cache_size_gb"}, probs
    assert len(probs) == len(where)  # one line a key: a union's members do not each complain
    assert all("finite number" in p for p in probs)
    # the command line too
    ok = _exp(tmp_path, SMALL, "ok.yaml")
    assert _validate(capsys, ok, "--set", "cost_model.roofline.flops_efficiency=.inf") == [
        "command line: --set cost_model.roofline.flops_efficiency: Input should be a finite number, got inf"]


def test_flops_efficiency_inf_no_longer_runs(tmp_path, capsys):
    exp = _exp(tmp_path, SMALL)
    out = tmp_path / "out"
    assert main(["run", str(exp), "--out", str(out), "--set", "cost_model.roofline.flops_efficiency=.inf"]) == 2
    assert "flops_efficiency: Input should be a finite number" in capsys.readouterr().err
    assert not (out / "a").exists()


def test_hardware_profile_and_models_refuse_non_finite_floats(tmp_path, capsys):
    text = H100.read_text()
    text = re.sub(r"(?m)^peak_bf16_flops:.*$", "peak_bf16_flops: .inf", text)
    text = re.sub(r"(?m)^hbm_capacity_bytes:.*$", "hbm_capacity_bytes: .nan", text)
    hw = tmp_path / "hw.yaml"
    hw.write_text(text)
    probs = _validate(capsys, _exp(tmp_path, SMALL.replace("hardware: h100-sxm", f"hardware: {hw}")))
    assert [p.split(": ")[1] for p in probs] == ["peak_bf16_flops", "hbm_capacity_bytes"], probs
    with pytest.raises(ValueError, match="finite"):
        RooflineConfig(flops_efficiency=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        PowerConfig(idle_w=float("nan"))
    with pytest.raises(ConfigError):
        HardwareSpec.from_file(hw)
    # a calibration profile with an infinite fitted parameter
    doc = safe_load(PROFILE.read_text())
    doc["roofline"]["bandwidth_efficiency"] = float("inf")
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(doc))
    exp = _exp(tmp_path, SMALL.replace("hardware: h100-sxm", f"hardware: h100-sxm\ncost_model: {{kind: calibrated, "
                                       f"profile: {prof}}}"), "calibrated.yaml")
    probs = _validate(capsys, exp)
    assert len(probs) == 1 and str(prof) in probs[0] and "finite" in probs[0]


# ---------------------------------------------------------------------- duplicate YAML keys


def test_duplicate_keys_are_refused_with_their_lines(tmp_path, capsys):
    exp = _exp(tmp_path, SMALL.replace("model: llama-3.2-1b\n", "model: llama-3.2-1b\nmodel: llama-3.1-8b\n")
               .replace("    output_len: 5\n", "    output_len: 5\n    output_len: 50\n"))
    assert _validate(capsys, exp) == [
        f"{exp}, line 3: invalid YAML: duplicate key 'model' (first at line 2): each key may appear once in a mapping",
        f"{exp}, line 11: invalid YAML: duplicate key 'output_len' (first at line 10): each key may appear once "
        "in a mapping"]
    # a hardware file
    hw = tmp_path / "hw.yaml"
    hw.write_text(H100.read_text() + "idle_power_w: 10\n")
    probs = _validate(capsys, _exp(tmp_path, SMALL.replace("hardware: h100-sxm", f"hardware: {hw}"), "e2.yaml"))
    assert len(probs) == 1 and f"{hw}, line" in probs[0] and "duplicate key 'idle_power_w'" in probs[0]
    # a calibration profile
    prof = tmp_path / "p.yaml"
    prof.write_text(PROFILE.read_text() + "model: llama-3.2-1b\n")
    exp = _exp(tmp_path, SMALL.replace("hardware: h100-sxm", f"hardware: h100-sxm\ncost_model: {{kind: calibrated, "
                                       f"profile: {prof}}}"), "e3.yaml")
    probs = _validate(capsys, exp)
    assert len(probs) == 1 and f"{prof}, line" in probs[0] and "duplicate key 'model'" in probs[0]


def test_a_duplicate_key_in_a_set_value_is_refused(tmp_path, capsys):
    assert _validate(capsys, _exp(tmp_path, SMALL), "--set", "kv_cache={max_tokens: 1, max_tokens: 2}") == [
        "command line: --set kv_cache: duplicate key 'max_tokens' (first at line 1): each key may appear once in a "
        "mapping"]


def test_merge_keys_may_still_be_overridden():
    assert safe_load("a: &x {b: 1, c: 2}\nd: {<<: *x, b: 3}\n") == {"a": {"b": 1, "c": 2}, "d": {"b": 3, "c": 2}}
    with pytest.raises(DuplicateKeyError) as e:
        safe_load("a: {b: 1,\n  b: 2}\nc: 1\nc: 2\n")
    assert [line for line, _ in e.value.duplicates] == [2, 4]


def test_the_shipped_files_have_no_duplicate_keys():
    for p in [*REPO.glob("experiments/*.yaml"), *REPO.glob("profiles/*.yaml"), *REPO.glob("sim/data/hardware/*.yaml")]:
        safe_load(p.read_text())


# ---------------------------------------------------------------------- huge lengths

BIG = "100000000000000000000000"


@pytest.mark.parametrize("length", [BIG, "{kind: uniform, low: 1, high: %s}" % BIG,
                                    "{kind: lognormal, mean: 1e23, sigma: 1}",
                                    "{kind: constant, value: 5, max: %s}" % BIG])
def test_a_length_of_10_to_the_23_is_named_as_written(tmp_path, capsys, length):
    probs = _validate(capsys, _exp(tmp_path, SMALL.replace("prompt_len: 100", f"prompt_len: {length}")))
    assert len(probs) == 1 and "less than or equal to 1000000000" in probs[0]
    assert ("1e23" if "1e23" in length else BIG) in probs[0] and "-9223372036854775808" not in probs[0]


def test_huge_lengths_in_traces_are_named_as_written(tmp_path):
    cases = {
        "a.csv": ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,5,1\n2023-11-16 18:15:47,%s,1\n" % BIG,
                  "line 3: ContextTokens must be at most 1,000,000,000, got '%s'" % BIG),
        "t.csv": ("arrival_s,prompt_len,output_len\n0,5,%s\n" % BIG,
                  "line 2: output_len must be at most 1,000,000,000, got '%s'" % BIG),
        "m.jsonl": ('{"timestamp": 0, "input_length": %s, "output_length": 1, "hash_ids": [1]}\n' % BIG,
                    "line 1: input_length must be an integer >= 1 and at most 1,000,000,000, got %s" % BIG),
    }
    for name, (text, want) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            read_trace(p)
        assert want in str(e.value) and BIG in str(e.value) and "-9223372036854775808" not in str(e.value), str(e.value)


def test_a_table_with_a_length_beyond_the_limit_in_parquet(tmp_path):
    p = tmp_path / "t.parquet"
    pd.DataFrame({"arrival_s": [0.0, 1.0], "prompt_len": [5, 2**40], "output_len": [1, 1]}).to_parquet(p)
    with pytest.raises(ConfigError, match=r"row 1: prompt_len must be at most 1,000,000,000 tokens, "
                                          r"got 1,099,511,627,776"):
        read_trace(p)


# ---------------------------------------------------------------------- BOM, row order


def test_an_azure_csv_with_a_utf8_bom_is_read(tmp_path):
    text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:50.99,396,109\n"
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_text(text)
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_trace(bom).equals(read_trace(plain))  # auto-detected as Azure from the header
    table = tmp_path / "table.csv"
    table.write_bytes(b"\xef\xbb\xbf# hash_block_size=4\narrival_s,prompt_len,output_len,block_hashes\n0,5,1,1 2\n")
    df = read_trace(table)
    assert df.attrs["hash_block_size"] == 4 and df["block_hashes"].tolist() == [(1, 2)]


def test_every_reader_sorts_unsorted_rows_stably_and_says_so(tmp_path, capsys):
    files = {
        "az.csv": "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:02,1,1\n2023-11-16 18:00:01,2,2\n"
                  "2023-11-16 18:00:02,3,3\n",
        "t.csv": "arrival_s,prompt_len,output_len\n2,1,1\n1,2,2\n2,3,3\n",
        "ids.csv": "request_id,arrival_s,prompt_len,output_len\n10,2,1,1\n11,1,2,2\n12,2,3,3\n",
        "m.jsonl": "".join('{"timestamp": %d, "input_length": %d, "output_length": 1, "hash_ids": [%d]}\n' % (t, n, n)
                           for t, n in ((2000, 1), (1000, 2), (2000, 3))),
    }
    for name, text in files.items():
        p = tmp_path / name
        p.write_text(text)
        df = read_trace(p)
        assert df["prompt_len"].tolist() == [2, 1, 3], name  # stable: the two at t=2 keep the file's order
        assert df["request_id"].tolist() == ([11, 10, 12] if name == "ids.csv" else [0, 1, 2]), name
        err = capsys.readouterr().err
        assert f"warning: {p}: the requests are not in arrival order" in err and "sorted by arrival time" in err
        assert ("row 1" if name.endswith("jsonl") else "line 3") in err, err
    p = tmp_path / "t.parquet"
    pd.DataFrame({"arrival_s": [2.0, 1.0], "prompt_len": [1, 2], "output_len": [1, 1]}).to_parquet(p)
    assert read_trace(p)["prompt_len"].tolist() == [2, 1]
    assert "row 1" in capsys.readouterr().err
    read_trace(p)  # once per file and process
    assert capsys.readouterr().err == ""


def test_an_unsorted_trace_runs_with_the_warning(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_len,output_len\n0.2,10,2\n0.1,20,2\n")
    exp = _exp(tmp_path, SMALL.replace("""  synthetic:
    num_requests: 4
    arrival: {kind: poisson, rate_req_s: 10}
    prompt_len: 100
    output_len: 5
""", f"  trace: {trace}\n"))
    assert main(["run", str(exp), "--out", str(tmp_path / "out")]) == 0
    assert "not in arrival order" in capsys.readouterr().err


# ---------------------------------------------------------------------- where a problem is reported


def test_chunk_size_errors_point_where_it_was_written(tmp_path, capsys):
    exp = _exp(tmp_path, SMALL.replace("output: ", "scheduler: {enable_chunked_context: true, chunk_size: 100}\n"
                                       "output: ").replace("  - name: a\n", """  - name: a
  - name: b
    scheduler: {max_batch_size: 8}
"""))
    assert _validate(capsys, exp) == [f"{exp}: scheduler.chunk_size: scheduler.chunk_size (100) must be a multiple "
                                      "of kv_cache.tokens_per_block (32)"]  # once, at the shared setting
    exp = _exp(tmp_path, SMALL.replace("output: ", "scheduler: {enable_chunked_context: true, chunk_size: 96}\n"
                                       "output: ").replace("  - name: a\n", """  - name: a
  - name: b
    kv_cache: {tokens_per_block: 64}
"""), "e2.yaml")
    assert _validate(capsys, exp) == [f"{exp}: variants[1].kv_cache.tokens_per_block: scheduler.chunk_size (96) "
                                      "must be a multiple of kv_cache.tokens_per_block (64)"]
    exp = _exp(tmp_path, SMALL, "e3.yaml")
    assert _validate(capsys, exp, "--set", "scheduler.chunk_size=100") == [
        "command line: --set scheduler.chunk_size: scheduler.chunk_size (100) must be a multiple of "
        "kv_cache.tokens_per_block (32)"]


def test_other_cross_checks_point_at_a_key(tmp_path, capsys):
    exp = _exp(tmp_path, SMALL.replace("output: ", "scheduler: {max_batch_size: 512, max_num_tokens: 256}\n"
                                       "output: ").replace("  - name: a\n", """  - name: a
  - name: b
    workload: {target_rate_req_s: 3, rate_scale: 2}
"""))
    probs = _validate(capsys, exp)
    assert f"{exp}: scheduler.max_num_tokens: scheduler.max_num_tokens (256) must be at least " \
        "scheduler.max_batch_size (512): every generation request takes one token of the budget" in probs
    assert f"{exp}: variants[1].workload.target_rate_req_s: give 'rate_scale' or 'target_rate_req_s', not both" \
        in probs


def test_an_oversized_max_num_tokens_is_named_in_sane_units(tmp_path, capsys):
    exp = _exp(tmp_path, SMALL)
    for n, size in ((2_000_000, "136.0 GB"), (8_000_000, "541.5 GB"), (2**24, "1.1 TB")):
        (prob,) = _validate(capsys, exp, "--set", f"scheduler.max_num_tokens={n}")
        assert prob == (f"{exp}: variants[0] (a): scheduler.max_num_tokens: no room for the KV cache: the activation "
                        f"reserve estimated for an iteration of scheduler.max_num_tokens = {n:,} tokens is {size}, "
                        "more than the 77.5 GB that h100-sxm (80.0 GB) leaves beside model llama-3.2-1b's weights; "
                        "at most 1,135,293 tokens an iteration leave room (or set "
                        "kv_cache.activation_reserve_gb)"), prob
    assert main(["validate", str(exp), "--set", "scheduler.max_num_tokens=1135293"]) == 0
    capsys.readouterr()
    (prob,) = _validate(capsys, exp, "--set", "scheduler.max_num_tokens=1135294")
    assert "scheduler.max_num_tokens: no room for the KV cache" in prob
    (prob,) = _validate(capsys, exp, "--set", "kv_cache.activation_reserve_gb=200")
    assert prob == (f"{exp}: variants[0] (a): kv_cache.activation_reserve_gb: no room for the KV cache: the activation "
                    "reserve you set is 200.0 GB, more than the 77.5 GB that h100-sxm (80.0 GB) leaves beside model "
                    "llama-3.2-1b's weights")
    (prob,) = _validate(capsys, exp, "--set", "scheduler.max_num_tokens=100000000000000000000000")
    assert "less than or equal to 16777216, got 100000000000000000000000" in prob  # refused before any arithmetic
    # the weights themselves not fitting still names the model
    (prob,) = _validate(capsys, exp, "--set", "model=llama-2-70b")
    assert prob.endswith("model: model llama-2-70b needs 138.0 GB of weights per GPU but h100-sxm has 80.0 GB (at least "
                         "2 GPUs' memory for the weights alone: use more GPUs, cluster.tensor_parallel x "
                         "cluster.pipeline_parallel, or a smaller precision)"), prob
    from servesim.sim.memory import human_bytes

    assert [human_bytes(x) for x in (8e10, 6.8e12, 6.76e16, 6.76e27)] == ["80.0 GB", "6.8 TB", "67.6 PB", "6.76e+09 EB"]


def test_a_missing_trace_names_the_experiment_and_variant(tmp_path, capsys):
    exp = _exp(tmp_path, """\
name: t
model: llama-3.2-1b
workload: {trace: nope.csv, num_requests: 5}
variants:
  - name: a
  - name: b
    model: llama-3.1-8b
  - name: c
    workload: {trace: nope2.csv}
""")
    probs = _validate(capsys, exp)
    assert probs == [
        f"{exp}: variants[0] (a), variants[1] (b): workload.trace: file not found: {tmp_path / 'nope.csv'} (a bundled "
        f"name — azure_conv, mooncake_conv — or a path relative to {tmp_path})",
        f"{exp}: variants[2] (c): workload.trace: file not found: {tmp_path / 'nope2.csv'} (a bundled name — "
        f"azure_conv, mooncake_conv — or a path relative to {tmp_path})"]
    exp = _exp(tmp_path, exp.read_text().replace("    workload: {trace: nope2.csv}\n", ""), "all.yaml")
    assert _validate(capsys, exp) == [
        f"{exp}: every variant (3): workload.trace: file not found: {tmp_path / 'nope.csv'} (a bundled name — "
        f"azure_conv, mooncake_conv — or a path relative to {tmp_path})"]


BROKEN_VARIANTS = """\
name: broken
model: llama-3.2-1b
workload: {trace: nope.csv, num_requests: 5}
variants:
  - name: a
    model: nomodel
  - name: b
    hardware: nohardware
  - name: c
    workload: {trace: azure_conv}
    scheduler: {max_num_tokens: 16000000}
  - name: d
    model: llama-2-70b
    cost_model: {kind: calibrated, profile: missing.yaml}
"""


def test_validate_and_run_report_the_same_problems(tmp_path, capsys):
    exp = _exp(tmp_path, BROKEN_VARIANTS)
    validated = _validate(capsys, exp)
    assert main(["run", str(exp), "--out", str(tmp_path / "out")]) == 2
    assert _problems(capsys) == validated
    # every variant's problems, and each independent input of a variant (model, hardware, workload);
    # the missing trace of three variants on one line
    assert len(validated) == 5, validated
    assert any("variants[0] (a), variants[1] (b), variants[3] (d): workload.trace: file not found" in p
               for p in validated)
    assert any("variants[0] (a): model: unknown model" in p for p in validated)
    assert any("variants[1] (b): hardware: unknown hardware" in p for p in validated)
    assert any("variants[2] (c): scheduler.max_num_tokens: no room for the KV cache" in p for p in validated)
    assert any("variants[3] (d): model: model llama-2-70b needs" in p for p in validated)
    assert not (tmp_path / "out").exists()  # nothing made for a run that never started
    # --only: the variants run, with their places in the file
    assert main(["run", str(exp), "--out", str(tmp_path / "out"), "--only", "d"]) == 2
    only = _problems(capsys)
    assert only and all("variants[3] (d)" in p for p in only), only
    # the output folder's problem comes after the file's
    (tmp_path / "file").write_text("")
    assert main(["run", str(exp), "--out", str(tmp_path / "file")]) == 2
    probs = _problems(capsys)
    assert probs[:-1] == validated and "command line: --out" in probs[-1]


# ---------------------------------------------------------------------- found by the fuzz test


@pytest.mark.parametrize("setting, want", [
    ("seed=-1", "seed: Input should be greater than or equal to 0, got -1"),
    ("kv_cache.pool_tokens=1000000000000", "the simulator holds at most 67,108,864 blocks"),
    ("workload.synthetic.arrival={kind: gamma, rate_req_s: 1, cv: 1e-200}", "cannot draw arrivals: a gamma process"),
    ("workload.rate_scale=1e-300", "arrival_s must be within ±1e+09 s"),
    ("workload.synthetic.arrival={kind: fixed, rate_req_s: 1e-320}", "arrival_s must be a finite number"),
    ("scheduler.max_batch_size=100000000000000000000", "less than or equal to 1048576"),
    ("cluster.replicas=1000000", "less than or equal to 1024"),
    ("model=" + "x" * 300, "a name of 300 bytes"),
    ("workload.synthetic.prompt_len={kind: empirical, trace: " + "y" * 300 + "}", "a name of 300 bytes"),
])
def test_inputs_that_raised_or_ran_away_are_refused(tmp_path, capsys, setting, want):
    exp = _exp(tmp_path, SMALL)
    assert main(["run", str(exp), "--out", str(tmp_path / "out"), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err, err
