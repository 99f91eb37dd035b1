"""fairseq patches (fairseq_ext.plugin.patches): each target still exists in the installed fairseq,
with the code shape the patch assumes, and the patches do what they say."""
import functools
import gc
import inspect
import pickle
import textwrap

import pytest
import torch

import fairseq_ext  # noqa: F401  (registers the plugin: install() has run)
import tiny
from fairseq_ext.core.run_record import read_run_record
from fairseq_ext.plugin import patches
from fairseq_ext.training.main import train_worker
from fairseq_ext.training.trainer import BitFitTrainer


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: f"{p.name}:{p.target}")
def test_every_patch_target_still_exists_as_the_patch_assumes(patch):
    target = patches.resolve(patch.target)
    if patch.source_has:
        source = inspect.getsource(target.fget if isinstance(target, property) else target)
        position = 0
        for text in patch.source_has:
            found = source.find(text, position)
            assert found >= 0, f"{patch.target} no longer has {text!r} (after position {position})"
            position = found + len(text)


def test_the_plugin_installs_the_always_on_patches():
    from fairseq.distributed import utils as distributed_utils
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    installed = patches.installed()
    assert {"quiet-import", "safe-checkpoint-types", "rank-broadcast", "bert-arch-names"} <= set(installed)
    assert set(installed) <= {patch.name for patch in patches.PATCHES}
    assert distributed_utils._broadcast_object_slow is patches._broadcast_object
    assert ARCH_MODEL_NAME_REGISTRY["bert_base"] == ARCH_MODEL_NAME_REGISTRY["bert_large"] == "bert"
    import argparse
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    patches.install()  # idempotent
    assert patches.installed() == installed


def test_scoped_patches_are_undone_when_their_scope_ends(tmp_path):
    import fairseq_cli.train
    from fairseq.logging import progress_bar

    trainer, bar = fairseq_cli.train.Trainer, progress_bar.progress_bar
    seen = []
    with patches.fairseq_train_with(BitFitTrainer, on_stats=lambda *args: seen.append(args)):
        assert fairseq_cli.train.Trainer is BitFitTrainer and "bitfit-trainer" in patches.installed()
        recorded = progress_bar.progress_bar(iter([1, 2]), log_format="none", epoch=3)
        assert list(recorded) == [1, 2]
        recorded.print({"loss": 0.5}, tag="valid", step=7)
        # fairseq's tensorboard wrapper has no epoch of its own: the record still gets it
        wrapped = progress_bar.progress_bar(iter([]), log_format="none", epoch=4, tensorboard_logdir=str(tmp_path))
        wrapped.print({"loss": 0.4}, tag="valid", step=8)
    assert seen == [("valid", 3, {"loss": 0.5}), ("valid", 4, {"loss": 0.4})]
    assert fairseq_cli.train.Trainer is trainer and progress_bar.progress_bar is bar
    assert "bitfit-trainer" not in patches.installed()


def test_a_fresh_worker_process_trains_with_the_bitfit_trainer(tmp_path):
    """fairseq's spawned GPU workers unpickle the training function in a new interpreter: train.py's
    worker brings BitFitTrainer there (a plain `fairseq_cli.train.Trainer = ...` would not)."""
    worker = pickle.dumps(functools.partial(train_worker, trainer_class=BitFitTrainer, resumed_from=None))
    script = textwrap.dedent(f"""
        import pickle, sys
        import fairseq_cli.train
        from omegaconf import OmegaConf
        worker = pickle.loads({worker!r})
        fairseq_cli.train.main = lambda cfg: print("trainer:", fairseq_cli.train.Trainer.func.__name__)
        worker(OmegaConf.create({{"checkpoint": {{"save_dir": {str(tmp_path)!r}}},
                                 "distributed_training": {{"distributed_rank": 0}}}}))
    """)
    result = tiny.run(["-c", script])
    assert "trainer: BitFitTrainer" in result.stdout, result.stdout + result.stderr
    assert read_run_record(tmp_path / "run_record.json")["status"] == "finished"


def test_batch_prefetching_threads_end_before_the_interpreter_does():
    """A run stopped mid-epoch (--max-update) leaves fairseq's prefetching thread collating;
    CPython would end it inside a torch call at exit and abort the finished process."""
    import threading
    import time

    from fairseq.data import iterators

    def slow_batches():
        for index in range(1000):
            time.sleep(0.01)
            yield torch.full((4,), index)

    class Batches:
        def __iter__(self):
            return slow_batches()

        def __len__(self):
            return 1000

    buffered = iterators.BufferedIterator(5, Batches())
    assert torch.equal(next(buffered), torch.zeros(4))  # the thread now prefetches the rest
    consumer = next(t for t in threading.enumerate() if isinstance(t, iterators.BackgroundConsumer))
    patches.stop_batch_prefetching()
    assert not consumer.is_alive() and consumer.count < 1000


@torch.no_grad()
def test_attention_through_projections_matches_fairseq_and_falls_back():
    """Eval-mode self-attention through the projection modules gives fairseq's output; what that
    path does not cover (attention weights, training) goes through fairseq's own."""
    from fairseq.modules import MultiheadAttention

    torch.manual_seed(0)
    attention = MultiheadAttention(16, 2, self_attention=True).eval()
    x = torch.randn(5, 3, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    expected, _ = attention(x, x, x, key_padding_mask=padding, need_weights=False)
    seen = []
    handle = attention.q_proj.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with patches.attention_through_projections([attention]):
        got, weights = attention(x, x, x, key_padding_mask=padding, need_weights=False)
        _, with_weights = attention(x, x, x, key_padding_mask=padding, need_weights=True)
    handle.remove()
    assert torch.allclose(got, expected, atol=1e-6) and weights is None
    assert with_weights is not None and len(seen) == 2  # the fallback still ran the projection modules
    assert "forward" not in attention.__dict__ and attention.skip_embed_dim_check is False


def test_foreach_adam_gives_fairseq_adams_numbers_bit_for_bit():
    """The multi-tensor step equals fairseq's per-tensor Adam exactly (weight decay, a parameter without a
    gradient, one that joins later with its own step count), and keeps fairseq's state layout."""
    from fairseq.optim.adam import Adam

    generator = torch.Generator().manual_seed(0)
    shapes = [(384,), (384, 384), (1536,), (7,)]
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(4)]

    def train(kind=None):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = Adam([{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:]}], lr=1e-3,
                         betas=(0.9, 0.98), eps=1e-6)
        if kind is not None:
            optimizer.__class__ = kind
        for step, step_grads in enumerate(grads):
            for i, (p, g) in enumerate(zip(params, step_grads)):
                p.grad = None if (i == 3 and step < 2) else g.clone()  # the last joins at step 3
            optimizer.step()
        return params, optimizer.state_dict()

    (theirs, their_state), (ours, our_state) = train(), train(patches.ForeachAdam)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))
    # --fused-adam: fairseq's update in torch's fused kernel, equal up to rounding, the same state layout.
    fused, fused_state = train(patches.FusedFairseqAdam)
    for a, b, before in zip(theirs, fused, start):
        assert (a - before).abs().max() > 1e-3  # four real steps of lr 1e-3
        torch.testing.assert_close(b, a, rtol=0, atol=2e-6)  # a few float32 ulps of these O(1) weights
    assert {k: s["step"] for k, s in fused_state["state"].items()} == {k: s["step"] for k, s in
                                                                       their_state["state"].items()}
    assert their_state["state"].keys() == our_state["state"].keys()
    for key, state in their_state["state"].items():
        assert state["step"] == our_state["state"][key]["step"]
        assert torch.equal(state["exp_avg_sq"], our_state["state"][key]["exp_avg_sq"])


def test_train_py_steps_with_foreach_adam_or_fused_adam(tiny_data, tiny_pretrained, tmp_path):
    built = []

    class Recording(BitFitTrainer):
        def _build_optimizer(self):
            super()._build_optimizer()
            built.append(type(self._optimizer.optimizer))

    from fairseq_ext.training.main import cli_main
    cli_main(tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path / "bitfit", updates=2, extra=["--bitfit"])[1:],
             trainer_class=Recording)
    assert built and all(kind is patches.ForeachAdam for kind in built)
    built.clear()
    cli_main(tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path / "fused", updates=2, extra=["--fused-adam"])[1:],
             trainer_class=Recording)
    assert built and all(kind is patches.FusedFairseqAdam for kind in built)
    # Nothing keeps a finished run's trainer (and its model) alive: not the checkpoint-copy hook either.
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, Recording)]


def test_bf16_batches_keep_float_targets():
    """--bf16 casts a batch's float inputs, but a regression target keeps fp32: STS-B's 3.8 stays 3.8."""
    from omegaconf import OmegaConf

    trainer = object.__new__(BitFitTrainer)  # only the config is read
    trainer.cfg = OmegaConf.create({"common": {"fp16": False, "bf16": True}})
    sample = {"net_input": {"src_tokens": torch.tensor([[0, 5, 2]]), "features": torch.tensor([0.1])},
              "target": torch.tensor([3.8])}
    converted = trainer._fp_convert_sample(sample)
    assert converted["net_input"]["features"].dtype == torch.bfloat16
    assert converted["target"].dtype == torch.float32 and converted["target"].item() == sample["target"].item()
    assert converted["net_input"]["src_tokens"].dtype == torch.long
