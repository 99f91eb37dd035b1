"""The GLUE job's settings (glue_run/settings.py): each declared once, and everything made from the table."""
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
    documented = set(re.findall(r"`([A-Z_]+)`", " ".join(line.split("|")[1] for line in table.splitlines()[2:])))
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
