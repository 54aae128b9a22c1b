"""The CLI end to end on the reference model, and every bad input: one line on stderr, exit code 2."""

import json
import subprocess
import sys

import pytest

from adatsq.cli import main
from adatsq.quant.kernels import onednn

FAST_RECIPE = """
method: gptq
weight: {bits: 4, group_size: 32, symmetric: false}
activation: {bits: 8}
calibration: {samples: 8, steps: 4, batch_size: 8}
"""


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "fast.yaml"
    path.write_text(FAST_RECIPE)
    return path


@pytest.fixture(scope="module")
def checkpoint(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    assert main(["quantize", "reference", "--recipe", str(recipe_file), "--out", str(out)]) == 0
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "adatsq.cli", *args], capture_output=True, text=True)


def assert_user_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0]


def test_eval_json_has_exactly_the_documented_keys(checkpoint, capsys):
    assert main(["eval", str(checkpoint), "--samples", "10", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {
        "psnr_db", "ssim", "accuracy", "fp_accuracy", "fid", "avg_bits", "checkpoint_bytes", "fp_seconds",
        "quant_seconds",
    }  # fmt: skip
    assert metrics["avg_bits"] == 4.0 and metrics["psnr_db"] > 15 and 0 < metrics["ssim"] <= 1


def test_eval_dtype_adds_bf16_seconds(checkpoint, capsys):
    assert main(["eval", str(checkpoint), "--samples", "2", "--json", "--dtype", "bfloat16"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert len(metrics) == 11 and metrics["dtype"] == "bfloat16"
    assert metrics["bf16_seconds"] == metrics["fp_seconds"]


def test_inspect_has_a_kernel_column(checkpoint, capsys):
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "kernel (cpu, float32)" in out and "fake-a8" in out


@pytest.mark.skipif(not onednn.available(), reason="oneDNN int8 linear not usable here")
def test_inspect_names_the_onednn_layout_this_cpu_runs(tmp_path, capsys):
    recipe = tmp_path / "w8a8.yaml"
    recipe.write_text(
        "method: rtn\nweight: {bits: 8, group_size: null, symmetric: true}\nactivation: {bits: 8}\n"
    )
    assert main(["quantize", "reference", "--recipe", str(recipe), "--out", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert " int8-onednn " in "\n".join(out[:-1]) and out[-1].endswith(f"oneDNN's {onednn.layout()}")


def test_eval_in_a_fresh_process(checkpoint):
    result = run_cli("eval", str(checkpoint), "--samples", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["avg_bits"] == 4.0


def test_inspect_lists_every_layer(checkpoint, capsys):
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "transformer_blocks.0.attn1.to_q" in out and "asym W4 A8" in out and "total" in out


def test_unknown_model(recipe_file, tmp_path):
    result = run_cli("quantize", "flux-dev", "--recipe", str(recipe_file), "--out", str(tmp_path / "o"))
    assert_user_error(result, "neither 'reference', 'umm' nor an existing folder")
    assert not (tmp_path / "o").exists()


def test_recipe_with_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(FAST_RECIPE + "colour: blue\n")
    result = run_cli("quantize", "reference", "--recipe", str(bad), "--out", str(tmp_path / "o"))
    assert_user_error(result, "unknown key(s) 'colour'")


def test_recipe_with_wrong_type_and_bad_bits(tmp_path):
    for text, fragment in [
        (FAST_RECIPE.replace("bits: 4", "bits: four"), "expected int"),
        (FAST_RECIPE.replace("bits: 4", "bits: 5"), "weight bits=5 is not supported"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        result = run_cli("quantize", "reference", "--recipe", str(bad), "--out", str(tmp_path / "o"))
        assert_user_error(result, fragment)


def test_existing_output_without_overwrite(checkpoint, recipe_file):
    before = sorted(p.name for p in checkpoint.iterdir())
    result = run_cli("quantize", "reference", "--recipe", str(recipe_file), "--out", str(checkpoint))
    assert_user_error(result, "--overwrite")
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_corrupted_checkpoint(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{not json")
    assert_user_error(run_cli("eval", str(tmp_path)), "corrupted")
    assert_user_error(run_cli("inspect", str(tmp_path / "missing")), "neither a checkpoint folder")


ADATSQ_RECIPE = (
    FAST_RECIPE.replace("method: gptq", "method: adatsq").replace(
        "batch_size: 8}", "batch_size: 8, segments: 2}"
    )
    + "planner: {candidates: [3, 4, 8], fisher_samples: 2, measure_samples: 2, beam_width: 2}\n"
)


def test_plan_with_infeasible_budget_states_the_minimum(tmp_path):
    recipe = tmp_path / "adatsq.yaml"
    recipe.write_text(ADATSQ_RECIPE)
    out = tmp_path / "plan.json"
    result = run_cli(
        "plan", "reference", "--recipe", str(recipe), "--budget", "avg_bits=2.5", "--out", str(out)
    )
    assert_user_error(result, "the minimum reachable value is 3")
    assert not out.exists()


@pytest.mark.parametrize(
    "change, fragment",
    [
        (
            ("candidates: [3, 4, 8]", "candidates: [3, 5, 8]"),
            "planner.candidates [3, 5, 8] must be drawn from",
        ),
        (("planner: {", "planner: {budget: avg_bits, "), "use KIND=VALUE"),
    ],
)
def test_plan_with_bad_planner_settings(tmp_path, change, fragment):
    recipe = tmp_path / "adatsq.yaml"
    recipe.write_text(ADATSQ_RECIPE.replace(*change))
    result = run_cli("plan", "reference", "--recipe", str(recipe), "--out", str(tmp_path / "plan.json"))
    assert_user_error(result, fragment)


@pytest.mark.parametrize(
    "text, fragment",
    [("3\nseven\n", "'seven' is not a class label"), ("# nothing here\n", "holds no inputs")],
)
def test_bad_calibration_file(recipe_file, tmp_path, text, fragment):
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    out = tmp_path / "o"
    result = run_cli(
        "quantize", "reference", "--recipe", str(recipe_file), "--out", str(out), "--calib", str(calib)
    )
    assert_user_error(result, fragment)
    assert not out.exists()


def test_plan_cli_writes_plan_plots_and_frontier_then_quantizes(tmp_path, capsys):
    recipe = tmp_path / "adatsq.yaml"
    recipe.write_text(ADATSQ_RECIPE)
    plan, frontier = tmp_path / "plan.json", tmp_path / "frontier.json"
    args = ["plan", "reference", "--recipe", str(recipe), "--budget", "avg_bits=4.5", "--out", str(plan)]
    assert (
        main([*args, "--frontier", str(frontier), "--sweep", "3.5,4.5,6", "--plot", str(tmp_path / "f.png")])
        == 0
    )
    for name in ("plan.json", "plan.png", "plan.fisher.png", "frontier.json", "f.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert main(["inspect", str(plan)]) == 0
    assert "transformer_blocks.5.ff.net.2" in capsys.readouterr().out
    out = tmp_path / "ckpt"
    assert (
        main(["quantize", "reference", "--recipe", str(recipe), "--plan", str(plan), "--out", str(out)]) == 0
    )
    assert (out / "plan.json").read_text() == plan.read_text()
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(ADATSQ_RECIPE.replace("segments: 2", "segments: 4"))
    result = run_cli(
        "quantize", "reference", "--recipe", str(wrong), "--plan", str(plan), "--out", str(tmp_path / "x")
    )
    assert_user_error(result, "made for 4 sampler steps in 2 segments")


def test_version_and_env_like_their_peers(capsys):
    import torch

    import adatsq

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"adatsq {adatsq.__version__}"
    assert main(["env"]) == 0
    lines = dict(line[2:].split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["torch"] == torch.__version__ and lines["adatsq"] == adatsq.__version__
    assert lines["torch threads"] == str(torch.get_num_threads())
    assert lines["cuda"] == "not available" or torch.cuda.is_available()


def test_export_writes_a_compressed_tensors_folder(checkpoint, tmp_path, capsys):
    out = tmp_path / "ct"
    assert main(["export", str(checkpoint), "--to", "compressed-tensors", "--out", str(out)]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(f"wrote {out}: compressed-tensors int-quantized, 1 config group(s)")
    assert line.endswith("each layer's only variant (no layer switches bits)")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"


def test_export_of_an_unknown_target_in_a_fresh_process(checkpoint, tmp_path):
    result = run_cli("export", str(checkpoint), "--to", "onnx", "--out", str(tmp_path / "o"))
    assert_user_error(
        result, "unknown export target 'onnx'; supported: compressed-tensors, gptqmodel, quanto"
    )


@pytest.fixture(scope="module")
def w3_checkpoint(tmp_path_factory):
    recipe = tmp_path_factory.mktemp("recipes") / "rtn3.yaml"
    recipe.write_text(FAST_RECIPE.replace("gptq", "rtn").replace("bits: 4", "bits: 3"))
    out = tmp_path_factory.mktemp("cli") / "w3"
    assert main(["quantize", "reference", "--recipe", str(recipe), "--out", str(out)]) == 0
    return out


def test_export_bad_inputs_are_one_line(checkpoint, w3_checkpoint, recipe_file, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    cases = [
        ([str(checkpoint), "--to", "quanto", "--segment", "1"], "--segment 1 is out of range"),
        ([str(tmp_path / "missing"), "--to", "quanto"], "neither a checkpoint folder nor a plan"),
        ([str(checkpoint), "--to", "quanto", "--out", str(checkpoint)], "already exists; pass --overwrite"),
        ([str(w3_checkpoint), "--to", "quanto"], "exports 3-bit weights; quanto has qint2 (2 bits)"),
        (
            [str(checkpoint), "--to", "gptqmodel", "--recipe", str(recipe_file)],
            "--recipe only applies to a plan",
        ),
        ([str(plan), "--to", "torchao"], "is missing keys"),
    ]
    for args, fragment in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
        assert main(["export", *args, *out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (args, err)
    assert not (tmp_path / "out").exists()


def test_verbose_shows_the_chained_library_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: rtn\nweight: {bits: 4\n")
    args = ["quantize", "reference", "--recipe", str(bad), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("adatsq: error: recipe") and "line 3, column 1" in line
    assert main(["--verbose", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "yaml.parser.ParserError" in err  # the original, chained
    assert err.strip().splitlines()[-1] == line  # the one line still comes last
    assert not (tmp_path / "o").exists()


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse exits, as for --version
        main(["quantize", "reference", "--seed", "abc"])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("adatsq: error: adatsq quantize: ") and "--help" in line
