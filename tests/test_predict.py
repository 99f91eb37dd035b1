"""MultiTaskPredictor and its CLI: one base, task deltas switched in place, logits equal to the full checkpoints.

Two tiny RoBERTa BitFit runs (different selections) share the tiny pretrained
base; a few BitFit updates of the embedded all-MiniLM-L6-v2 on a CoLA subset
check the real tokenizer, GLUE test files and the leaderboard output.
"""
import dataclasses
import random
import shutil
from pathlib import Path

import pytest
import torch

import fairseq_ext  # noqa: F401  (the glue task, bert model and safe checkpoint loading)
import tiny
from fairseq_ext.core import delta_file as deltas
from fairseq_ext.core.errors import UserError
from fairseq_ext.plugin.mixed_batches import PerExampleBiases
from fairseq_ext.plugin.predictor import MultiTaskPredictor
from fairseq_ext.tools import predict as predict_cli

REAL_GLUE = tiny.REAL_GLUE
BEST_DELTA = f"checkpoint_best{deltas.DELTA_SUFFIX}"


@pytest.fixture(scope="module")
def tiny_predictor(tiny_runs, tiny_pretrained, tiny_data):
    predictor = MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt",
                                           batch_size=8)
    predictor.add_task("ofa", tiny_runs / "ofa" / BEST_DELTA)
    predictor.add_task("all", tiny_runs / "all" / BEST_DELTA)
    return predictor


def tiny_sentences(tiny_data):
    return (tiny_data.parent / "raw" / "valid.input0").read_text().splitlines()


def fairseq_model(checkpoint, data=None):
    """A full checkpoint as fairseq loads it: (model, task, head name)."""
    from fairseq import checkpoint_utils

    overrides = {"data": str(data), "no_shuffle": True} if data else None
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], arg_overrides=overrides)
    return models[0].eval(), task, cfg.task.classification_head_name


@torch.no_grad()
def reference_logits(predictor, task_name, examples, checkpoint):
    """The full checkpoint's logits on exactly the predictor's batches."""
    model, _, head = fairseq_model(checkpoint)
    rows = [None] * len(examples)
    for indices, src_tokens in predictor.batches(predictor.encode(task_name, examples)):
        output, _ = model(src_tokens, features_only=True, classification_head_name=head)
        for index, row in zip(indices, output):
            rows[index] = row
    return torch.stack(rows)


def run_cli(capsys, *argv):
    return tiny.run_main(predict_cli.main, capsys, *argv)


assert_one_line_error = tiny.assert_one_line_error


# ------------------------------------------------------------------ tiny RoBERTa


def test_switching_tasks_gives_each_full_checkpoints_logits(tiny_predictor, tiny_runs, tiny_data):
    sentences = tiny_sentences(tiny_data)
    expected = {name: reference_logits(tiny_predictor, name, sentences, tiny_runs / name / "checkpoint_best.pt")
                for name in ("ofa", "all")}
    for name in ("ofa", "all", "ofa", "all"):  # "all" trains q/k/v biases, which "ofa" must get back as base
        assert torch.equal(tiny_predictor.logits(name, sentences), expected[name]), name
    assert not torch.equal(expected["ofa"], expected["all"])


def test_encoding_matches_the_training_data(tiny_predictor, tiny_runs, tiny_data):
    _, task, _ = fairseq_model(tiny_runs / "ofa" / "checkpoint_best.pt", tiny_data)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    encoded = tiny_predictor.encode("ofa", tiny_sentences(tiny_data))
    assert len(encoded) == len(dataset)
    for index, tokens in enumerate(encoded):
        assert torch.equal(tokens, dataset[index]["net_input.src_tokens"]), index

    # Pairs as sentence_prediction builds them: <s> a </s> <separator> b </s>, RoBERTa's separator is </s>.
    dictionary = tiny_predictor.dictionary
    (pair,) = tiny_predictor.encode("ofa", [("good w1", "bad")])
    expected = [dictionary.bos(), dictionary.index("good"), dictionary.index("w1"), dictionary.eos(),
                dictionary.eos(), dictionary.index("bad"), dictionary.eos()]
    assert pair.tolist() == expected
    (long,) = tiny_predictor.encode("ofa", [" ".join(["good"] * 200)])
    assert len(long) == 64  # the task's --max-positions


def test_predictions_hold_label_score_and_probabilities(tiny_predictor, tiny_runs, tiny_data):
    sentences = tiny_sentences(tiny_data)[:5]
    delta = deltas.read_delta(tiny_runs / "ofa" / BEST_DELTA)
    logits = tiny_predictor.logits("ofa", sentences)
    for prediction, row in zip(tiny_predictor.predict("ofa", sentences), logits):
        probabilities = torch.softmax(row, dim=-1)
        assert prediction.label == delta.label_symbols[int(row.argmax())]
        assert prediction.score == pytest.approx(float(probabilities.max()))
        assert prediction.probabilities == pytest.approx(probabilities.tolist())
        assert prediction.logits == row.tolist()


def test_regression_tasks_predict_a_value(tiny_runs, tiny_pretrained, tiny_data):
    predictor = MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt")
    predictor.add_task("score", tiny.as_regression(deltas.read_delta(tiny_runs / "ofa" / BEST_DELTA)))
    (prediction,) = predictor.predict("score", ["good w1 w2"])
    assert prediction.label is None and prediction.probabilities is None
    assert prediction.score == prediction.logits[0]


def assert_mixed_equals_one_task_batches(predictor, items):
    """logits_mixed equals logits() of each task within 1e-6 (fp32), and the in-place task stays."""
    before = {name: predictor.logits(name, [example for task, example in items if task == name])
              for name in predictor.tasks}
    active = predictor.tasks[-1]  # predictor.logits left this task in place
    predictor.prepare_mixed()  # its one probe pass reads each module's batch dimension
    forward, passes = predictor.model.forward, []
    predictor.model.forward = lambda *args, **kwargs: passes.append(1) or forward(*args, **kwargs)
    try:
        mixed = predictor.logits_mixed(items)
    finally:
        del predictor.model.forward
    assert len(passes) == -(-len(items) // predictor.batch_size)  # one pass per batch, whatever its tasks
    assert len(mixed) == len(items)
    for name in predictor.tasks:
        rows = torch.stack([row for (task, _), row in zip(items, mixed) if task == name])
        assert rows.shape == before[name].shape
        assert torch.allclose(rows, before[name], rtol=0, atol=1e-6), (name, (rows - before[name]).abs().max())
    # The single-task path is untouched: bit for bit what it gave before.
    examples = [example for task, example in items if task == active]
    assert torch.equal(predictor.logits(active, examples), before[active])
    for (task, _), prediction, row in zip(items, predictor.predict_mixed(items), mixed):
        assert prediction.logits == row.tolist()
        assert (prediction.probabilities is None) == predictor.delta(task).regression


@torch.no_grad()
def test_per_example_biases_follow_each_module_s_batch_dimension():
    """A pre-norm RoBERTa's final LayerNorm runs time-major after the layers, its embedding
    LayerNorm batch-major: each example gets its own rows, also when batch and length are equal."""
    from fairseq.data import Dictionary

    from fairseq_ext.plugin.models.build import architecture_config, build_fairseq_model

    dictionary = Dictionary()
    for index in range(20):
        dictionary.add_symbol(f"w{index}")
    cfg = architecture_config("roberta", arch="roberta", encoder_layers=1, encoder_embed_dim=16,
                              encoder_ffn_embed_dim=32, encoder_attention_heads=2, max_positions=16,
                              encoder_normalize_before=True)
    torch.manual_seed(0)
    model = build_fairseq_model(cfg, dictionary).eval()
    parameters = dict(model.named_parameters())
    names = [name for name in parameters if name.endswith(".bias") and "lm_head" not in name
             and any(part in name for part in ("layer_norm", "layernorm_embedding", "q_proj", "v_proj", "fc1"))]
    assert "encoder.sentence_encoder.layer_norm.bias" in names
    tables = {name: torch.randn(3, parameters[name].numel()) for name in names}
    probe = torch.tensor([[0, 5, 2], [0, 6, 2]])
    mixed = PerExampleBiases(model, tables, probe)
    assert {name: dim for name, (_, dim) in mixed.targets.items()}["encoder.sentence_encoder.layer_norm.bias"] == 1
    before = {name: parameters[name].clone() for name in names}
    for batch, length in ((4, 4), (3, 5)):
        tokens = torch.randint(4, len(dictionary), (batch, length))
        task_index = torch.randint(0, 3, (batch,))
        with mixed.applied(task_index):
            features, _ = model(tokens, features_only=True)
        for row in range(batch):
            for name in names:
                parameters[name].copy_(tables[name][task_index[row]])
            alone, _ = model(tokens[row:row + 1], features_only=True)
            assert torch.allclose(features[row], alone[0], atol=1e-5), (batch, length, row)
        for name in names:
            parameters[name].copy_(before[name])
    # A failure inside the pass leaves the model as it was: biases, hooks, attention.
    with pytest.raises(RuntimeError, match="inside"):
        with mixed.applied(torch.zeros(2, dtype=torch.long)):
            raise RuntimeError("inside")
    assert all(torch.equal(parameters[name], before[name]) for name in names)
    assert not any(module._forward_hooks for module in model.modules())
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_mixed_task_batches_equal_one_task_batches(tiny_runs, tiny_pretrained, tiny_data):
    predictor = MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt", batch_size=8)
    predictor.add_task("ofa", tiny_runs / "ofa" / BEST_DELTA)
    predictor.add_task("all", tiny_runs / "all" / BEST_DELTA)  # q/k/v biases too: attention per example
    predictor.add_task("score", tiny.as_regression(deltas.read_delta(tiny_runs / "all" / BEST_DELTA)))
    rng = random.Random(0)
    items = [(rng.choice(predictor.tasks), sentence) for sentence in tiny_sentences(tiny_data)]
    items += [("ofa", ("good w1", "bad w2")), ("score", ("w3 nice", "w4"))]  # pairs mix in too
    assert_mixed_equals_one_task_batches(predictor, items)
    assert predictor.logits_mixed([]) == []
    with pytest.raises(UserError, match="no task 'nope'; added: ofa, all, score"):
        predictor.predict_mixed([("ofa", "good"), ("nope", "bad")])
    with pytest.raises(UserError, match="an item is"):
        predictor.predict_mixed(["good w1"])
    weight = next(name for name, _ in predictor.model.named_parameters() if name.endswith("fc1.weight"))
    with pytest.raises(UserError, match="Linear and LayerNorm modules only"):
        PerExampleBiases(predictor.model, {weight: torch.zeros(3, 1)}, torch.tensor([[0, 4, 2], [0, 5, 2]]))


def test_cli_on_plain_lines(tiny_runs, tiny_pretrained, tiny_data, tiny_predictor, tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copyfile(tiny_pretrained, base / "model.pt")
    shutil.copyfile(tiny_data / "input0" / "dict.txt", base / "dict.txt")  # found beside the checkpoint
    sentences = tiny_sentences(tiny_data)[:7]
    lines = tmp_path / "in.txt"
    lines.write_text("".join(s + "\n" for s in sentences))
    out = tmp_path / "out.tsv"
    status, _, err = run_cli(capsys, "--base", base / "model.pt", "--delta", f"ofa={tiny_runs / 'ofa' / BEST_DELTA}",
                             "--delta", f"all={tiny_runs / 'all' / BEST_DELTA}", "--task", "all",
                             "--input", lines, "--output", out)
    assert status == 0, err
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    expected = tiny_predictor.predict("all", sentences)
    assert [row[0] for row in rows] == [p.label for p in expected]
    assert [[float(v) for v in row[1:]] for row in rows] == [pytest.approx(p.probabilities, abs=1e-6)
                                                             for p in expected]


def test_bad_input_fails_with_one_line_and_no_output(tiny_runs, tiny_pretrained, tiny_data, tiny_predictor,
                                                     tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copyfile(tiny_pretrained, base / "model.pt")
    shutil.copyfile(tiny_data / "input0" / "dict.txt", base / "dict.txt")
    good = tmp_path / "in.txt"
    good.write_text("good w1\nbad w2\n")
    out = tmp_path / "out.tsv"
    ofa = f"ofa={tiny_runs / 'ofa' / BEST_DELTA}"

    def cli(*argv):
        return run_cli(capsys, "--base", base / "model.pt", "--output", out, *argv)

    assert_one_line_error(cli("--delta", ofa, "--task", "cola", "--input", good), "--task cola: no --delta for it")
    assert_one_line_error(cli("--delta", "ofa", "--task", "ofa", "--input", good), "expected TASK=PATH")
    truncated = tmp_path / "truncated.delta.safetensors"
    truncated.write_bytes((tiny_runs / "ofa" / BEST_DELTA).read_bytes()[:3000])
    assert_one_line_error(cli("--delta", f"ofa={truncated}", "--task", "ofa", "--input", good), "truncated or corrupt")
    three = tmp_path / "three.txt"
    three.write_text("a\tb\tc\n")
    assert_one_line_error(cli("--delta", ofa, "--task", "ofa", "--input", three), "three.txt:1: 3 tab-separated")
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("good\nbad\tw1\n")
    assert_one_line_error(cli("--delta", ofa, "--task", "ofa", "--input", mixed), "mixed.txt:2: 2 sentences")
    assert_one_line_error(cli("--delta", ofa, "--task", "ofa", "--input", good, "--device", "foo"),
                          "--device foo: not a torch device")
    if not torch.cuda.is_available():
        assert_one_line_error(cli("--delta", ofa, "--task", "ofa", "--input", good, "--device", "cuda"),
                              "--device cuda: this torch has no CUDA device")
    assert not out.exists() and not list(tmp_path.glob(".out.tsv*"))
    for bad_out, message in ((tmp_path, "is a folder"), (tmp_path / "nowhere" / "out.tsv", "no such folder")):
        assert_one_line_error(run_cli(capsys, "--base", base / "model.pt", "--output", bad_out, "--delta", ofa,
                                      "--task", "ofa", "--input", good), "--output", message)

    with pytest.raises(UserError, match="no task 'nope'"):
        tiny_predictor.predict("nope", ["good"])
    with pytest.raises(UserError, match="added twice"):
        tiny_predictor.add_task("ofa", tiny_runs / "ofa" / BEST_DELTA)


# ------------------------------------------------------------------ the embedded MiniLM on CoLA


@pytest.fixture(scope="module")
def minilm_cola(tmp_path_factory):
    """A few BitFit updates of all-MiniLM-L6-v2 on the first rows of the real CoLA files."""
    if not (REAL_GLUE / "CoLA").is_dir():
        pytest.skip(f"no GLUE files at {REAL_GLUE}")
    from fairseq_ext.plugin.data.glue_prepare import prepare_task

    model = tiny.embedded_model_dir()
    root = tmp_path_factory.mktemp("minilm_cola")
    glue = root / "glue" / "CoLA"
    glue.mkdir(parents=True)
    for name, lines in (("train.tsv", 64), ("dev.tsv", 32), ("test.tsv", 41)):  # CoLA test.tsv has a header
        head = (REAL_GLUE / "CoLA" / name).read_text(encoding="utf-8").split("\n")[:lines]
        (glue / name).write_text("\n".join(head) + "\n", encoding="utf-8")
    prepare_task("CoLA", root / "glue", model, None, root / "data", 1)
    for run, terms in (("run", "ofa"), ("run_all", "all")):
        tiny.run(["train.py", str(root / "data"), "--task", "glue", "--criterion", "glue_prediction",
                  *model.arch_args(), "--restore-file", model.checkpoint, "--reset-optimizer", "--reset-dataloader",
                  "--reset-meters", "--max-seq-len", "64", "--batch-size", "16", "--optimizer", "adam", "--lr", "1e-3",
                  "--max-update", "3", "--save-dir", str(root / run), "--no-epoch-checkpoints",
                  "--best-checkpoint-metric", "mcc", "--maximize-best-checkpoint-metric", *tiny.COMMON,
                  "--bitfit", "--bitfit-terms", terms])
    return model, root


def test_minilm_cli_writes_the_leaderboard_file_of_the_full_checkpoint(minilm_cola, tmp_path):
    model, root = minilm_cola
    out = tmp_path / "CoLA.tsv"
    tiny.run(["-m", "fairseq_ext.tools.predict", "--base", model.path, "--delta", f"cola={root / 'run' / BEST_DELTA}",
              "--task", "cola", "--input", str(root / "glue" / "CoLA" / "test.tsv"), "--output", str(out)])

    predictor = MultiTaskPredictor(model.path)
    predictor.add_task("cola", root / "run" / BEST_DELTA)
    rows = [line.split("\t") for line in (root / "glue" / "CoLA" / "test.tsv").read_text().splitlines()[1:]]
    sentences = [row[1] for row in rows]
    logits = predictor.logits("cola", sentences)
    assert torch.equal(logits, reference_logits(predictor, "cola", sentences, root / "run" / "checkpoint_best.pt"))

    lines = out.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert lines[1:] == [f"{row[0]}\t{int(label)}" for row, label in zip(rows, logits.argmax(dim=1))]

    # Same tokens as the prepared (glue_data) test split, through the glue task.
    _, task, _ = fairseq_model(root / "run" / "checkpoint_best.pt", root / "data")
    task.load_dataset("test")
    encoded = predictor.encode("cola", sentences)
    assert all(torch.equal(tokens, task.dataset("test")[i]["net_input.src_tokens"]) for i, tokens in enumerate(encoded))
    # The folder's own model.pt stands for the folder: its tokenizer applies.
    by_file = MultiTaskPredictor(Path(model.path) / "model.pt")
    by_file.add_task("cola", root / "run" / BEST_DELTA)
    assert all(torch.equal(a, b) for a, b in zip(by_file.encode("cola", sentences), encoded))


def test_minilm_rejects_wrong_columns_and_foreign_deltas(minilm_cola, tiny_runs, tiny_pretrained, tiny_data,
                                                         tmp_path, capsys):
    model, root = minilm_cola
    out = tmp_path / "CoLA.tsv"
    cola = f"cola={root / 'run' / BEST_DELTA}"
    mrpc_like = tmp_path / "test.tsv"
    mrpc_like.write_text("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\ta\tb\n")
    assert_one_line_error(run_cli(capsys, "--base", model.path, "--delta", cola, "--task", "cola",
                                  "--input", mrpc_like, "--output", out), "header has no column 'sentence'")
    # A tiny RoBERTa delta on the MiniLM base, and the MiniLM delta on the tiny base.
    lines = tmp_path / "lines.txt"
    lines.write_text("good w1\n")
    assert_one_line_error(run_cli(capsys, "--base", model.path, "--delta", f"ofa={tiny_runs / 'ofa' / BEST_DELTA}",
                                  "--task", "ofa", "--input", lines, "--output", out),
                          "does not fit the delta's model (arch roberta)")
    with pytest.raises(UserError, match=r"does not fit the delta's model \(arch bert_minilm_l6_h384\)"):
        MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt").add_task(
            "cola", root / "run" / BEST_DELTA)
    # A GLUE task name that contradicts the GLUE task the delta was trained on.
    assert_one_line_error(run_cli(capsys, "--base", model.path, "--delta", f"MRPC={root / 'run' / BEST_DELTA}",
                                  "--task", "MRPC", "--input", lines, "--output", out),
                          "trained on GLUE CoLA, not MRPC")
    assert not out.exists()


def test_minilm_mixed_task_batches_equal_one_task_batches(minilm_cola):
    """Three MiniLM tasks in one stream: OFA's biases, every bias, and a regression head."""
    model, root = minilm_cola
    predictor = MultiTaskPredictor(model.path, batch_size=16)
    predictor.add_task("cola", root / "run" / BEST_DELTA)
    predictor.add_task("cola_all", root / "run_all" / BEST_DELTA)
    predictor.add_task("score", tiny.as_regression(deltas.read_delta(root / "run" / BEST_DELTA)))
    sentences = [line.split("\t")[1] for line in (root / "glue" / "CoLA" / "test.tsv").read_text().splitlines()[1:]]
    items = [(predictor.tasks[index % 3], sentence) for index, sentence in enumerate(sentences)]
    assert_mixed_equals_one_task_batches(predictor, items)
    with pytest.raises(UserError, match="takes single sentences"):
        predictor.predict_mixed([("cola", ("a premise", "a hypothesis"))])


def test_a_mislabelled_delta_is_blamed_before_the_input_is_read(tiny_runs, tiny_pretrained, tiny_data, tmp_path,
                                                                 capsys):
    """Issue 31: an MRPC delta served as `rte` on RTE's test.tsv: the delta's task is the problem, not the header."""
    ofa = deltas.read_delta(tiny_runs / "ofa" / BEST_DELTA)
    mrpc = tmp_path / f"mrpc{deltas.DELTA_SUFFIX}"
    ofa_as_mrpc = {**ofa.task, "cfg": {**ofa.task_cfg, "glue_task": "MRPC"}}
    dataclasses.replace(ofa, task=ofa_as_mrpc).save(mrpc)
    rte_test = tmp_path / "test.tsv"
    rte_test.write_text("index\tsentence1\tsentence2\n0\tgood w1\tbad w2\n")
    out = tmp_path / "RTE.tsv"
    assert_one_line_error(run_cli(capsys, "--base", tiny_pretrained, "--dictionary", tiny_data / "input0" / "dict.txt",
                                  "--delta", f"rte={mrpc}", "--task", "rte", "--input", rte_test, "--output", out),
                          "trained on GLUE MRPC, not RTE", str(mrpc))
    assert not out.exists()
