"""Cached module walks: the same train/eval modes and update counts as fairseq's walks."""
import copy
import pickle

import torch
from fairseq.models import BaseFairseqModel, FairseqEncoder

from fairseq_ext.plugin.patches import CachedModuleWalks, cache_module_walks


class CountReader(torch.nn.Module):
    """A module that uses the update count, as a scheduled dropout would."""

    def __init__(self):
        super().__init__()
        self.num_updates = None
        self.calls = 0

    def set_num_updates(self, num_updates):
        self.num_updates = num_updates
        self.calls += 1


class Inner(FairseqEncoder):
    def __init__(self):
        super().__init__(dictionary=None)
        self.reader = CountReader()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)])


class Outer(FairseqEncoder):
    def __init__(self):
        super().__init__(dictionary=None)
        self.inner = Inner()  # nested encoders: fairseq's walk is quadratic here
        self.reader = CountReader()


class Model(BaseFairseqModel):
    def __init__(self):
        super().__init__()
        self.encoder = Outer()
        self.head = torch.nn.Linear(2, 2)


def readers(model):
    return [m for m in model.modules() if isinstance(m, CountReader)]


def test_update_count_reaches_the_same_modules_once():
    stock, cached = Model(), cache_module_walks(Model())
    stock.set_num_updates(7)
    cached.set_num_updates(7)
    assert [r.num_updates for r in readers(stock)] == [7, 7]
    assert [r.num_updates for r in readers(cached)] == [7, 7]
    assert all(r.calls > 1 for r in readers(stock))  # fairseq's nested walks repeat calls
    assert [r.calls for r in readers(cached)] == [1, 1]
    assert isinstance(cached, Model) and type(cached).__name__ == "Model"


def test_train_and_eval_reach_every_module():
    model = cache_module_walks(Model())
    for _ in range(2):
        model.eval()
        assert not any(m.training for m in model.modules())
        model.train()
        model.train()  # the second call is the cached no-op
        assert all(m.training for m in model.modules())


def test_modules_added_by_a_load_are_found():
    model = cache_module_walks(Model())
    model.train()
    model.set_num_updates(1)
    model.extra = CountReader()  # e.g. a classification head a checkpoint registers
    model.load_state_dict(model.state_dict(), strict=False)
    model.extra.train(False)
    model.train()
    model.set_num_updates(2)
    assert model.extra.training and model.extra.num_updates == 2


def test_a_deep_copy_walks_its_own_modules():
    model = cache_module_walks(Model())
    model.set_num_updates(3)
    ema = copy.deepcopy(model)  # fairseq's --store-ema copies the model this way
    ema.set_num_updates(9)
    assert [r.num_updates for r in readers(model)] == [3, 3]
    assert [r.num_updates for r in readers(ema)] == [9, 9]


def test_pickles_as_the_plain_fairseq_class():
    model = cache_module_walks(Model())
    model.train()
    model.set_num_updates(4)
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored) is Model and "_update_count_receivers" not in restored.__dict__
    assert torch.equal(restored.head.weight, model.head.weight)
    restored.set_num_updates(5)
    assert [r.num_updates for r in readers(restored)] == [5, 5]
    assert [r.num_updates for r in readers(model)] == [4, 4]


def test_only_fairseq_models_are_switched():
    plain = torch.nn.Linear(2, 2)
    assert type(cache_module_walks(plain)) is torch.nn.Linear
    model = cache_module_walks(cache_module_walks(Model()))
    assert type(model).__mro__.count(CachedModuleWalks) == 1
