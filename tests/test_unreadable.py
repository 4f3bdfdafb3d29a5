"""Unreadable images: an error raised in a loader worker reaches the user as its own one line, and the wrapper of
DATA.SKIP_UNREADABLE (data/unreadable.py) replaces them by the next readable image, collects them from the loader
workers and applies the 1 % rule."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from config import load_config
from data.unreadable import SkipUnreadable, UnreadableImage, check_unreadable
from errors import CheckpointError, ConfigError, DataError, DFvTError
from tests.helpers import (
    FINGERPRINT,
    ROOT,
    check,
    clean_env,
    config_path,
    launcher,
    log_of,
    main_args,
    run,
    write_image_folder,
)


def message(i: int) -> str:
    return f"cannot read image /data/{i}.jpg: image file is truncated; remove or replace the file"


class Items(Dataset):
    """Item ``i`` is ``(i, a draw from torch's generator)``; the ``bad`` indices raise :class:`DataError` after their
    draw, as a transform that fails part-way would."""

    def __init__(self, n: int, bad: tuple[int, ...] = ()) -> None:
        self.n, self.bad = n, frozenset(bad)
        self.reads: list[int] = []  # the indices read, in order (in this process)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, float]:
        self.reads.append(i)
        draw = torch.rand(()).item()
        if i in self.bad:
            raise DataError(message(i))
        return i, draw


class Raising(Dataset):
    """One item, which raises ``error`` (with an OSError as its cause when ``chained``)."""

    def __init__(self, error: Exception, chained: bool) -> None:
        self.error, self.chained = error, chained

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> None:
        if not self.chained:
            raise self.error
        try:
            raise OSError("image file is truncated")
        except OSError as e:
            raise self.error from e


def error_from_a_worker(dataset: Dataset) -> DFvTError:
    try:
        next(iter(DataLoader(dataset, num_workers=1)))
    except DFvTError as e:
        e.__traceback__ = None  # frees the loader now, so its worker stops at once (not at a later gc, 5 s on)
        return e
    raise AssertionError("the worker's error did not reach the main process")


# ----------------------------------------------------------------------------------------------- errors from workers


@pytest.mark.parametrize("chained", [False, True], ids=["plain", "chained"])
@pytest.mark.parametrize("kind", [DataError, CheckpointError])
def test_an_error_in_a_loader_worker_reaches_the_main_process_as_its_one_line(kind, chained):
    line = "cannot read /x/y.jpg: image file is truncated; remove or replace the file"
    err = error_from_a_worker(Raising(kind(line), chained))
    assert type(err) is kind and str(err) == line and err.args == (line,)
    assert err.worker_traceback.startswith(f"Caught {kind.__name__} in DataLoader worker process 0.\nOriginal ")
    assert ("OSError: image file is truncated" in err.worker_traceback) is chained
    again = pickle.loads(pickle.dumps(err))  # as another process (a launcher, a worker) would see it
    assert str(again) == line and again.worker_traceback == err.worker_traceback


def test_messages_that_are_not_a_worker_report_are_kept():
    report = "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    report += '  File "x.py", line 1, in f\nerrors.DataError: the line\n'
    assert str(DataError(report)) == "the line"
    assert str(ConfigError(report)) == report  # another class's report: not this error's
    for text in ("two\nlines", "Caught DataError somewhere", report.replace("errors.DataError: the line", "boom")):
        assert str(DataError(text)) == text and DataError(text).worker_traceback is None


@pytest.mark.slow
def test_a_truncated_image_read_by_a_worker_stops_main_py_with_the_same_line_as_without_workers(tmp_path):
    data = write_image_folder(tmp_path / "data")
    bad = data / "train" / "b" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    lines = {}
    for workers in ("0", "1"):
        out = tmp_path / f"out{workers}"
        proc = run([sys.executable, *main_args(data, out, opts=("DATA.NUM_WORKERS", workers))], timeout=120)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "Traceback" not in proc.stdout + proc.stderr
        errors = [line for line in log_of(out).splitlines() if " ERROR " in line]
        assert len(errors) == 1 and f"DataError: cannot read image {bad}: " in errors[0], errors
        lines[workers] = errors[0].split(" ERROR ", 1)[1]
    assert lines["1"] == lines["0"]


# ----------------------------------------------------------------------------------------------- the replacement


def test_an_unreadable_image_is_replaced_by_the_next_readable_one():
    skip = SkipUnreadable(Items(400, bad=(2, 3, 399)))
    expected = list(range(400))
    expected[2] = expected[3] = 4  # 3 is unreadable too
    expected[399] = 0  # wraps round
    assert [skip[i][0] for i in range(400)] == expected
    skip.close()


def test_the_replacement_follows_the_shard():
    odd = SkipUnreadable(Items(400, bad=(3, 5, 399)), shard_indices=range(1, 400, 2))
    assert [odd[i][0] for i in (1, 3, 5, 7, 399)] == [1, 7, 7, 7, 1]
    assert odd[4][0] == 4 and odd[3][0] == 7
    listed = SkipUnreadable(Items(400, bad=(4, 7, 8)), shard_indices=[9, 4, 7, 1])
    assert [listed[i][0] for i in (9, 4, 7, 1)] == [9, 1, 1, 1]
    assert listed[8][0] == 9  # not in the shard: i + 1, ...
    for skip in (odd, listed):
        skip.close()
    with pytest.raises(ValueError, match="repeat"):
        SkipUnreadable(Items(10), shard_indices=[1, 2, 1])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        SkipUnreadable(Items(10), shard_indices=[3, 10])


def test_the_replacement_does_not_depend_on_what_the_process_met_before():
    skip = SkipUnreadable(Items(400, bad=(2, 3)))
    torch.manual_seed(0)
    torch.rand(())  # the unreadable image 2 draws once, then fails
    expected = (4, torch.rand(()).item())  # image 4 gets the next draw: image 3's failed draw is undone
    for _ in range(2):  # the second time 3 is known to be unreadable and not read again
        torch.manual_seed(0)
        assert skip[2] == expected
    assert skip.dataset.reads == [2, 3, 4, 2, 4]
    fresh = SkipUnreadable(Items(400, bad=(2, 3)))
    fresh[3]  # meets 3 first, on its own
    torch.manual_seed(0)
    assert fresh[2] == expected
    for wrapper in (skip, fresh):
        wrapper.close()


def test_other_errors_are_not_skipped():
    class Broken(Items):
        def __getitem__(self, i):
            raise RuntimeError("a bug, not an unreadable image")

    with pytest.raises(RuntimeError, match="a bug"):
        SkipUnreadable(Broken(400))[0]


# ----------------------------------------------------------------------------------------------- the records


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_reach_drain_once_each_every_epoch(workers):
    skip = SkipUnreadable(Items(400, bad=(2, 3, 399)))
    # One image per batch: with two workers, image 3 is met by the worker drawing 2 and by the one drawing 3.
    loader = DataLoader(skip, batch_size=1, num_workers=workers, generator=torch.Generator().manual_seed(5))
    expected_ids = [4 if i in (2, 3) else 0 if i == 399 else i for i in range(400)]
    expected_notes = [UnreadableImage(i, message(i)) for i in (2, 3, 399)]
    epochs = []
    for _ in range(2):
        torch.manual_seed(5)  # the draws without workers
        loader.generator.manual_seed(5)  # the workers' seeds
        epochs.append([(int(i), float(draw)) for i, draw in loader])
        assert [i for i, _ in epochs[-1]] == expected_ids
        assert skip.drain() == expected_notes
        assert skip.drain() == []
    assert epochs[0] == epochs[1]  # the same epoch replayed: the same images and draws
    skip.close()


def test_notes_from_a_pickled_copy_reach_the_original():
    skip = SkipUnreadable(Items(400, bad=(7,)))
    copy = pickle.loads(pickle.dumps(skip))  # how a spawned worker gets the dataset
    assert copy[7][0] == 8
    assert skip.drain() == [UnreadableImage(7, message(7))]
    folder = skip.folder
    copy.close()  # a copy leaves the folder alone
    assert os.path.isdir(folder)
    skip.close()
    assert not os.path.exists(folder)


# ----------------------------------------------------------------------------------------------- the 1 % rule


@pytest.mark.parametrize(
    "count,images,stops",
    [(0, 0, False), (1, 100, False), (2, 100, True), (100, 10000, False), (101, 10000, True), (1, 0, True)],
)
def test_the_run_stops_past_one_percent_unreadable(count, images, stops):
    if not stops:
        check_unreadable(count, images)
        return
    with pytest.raises(DataError) as err:
        check_unreadable(count, images)
    text = str(err.value)
    assert text.startswith(f"{count} of {images} training images (") and "more than the 1 %" in text
    assert "\n" not in text and "fix or remove them" in text
    if images == 100:
        assert "(2.00 %)" in text


def test_a_search_past_one_percent_in_a_row_stops_at_once():
    assert SkipUnreadable(Items(200, bad=(0, 1)))[0][0] == 2  # 2 of 200 in a row: 1 %, not more
    with pytest.raises(DataError) as err:
        SkipUnreadable(Items(200, bad=(0, 1, 2)))[0]
    text = str(err.value)
    assert text.startswith("3 training images in a row are unreadable") and "of the 200" in text
    assert text.endswith(f"starting with: {message(0)}") and "\n" not in text
    with pytest.raises(DataError, match=r"^all 2 images .* starting with: " + message(1)):
        SkipUnreadable(Items(400, bad=(1, 3)), shard_indices=[1, 3])[1]


# ----------------------------------------------------------------------------------------------- through main.py


@pytest.mark.slow
def test_skip_unreadable_trains_on_names_the_file_and_stops_past_one_percent(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=34, n_val=1, size=(36, 36))  # 102 training images
    bad = [data / "train" / "a" / "5.jpg", data / "train" / "c" / "9.jpg"]
    bad[0].write_bytes(bad[0].read_bytes()[:100])
    opts = ("DATA.SKIP_UNREADABLE", "True", "DATA.NUM_WORKERS", "1", "PRINT_FREQ", "100", "AUG.AUTO_AUGMENT", "none")
    prints = []
    for workers in ("1", "0"):  # the replacement (and so the run) does not depend on the loader processes
        out = tmp_path / f"one{workers}"
        check(run([sys.executable, *main_args(data, out, opts=(*opts, "DATA.NUM_WORKERS", workers))]))
        log = log_of(out)
        named = [line for line in log.splitlines() if "unreadable training image replaced" in line]
        assert len(named) == 1 and str(bad[0]) in named[0], named
        assert "EPOCH 0: 1 unreadable of 100 training images drawn" in log  # 25 steps of 4
        prints.append(FINGERPRINT.search(log).group(1))
    assert prints[0] == prints[1]
    bad[1].write_bytes(bad[1].read_bytes()[:100])  # 2 of ~100: past 1 %
    out = tmp_path / "two"
    proc = run([sys.executable, *main_args(data, out, opts=opts)])
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in log_of(out).splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "training images (2.00 %) were unreadable this epoch, more than the 1 %" in errors[0]


@pytest.mark.slow
def test_every_rank_ends_in_one_line_when_one_rank_meets_a_bad_image(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=8)
    bad = data / "train" / "b" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    out = tmp_path / "out"
    proc = run([*launcher("torch.distributed.run"), *main_args(data, out, opts=("DATA.NUM_WORKERS", "1"))], timeout=200)
    # torchrun exits 1 when a process fails (its ChildFailedError), and reports the status of each process it saw
    # end: the first to end (the root cause) exits 2, as a user error does; one still running then is stopped by
    # torchrun's own SIGTERM (-15), which it says it sends.
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = proc.stderr[proc.stderr.rindex("Failures:") :]
    statuses = [int(code) for code in re.findall(r"exitcode\s*: (-?\d+)", report)]
    root = re.search(r"Root Cause.*?exitcode\s*: (-?\d+)", report, re.S)
    assert root is not None and int(root.group(1)) == 2, report
    assert set(statuses) <= {2, -signal.SIGTERM} and 1 <= len(statuses) <= 2, report
    if -signal.SIGTERM in statuses:
        assert re.search(r"Sending process \d+ closing signal SIGTERM", proc.stderr), proc.stderr[-3000:]
    lines = [[line for line in log_of(out, rank).splitlines() if " ERROR " in line] for rank in (0, 1)]
    assert all(len(found) == 1 for found in lines), lines
    reader = 0 if str(bad) in lines[0][0] else 1  # the rank whose shard holds the file names it; the other says why
    assert f"DataError: cannot read image {bad}" in lines[reader][0]
    assert "another process of this run stopped" in lines[1 - reader][0] and "log_rank<R>.txt" in lines[1 - reader][0]
    assert "Traceback" not in log_of(out, 0) + log_of(out, 1)


def _report_lines(log: str) -> list[str]:
    """The lines of epoch 0's unreadable-image report (each file replaced, then the count), timestamps aside."""
    return re.findall(r"EPOCH 0: (?:unreadable training image replaced by|\d+ unreadable of).*", log)


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_with_skipping_on_continues_exactly_and_reports_the_whole_epoch(tmp_path):
    # 210 training images: 26 steps of 8. Two unreadable (2 of the 208 drawn, under 1 %): one drawn before the stop,
    # the other after it, neither the other's replacement candidate (so each process meets only its own).
    data = write_image_folder(tmp_path / "data", n_train=70, n_val=1, size=(36, 36))
    files = sorted((data / "train").glob("*/*.jpg"))  # the dataset's order: classes, then file names
    seed = load_config(config_path("tiny"), []).SEED
    order = DistributedSampler(range(len(files)), num_replicas=1, rank=0, shuffle=True, seed=seed)  # data/build.py's
    position = {index: at for at, index in enumerate(order)}  # where epoch 0 draws each image
    early = next(i for i in range(len(files)) if position[i] < 40)  # in the first 5 steps
    late = next(i for i in range(len(files)) if 160 <= position[i] < 208 and abs(i - early) > 1)  # in the last 6
    bad = sorted([early, late])
    for i in bad:
        files[i].write_bytes(files[i].read_bytes()[:100])
    opts = ("DATA.SKIP_UNREADABLE", "True", "DATA.NUM_WORKERS", "1", "MODEL.DROP_PATH_RATE", "0.1")
    reference = tmp_path / "whole"
    check(run([sys.executable, *main_args(data, reference, batch=8, opts=opts)]))
    expected = _report_lines(log_of(reference))
    assert len(expected) == 3 and str(files[bad[0]]) in expected[0] and str(files[bad[1]]) in expected[1], expected
    assert expected[2] == "EPOCH 0: 2 unreadable of 208 training images drawn (all processes)"

    out = tmp_path / "stopped"
    cmd = [sys.executable, *main_args(data, out, batch=8, opts=opts)]
    with open(tmp_path / "stopped.txt", "w+") as output:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=output, stderr=subprocess.STDOUT)
        log, deadline = out / "dfvt_tiny" / "t" / "log_rank0.txt", time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and "Train: [0/1][6/26]" in log.read_text():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=240)
        output.seek(0)
        text = output.read()
    # Stopped mid-epoch (one unreadable image met so far, 2 % of those drawn: the 1 % rule waits for the epoch's end).
    assert proc.returncode == 128 + signal.SIGUSR1, text[-3000:]
    step = int(re.search(r"stopped by SIGUSR1 at epoch 0, step (\d+)/26", text).group(1))
    assert position[early] < step * 8 <= position[late], step
    assert _report_lines(text)[-1] == f"EPOCH 0: 1 unreadable of {step * 8} training images drawn (all processes)"

    check(run(cmd))
    log = log_of(out)
    rerun = log[log.rindex("Resuming from") :]
    assert f"continuing at epoch 0, step {step}" in rerun
    assert FINGERPRINT.search(rerun).group(1) == FINGERPRINT.search(log_of(reference)).group(1)
    # The epoch's report after the resume is the uninterrupted one: both files, counted over the whole epoch.
    assert _report_lines(rerun) == expected
