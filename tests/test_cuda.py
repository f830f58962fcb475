"""GPU paths: run where a CUDA device exists (benchmarks/gpu.py runs them there)."""

import pytest
import torch

from retina.config import TrialSettings
from retina.data.dataset import load_dataset
from retina.training import run_final_training, run_phase_one, split_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_on_cuda_keeps_photos_on_the_gpu_with_mixed_precision(hrf_dir):
    settings = TrialSettings(resolution=128, channels=(8, 16, 32), epochs=2, patience=0)
    device = torch.device("cuda")
    train, val = split_tensors(load_dataset(hrf_dir, 128), settings, device)
    assert train.photos.is_cuda and val.vessels.is_cuda
    progress = run_phase_one(settings, train, val, device, lambda *_: None)
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in progress.history)
    model = run_final_training(settings, train, val, device, progress)
    assert next(model.parameters()).is_cuda
