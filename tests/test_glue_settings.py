"""The GLUE job's settings (glue_run/settings.py): each declared once, and everything made from the table."""
import json
import re
import subprocess

import pytest

import tiny
from fairseq_ext.core.errors import UserError
from fairseq_ext.experiments.glue_run import settings


def test_the_script_help_lists_every_setting_with_its_default():
    result = subprocess.run(["bash", str(tiny.REPO / "run_scripts" / "glue_bitfit.sh"), "--help"],
                            capture_output=True, text=True, cwd=tiny.REPO)
    assert result.returncode == 0, result.stderr
    for setting in settings.SETTINGS:
        line = next(line for line in result.stdout.splitlines() if line.split()[:1] == [setting.env])
        assert setting.help in line and (not setting.default_text or f"[{setting.default_text}]" in line)


def test_docs_glue_md_documents_every_setting_and_no_other():
    table = (tiny.REPO / "docs" / "glue.md").read_text().split("| variable | default | meaning |", 1)[1]
    table = table.split("\n\n", 1)[0]
    first_cells = " ".join(line.split("|")[1] for line in table.splitlines()[2:])
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cells))  # BF16_BASE has digits
    assert documented == {setting.env for setting in settings.SETTINGS}


def test_a_flag_wins_over_the_variable_and_variables_count_only_from_the_script():
    environ = {"SEEDS": "1 2 3", "PARALLEL": "2", "MODE": ""}  # an empty variable is unset, as in the shell
    args = settings.parse(["--from-env", "--parallel", "4"], "glue_bitfit", environ)
    assert args.seeds == [1, 2, 3] and args.parallel == 4 and args.mode == "bitfit" and args.progress_interval == 60.0
    assert settings.parse([], "glue_bitfit", environ).seeds == [1]  # python -m without --from-env: flags only
    assert settings.parse(["--from-env"], "glue_bitfit", {}).epochs is None


@pytest.mark.parametrize("environ, message", [
    ({"SAVE_MINUTES": "-1"}, "SAVE_MINUTES '-1': expected a number of at least 0"),
    ({"SLURM_GPUS_PER_RUN": "-1"}, "SLURM_GPUS_PER_RUN '-1': expected an integer of at least 0"),
    ({"SEEDS": "1 x"}, "SEEDS '1 x': expected space-separated positive integers"),
    ({"LAUNCHER": "pbs"}, "LAUNCHER 'pbs': expected local, submitit or submitit_local"),
])
def test_a_bad_value_names_the_variable(environ, message):
    with pytest.raises(UserError) as error:
        settings.parse(["--from-env"], "glue_bitfit", environ)
    assert str(error.value) == message


def test_the_resume_line_repeats_the_variables_given_and_the_train_py_arguments():
    environ = {"GLUE_DIR": "my glue", "TASKS": "CoLA", "OUTPUT_DIR": "", "GLUE_BITFIT_SCRIPT": "run_scripts/glue_bitfit.sh"}
    assert settings.resume_command(["--from-env", "--", "--max-update", "40"], True, environ) == \
        "GLUE_DIR='my glue' TASKS=CoLA bash run_scripts/glue_bitfit.sh --max-update 40"
    environ["GLUE_BITFIT_COMMAND"] = "bash run_scripts/glue_table.sh"  # a script that calls this one names itself
    assert settings.resume_command(["--from-env"], True, environ) == "bash run_scripts/glue_table.sh"


def test_bf16_base_auto_turns_on_only_for_new_output_dirs_on_a_native_bf16_cpu(tmp_path, monkeypatch):
    """BF16_BASE=auto: --bf16 for frozen-base modes (never full) where this CPU has native bf16, the runs train
    here and OUTPUT_DIR holds no fp32 run of those modes; on and off are the user's word."""
    from fairseq_ext.experiments.glue_run import plan
    from fairseq_ext.experiments.glue_run.results import Ledger

    ledger = Ledger(tmp_path / "results.json")  # absent: a new OUTPUT_DIR
    modes = ["full", "bitfit-all", "head", "lora"]

    def choose(setting="auto", passthrough=(), local_cpu=True, ledger=ledger):
        return plan.choose_bf16_base(setting, modes, list(passthrough), local_cpu, tmp_path, ledger)

    monkeypatch.setattr(plan, "cpu_native_bf16", lambda: "avx512_bf16")
    auto = choose()
    assert auto.bf16 and "avx512_bf16" in auto.line and "BF16_BASE=off" in auto.line
    assert [auto.flags(mode) for mode in modes] == [[], ["--bf16"], ["--bf16"], ["--bf16"]]
    assert not choose(local_cpu=False).bf16 and not choose(passthrough=["--fp16"]).bf16
    assert not choose("off").bf16
    # An OUTPUT_DIR with an fp32 BitFit row keeps fp32, so that row stays reusable; bf16 rows keep bf16.
    fp32_row = {"task": "CoLA", "mode": "bitfit-all", "lr": 1e-3, "seed": 1, "settings": {"train_args": ["DATA"]}}
    (tmp_path / "results.json").write_text(json.dumps({"runs": [fp32_row]}))
    kept = choose(ledger=Ledger(tmp_path / "results.json"))
    assert not kept.bf16 and "fp32 runs" in kept.line
    bf16_row = dict(fp32_row, settings={"train_args": ["DATA", "--bf16"]})
    (tmp_path / "results.json").write_text(json.dumps({"runs": [bf16_row]}))
    assert choose(ledger=Ledger(tmp_path / "results.json")).bf16
    # So does a job that may take fp32 rows from another job's results.json (REUSE_RESULTS).
    (tmp_path / "other.json").write_text(json.dumps({"runs": [fp32_row]}))
    reusing = choose(ledger=Ledger(tmp_path / "absent.json", [tmp_path / "other.json"]))
    assert not reusing.bf16 and "or REUSE_RESULTS holds fp32 runs" in reusing.line
    monkeypatch.setattr(plan, "cpu_native_bf16", lambda: None)
    assert not choose().bf16 and "no native bf16" in choose().line
    assert choose("on").bf16  # the user's word, native or not
    # A job resumed on a CPU without native bf16 keeps the bf16 of the runs it holds, or reuses: its table
    # stays one precision, and its interrupted runs resume.
    (tmp_path / "results.json").write_text(json.dumps({"runs": [bf16_row]}))
    resumed = choose(ledger=Ledger(tmp_path / "results.json"))
    assert resumed.bf16 and "holds bf16 runs of these modes, kept reusable" in resumed.line and "slower" in resumed.line
    assert choose(ledger=Ledger(tmp_path / "absent.json", [tmp_path / "results.json"])).bf16  # as REUSE_RESULTS
    assert not plan.choose_bf16_base("auto", ["full"], [], True, tmp_path, ledger).bf16


def test_native_bf16_is_read_from_the_cpu_flags_where_torch_cannot_tell(tmp_path, monkeypatch):
    import torch
    from fairseq_ext.training import launch

    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n")
    assert launch.cpu_native_bf16(str(cpuinfo)) == "avx512_bf16"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert launch.cpu_native_bf16(str(cpuinfo)) is None
    assert launch.cpu_native_bf16(str(tmp_path / "missing")) is None
