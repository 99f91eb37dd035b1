"""tools.export_hf: BitFit runs leave fairseq as transformers folders and PEFT adapters with the predictor's logits.

Tiny Hugging Face BERT and RoBERTa folders (test_bert_convert's) are imported, BitFit-trained
by train.py on synthetic GLUE tasks (single sentence, pair, regression), exported, and loaded
back by transformers alone (``AutoModelForSequenceClassification`` + ``AutoTokenizer`` on raw
text) or by PEFT over the unmodified Hugging Face base: logits equal ``MultiTaskPredictor``'s
within 1e-5.  Where ../shared/glue has the real dev files, the embedded all-MiniLM-L6-v2 gets a
short BitFit run on CoLA and STS-B and the same checks.
"""
import ast
import dataclasses
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fairseq_ext  # noqa: F401,E402
import synthetic_glue  # noqa: E402
import tiny  # noqa: E402
from fairseq_ext.core.delta_file import DELTA_SUFFIX, read_delta  # noqa: E402
from fairseq_ext.core.glue_files import read_split  # noqa: E402
from fairseq_ext.plugin.data.glue_prepare import prepare_task  # noqa: E402
from fairseq_ext.plugin.models import hf_import  # noqa: E402
from fairseq_ext.plugin.models.hf_export import export  # noqa: E402
from fairseq_ext.plugin.models.model_dir import load_model_dir  # noqa: E402
from fairseq_ext.plugin.predictor import MultiTaskPredictor  # noqa: E402
from fairseq_ext.tools import export_hf as export_cli  # noqa: E402
from test_bert_convert import tiny_bert_src, tiny_roberta_src  # noqa: E402,F401  (fixtures)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BEST = f"checkpoint_best{DELTA_SUFFIX}"
MINILM_TASKS = ("CoLA", "STS-B")  # a sentence's classes and a pair's score: SST-2 would repeat CoLA's path
DEV_ROWS = 200  # the first rows of each real dev file: the whole files take minutes on 2 cores
METRICS = {"CoLA": "mcc", "SST-2": "accuracy", "RTE": "accuracy", "STS-B": "pearson"}
# (run name, model, GLUE task, --bitfit-terms): every head layout and task kind.
TINY_RUNS = [("bert_cola", "bert_first", "CoLA", "ofa"), ("bert_stsb", "bert_first", "STS-B", "all"),
             ("mean_rte", "bert_mean", "RTE", "ofa"), ("roberta_sst2", "roberta", "SST-2", "q,k,v,m1,m2,m3"),
             ("roberta_rte", "roberta", "RTE", "all")]
CLASSES = {"bert_first": "BertForSequenceClassification", "bert_mean": "BertForMeanPooledSequenceClassification",
           "roberta": "RobertaForSequenceClassification"}


def train(model_dir, glue_dir: Path, task: str, terms: str, root: Path, max_len=64) -> Path:
    data = root / f"data_{task}_{Path(model_dir.path).name}"
    if not data.exists():
        prepare_task(task, glue_dir, model_dir, None, data, 1)
    save_dir = root / f"run_{task}_{Path(model_dir.path).name}_{terms}"
    tiny.run(["train.py", str(data), "--task", "glue", "--criterion", "glue_prediction", *model_dir.arch_args(),
              "--restore-file", model_dir.checkpoint, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
              "--max-seq-len", str(max_len), "--batch-size", "16", "--optimizer", "adam", "--lr", "1e-2",
              "--max-update", "3", "--save-dir", str(save_dir), "--no-epoch-checkpoints",
              "--best-checkpoint-metric", METRICS[task], "--maximize-best-checkpoint-metric", *tiny.COMMON,
              "--bitfit", "--bitfit-terms", terms, *(["--separator-token", "2"] if model_dir.pair_separator else [])])
    return save_dir


@pytest.fixture(scope="module")
def tiny_runs(tiny_bert_src, tiny_roberta_src, tmp_path_factory):  # noqa: F811
    """{run name: (model folder, its Hugging Face source, run folder, GLUE task, glue dir)}."""
    root = tmp_path_factory.mktemp("export_hf")
    glue = synthetic_glue.make_glue_dir(root / "glue", tasks=("CoLA", "SST-2", "STS-B", "RTE"), rows_per_split=24)
    models = {"bert_first": (tiny_bert_src, "first"), "bert_mean": (tiny_bert_src, "mean"),
              "roberta": (tiny_roberta_src, "first")}
    folders = {name: load_model_dir(hf_import.convert(src, root / name, pooling=pooling, report=None))
               for name, (src, pooling) in models.items()}
    return {run: (folders[model], models[model][0], train(folders[model], glue, task, terms, root), task, glue)
            for run, model, task, terms in TINY_RUNS}


def dev_examples(task, glue_dir, limit=None, words=None):
    """Raw dev texts; ``words``: each sentence's first words (the tiny models' vocab spells most words by letter,
    and the run truncated longer examples, which transformers' tokenizer does its own way)."""
    texts = read_split(task, glue_dir, "valid").texts[:limit]
    if words:
        texts = [tuple(" ".join(text.split()[:words]) for text in row) for row in texts]
    return [text[0] if len(text) == 1 else text for text in texts]


def predictor_logits(model_dir, delta, examples):
    predictor = MultiTaskPredictor(model_dir.path, batch_size=16)
    predictor.add_task("task", delta)
    return predictor, predictor.logits("task", examples)


def encoded(tokenizer, examples):
    firsts = [e if isinstance(e, str) else e[0] for e in examples]
    seconds = None if isinstance(examples[0], str) else [e[1] for e in examples]
    return tokenizer(firsts, seconds, padding=True, return_tensors="pt")


@torch.no_grad()
def transformers_logits(model, tokenizer, examples, batch=16):
    return torch.cat([model(**encoded(tokenizer, examples[i:i + batch])).logits
                      for i in range(0, len(examples), batch)])


def check_folder(folder: Path, model_dir, delta, examples, class_name):
    """AutoModelForSequenceClassification + AutoTokenizer on raw text: the predictor's ids and logits."""
    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert config.architectures == [class_name]
    remote = class_name == CLASSES["bert_mean"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=remote)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    predictor, all_expected = predictor_logits(model_dir, delta, examples)
    kept = [i for i, ids in enumerate(predictor.encode("task", examples)) if len(ids) < predictor.max_tokens("task")]
    assert len(kept) > len(examples) * 0.8  # the rest the run truncated, which transformers does otherwise
    examples, expected = [examples[i] for i in kept], all_expected[kept]
    assert [encoded(tokenizer, [e])["input_ids"][0].tolist() for e in examples] == \
        [ids.tolist() for ids in predictor.encode("task", examples)]
    found = transformers_logits(model.eval(), tokenizer, examples)
    assert found.shape == expected.shape and (found - expected).abs().max() < 1e-5
    return config, all_expected


@pytest.mark.parametrize("run", [name for name, *_ in TINY_RUNS])
def test_transformers_folder_gives_the_predictor_s_logits(run, tiny_runs, tmp_path):
    model_dir, _, run_dir, task, glue = tiny_runs[run]
    model = next(m for name, m, *_ in TINY_RUNS if name == run)
    out = export(model_dir.path, tmp_path / "hf", delta=run_dir / BEST, report=None)
    config, *_ = check_folder(out, model_dir, run_dir / BEST, dev_examples(task, glue, words=3), CLASSES[model])
    if task == "STS-B":
        assert config.problem_type == "regression" and config.num_labels == 1
    else:
        labels = {"CoLA": ["0", "1"], "SST-2": ["0", "1"], "RTE": ["entailment", "not_entailment"]}[task]
        assert [config.id2label[i] for i in range(len(labels))] == labels
        assert config.label2id == {label: i for i, label in enumerate(labels)}
    assert (out / "modeling_bitfit_mean_pooling.py").is_file() == (model == "bert_mean")


def test_a_full_checkpoint_exports_as_its_delta_does(tiny_runs, tmp_path):
    model_dir, _, run_dir, task, glue = tiny_runs["bert_cola"]
    out = export(model_dir.path, tmp_path / "hf", checkpoint=run_dir / "checkpoint_best.pt", report=None)
    check_folder(out, model_dir, run_dir / BEST, dev_examples(task, glue, words=3), CLASSES["bert_first"])


def peft_over(base, adapter: Path):
    return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


@pytest.mark.parametrize("run", ["bert_cola", "mean_rte", "roberta_sst2"])
def test_peft_adapter_over_the_unmodified_base_gives_the_predictor_s_logits(run, tiny_runs, tmp_path):
    """BERT bases are the original Hugging Face folders (their own tokenizer and token order); RoBERTa's is
    the encoder exported alone (the path of a fairseq-native model, which has no Hugging Face folder)."""
    model_dir, hf_src, run_dir, task, glue = tiny_runs[run]
    adapter = export(model_dir.path, tmp_path / "adapter", delta=run_dir / BEST, fmt="peft", report=None)
    config = peft.PeftConfig.from_pretrained(str(adapter))
    examples = dev_examples(task, glue, words=3)
    num_labels = 1 if task == "STS-B" else 2
    if run == "roberta_sst2":
        base_dir = export(model_dir.path, tmp_path / "base", report=None)
        assert set(config.modules_to_save) == {"classifier.dense", "classifier.out_proj"}  # linear biases only: BEFT carries them all
    else:
        base_dir = hf_src
        assert config.base_model_name_or_path == str(hf_src)
        assert any(name.endswith("LayerNorm") for name in config.modules_to_save)  # ofa's LN biases, whole
    if run == "mean_rte":
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        model_class = get_class_from_dynamic_module(
            "modeling_bitfit_mean_pooling.BertForMeanPooledSequenceClassification", str(adapter))
        base = model_class.from_pretrained(str(base_dir), num_labels=num_labels)
    else:
        base = transformers.AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_dir))
    _, expected = predictor_logits(model_dir, run_dir / BEST, examples)
    model = peft_over(base, adapter)
    assert (transformers_logits(model, tokenizer, examples) - expected).abs().max() < 1e-5
    merged = model.merge_and_unload()  # BEFT folds its vectors into the biases
    assert (transformers_logits(merged, tokenizer, examples) - expected).abs().max() < 1e-5


def test_the_exported_model_class_needs_no_package_of_ours():
    source = Path(fairseq_ext.__file__).parent / "plugin" / "models" / "hf_mean_pooling.py"
    roots = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            roots.add(node.module.split(".")[0])
    assert roots == {"torch", "transformers"}


def test_glue_runner_export_writes_each_task_s_best_bitfit_run(tiny_runs, tmp_path):
    from fairseq_ext.core.errors import UserError
    from fairseq_ext.experiments.glue_run import results, settings

    assert settings.parse(["--from-env"], "glue_bitfit", {"EXPORT": "hf"}).export == "hf"
    assert settings.parse([], "glue_bitfit").export is None
    with pytest.raises(UserError, match="EXPORT 'onnx': expected hf"):
        settings.parse(["--from-env"], "glue_bitfit", {"EXPORT": "onnx"})
    model_dir, _, cola_run, *_ = tiny_runs["bert_cola"]
    _, _, stsb_run, *_ = tiny_runs["bert_stsb"]
    _, _, foreign_run, *_ = tiny_runs["roberta_rte"]  # another model's run in the same OUTPUT_DIR: left out

    def row(task, mode, metric, score, run_dir):
        return {"task": task, "mode": mode, "lr": 0.01, "seed": 1, "train_rows": 24, "dev": {metric: score},
                "primary_metric": metric, "run_dir": str(run_dir)}

    rows = [row("CoLA", "bitfit-ofa", "mcc", 0.2, cola_run), row("CoLA", "full", "mcc", 0.9, foreign_run),
            row("STS-B", "bitfit-all", "pearson", 0.3, stsb_run), row("RTE", "bitfit-ofa", "accuracy", 0.5, foreign_run)]
    for _ in range(2):  # a second job replaces the folders
        assert results.export_best_runs(tmp_path, rows, model_dir.path) == [tmp_path / "export" / "CoLA",
                                                                            tmp_path / "export" / "STS-B"]
    assert sorted(os.listdir(tmp_path / "export")) == ["CoLA", "STS-B"]
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "export" / "STS-B")).problem_type == "regression"


# --- bad input: one line, exit status 2, nothing written -------------------------------------------


def rewritten(delta_path: Path, out: Path, **changes) -> Path:
    delta = read_delta(delta_path)
    dataclasses.replace(delta, **{key: {**getattr(delta, key), **value} for key, value in changes.items()}).save(out)
    return out


def test_bad_input_gets_one_line_and_exit_2(tiny_runs, tmp_path, capsys):
    bert_dir, _, bert_run, *_ = tiny_runs["bert_cola"]
    roberta_dir, _, roberta_run, *_ = tiny_runs["roberta_sst2"]
    changed_base = tmp_path / "changed_base"
    changed_base.mkdir()
    for name in os.listdir(bert_dir.path):
        (changed_base / name).write_bytes((Path(bert_dir.path) / name).read_bytes())
    checkpoint = torch.load(changed_base / "model.pt", weights_only=True)
    checkpoint["model"]["encoder.sentence_encoder.layers.0.fc1.weight"] += 1e-3
    torch.save(checkpoint, changed_base / "model.pt")
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    out = tmp_path / "out"
    delta = bert_run / BEST
    cases = [
        (["--base", roberta_dir.path, "--delta", delta], "trained with another dictionary"),
        (["--base", changed_base, "--delta", delta], "is not the base"),
        (["--base", bert_dir.path, "--delta", rewritten(delta, tmp_path / "arch.delta.safetensors",
                                                       model={"arch": "transformer_lm"})],
         "export to transformers covers bert and roberta"),
        (["--base", bert_dir.path, "--delta", rewritten(delta, tmp_path / "lm.delta.safetensors",
                                                       task={"kind": "language_model"})],
         "seq2seq and language-model export is not supported"),
        (["--base", bert_dir.path, "--delta", delta, "--out", full], "already exists"),
        (["--base", bert_dir.path, "--format", "peft"], "--format peft needs --delta"),
        (["--base", roberta_dir.path, "--checkpoint", roberta_run / "checkpoint_best.pt", "--delta",
          roberta_run / BEST], "give one"),
    ]
    for argv, message in cases:
        if "--out" not in argv:
            argv = argv + ["--out", out]
        tiny.assert_one_line_error(tiny.run_main(export_cli.main, capsys, *argv), message)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert os.listdir(full) == ["mine.txt"]


# --- the embedded all-MiniLM-L6-v2 on the real GLUE dev files ---------------------------------------


@pytest.fixture(scope="module")
def minilm_runs(tmp_path_factory):
    if not all((tiny.REAL_GLUE / task / "dev.tsv").is_file() for task in MINILM_TASKS):
        pytest.skip(f"no real GLUE dev files at {tiny.REAL_GLUE}")
    model_dir = tiny.embedded_model_dir()
    root = tmp_path_factory.mktemp("minilm_export")
    glue = root / "glue"
    for task in MINILM_TASKS:
        (glue / task).mkdir(parents=True)
        headerless = task == "CoLA"  # CoLA's train and dev files have no header line
        for name, rows in (("train.tsv", 64), ("dev.tsv", DEV_ROWS), ("test.tsv", 8)):  # test.tsv: a header
            lines = (tiny.REAL_GLUE / task / name).read_text(encoding="utf-8").split("\n")
            keep = rows + (name == "test.tsv" or not headerless)
            (glue / task / name).write_text("\n".join(lines[:keep]) + "\n", encoding="utf-8")
    return model_dir, glue, {task: train(model_dir, glue, task, "ofa", root, max_len=128)
                             for task in MINILM_TASKS}


@pytest.mark.parametrize("task", MINILM_TASKS)
def test_minilm_on_real_dev_files(task, minilm_runs, tmp_path):
    model_dir, glue, runs = minilm_runs
    delta = runs[task] / BEST
    out = export(model_dir.path, tmp_path / "hf", delta=delta, report=None)
    examples = dev_examples(task, glue)
    _, expected = check_folder(out, model_dir, delta, examples, CLASSES["bert_mean"])
    classify = transformers.pipeline("text-classification", model=str(out), trust_remote_code=True)
    first = examples[0] if isinstance(examples[0], str) else {"text": examples[0][0], "text_pair": examples[0][1]}
    if task == "STS-B":
        assert abs(classify([first])[0]["score"] - float(expected[0, 0])) < 1e-5  # regression: the value itself
    else:
        prediction = read_delta(delta).label_symbols[int(expected[0].argmax())]
        assert classify([first])[0]["label"] == prediction
    if task == "STS-B":  # the adapter form over the package's own Hugging Face folder
        from fairseq_ext.plugin.models.pretrained import package_model_folder
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        adapter = export(model_dir.path, tmp_path / "adapter", delta=delta, fmt="peft", report=None)
        model_class = get_class_from_dynamic_module(
            "modeling_bitfit_mean_pooling.BertForMeanPooledSequenceClassification", str(adapter))
        base = model_class.from_pretrained(str(package_model_folder()), num_labels=1, problem_type="regression")
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(package_model_folder()))
        found = transformers_logits(peft_over(base, adapter), hf_tokenizer, examples)
        assert (found - expected).abs().max() < 1e-5
