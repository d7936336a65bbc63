import numpy as np
import pytest
import torch
from transformers.audio_utils import mel_filter_bank

from omnitok.train.audio_losses import mel_distance, mel_filterbank, mel_losses


@pytest.mark.parametrize("rate,n_fft,n_mels", [(24_000, 1024, 64), (32_000, 256, 64), (24_000, 64, 16)])
@pytest.mark.filterwarnings("ignore:At least one mel filter")
def test_mel_filterbank_matches_transformers_slaney_filters(rate, n_fft, n_mels):
    reference = mel_filter_bank(n_fft // 2 + 1, n_mels, 0.0, rate / 2, rate, norm="slaney", mel_scale="slaney")
    assert mel_filterbank(rate, n_fft, n_mels).numpy() == pytest.approx(reference.T, abs=1e-6)


def test_log_mel_loss_is_the_mel_distance_and_weighs_quiet_high_bands():
    rate = 24_000
    t = torch.arange(rate // 2) / rate
    low = 0.5 * torch.sin(2 * np.pi * 200 * t)
    quiet_high = 0.01 * torch.randn(len(t), generator=torch.Generator().manual_seed(0))  # a faint "s"
    x = (low + quiet_high)[None, None]
    y = low[None, None]  # the consonant lost
    magnitude, log = mel_losses(x, y, rate)
    assert log == pytest.approx(float(mel_distance(x, y, rate)), rel=1e-5)
    assert mel_losses(x, x, rate) == (0, 0)
    # against a 10 % error in the loud tone, the magnitude loss ranks the lost consonant as the smaller error and
    # the log loss as by far the larger (measured: 0.005 vs 0.008, and 2.2 vs 0.023)
    magnitude_loud, log_loud = mel_losses(x, (0.9 * low + quiet_high)[None, None], rate)
    assert magnitude < magnitude_loud and log > 10 * log_loud
