"""GLUE metrics from summable statistics agree with sklearn/scipy, and across workers."""
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from fairseq_ext.core import glue_metrics as gm


def random_classification(seed, n, num_classes, skew=0.0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, num_classes, n)
    predictions = np.where(rng.random(n) < skew, targets, rng.integers(0, num_classes, n))
    return targets, predictions


@pytest.mark.parametrize("num_classes,skew", [(2, 0.3), (2, 0.9), (3, 0.5)])
def test_confusion_metrics_match_sklearn(num_classes, skew):
    targets, predictions = random_classification(0, 997, num_classes, skew)
    confusion = gm.confusion_matrix(targets, predictions, num_classes)
    assert confusion.sum() == len(targets)
    assert gm.accuracy(confusion) == pytest.approx(accuracy_score(targets, predictions), rel=1e-15)
    assert gm.matthews_corrcoef(confusion) == pytest.approx(matthews_corrcoef(targets, predictions), rel=1e-12)
    if num_classes == 2:
        assert gm.f1(confusion) == pytest.approx(f1_score(targets, predictions), rel=1e-15)


def test_degenerate_predictions_give_zero_like_sklearn():
    targets = np.array([0, 1, 1, 0, 1])
    constant = np.ones_like(targets)
    confusion = gm.confusion_matrix(targets, constant, 2)
    assert gm.matthews_corrcoef(confusion) == matthews_corrcoef(targets, constant) == 0.0
    no_positives = gm.confusion_matrix(np.zeros(4, int), np.zeros(4, int), 2)
    assert gm.f1(no_positives) == 0.0
    assert gm.pearson(gm.regression_sums(np.ones(5), np.arange(5.0))) == 0.0
    assert gm.spearman(np.ones(5), np.arange(5.0)) == 0.0


def test_confusion_matrix_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="prediction class outside 0..1"):
        gm.confusion_matrix([0, 1], [0, 2], 2)


def random_regression(seed, n):
    rng = np.random.default_rng(seed)
    targets = np.round(rng.uniform(0, 5, n), 1)  # STS-B-like scores, with ties
    predictions = (targets + rng.normal(0, 1.2, n)).astype(np.float32)
    return predictions, targets


def test_correlations_match_scipy():
    predictions, targets = random_regression(1, 1500)
    assert gm.pearson(gm.regression_sums(predictions, targets)) == pytest.approx(
        pearsonr(predictions.astype(np.float64), targets)[0], rel=1e-12
    )
    assert gm.spearman(predictions, targets) == spearmanr(predictions, targets)[0]


def test_statistics_add_up_across_shards():
    targets, predictions = random_classification(2, 1001, 2, 0.6)
    whole = gm.confusion_matrix(targets, predictions, 2)
    parts = gm.confusion_matrix(targets[:400], predictions[:400], 2) + gm.confusion_matrix(
        targets[400:], predictions[400:], 2
    )
    assert np.array_equal(whole, parts)

    scores, labels = random_regression(3, 1001)
    summed = gm.regression_sums(scores[:400], labels[:400]) + gm.regression_sums(scores[400:], labels[400:])
    assert gm.pearson(summed) == pytest.approx(gm.pearson(gm.regression_sums(scores, labels)), rel=1e-12)


def test_official_metrics_and_glue_score():
    targets, predictions = random_classification(4, 500, 2, 0.5)
    confusion = gm.confusion_matrix(targets, predictions, 2)
    values = gm.official_metrics((gm.F1, gm.ACCURACY), confusion=confusion)
    assert values[gm.GLUE_SCORE] == pytest.approx((values[gm.F1] + values[gm.ACCURACY]) / 2)

    scores, labels = random_regression(5, 300)
    sums = gm.regression_sums(scores, labels)
    without_examples = gm.official_metrics((gm.PEARSON, gm.SPEARMAN), sums=sums)
    assert set(without_examples) == {gm.PEARSON}  # Spearman needs every prediction; no glue_score without it
    examples = gm.unique_examples(np.arange(300), scores, labels)
    complete = gm.official_metrics((gm.PEARSON, gm.SPEARMAN), sums=sums, examples=examples)
    assert complete[gm.GLUE_SCORE] == pytest.approx((complete[gm.PEARSON] + complete[gm.SPEARMAN]) / 2)


def test_unique_examples_drops_repeats_and_orders_by_id():
    ids, predictions, targets = gm.unique_examples([3, 1, 2, 1], [0.3, 0.1, 0.2, 0.1], [3.0, 1.0, 2.0, 1.0])
    assert ids.tolist() == [1, 2, 3]
    assert predictions.tolist() == [0.1, 0.2, 0.3]
    assert targets.tolist() == [1.0, 2.0, 3.0]


# ---------------------------------------------------------------- 2 workers (gloo)

N_EXAMPLES = 203


def shard_statistics(rank, world_size):
    """What one worker sees: its shard, plus (on the last worker) a repeat of the first
    examples, like fairseq's dummy batch."""
    targets, predictions = random_classification(6, N_EXAMPLES, 2, 0.7)
    scores, labels = random_regression(7, N_EXAMPLES)
    ids = np.arange(N_EXAMPLES)
    mine = ids[rank::world_size]
    repeats = ids[:8] if rank == world_size - 1 and world_size > 1 else ids[:0]
    confusion = gm.confusion_matrix(targets[mine], predictions[mine], 2)
    sums = gm.regression_sums(scores[mine], labels[mine])
    seen = np.concatenate([mine, repeats])
    return confusion, sums, (seen, scores[seen], labels[seen])


def metrics_of(confusion, sums, examples):
    return gm.official_metrics((gm.MCC, gm.F1, gm.ACCURACY), confusion=confusion) | gm.official_metrics(
        (gm.PEARSON, gm.SPEARMAN), sums=sums, examples=gm.unique_examples(*examples)
    )


def gloo_worker(rank, world_size, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        confusion, sums, examples = shard_statistics(rank, world_size)
        summed = {"confusion": torch.from_numpy(confusion).double(), "sums": torch.from_numpy(sums)}
        for tensor in summed.values():  # what fairseq's all_reduce_dict does with logging outputs
            dist.all_reduce(tensor)
        gathered = gm.gather_examples(*examples)
        results[rank] = metrics_of(summed["confusion"].long().numpy(), summed["sums"].numpy(), gathered)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_workers_give_the_one_worker_metrics():
    with mp.Manager() as manager:
        results = manager.dict()
        # fork: the workers inherit the imports (spawn would re-import fairseq in each)
        mp.start_processes(gloo_worker, args=(2, free_port(), results), nprocs=2, join=True, start_method="fork")
        two_workers = dict(results)
    one_worker = metrics_of(*shard_statistics(0, 1))
    for rank in (0, 1):
        values = two_workers[rank]
        assert set(values) == set(one_worker)
        for name in (gm.MCC, gm.F1, gm.ACCURACY, gm.SPEARMAN):  # counts and ranks: exact
            assert values[name] == one_worker[name], name
        # float64 sums added in another order: equal to rounding
        assert values[gm.PEARSON] == pytest.approx(one_worker[gm.PEARSON], rel=1e-12, abs=1e-15)
