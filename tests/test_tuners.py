"""The comparison methods (--tuner lora, ia3, adapter): trained in train.py as BitFit is, with the same
guarantees: the base bit-identical, a delta of only the trained tensors, an exact resume, a merge that
computes what the unmerged model computes, and a predictor that serves every one of them."""
import copy
import shutil

import pytest
import torch
from torch import nn

import fairseq_ext  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
import tiny
from fairseq_ext.core import delta_file as deltas
from fairseq_ext.core import tuners
from fairseq_ext.plugin.deltas import merged_model
from fairseq_ext.plugin.predictor import MultiTaskPredictor
from fairseq_ext.tools import delta as delta_cli
from fairseq_ext.training.glue_recipe import default_recipe
from fairseq_ext.training.options import mode_flags
from test_predict import reference_logits, tiny_sentences

UPDATES = 12
METHODS = tuners.TUNERS
LAST_DELTA = f"checkpoint_last{deltas.DELTA_SUFFIX}"


# ------------------------------------------------------------------ the core, on any module


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):  # (output, weights), as fairseq's attention returns
        return self.out_proj(self.q_proj(x) * self.k_proj(x) + self.v_proj(x)), None


class Block(nn.Module):
    """A transformer layer as fairseq names it, enough for every method's targets."""

    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        x = x + self.self_attn(x)[0]
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("method", METHODS)
def test_an_injected_model_starts_as_its_base_and_keeps_the_base_names(method):
    torch.manual_seed(0)
    base, x = Stack(), torch.randn(4, 8)
    model = copy.deepcopy(base)
    added = tuners.inject(model, tuners.TunerSpec(method))
    assert added and all(tuners.trained_tensor_role(name) == method for name in added)
    assert torch.equal(model(x), base(x))  # LoRA's B, IA3's scales and adapters' up start neutral
    state = model.state_dict()
    assert set(state) == set(base.state_dict()) | set(added)  # the base's own names, plus the tuner's
    fresh = Stack()
    tuners.inject(fresh, tuners.TunerSpec(method))
    fresh.load_state_dict(base.state_dict())  # a base without the tuner loads; the tuner keeps its init
    assert torch.equal(fresh(x), base(x))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in added:
                parameter.add_(0.05 * torch.randn_like(parameter))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    if method == tuners.ADAPTER:
        with pytest.raises(tuners.TunerError, match="cannot be merged"):
            tuners.merge(model)
    else:
        tuned = model(x)
        tuners.merge(model)
        assert list(model.state_dict()) == list(base.state_dict())  # the base's graph again
        assert torch.allclose(model(x), tuned, atol=1e-6)


def test_bad_tuner_settings_are_refused_by_name():
    with pytest.raises(tuners.TunerError, match="unknown method 'prefix'"):
        tuners.TunerSpec("prefix")
    with pytest.raises(tuners.TunerError, match="unknown target 'x'"):
        tuners.spec_from_options("lora", 8, 8.0, "q,x", 64)
    with pytest.raises(tuners.TunerError, match="take no targets"):
        tuners.spec_from_options("adapter", 8, 8.0, "q", 64)
    assert tuners.spec_from_options("ia3", 8, 8.0, "", 64).targets == ("k", "v", "m3")


def test_each_method_is_a_runner_mode_with_a_sourced_recipe():
    for method in METHODS:
        assert mode_flags(method) == ["--tuner", method]
        small, large = (default_recipe(method, "CoLA", 8551, params) for params in (22_700_000, 125_000_000))
        assert "et al." in small.rule and "et al." in large.rule
    assert default_recipe("lora", "SST-2", 67349, 125_000_000).lrs == (5e-4,)  # LoRA's Table 9
    assert default_recipe("lora", "CoLA", 8551, 125_000_000).epochs == 80


# ------------------------------------------------------------------ train.py


def tuner_recipe(data, pretrained, save_dir, method, *extra):
    return tiny.glue_recipe(data, pretrained, save_dir, updates=UPDATES, extra=["--tuner", method, *extra])


@pytest.fixture(scope="module")
def tuner_runs(tiny_data, tiny_pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuner_runs")
    for method in METHODS:
        tiny.run(tuner_recipe(tiny_data, tiny_pretrained, root / method, method))
    return root


def load(path):
    return torch.load(path, map_location="cpu")


@pytest.mark.parametrize("method", METHODS)
def test_a_tuner_run_trains_only_its_tensors_and_the_head(tuner_runs, tiny_pretrained, method):
    pretrained = load(tiny_pretrained)["model"]
    trained = load(tuner_runs / method / "checkpoint_last.pt")["model"]
    added = [name for name in trained if tuners.trained_tensor_role(name)]
    assert added and all(tuners.trained_tensor_role(name) == method for name in added)
    for name, tensor in pretrained.items():  # the whole base, under its own names, bit-identical
        if not name.startswith("classification_heads."):
            assert torch.equal(trained[name], tensor), name
    delta = deltas.read_delta(tuner_runs / method / LAST_DELTA)
    assert delta.selection["tuner"]["method"] == method and delta.selection["terms"] == "none"
    assert set(delta.tensors) == set(added) | {n for n in trained if n.startswith("classification_heads.")}
    moved = [name for name in added if not torch.equal(trained[name], tuners_initial(method, name, trained))]
    assert moved, "no tuner tensor changed"


def tuners_initial(method, name, state):
    """The value a tuner tensor is created with where it is deterministic (zeros or ones), else itself."""
    if method == tuners.LORA and "lora_B" in name or method == tuners.ADAPTER and ".up." in name:
        return torch.zeros_like(state[name])
    if method == tuners.IA3:
        return torch.ones_like(state[name])
    return state[name] + 1  # random init: any value it holds counts as moved


@pytest.mark.parametrize("method", [tuners.LORA, tuners.ADAPTER])  # PEFT's wrapped layers; the hooks here
def test_an_interrupted_tuner_run_resumes_to_the_straight_runs_weights(tuner_runs, tiny_data, tiny_pretrained,
                                                                       tmp_path, method):
    save_dir = tmp_path / method
    tiny.run(tuner_recipe(tiny_data, tiny_pretrained, save_dir, method, "--max-update", "6"))
    second = tiny.run(tuner_recipe(tiny_data, tiny_pretrained, save_dir, method))
    assert "resuming the interrupted run" in second.stdout
    straight = load(tuner_runs / method / "checkpoint_last.pt")["model"]
    resumed = load(save_dir / "checkpoint_last.pt")["model"]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(resumed[name], tensor) for name, tensor in straight.items())


def test_a_changed_tuner_is_refused_on_resume(tuner_runs, tiny_data, tiny_pretrained, tmp_path):
    save_dir = tmp_path / "changed"
    shutil.copytree(tuner_runs / "lora", save_dir)
    result = tiny.run(tuner_recipe(tiny_data, tiny_pretrained, save_dir, "lora", "--lora-rank", "4",
                                   "--max-update", str(UPDATES + 2)), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "was trained with LoRA r 8, alpha 8 on q,v, this run asks for LoRA r 4" in result.stderr.strip().splitlines()[-1]


def test_bad_tuner_flags_are_one_line(tiny_data, tiny_pretrained, tmp_path):
    result = tiny.run(tuner_recipe(tiny_data, tiny_pretrained, tmp_path / "bad", "lora", "--tuner-targets", "q,z"),
                      check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "argument --tuner lora: unknown target 'z'" in lines[-1]
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


# ------------------------------------------------------------------ merging and serving


@pytest.mark.parametrize("method", [tuners.LORA, tuners.IA3])
def test_delta_apply_merges_lora_and_ia3_into_a_plain_checkpoint(tuner_runs, tiny_pretrained, tiny_data, tmp_path,
                                                                 capsys, method):
    """The merged checkpoint (fairseq loads it, no tuner in sight) predicts what the predictor, serving
    the delta unmerged, predicts."""
    merged = tmp_path / "merged.pt"
    status, _, err = tiny.run_main(delta_cli.main, capsys, "apply", "--base", tiny_pretrained,
                                   "--delta", tuner_runs / method / LAST_DELTA, "--out", merged)
    assert status == 0, err
    state = load(merged)["model"]
    assert not any(tuners.trained_tensor_role(name) for name in state)
    predictor = MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt", batch_size=8)
    predictor.add_task(method, tuner_runs / method / LAST_DELTA)
    examples = tiny_sentences(tiny_data)[:24]
    served = predictor.logits(method, examples)
    assert torch.allclose(served, reference_logits(predictor, method, examples, merged), atol=1e-5)


def test_adapters_are_served_unmerged_and_apply_refuses_them(tuner_runs, tiny_pretrained, tiny_data, tmp_path,
                                                            capsys):
    delta = tuner_runs / "adapter" / LAST_DELTA
    tiny.assert_one_line_error(
        tiny.run_main(delta_cli.main, capsys, "apply", "--base", tiny_pretrained, "--delta", delta,
                      "--out", tmp_path / "merged.pt"), "add layers", "serve the delta unmerged")
    assert not (tmp_path / "merged.pt").exists()
    model, _ = merged_model(tiny_pretrained, delta)  # the runner's in-memory path: adapters in place
    predictor = MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt", batch_size=8)
    predictor.add_task("adapter", delta)
    examples = tiny_sentences(tiny_data)[:24]
    head = next(iter(model.classification_heads))
    with torch.no_grad():
        for indices, src_tokens in predictor.batches(predictor.encode("adapter", examples)):
            expected, _ = model.float().eval()(src_tokens, features_only=True, classification_head_name=head)
            assert torch.allclose(predictor.logits("adapter", [examples[i] for i in indices]), expected, atol=1e-5)


def test_mixed_requests_over_lora_tasks_run_task_by_task(tuner_runs, tiny_pretrained, tiny_data):
    predictor = MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt", batch_size=8)
    predictor.add_task("first", tuner_runs / "lora" / LAST_DELTA)
    predictor.add_task("second", tuner_runs / "lora" / f"checkpoint_best{deltas.DELTA_SUFFIX}")
    examples = tiny_sentences(tiny_data)[:10]
    items = [("first" if i % 3 else "second", text) for i, text in enumerate(examples)]
    predictor.use("second")
    mixed = predictor.logits_mixed(items)
    assert predictor.prepare_mixed() is None
    for (task, text), row in zip(items, mixed):
        assert torch.allclose(row, predictor.logits(task, [text])[0], atol=1e-5)


def test_a_predictor_refuses_tasks_of_another_tuner(tuner_runs, tiny_pretrained, tiny_data):
    from fairseq_ext.core.errors import UserError

    predictor = MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt")
    predictor.add_task("lora", tuner_runs / "lora" / LAST_DELTA)
    with pytest.raises(UserError, match="trained with IA3 on k,v,m3, the loaded model has LoRA"):
        predictor.add_task("ia3", tuner_runs / "ia3" / LAST_DELTA)


# ------------------------------------------------------------------ torchrun and mixed precision


def test_lora_under_torchrun_equals_one_worker_with_twice_the_batch(tiny_data, tiny_pretrained, tmp_path):
    from test_distributed import dump_run, recipe

    def lora(save_dir, batch):
        args = recipe(tiny_data, tiny_pretrained, save_dir, batch, ["--tuner", "lora", "--ddp-backend", "c10d"])
        args.remove("--bitfit")
        return args

    two = dump_run(lora(tmp_path / "two", 8), tmp_path / "two_dump", nproc=2)
    assert "torchrun: 2 workers, backend gloo" in two.stdout
    dump_run(lora(tmp_path / "one", 16), tmp_path / "one_dump")
    rank0, rank1 = (torch.load(tmp_path / "two_dump" / f"rank{rank}.pt") for rank in (0, 1))
    single = torch.load(tmp_path / "one_dump" / "rank0.pt")
    pretrained = torch.load(tiny_pretrained)["model"]
    assert any("lora_B" in name and rank0[name].abs().sum() > 0 for name in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
        if name in pretrained and not name.startswith("classification_heads."):
            assert torch.equal(rank0[name], pretrained[name]), f"frozen {name} changed"


def test_bf16_adapters_keep_the_base_and_fp32_masters(tiny_data, tiny_pretrained, tmp_path):
    from test_distributed import dump_run

    args = tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=6, extra=["--tuner", "adapter", "--bf16"])
    dump_run(args, tmp_path / "dump")
    live = torch.load(tmp_path / "dump" / "rank0.pt")
    checkpoint = torch.load(tmp_path / "checkpoint_last.pt")
    trained = checkpoint["optimizer_history"][-1]["bitfit"]["trainable"]
    pretrained = torch.load(tiny_pretrained)["model"]
    assert any(".adapter_ffn." in name for name in trained)
    for name, tensor in live.items():
        assert tensor.dtype == torch.bfloat16, name
        if name in pretrained and name not in trained:
            assert torch.equal(tensor, pretrained[name].to(torch.bfloat16)), f"frozen {name} changed"
    optimizer_state = checkpoint["last_optimizer_state"]["state"]
    assert len(optimizer_state) == len(trained)
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer_state.values())
