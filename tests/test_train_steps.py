"""`train_with`'s steps, each run alone: the real network on a few digits, nothing mocked."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from training.datasets import Dataset, Split, load_digits
from training.evaluation import evaluate
from training.resume import LAST, TrainingState, load_last
from training.train import (
    CHECKPOINT,
    METRICS,
    RUN_INFO,
    SINGLE_CPU,
    TrainConfig,
    finish,
    load_run,
    run_epoch,
    save_checkpoint,
    set_up,
    train_epoch,
    validate,
)

CONFIG = TrainConfig(epochs=3, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def few_digits() -> Dataset:
    data = load_digits(seed=0)

    def head(split: Split, n: int) -> Split:
        return Split(split.images[:n], split.labels[:n])

    val, test = head(data.val, 60), head(data.test, 60)
    return Dataset(data.name, data.class_names, data.color_mode, head(data.train, 120), val, test)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_set_up_builds_the_seeds_network_and_a_fresh_state(few_digits: Dataset, tmp_path: Path) -> None:
    first = set_up(few_digits, CONFIG, tmp_path / "a", SINGLE_CPU, resume=False)
    again = set_up(few_digits, CONFIG, tmp_path / "b", SINGLE_CPU, resume=False)
    other = set_up(few_digits, replace(CONFIG, seed=1), tmp_path / "c", SINGLE_CPU, resume=False)
    assert same(weights(first.model), weights(again.model))
    assert not same(weights(first.model), weights(other.model))
    assert (tmp_path / "a").is_dir() and first.state == TrainingState() and first.resumed_from == 0
    assert (first.local_batch, first.steps_per_epoch) == (32, 4)  # 120 images: 3 full batches and 24
    assert first.info.class_names == list(few_digits.class_names) and first.num_classes == 10


def test_one_epoch_sees_every_image_once_and_moves_the_weights(few_digits: Dataset, tmp_path: Path) -> None:
    training = set_up(few_digits, CONFIG, tmp_path / "a", SINGLE_CPU, resume=False)
    before = weights(training.model)
    totals = train_epoch(training, epoch=1)
    loss_sum, correct, images = totals.tolist()
    assert images == len(few_digits.train) and 0 <= correct <= images and loss_sum > 0
    assert not same(before, weights(training.model))
    assert training.schedule.last_epoch == training.steps_per_epoch  # one schedule step per batch
    replay = set_up(few_digits, CONFIG, tmp_path / "b", SINGLE_CPU, resume=False)
    assert torch.equal(train_epoch(replay, epoch=1), totals)  # seeded per epoch: the same draws
    assert same(weights(replay.model), weights(training.model))


def test_validation_is_the_models_evaluation_on_the_validation_split(
    few_digits: Dataset, tmp_path: Path
) -> None:
    training = set_up(few_digits, CONFIG, tmp_path, SINGLE_CPU, resume=False)
    train_epoch(training, epoch=1)
    loss, accuracy = validate(training)
    expected = evaluate(training.model, few_digits.val, 10)
    assert (loss, accuracy) == pytest.approx((expected.loss, expected.accuracy))


def test_the_best_epoch_is_kept_and_patience_stops_the_run() -> None:
    state = TrainingState()
    assert state.record_validation(1, val_loss=0.5, val_accuracy=0.8, patience=2)
    assert state.record_validation(2, val_loss=0.4, val_accuracy=0.8, patience=2)  # a tie, lower loss
    assert not state.record_validation(3, val_loss=0.3, val_accuracy=0.7, patience=2)
    assert (state.best_epoch, state.best_accuracy, state.best_loss) == (2, 0.8, 0.4)
    assert state.stale_epochs == 1 and not state.stopped_early
    assert not state.record_validation(4, val_loss=0.4, val_accuracy=0.8, patience=2)  # a tie, higher loss
    assert state.stopped_early and state.epoch == 4
    never = TrainingState()
    for epoch in range(1, 6):
        never.record_validation(epoch, val_loss=1.0, val_accuracy=0.1, patience=0)
    assert never.stale_epochs == 4 and not never.stopped_early  # patience 0: never stops


def test_the_checkpoint_follows_the_best_epoch_and_last_follows_every_epoch(
    few_digits: Dataset, tmp_path: Path
) -> None:
    training = set_up(few_digits, CONFIG, tmp_path, SINGLE_CPU, resume=False)
    train_epoch(training, epoch=1)
    training.state.record_validation(1, 0.5, 0.5, CONFIG.patience)
    save_checkpoint(training, improved=True)
    best = weights(training.model)
    train_epoch(training, epoch=2)
    training.state.record_validation(2, 0.6, 0.4, CONFIG.patience)
    save_checkpoint(training, improved=False)
    assert same(torch.load(tmp_path / CHECKPOINT, weights_only=True), best)
    last = load_last(tmp_path, CONFIG, SINGLE_CPU)
    assert last is not None and last["state"] == asdict(training.state)
    assert same(last["model"], weights(training.model))


def test_an_epoch_then_a_resumed_set_up_continue_where_it_stood(few_digits: Dataset, tmp_path: Path) -> None:
    training = set_up(few_digits, CONFIG, tmp_path, SINGLE_CPU, resume=False)
    record = run_epoch(training, epoch=1)
    assert record["epoch"] == 1 and 0 <= record["val_accuracy"] <= 1
    assert (tmp_path / LAST).exists() and (tmp_path / CHECKPOINT).exists()  # the first epoch is the best
    resumed = set_up(few_digits, CONFIG, tmp_path, SINGLE_CPU, resume=True)
    assert resumed.resumed_from == 1 and resumed.state == training.state
    assert same(weights(resumed.model), weights(training.model))
    assert resumed.schedule.last_epoch == training.schedule.last_epoch


def test_finish_tests_the_best_epoch_and_writes_a_run_folder_export_can_read(
    few_digits: Dataset, tmp_path: Path
) -> None:
    training = set_up(few_digits, CONFIG, tmp_path, SINGLE_CPU, resume=False)
    run_epoch(training, epoch=1)
    metrics = finish(training)
    assert metrics["epochs_run"] == 1 and metrics["best_epoch"] == 1
    assert metrics["sizes"] == {"train": 120, "val": 60, "test": 60}
    assert (tmp_path / METRICS).exists() and (tmp_path / RUN_INFO).exists()
    info, model = load_run(tmp_path)
    assert info == training.info
    assert evaluate(model, few_digits.test, 10).accuracy == pytest.approx(metrics["test_accuracy"])
