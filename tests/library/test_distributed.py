"""Distributed data-parallel training (what MONAI Label's ``multi_gpu`` option runs on several
GPUs), exercised on the CPU with two processes and the gloo backend."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.transforms import Transform

from tests.support.paths import ddti_subset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CountingLoad(Transform):
    """The first (deterministic, hence cached) training transform: counts the images it prepares."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, item):
        with self._lock:
            self.calls += 1
        return item


def _worker(rank: int, world_size: int, port: int, out_dir: str, items: list) -> None:
    from thyroid_plugin.engine import fit
    from thyroid_plugin.losses import SaliencyGuidedLoss
    from thyroid_plugin.networks import SaliencyGuidedClassifier
    from thyroid_plugin.transforms import augmentation_transforms, preprocess_transforms

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world_size, rank=rank)
    try:
        torch.manual_seed(0)  # same initial weights on every rank, as DDP requires
        network = SaliencyGuidedClassifier()
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
        counting = _CountingLoad()
        stats = fit(network, SaliencyGuidedLoss("wellposed", class_weights="balanced"), optimizer, items[:8], items[8:],
                    out_dir, {"epochs": 1, "batch_size": 2, "image_size": 48, "progress": False, "tensorboard": False,
                              "log_every": 0}, device="cpu", rank=rank, world_size=world_size,
                    train_transforms=[counting] + preprocess_transforms(48) + augmentation_transforms(48, {}))
        # after a step, DDP keeps every replica's weights identical
        flat = torch.cat([p.detach().flatten() for p in network.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], g) for g in gathered[1:])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fp:
            json.dump({"epoch": stats["epoch"], "train_size": stats["train_size"], "prepared": counting.calls}, fp)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_training_keeps_replicas_in_sync(tmp_path):
    rows = ddti_subset(5, 5)
    items = [{"image": r["file"], "label": int(r["label"] == "malignant"), "group": r["case"]} for r in rows]
    items = items[:4] + items[5:9] + [items[4], items[9]]  # 8 train (both classes), 2 validation
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), items), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["epoch"] == 1
        assert result["prepared"] == 8, "each rank decodes and caches every training image once"
    assert (tmp_path / "model.pt").is_file(), "rank 0 writes the model"
