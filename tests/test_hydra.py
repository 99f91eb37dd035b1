"""train.py in hydra form: the same training as the argparse form, sweeps on hydra's launchers,
the shipped GLUE configs, and one-line errors that name config keys."""
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fairseq_ext  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
import tiny
from fairseq_ext.tools import glue_configs
from fairseq_ext.training import hydra_form
from fairseq_ext.training.main import cli_main

UPDATES = 12
CONFIGS = tiny.REPO / "configs" / "glue"


def tiny_config(folder: Path) -> Path:
    """tiny.glue_recipe as a hydra config file (the data and checkpoint come as overrides)."""
    required = "???"
    config = {
        "common": {"cpu": True, "seed": 1, "log_format": "simple", "log_interval": 1},
        "task": {"_name": "sentence_prediction", "data": required, "num_classes": 2, "init_token": 0,
                 "separator_token": 2, "max_positions": 64},
        "model": {"_name": "roberta", "encoder_layers": 2, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64,
                  "encoder_attention_heads": 2, "max_positions": 64},
        "criterion": {"_name": "sentence_prediction"},
        "checkpoint": {"restore_file": required, "reset_optimizer": True, "reset_dataloader": True,
                       "reset_meters": True, "no_epoch_checkpoints": True, "best_checkpoint_metric": "accuracy",
                       "maximize_best_checkpoint_metric": True},
        "dataset": {"batch_size": 16, "num_workers": 0},
        "optimizer": {"_name": "adam"},
        "lr_scheduler": {"_name": "polynomial_decay", "total_num_update": UPDATES, "warmup_updates": 2},
        "optimization": {"lr": [1e-2], "max_update": UPDATES},
    }
    folder.mkdir(parents=True, exist_ok=True)
    # fairseq's config files start so; hydra then reads them as fairseq-hydra-train does.
    (folder / "tiny.yaml").write_text("# @package _group_\n" + yaml.safe_dump(config))
    return folder


def hydra_command(config_dir: Path, data: Path, pretrained: Path, *overrides, multirun=False):
    return [str(tiny.REPO / "train.py"), *(["-m"] if multirun else []), "--config-dir", str(config_dir), "--config-name", "tiny",
            f"task.data={data}", f"checkpoint.restore_file={pretrained}", *overrides]


def logged_stats(log: str):
    """Per-update, epoch and validation stats, without timings."""
    return [re.sub(r"\b(wps|ups|wall|train_wall)[= ][\d.]+", "", line.split("|", 3)[3])
            for line in log.splitlines() if re.search(r"\| (train_inner|train|valid) \|", line)]


def tensors(save_dir: Path):
    out = {f"model.{k}": v for k, v in torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")["model"].items()}
    out.update({f"delta.{k}": v for k, v in load_file(save_dir / "checkpoint_last.delta.safetensors").items()})
    return out


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_hydra_form_trains_exactly_as_the_argparse_form(tiny_data, tiny_pretrained, tmp_path):
    argparse_log = tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path / "argparse",
                                             updates=UPDATES, extra=["--bitfit", "--bitfit-terms", "all"])).stdout
    command = hydra_command(tiny_config(tmp_path / "conf"), tiny_data, tiny_pretrained,
                            f"checkpoint.save_dir={tmp_path / 'hydra'}", "bitfit.bitfit=true", "bitfit.bitfit_terms=all")
    hydra_log = tiny.run(command, cwd=tmp_path).stdout

    assert "trainable params:" in hydra_log
    assert logged_stats(hydra_log) == logged_stats(argparse_log)
    assert len(logged_stats(hydra_log)) >= UPDATES
    assert_same_tensors(tensors(tmp_path / "hydra"), tensors(tmp_path / "argparse"))
    # The BitFit options are stored where the argparse form stores them.
    cfg = torch.load(tmp_path / "hydra" / "checkpoint_last.pt", map_location="cpu")["cfg"]
    assert (cfg["bitfit"]["bitfit"], cfg["bitfit"]["bitfit_terms"]) == (True, "all")

    # The same command again resumes the finished run instead of starting over.
    again = tiny.run(command, cwd=tmp_path).stdout
    assert f"resuming the interrupted run from {tmp_path / 'hydra' / 'checkpoint_last.pt'}" in again
    assert "num_updates=1," not in again  # it went on from update 12


def test_joblib_sweep_runs_jobs_at_once_each_in_its_folder(tiny_data, tiny_pretrained, tmp_path):
    config_dir = tiny_config(tmp_path / "conf")
    sweep = tmp_path / "sweep"
    tiny.run(hydra_command(config_dir, tiny_data, tiny_pretrained, "bitfit.bitfit=true", "common.seed=1,2",
                           "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}",
                           multirun=True), cwd=tmp_path)
    single = tmp_path / "single"
    tiny.run(hydra_command(config_dir, tiny_data, tiny_pretrained, "bitfit.bitfit=true", "common.seed=2",
                           f"checkpoint.save_dir={single}"), cwd=tmp_path)

    first, second = tensors(sweep / "0" / "checkpoints"), tensors(sweep / "1" / "checkpoints")
    assert not all(torch.equal(first[k], second[k]) for k in first)  # two seeds, two runs
    assert_same_tensors(second, tensors(single))  # a sweep's job is the run its overrides describe
    assert "common.seed=2" in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    assert "| train_inner |" in (sweep / "1" / "train.log").read_text()
    assert not (tmp_path / "checkpoints").exists()


def test_submitit_local_sweep(tiny_data, tiny_pretrained, tmp_path):
    """The submitit launcher's path, on submitit's local executor instead of SLURM."""
    sweep = tmp_path / "sweep"
    tiny.run(hydra_command(tiny_config(tmp_path / "conf"), tiny_data, tiny_pretrained, "bitfit.bitfit=true",
                           'bitfit.bitfit_terms="q,m2"', "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                           f"hydra.sweep.dir={sweep}", multirun=True), cwd=tmp_path)
    checkpoint = torch.load(sweep / "0" / "checkpoints" / "checkpoint_last.pt", map_location="cpu")
    assert checkpoint["cfg"]["bitfit"]["bitfit_terms"] == "q,m2"
    assert checkpoint["optimizer_history"][-1]["num_updates"] == UPDATES
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))


@pytest.mark.parametrize("overrides, fragments", [
    (["bitfit.bogus=1"], ["bitfit.bogus: no such config key"]),
    (["bitfit.bitfit=true", "bitfit.bitfit_terms=q,bogus"], ["bitfit.bitfit_terms", "unknown term 'bogus'"]),
    (["bitfit.bitfit_delta_only=true"], ["bitfit.bitfit_delta_only needs bitfit.bitfit"]),
    (["common.fp16=true", "common.bf16=true"], ["common.bf16 and common.fp16 exclude each other"]),
    (["checkpoint.save_interval_minutes=-1"], ["checkpoint.save_interval_minutes -1: must be positive"]),
    (["optimization.lr=fast"], ["optimization.lr=fast"]),
    (["dataset.batch_size=null"], ["dataset.batch_size or dataset.max_tokens is needed"]),
    (["criterion._name=cross_entropy"], ["task._name=sentence_prediction takes task.regression_target",
                                          "criterion._name=cross_entropy does not have",
                                          "use criterion._name=sentence_prediction"]),
])
def test_bad_config_is_one_line_naming_the_key(tiny_data, tiny_pretrained, tmp_path, capsys, overrides, fragments):
    command = hydra_command(tiny_config(tmp_path / "conf"), tiny_data, tiny_pretrained, *overrides)
    tiny.assert_one_line_error(tiny.run_main(cli_main, capsys, *command[1:]), *fragments)


def test_bad_value_inside_a_sweep_stops_it_before_any_job(tiny_data, tiny_pretrained, tmp_path, capsys):
    command = hydra_command(tiny_config(tmp_path / "conf"), tiny_data, tiny_pretrained, "bitfit.bitfit=true",
                            "bitfit.bitfit_terms=all,q,nonsense", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                            multirun=True)
    tiny.assert_one_line_error(tiny.run_main(cli_main, capsys, *command[1:]), "bitfit.bitfit_terms",
                               "unknown term 'nonsense'")
    assert not (tmp_path / "sweep").exists()


def test_missing_launcher_plugin_names_its_pip_package(tiny_data, tiny_pretrained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(hydra_form.LAUNCHER_PACKAGES, "joblib",
                        ("hydra_plugins.not_installed_here", "hydra-joblib-launcher"))
    command = hydra_command(tiny_config(tmp_path / "conf"), tiny_data, tiny_pretrained, "common.seed=1,2",
                            "hydra/launcher=joblib", multirun=True)
    tiny.assert_one_line_error(tiny.run_main(cli_main, capsys, *command[1:]), "hydra/launcher=joblib",
                               "pip install hydra-joblib-launcher")


def test_missing_config_file_and_misplaced_options(tmp_path, capsys):
    tiny.assert_one_line_error(tiny.run_main(cli_main, capsys, "--config-dir", tmp_path, "--config-name", "rte"),
                               f"--config-name rte: no rte.yaml in {tmp_path}")
    tiny.assert_one_line_error(tiny.run_main(cli_main, capsys, "--config-dir", CONFIGS, "--config-name", "rte",
                                             "task.data=x", "-m", "common.seed=1,2"),
                               "unrecognized arguments", "go before the key=value overrides")


def test_shipped_glue_configs_are_the_runners_recipe(tmp_path):
    """configs/glue/*.yaml are what python -m fairseq_ext.tools.glue_configs writes today."""
    written = glue_configs.write_all(tmp_path)
    assert len(written) == 16
    for path in written:
        assert path.read_text() == (CONFIGS / path.name).read_text(), f"regenerate {CONFIGS / path.name}"
    cola = yaml.safe_load((CONFIGS / "cola.yaml").read_text())
    assert cola["bitfit"] == {"bitfit": True, "bitfit_terms": "all"}
    assert (cola["optimization"]["lr"], cola["dataset"]["batch_size"]) == ([1e-3], 32)
    full = yaml.safe_load((CONFIGS / "cola_full.yaml").read_text())
    assert "bitfit" not in full and full["optimization"]["lr"] == [1e-5]  # fairseq's RoBERTa recipe


def test_shipped_configs_compose_to_the_runners_config():
    """Composed by hydra, each shipped config is the config the argparse form makes of the runner's
    command, section for section (the model section is the arch's in both)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fairseq_ext.training import options

    sections = ("common", "dataset", "optimization", "checkpoint", "bitfit", "lr_scheduler", "optimizer", "task",
                "criterion", "distributed_training")
    for task in glue_configs.GLUE_TRAIN_ROWS:
        for mode in (glue_configs.BITFIT_MODE, "full"):
            command = [str(arg) for arg in glue_configs.recipe_command(task, mode)]
            command[0], command[command.index("--restore-file") + 1] = "DATA", "model.pt"
            expected = OmegaConf.to_container(options.to_config(options.parse_args(command)), resolve=True)
            name = glue_configs.config_name(task, mode)
            hydra_form.register_schema(name)
            with initialize_config_dir(config_dir=str(CONFIGS), version_base=hydra_form.HYDRA_VERSION_BASE):
                composed = compose(name, overrides=["task.data=DATA", "checkpoint.restore_file=model.pt"])
            composed = OmegaConf.to_container(hydra_form.plain_config(composed), resolve=True)
            for section in sections:
                assert composed[section] == expected[section], (name, section)


def test_shipped_configs_compose_and_pass_the_checks():
    names = sorted(path.stem for path in CONFIGS.glob("*.yaml"))
    assert len(names) == 16
    for name in names:
        hydra_form.register_schema(name)
        hydra_form.check_command_line(["--config-dir", str(CONFIGS), "--config-name", name, "task.data=prepared/X",
                                       "checkpoint.restore_file=model.pt"])
    # The paper's grid as a sweep: every value of every sweep is checked.
    hydra_form.check_command_line(["-m", "--config-dir", str(CONFIGS), "--config-name", "rte", "task.data=prepared/X",
                                   "checkpoint.restore_file=model.pt", "optimization.lr=[1e-4],[4e-4],[7e-4],[1e-3]",
                                   "common.seed=1,2,3"])


def test_slurm_run_config_sets_up_the_submitit_launcher(tmp_path):
    result = tiny.run([str(tiny.REPO / "train.py"), "--config-dir", str(CONFIGS), "--config-name", "rte", "+run_config=slurm_1g",
                       "hydra/launcher=submitit_slurm", "task.data=prepared/RTE", "checkpoint.restore_file=model.pt",
                       "--cfg", "hydra"], cwd=tmp_path)
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["partition"]) == (1, 1, None)


def test_hydra_form_under_torchrun_trains_one_job(tiny_data, tiny_pretrained, tmp_path):
    """torchrun's workers join one training, as in the argparse form; frozen weights stay bit-identical."""
    from test_distributed import free_port, torchrun

    save_dir = tmp_path / "save"
    command = hydra_command(tiny_config(tmp_path / "conf"), tiny_data, tiny_pretrained, "bitfit.bitfit=true",
                            f"checkpoint.save_dir={save_dir}", "dataset.batch_size=8")
    result = tiny.run([*torchrun(2, free_port()), *command], cwd=tmp_path, timeout=300)
    assert "torchrun: 2 workers, backend gloo" in result.stdout
    trained = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")
    assert trained["optimizer_history"][-1]["num_updates"] == UPDATES
    pretrained = torch.load(tiny_pretrained, map_location="cpu")["model"]
    for name, tensor in trained["model"].items():
        if name in pretrained and not name.endswith("bias"):
            assert torch.equal(tensor, pretrained[name]), f"frozen {name} changed"
