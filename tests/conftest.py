"""Fixtures shared by the test modules. Importing ``online_rewards`` registers the test scorers (``test_mean_red``,
``test_fad``, ``test_vendi``) that configs name."""

import os
from pathlib import Path

import online_rewards  # noqa: F401
import pytest
import torch
from helpers import write_random_pairs
from tiny_pipelines import build_tiny_sd, build_tiny_sdxl


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, share the cores among the workers: torch's default of one thread per core in every
    worker oversubscribes the CPU and runs slower than one worker alone. Subprocesses (torchrun, the CLI) inherit
    the share through ``OMP_NUM_THREADS``."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def slow_minutes(item: pytest.Item) -> float:
    """A test's ``slow(minutes=...)`` hint: 0.5 for a ``slow`` test without one, 0 for a test not marked ``slow``."""
    marker = item.get_closest_marker("slow")
    return 0.0 if marker is None else float(marker.kwargs.get("minutes", 0.5))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end runs marked ``slow`` first, longest first by :func:`slow_minutes`, then the short tests in
    collection order. pytest-xdist then hands out one test at a time (``--maxschedchunk 1`` in pyproject.toml):
    the long runs spread over the workers from the start and the short tests fill the gaps, instead of a chunk of
    long runs queueing on one worker while the other idles at the end."""
    items.sort(key=slow_minutes, reverse=True)  # stable: equal hints keep their collection order


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: on a shared 2-core CPU they run faster than on contended two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny SD1.5-like pipeline with random weights, in a folder ``sd`` of its own (a test may run from its
    parent and name it by the relative path ``sd``)."""
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Eight Pick-a-Pic-style rows of random images (:func:`helpers.write_random_pairs`)."""
    return write_random_pairs(tmp_path_factory.mktemp("data") / "pairs.parquet")


@pytest.fixture(scope="module")
def sd_sdxl_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1.5-like and SDXL-like pipelines, under ``"sd"`` and ``"sdxl"``."""
    root = tmp_path_factory.mktemp("models")
    return {"sd": build_tiny_sd(root / "sd"), "sdxl": build_tiny_sdxl(root / "sdxl")}
