"""train.py end to end: the RoBERTa GLUE recipe with --bitfit, resume, and parity with fairseq-train."""
import json
import os
import re
import shutil
import signal
import time

import pytest
import torch

import fairseq_ext  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
import tiny
from fairseq_ext.core.run_record import epoch_stats, read_run_record
from fairseq_ext.training.main import cli_main


def load(path):
    return torch.load(path, map_location="cpu")


def bitfit_history(checkpoint):
    return checkpoint["optimizer_history"][-1].get("bitfit")


@pytest.mark.parametrize(
    "terms, expected_roles",
    [
        ("ofa", {"fc1.bias", "fc2.bias", "self_attn_layer_norm.bias", "final_layer_norm.bias"}),
        ("all", {"q_proj.bias", "k_proj.bias", "v_proj.bias", "out_proj.bias", "fc1.bias", "fc2.bias",
                 "self_attn_layer_norm.bias", "final_layer_norm.bias", "layernorm_embedding.bias"}),
        ("q,m2", {"q_proj.bias", "fc1.bias"}),
    ],
)
def test_bitfit_trains_only_the_selection(tiny_data, tiny_pretrained, tmp_path, terms, expected_roles):
    result = tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, extra=["--bitfit", "--bitfit-terms", terms]))
    assert "trainable params:" in result.stdout

    pretrained = load(tiny_pretrained)["model"]
    finetuned = load(tmp_path / "checkpoint_last.pt")
    trained = set(bitfit_history(finetuned)["trainable"])
    expected_cfg = {"bitfit": True, "bitfit_terms": terms, "bitfit_freeze_heads": False, "bitfit_delta_only": False,
                    "tuner": "", "fused_adam": False}  # the group's other fields: --tuner's settings
    assert {key: finetuned["cfg"]["bitfit"][key] for key in expected_cfg} == expected_cfg

    body = {n for n in trained if not n.startswith("classification_heads.")}
    roles = {".".join(n.split(".")[-2:]) for n in body}
    assert roles == expected_roles
    assert {n for n in trained if n.startswith("classification_heads.")} == {
        f"classification_heads.sentence_classification_head.{m}.{p}"
        for m in ("dense", "out_proj") for p in ("weight", "bias")}
    # The LM head's biases are unused in sentence classification: left frozen.
    assert not any("lm_head" in n for n in trained)

    for name, before in pretrained.items():
        after = finetuned["model"][name]
        if name in trained:
            assert not torch.equal(before, after), f"{name} was selected but did not change"
        else:
            assert torch.equal(before, after), f"{name} is frozen but changed"

    # The run record says the same, for programs to read.
    record = read_run_record(tmp_path / "run_record.json")
    assert record["status"] == "finished" and len(record["launches"]) == 1
    sizes = {name: tensor.numel() for name, tensor in finetuned["model"].items()}
    assert record["parameters"]["trainable"] == sum(sizes[name] for name in trained)
    assert record["bitfit"]["terms"] == terms and record["bitfit"]["train_heads"] is True
    assert all(name.startswith("encoder.lm_head.") for name in record["bitfit"]["unused"])
    assert sum(group["params"] for group in record["bitfit"]["groups"].values()) == record["parameters"]["trainable"]
    valid = epoch_stats(record, "valid")
    assert valid and all("accuracy" in values and "loss" in values for values in valid.values())
    assert max(values["num_updates"] for values in valid.values()) == 12
    assert record["checkpoints"]["checkpoint_last.pt"] == str((tmp_path / "checkpoint_last.pt").resolve())


def test_freeze_heads_reproduces_ofa_exactly(tiny_data, tiny_pretrained, tmp_path):
    tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=2,
                              extra=["--bitfit", "--bitfit-freeze-heads"]))
    trained = bitfit_history(load(tmp_path / "checkpoint_last.pt"))["trainable"]
    assert trained and not any(n.startswith("classification_heads.") for n in trained)


def test_interrupted_run_resumes_to_the_same_result(tiny_data, tiny_pretrained, tmp_path):
    """Stopping after 6 updates and relaunching the same command equals one 12-update run."""
    straight = tmp_path / "straight"
    tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, straight, extra=["--bitfit"]))

    resumed = tmp_path / "resumed"
    tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, resumed, extra=["--bitfit", "--max-update", "6"]))
    second = tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, resumed, extra=["--bitfit"]))
    assert "resuming the interrupted run" in second.stdout
    assert "@ 6 updates" in second.stdout

    launches = read_run_record(resumed / "run_record.json")["launches"]
    assert [launch["resumed_from"] for launch in launches] == [None, str(resumed / "checkpoint_last.pt")]
    assert [launch["status"] for launch in launches] == ["finished", "finished"]

    a = load(straight / "checkpoint_last.pt")
    b = load(resumed / "checkpoint_last.pt")
    assert b["optimizer_history"][-1]["num_updates"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_sigterm_mid_epoch_then_the_same_command_ends_bit_identical(tiny_data, tiny_pretrained, tmp_path):
    """--save-interval-minutes saves inside an epoch; SIGTERM stops train.py with one line and exit 143,
    leaving whole checkpoints; relaunching resumes inside the epoch and ends where an uninterrupted run does."""
    small_batches = ["--bitfit", "--batch-size", "2", "--max-update", "100", "--total-num-update", "100"]  # 80 an epoch
    straight = tmp_path / "straight"
    tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, straight, extra=small_batches))

    stopped = tmp_path / "stopped"
    command = tiny.glue_recipe(tiny_data, tiny_pretrained, stopped, extra=[*small_batches, "--save-interval-minutes",
                                                                            "0.0005"])
    process = tiny.start(command)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        record = stopped / "run_record.json"
        saved = (json.loads(record.read_text()).get("progress") or {}).get("last_saved_updates") \
            if record.exists() else None
        if saved is not None and saved >= 20:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: SIGTERM: stopped.") and "checkpoint_last.pt" in lines[0]
    assert not [p.name for p in stopped.iterdir() if ".tmp" in p.name]
    assert read_run_record(stopped / "run_record.json")["launches"][-1]["status"] == "interrupted"
    iterator = load(stopped / "checkpoint_last.pt")["extra_state"]["train_iterator"]
    assert iterator["epoch"] == 1 and 0 < iterator["iterations_in_epoch"] < 80  # saved inside the first epoch

    second = tiny.run(command)
    assert "resuming the interrupted run" in second.stdout
    a, b = load(straight / "checkpoint_last.pt"), load(stopped / "checkpoint_last.pt")
    assert b["optimizer_history"][-1]["num_updates"] == 100
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_resume_with_another_selection_is_refused(tiny_data, tiny_pretrained, tmp_path, capsys):
    tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=2, extra=["--bitfit"]))
    for extra, message in (
        (["--bitfit", "--bitfit-terms", "q,m2"], "--bitfit-terms 'q,m2'"),
        ([], "resume with the same --bitfit flags"),
    ):
        args = tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=4, extra=extra)
        tiny.assert_one_line_error(tiny.run_main(cli_main, capsys, *args[1:]), message)
        launch = read_run_record(tmp_path / "run_record.json")["launches"][-1]
        assert launch["status"] == "failed" and message in launch["error"]


def test_without_bitfit_matches_fairseq_train_exactly(tiny_data, tiny_pretrained, tmp_path):
    ours = tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path / "ours")
    theirs = ["-m", "fairseq_cli.train", *tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path / "theirs")[1:]]
    ours_log = tiny.run(ours).stdout
    # Stock fairseq cannot read its own checkpoints under torch >= 2.6 without this.
    theirs_log = tiny.run(theirs, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}).stdout

    def stats(log):
        """Per-update and validation stats, without timings."""
        return [re.sub(r"\b(wps|ups|wall|train_wall)[= ][\d.]+", "", line.split("|", 3)[3])
                for line in log.splitlines() if "| train_inner |" in line or "| valid |" in line]

    assert stats(ours_log) == stats(theirs_log)
    assert len(stats(ours_log)) >= 12
    a = load(tmp_path / "ours" / "checkpoint_last.pt")["model"]
    b = load(tmp_path / "theirs" / "checkpoint_last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--bitfit", "--bitfit-terms", "q,bogus"], "--bitfit-terms"),
        (["--bitfit", "--bitfit-terms", "none", "--bitfit-freeze-heads"], "trains no parameter"),
        (["--bitfit", "--ddp-backend", "fully_sharded"], "fully_sharded"),
        (["--restore-file", "/nonexistent/model.pt"], "--restore-file /nonexistent/model.pt"),
        (["--fp16", "--bf16"], "--bf16 and --fp16 exclude each other"),
        pytest.param(["--amp"], "--amp needs a CUDA device", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="--amp is valid on a GPU")),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(tiny_data, tiny_pretrained, tmp_path, capsys, extra, needle):
    """train.py's main in this process (what these checks say, at no interpreter start); the next test runs
    train.py itself, for what a fresh interpreter adds to stderr."""
    args = tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=2, extra=extra)
    status, _, stderr = tiny.run_main(cli_main, capsys, *args[1:])
    assert status == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and needle in lines[0], stderr
    assert not (tmp_path / "checkpoint_last.pt").exists()


def test_no_batch_size_is_one_line_and_exit_2(tiny_data, tiny_pretrained, tmp_path):
    """fairseq-train asserts (a traceback) when neither --batch-size nor --max-tokens is given. Through
    train.py in a fresh interpreter: nothing else reaches stderr."""
    args = tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=2)
    at = args.index("--batch-size")
    result = tiny.run(args[:at] + args[at + 2:], check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: --batch-size or --max-tokens"), result.stderr


def test_a_sentence_task_without_its_criterion_is_one_line_and_exit_2(tiny_data, tiny_pretrained, tmp_path, capsys):
    """sentence_prediction reads its head name from the criterion's config: under fairseq-train's default
    criterion that is omegaconf's traceback."""
    args = tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=2)
    at = args.index("--criterion")
    status, _, stderr = tiny.run_main(cli_main, capsys, *args[1:at], *args[at + 2:])
    assert status == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "--criterion cross_entropy does not have" in lines[0], stderr
    assert lines[0].endswith("use --criterion sentence_prediction"), stderr


def test_user_dir_fairseq_ext_is_accepted(tiny_data, tiny_pretrained, tmp_path):
    """fairseq users pass --user-dir; train.py has imported the plugin already."""
    result = tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=2,
                                       extra=["--bitfit", "--user-dir", str(tiny.REPO / "fairseq_ext")]))
    assert "has already been imported" in result.stdout
    assert (tmp_path / "checkpoint_last.pt").exists()


def test_resume_finds_the_suffixed_last_checkpoint(tiny_data, tiny_pretrained, tmp_path):
    """fairseq names it checkpoint_last{--checkpoint-suffix}.pt; the restart must find that one."""
    suffix = ["--bitfit", "--checkpoint-suffix", "_x"]
    tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=2, extra=suffix))
    second = tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=4, extra=suffix))
    assert "resuming the interrupted run" in second.stdout and "@ 2 updates" in second.stdout
    assert load(tmp_path / "checkpoint_last_x.pt")["optimizer_history"][-1]["num_updates"] == 4


def test_broken_checkpoints_and_changed_optimizer_are_one_line_errors(tiny_data, tiny_pretrained, tmp_path, capsys):
    def one_line_error(args, *fragments):
        tiny.assert_one_line_error(tiny.run_main(cli_main, capsys, *args[1:]), *fragments)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_pretrained.read_bytes()[:5000])
    one_line_error(tiny.glue_recipe(tiny_data, truncated, tmp_path / "fresh", updates=2),
                   f"--restore-file {truncated}: not a whole PyTorch checkpoint")

    run = tmp_path / "run"
    tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, run, updates=2, extra=["--bitfit"]))
    sgd = tiny.glue_recipe(tiny_data, tiny_pretrained, run, updates=4, extra=["--bitfit"])
    sgd[sgd.index("adam")] = "sgd"
    one_line_error(sgd, "trained with the optimizer", "--optimizer")

    last = run / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    one_line_error(tiny.glue_recipe(tiny_data, tiny_pretrained, run, updates=4, extra=["--bitfit"]),
                   f"resuming from {last}: not a whole PyTorch checkpoint")


class RunsCode:
    """Unpickling this runs a command: what a hostile checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_the_safe_loader_refuses_is_one_line_and_nothing_is_written(tiny_data, tiny_pretrained, tmp_path):
    """A checkpoint holding code to run, as --restore-file or as the save dir's checkpoint_last.pt: train.py
    names it in one line with exit 2, never runs it, and writes nothing into --save-dir."""
    marker, hostile = tmp_path / "it-ran", tmp_path / "hostile.pt"
    state = load(tiny_pretrained)
    state["extra_state"]["payload"] = RunsCode(marker)
    torch.save(state, hostile)

    fresh = tmp_path / "fresh"
    result = tiny.run(tiny.glue_recipe(tiny_data, hostile, fresh, updates=2, extra=["--bitfit"]), check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"train.py: error: --restore-file {hostile}: holds Python objects outside the allow-list of fairseq "
        "checkpoint types, which could run code when unpickled; train.py does not load it"], result.stderr[-2000:]
    assert not fresh.exists()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(hostile, resumed / "checkpoint_last.pt")
    result = tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, resumed, updates=2, extra=["--bitfit"]), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert f"resuming from {resumed / 'checkpoint_last.pt'}: holds Python objects" in result.stderr
    assert [path.name for path in resumed.iterdir()] == ["checkpoint_last.pt"]
    assert not marker.exists()


def test_patience_survives_a_stop_after_a_validation_that_did_not_improve(tiny_data, tiny_pretrained, tmp_path):
    """--patience counts across a restart: SIGTERM right after epoch 2's save, whose validation did not
    improve, then the same command; it trains the same epochs, keeps the same best and ends with the same
    weights bit for bit as a run never stopped. Run again, the finished run trains nothing more."""
    # Maximizing the loss: every validation after the first fails to improve while training lowers it.
    patience = ["--bitfit", "--max-update", "0", "--max-epoch", "8", "--patience", "2",
                "--best-checkpoint-metric", "loss", "--maximize-best-checkpoint-metric"]
    straight = tmp_path / "straight"
    tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, straight, extra=patience))
    straight_record = read_run_record(straight / "run_record.json")
    assert straight_record["early_stop"]["epoch"] == 3 and straight_record["early_stop"]["patience"] == 2

    stopped = tmp_path / "stopped"
    command = tiny.glue_recipe(tiny_data, tiny_pretrained, stopped, extra=patience)
    first = tiny.run([str(tiny.REPO / "tests" / "stop_after_epoch.py"), *command[1:]],
                     env={"STOP_AFTER_EPOCH": "2"}, check=False)
    assert first.returncode == 143, first.stderr[-2000:]
    saved = load(stopped / "checkpoint_last.pt")["extra_state"]
    assert (saved["train_iterator"]["epoch"], saved["train_iterator"]["iterations_in_epoch"]) == (3, 0)  # epoch 2 done
    assert saved["patience"]["validations_without_improvement"] == 1

    second = tiny.run(command)
    assert "resuming the interrupted run" in second.stdout
    record = read_run_record(stopped / "run_record.json")
    assert record["early_stop"] == straight_record["early_stop"]
    assert sorted(epoch_stats(record, "valid")) == sorted(epoch_stats(straight_record, "valid")) == [1, 2, 3]
    a, b = load(straight / "checkpoint_last.pt"), load(stopped / "checkpoint_last.pt")
    assert b["optimizer_history"][-1]["num_updates"] == a["optimizer_history"][-1]["num_updates"]
    assert b["extra_state"]["best"] == a["extra_state"]["best"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name

    third = tiny.run(command)
    assert "nothing left to train" in third.stdout
    c = load(stopped / "checkpoint_last.pt")
    assert c["optimizer_history"][-1]["num_updates"] == a["optimizer_history"][-1]["num_updates"]
    assert read_run_record(stopped / "run_record.json")["early_stop"] == straight_record["early_stop"]
