"""The GPU check script's checks, run on CPU (bf16, gloo): the same code a CUDA machine runs."""
import tiny


def test_gpu_check_passes_on_cpu():
    result = tiny.run(["-m", "fairseq_ext.experiments.gpu_check", "--device", "cpu", "--steps", "2"], timeout=600)
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))]
    assert verdicts == [
        "PASS --bf16 --bitfit on cpu (bert_tiny): frozen weights bit-identical, trained tensors fp32 state",
        "PASS --memory-efficient-bf16 --bitfit on cpu (bert_tiny): frozen weights bit-identical, trained tensors fp32 state",
        "PASS data parallel: BitFit on 2 workers (gloo, c10d), trained tensors identical across ranks",
    ], result.stdout[-3000:]


def test_a_frozen_weight_that_moves_is_caught(monkeypatch):
    """The check is not vacuous: nudging a frozen tensor during training makes it fail."""
    import torch

    from fairseq_ext.experiments import gpu_check
    from fairseq_ext.training.trainer import BitFitTrainer

    original = BitFitTrainer.train_step

    def leaky_step(self, samples, raise_oom=False):
        output = original(self, samples, raise_oom)
        frozen = next((p for p in self.get_model().parameters() if not p.requires_grad), None)
        if frozen is not None:
            with torch.no_grad():
                frozen.add_(1.0)
        return output

    monkeypatch.setattr(BitFitTrainer, "train_step", leaky_step)
    problems = gpu_check.check_precision("bert_tiny", "cpu", "bf16", steps=1)
    assert any(p.startswith("frozen ") and p.endswith(" changed") for p in problems)
