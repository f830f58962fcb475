"""Train one trial on several workers at once with PyTorch DDP, inside its Tune trial.

The trial's own process is worker 0: it owns the MLflow run, reports to Tune and writes
checkpoints. Workers 1..n-1 are Ray actors placed in the trial's placement group (one
bundle each, so a trial of 2 workers with 1 GPU each holds 2 GPUs, on one node or two).
Every worker runs the same two phases on its shard of the data; they stay in lockstep
because every decision (best epoch, early stopping, divergence) is taken from values
summed over all workers.
"""

import datetime
import logging
import socket

import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from retina.config import TrialSettings
from retina.data.dataset import FundusDataset
from retina.training import (
    DataParallel,
    ResumePoint,
    run_final_training,
    run_phase_one,
    split_tensors,
)

log = logging.getLogger(__name__)

# A worker that dies leaves the others waiting in a collective; give up after this long.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def worker_device() -> torch.device:
    """The GPU Ray gave this worker, else the CPU."""
    return (
        torch.device("cuda")
        if ray.get_gpu_ids() and torch.cuda.is_available()
        else (torch.device("cpu"))
    )


def join_process_group(rank: int, world: int, address: str, device: torch.device) -> DataParallel:
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend, init_method=address, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    return DataParallel(rank, world)


def rendezvous_address() -> str:
    """A TCP address on this node where the workers of one trial meet."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


def train_shard(
    rank: int,
    world: int,
    address: str,
    config: dict,
    threads: int,
    dataset: FundusDataset,
    resume_from: ResumePoint | None,
) -> None:
    """What workers 1..n-1 do: both phases on their shards, reporting nothing."""
    settings = TrialSettings.model_validate(config)
    torch.set_num_threads(threads)
    device = worker_device()
    parallel = join_process_group(rank, world, address, device)
    try:
        train, val = split_tensors(dataset, settings, device)
        progress = run_phase_one(
            settings, train, val, device, lambda *_: None, resume_from, parallel
        )
        run_final_training(
            settings, train, val, device, progress, parallel=parallel, resume_from=resume_from
        )
    finally:
        torch.distributed.destroy_process_group()


@ray.remote
class ShardWorker:
    """A Ray actor that trains one shard of a data-parallel trial."""

    def train(self, *args) -> None:
        train_shard(*args)


def start_shard_workers(
    world: int,
    address: str,
    config: dict,
    cpus: float,
    gpus: float,
    dataset: FundusDataset,
    resume_from: ResumePoint | None,
) -> list[ray.ObjectRef]:
    """Start workers 1..world-1 in the trial's placement group; returns their futures."""
    group = get_current_placement_group()
    dataset_ref = ray.put(dataset)
    futures = []
    for rank in range(1, world):
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
        worker = ShardWorker.options(
            num_cpus=cpus, num_gpus=gpus, scheduling_strategy=strategy
        ).remote()
        futures.append(
            worker.train.remote(
                rank, world, address, config, max(1, int(cpus)), dataset_ref, resume_from
            )
        )
    log.info("started %d more workers for this trial at %s", world - 1, address)
    return futures
