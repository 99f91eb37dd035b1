"""The GLUE job's run file (glue_run/run_file.py): one file per run folder, and the older folders migrated."""
import json

from fairseq_ext.experiments.glue_run.run_file import RUN_FILE, RunFile, finished_result


def test_a_run_folder_of_three_files_is_read_as_it_is_and_migrated_on_write(tmp_path):
    settings = {"train_args": ["DATA", "--lr", "0.001"], "data": "abc"}
    row = {"task": "CoLA", "updates": 6}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    (tmp_path / "elapsed.json").write_text('{"seconds": 12.5}')
    (tmp_path / "result.json").write_text(json.dumps(row))
    old = RunFile.read(tmp_path)
    assert (old.settings, old.seconds, old.result) == (settings, 12.5, row) and finished_result(tmp_path) == row

    old.seconds = 20.0
    old.write(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [RUN_FILE]
    assert json.loads((tmp_path / RUN_FILE).read_text()) == {"format": "glue-run", "settings": settings,
                                                             "seconds": 20.0, "result": row}
    assert RunFile.read(tmp_path) == RunFile(settings, 20.0, row)


def test_a_run_not_begun_or_not_finished_has_no_result(tmp_path):
    assert finished_result(tmp_path / "absent") is None
    RunFile(settings={"data": "k"}, seconds=3.0).write(tmp_path)
    assert finished_result(tmp_path) is None
