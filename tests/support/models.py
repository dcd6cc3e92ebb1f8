"""Small real models for tests: the full default network, trained briefly on real DDTI images at
a small input size so that inference in tests is fast."""

from __future__ import annotations

from pathlib import Path

import torch

from thyroid_plugin.data import datalist_from_csv
from thyroid_plugin.engine import fit
from thyroid_plugin.losses import SaliencyGuidedLoss
from thyroid_plugin.networks import SaliencyGuidedClassifier

from .paths import ddti_subset, write_csv


def train_small_model(out_dir: Path, image_size: int = 64, epochs: int = 1, seed: int = 0) -> Path:
    """Train the default network for ``epochs`` on 12 real DDTI images; returns ``model.pt``."""
    csv_path = write_csv(ddti_subset(6, 6, offset=20), out_dir / "data.csv")
    items = datalist_from_csv(csv_path)
    train, val = items[::2] + items[1::4], items[3::4]
    torch.manual_seed(seed)
    network = SaliencyGuidedClassifier()
    loss = SaliencyGuidedLoss("wellposed", class_weights="balanced")
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    fit(network, loss, optimizer, train, val, out_dir, {"epochs": epochs, "batch_size": 4, "image_size": image_size,
                                                        "progress": False, "tensorboard": False, "log_every": 0, "seed": seed},
        device="cpu")
    return out_dir / "model.pt"
