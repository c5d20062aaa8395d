"""lfm_mlx.ladder: a quant ladder measured in the real llama.cpp on tiny LFM2-MoE and LFM2 models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm_mlx.cli import main as cli
from lfm_mlx.ladder import judge, markdown, run_ladder
from lfm_mlx.demo.task import build_suite

pytest.importorskip("llama_cpp")
BROKEN = "Q4_K_M@attn_q=q1_0"  # q1_0 blocks are 128 wide, the tiny models' rows 64: llama.cpp has no fallback
FAST = dict(max_tokens=16, prefill_tokens=32, decode_tokens=8, repeats=1, threads=1, log=lambda *_: None)


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ladder_suite") / "suite.json"
    path.write_text(json.dumps(build_suite(per_category=1)))  # six categories, one case each
    return path


def follows_the_rule(ladder: dict) -> str:
    """The recommendation, recomputed here from the reported figures alone."""
    parent, tolerance = ladder["rungs"][0], ladder["settings"]["tolerance"]
    keep = [r for r in ladder["rungs"][1:] if r["status"] == "measured" and r["suite_complete"]
            and r["passed"] >= parent["passed"] - tolerance
            and all(e["passed"] > 0 or parent["per_category"][c]["passed"] == 0 for c, e in r["per_category"].items())]
    return min(keep, key=lambda r: r["bytes"])["name"] if keep else parent["name"]


@pytest.mark.parametrize("model", ["tiny_moe_dir", "tiny_dense_dir"])
def test_ladder_in_llama_cpp(model, suite, tmp_path, request):
    out = tmp_path / "ladder"
    ladder = run_ladder(request.getfixturevalue(model), out, str(suite), ["Q8_0", "Q4_K_M", "IQ4_XS", BROKEN], **FAST)
    assert ladder["complete"] and ladder["error"] is None
    names = [r["name"] for r in ladder["rungs"]]
    assert names == ["BF16", "Q8_0", "Q4_K_M", "IQ4_XS", BROKEN]
    measured = ladder["rungs"][:4]
    sizes = [r["bytes"] for r in measured]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4  # smaller down the ladder
    for rung in measured:
        assert rung["status"] == "measured" and (out / rung["file"]).stat().st_size == rung["bytes"]
        assert rung["peak_rss_bytes"] >= rung["rss_before_load_bytes"] > 0
        assert rung["prefill_tok_s"] > 0 and rung["decode_tok_s"] > 0 and rung["n_threads"] == 1
        assert rung["runs"] == 6 and 0 <= rung["passed"] <= 6 and rung["suite_complete"]
        assert set(rung["per_category"]) == {"apps", "browser", "file", "finalization", "no_tool", "terminal"}
        assert rung["text_tool_leaks"] >= 0 and rung["false_positives"] >= 0 and 0 <= rung["agreement"] <= 1
        assert json.loads((out / rung["eval_report"]).read_text())["metrics"]["runs"] == 6
    assert measured[0]["agreement"] == 1.0 and measured[0]["verdict"] == "parent"
    # the rung llama.cpp refuses is reported, not fatal, and leaves no file, temporary or lock behind
    broken = ladder["rungs"][4]
    assert broken["status"] == "failed" and broken["stage"] == "quantize" and broken["verdict"] == "rejected"
    assert "q1_0" in broken["reasons"][0] and "rows of 64" in broken["reasons"][0]
    assert not (out / broken["file"]).exists() and not list(out.glob(".*"))
    # the rule, and a reason for every rung it did not pick
    assert ladder["recommendation"]["rung"] == follows_the_rule(ladder)
    for rung in ladder["rungs"][1:]:
        assert (rung["verdict"] == "recommended") == (rung["name"] == ladder["recommendation"]["rung"])
        assert rung["verdict"] == "recommended" or rung["reasons"]
    # the table and plot are rebuilt from ladder.json alone
    saved = json.loads((out / "ladder.json").read_text())
    assert saved == json.loads(json.dumps(ladder))
    table = (out / "ladder.md").read_text()
    assert table == markdown(saved) and all(f"| {name} |" in table for name in names)
    (out / "ladder.md").unlink()
    (out / "ladder.png").unlink()
    assert cli(["ladder", "--redraw", str(out)]) == 0
    assert (out / "ladder.md").read_text() == table and (out / "ladder.png").stat().st_size > 0


def test_stops_cleanly_keeping_what_it_measured(tiny_dense_dir, suite, tmp_path):
    def interrupt_after_q8(line: str) -> None:
        if line.startswith("ladder: Q8_0"):
            raise KeyboardInterrupt

    out = tmp_path / "ladder"
    ladder = run_ladder(tiny_dense_dir, out, str(suite), ["Q8_0", "Q4_K_M"], **dict(FAST, log=interrupt_after_q8))
    assert not ladder["complete"] and "interrupted" in ladder["error"]
    saved = json.loads((out / "ladder.json").read_text())
    assert [r["name"] for r in saved["rungs"]] == ["BF16", "Q8_0"] and saved["rungs"][1]["status"] == "measured"
    assert "Incomplete ladder" in (out / "ladder.md").read_text()


def _rung(name, size, passed, categories, status="measured"):
    return {"name": name, "file": f"{name}.gguf", "bytes": size, "status": status, "suite_complete": True,
            "passed": passed, "runs": 6, "tensor_types": {name: 1}, "stage": "quantize", "error": "refused",
            "per_category": {c: {"passed": p, "runs": 3} for c, p in categories.items()}}


def test_the_rule_and_its_reasons():
    ladder = {"settings": {"tolerance": 1}, "rungs": [
        _rung("BF16", 100, 5, {"a": 3, "b": 2}),
        _rung("Q8_0", 60, 5, {"a": 3, "b": 2}),
        _rung("Q4_K_M", 40, 4, {"a": 2, "b": 2}),      # one case below: within tolerance
        _rung("Q3_K_M", 30, 4, {"a": 3, "b": 1}),      # also within: the smallest such one
        _rung("IQ3_XS", 25, 4, {"a": 4, "b": 0}),      # within on the total, but loses category b
        _rung("Q2_K", 20, 3, {"a": 2, "b": 1}),        # two cases below
        _rung("IQ2_M", None, 0, {}, status="failed"),
    ]}
    judge(ladder)
    verdicts = {r["name"]: (r["verdict"], " ".join(r["reasons"])) for r in ladder["rungs"]}
    assert ladder["recommendation"]["rung"] == "Q3_K_M" and verdicts["Q3_K_M"] == ("recommended", "")
    assert verdicts["Q8_0"] == ("rejected", "within tolerance, but 30 B larger than Q3_K_M")
    assert "loses b (0/3; parent 2/3)" in verdicts["IQ3_XS"][1]
    assert "passes 3/6, more than 1 case(s) below the parent's 5/6" in verdicts["Q2_K"][1]
    assert verdicts["IQ2_M"] == ("rejected", "failed to quantize: refused")
    ladder["settings"]["tolerance"] = 0  # nothing within 0 cases but Q8_0
    judge(ladder)
    assert ladder["recommendation"]["rung"] == "Q8_0"


@pytest.mark.parametrize("args, message", [
    (["--types", "Q4_K_Z"], "'Q4_K_Z' is not a type"),
    (["--types", "Q4_K_M@attn_q"], "'attn_q' is not REGEX=GGML_TYPE"),
    (["--types", "Q8_0", "q8_0"], "lists a rung twice (Q8_0)"),
    (["--tolerance", "-1"], "--tolerance -1: must be at least 0"),
    (["--outtype", "q8_0"], "the parent must be a float export"),
])
def test_user_mistakes_exit_2_with_one_line(args, message, tiny_dense_dir, suite, tmp_path, capsys):
    assert cli(["ladder", str(tiny_dense_dir), str(tmp_path / "out"), "--suite", str(suite), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_model_and_redraw_of_nothing(suite, tmp_path, capsys):
    assert cli(["ladder", str(tmp_path / "nope"), str(tmp_path / "out"), "--suite", str(suite)]) == 2
    assert cli(["ladder", "--redraw", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope does not exist" in err and "ladder.json does not exist" in err
