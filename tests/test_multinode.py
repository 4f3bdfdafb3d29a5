"""Beyond one machine, tested on one: SLURM's host lists and variables mapped onto torchrun's (``srun python
main.py`` without torchrun), and, end to end on localhost (``slow``), two torchrun "nodes" and two SLURM tasks
training to the same weights and validation figures as one two-process torchrun launcher."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils
from errors import ConfigError
from tests.helpers import (
    FINGERPRINT,
    ROOT,
    check,
    clean_env,
    free_port,
    launcher,
    log_of,
    main_args,
    run,
    summaries,
    write_image_folder,
)
from utils import first_slurm_host, init_distributed, slurm_environment

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------- host lists


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node[01-04,07],gpu5", "node01"),
        ("host1,host2", "host1"),
        ("a-b[3-5]", "a-b3"),
        ("gpu5", "gpu5"),
        ("node[007]", "node007"),  # zero padding kept
        ("node[10,02-03]", "node10"),  # the first as listed, not the smallest
        ("rack[2-3]-n[08-09]-ib,login1", "rack2-n08-ib"),  # several ranges in one name
        ("c[1-2],d[5]", "c1"),
        ("127.0.0.1", "127.0.0.1"),
        (" node[1-2]\n", "node1"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "node[01-", "node[a-b]", "node]1[", "[", "node[01-04"])
def test_malformed_host_list_names_the_variable(nodelist):
    with pytest.raises(ConfigError, match=r"^SLURM_NODELIST .*not a SLURM host list") as info:
        first_slurm_host(nodelist, "SLURM_NODELIST")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- variables


def slurm_task(rank: int, **extra: str) -> dict[str, str]:
    """The variables ``srun`` gives task ``rank`` of 16 (2 nodes × 8), without torchrun's, and an empty PATH: no
    ``scontrol`` (as on a machine without SLURM), so the host-list parser decides."""
    env = {
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": str(rank % 8),
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "123456",
        "PATH": "",
    }
    return {**env, **extra}


def test_slurm_variables_map_onto_torchrun_ones():
    assert slurm_environment(slurm_task(11)) == {
        "RANK": "11",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(10000 + 123456 % 20000),  # 13456, the same on every node of the job
    }
    # With --ntasks-per-node, the node's task count (what DATA.NUM_WORKERS auto divides the cores by).
    assert slurm_environment(slurm_task(3, SLURM_NTASKS_PER_NODE="8"))["LOCAL_WORLD_SIZE"] == "8"
    assert "LOCAL_WORLD_SIZE" not in slurm_environment(slurm_task(3, SLURM_NTASKS_PER_NODE="8(x2)"))


def test_slurm_fallbacks_and_kept_values():
    env = slurm_task(0, SLURM_NODELIST="old[3-4]")
    del env["SLURM_JOB_NODELIST"], env["SLURM_JOB_ID"]
    mapped = slurm_environment(env)
    assert mapped["MASTER_ADDR"] == "old3" and mapped["MASTER_PORT"] == "29500"
    # A rendezvous the user set is kept: neither key is returned, so os.environ keeps it.
    mapped = slurm_environment(slurm_task(0, MASTER_ADDR="10.0.0.1", MASTER_PORT="4242"))
    assert mapped == {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0"}
    # SLURM_LOCALID missing (not srun): local rank 0.
    env = slurm_task(5)
    del env["SLURM_LOCALID"]
    assert slurm_environment(env)["LOCAL_RANK"] == "0"


@pytest.mark.parametrize(
    "env",
    [
        {},  # not under SLURM
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"},  # one task: plain python main.py
        {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]"},  # an allocation, but not a task of a step
        {**slurm_task(3), "RANK": "3", "WORLD_SIZE": "4"},  # torchrun inside an sbatch allocation
        {**slurm_task(3), "WORLD_SIZE": "4"},
    ],
)
def test_nothing_to_map(env):
    assert slurm_environment(env) == {}


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SLURM_PROCID", "one"),
        ("SLURM_PROCID", "16"),  # not a task of 16
        ("SLURM_PROCID", "-1"),
        ("SLURM_NTASKS", "2(x8)"),
        ("SLURM_LOCALID", ""),
        ("SLURM_JOB_ID", "12_3"),
        ("SLURM_JOB_NODELIST", "gpu[007-"),
    ],
)
def test_malformed_slurm_value_names_the_variable(variable, value):
    with pytest.raises(ConfigError, match=rf"^{variable} ") as info:
        slurm_environment(slurm_task(1, **{variable: value}))
    assert "\n" not in str(info.value)


def test_missing_node_list_asks_for_master_addr():
    env = slurm_task(1)
    del env["SLURM_JOB_NODELIST"]
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST is not set; set MASTER_ADDR"):
        slurm_environment(env)
    assert slurm_environment({**env, "MASTER_ADDR": "n1"})["RANK"] == "1"


def _fake_scontrol(folder: Path, script: str) -> str:
    folder.mkdir()
    exe = folder / "scontrol"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(0o755)
    return str(folder)


def test_scontrol_is_preferred_and_the_parser_is_the_fallback(tmp_path):
    # scontrol expands the list (it prints one host a line); the parser would have said gpu007.
    expected_call = 'test "$1 $2 $3" = "show hostnames gpu[007-008]"'
    path = _fake_scontrol(tmp_path / "ok", expected_call + ' && printf "alpha\\nbeta\\n"')
    assert slurm_environment(slurm_task(2, PATH=path))["MASTER_ADDR"] == "alpha"
    # A failing scontrol (no controller reachable, say) or an empty answer: the parser decides.
    path = _fake_scontrol(tmp_path / "fails", "echo 'slurm_load_partitions: Unable to contact' >&2; exit 1")
    assert slurm_environment(slurm_task(2, PATH=path))["MASTER_ADDR"] == "gpu007"
    path = _fake_scontrol(tmp_path / "silent", "exit 0")
    assert slurm_environment(slurm_task(2, PATH=path))["MASTER_ADDR"] == "gpu007"


@pytest.fixture
def environ(monkeypatch):
    """A private os.environ for init_distributed, so that what it sets ends with the test; its empty PATH has no
    ``scontrol``."""
    env = {"PATH": ""}
    monkeypatch.setattr(os, "environ", env)
    return env


def test_init_distributed_joins_with_the_slurm_rank(environ, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(utils.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(utils.dist, "init_process_group", lambda **kw: calls.append(kw))
    environ.update(slurm_task(9))
    env = init_distributed(None)
    assert (env.rank, env.world_size, env.local_rank, env.device.type) == (9, 16, 1, "cpu")
    assert [(c["rank"], c["world_size"], c["init_method"], c["backend"]) for c in calls] == [(9, 16, "env://", "gloo")]
    # env:// reads these.
    assert {k: environ[k] for k in LAUNCHER_VARS} == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": "13456",
    }


def test_init_distributed_refuses_a_bad_slurm_procid_before_joining(environ, monkeypatch):
    monkeypatch.setattr(utils.dist, "init_process_group", lambda **kw: pytest.fail("joined"))
    environ.update(slurm_task(0, SLURM_PROCID="0x1"))
    with pytest.raises(ConfigError, match=r"^SLURM_PROCID '0x1' is not an integer"):
        init_distributed(None)
    assert not set(LAUNCHER_VARS) & environ.keys()


def test_init_distributed_alone_under_a_one_task_step(environ):
    environ.update({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_JOB_ID": "5"})
    env = init_distributed(None)
    assert (env.rank, env.world_size, env.distributed) == (0, 1, False)
    assert not set(LAUNCHER_VARS) & environ.keys()


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 classes × 4 training JPEGs (3 steps per rank at batch 2 on 2 ranks), 9 validation images."""
    return write_image_folder(tmp_path_factory.mktemp("multinode") / "data", n_train=4, n_val=3)


def outcome(out: Path) -> tuple[str, list]:
    """The final weights fingerprint (the same on both ranks, checked) and rank 0's validation summaries."""
    logs = [log_of(out, 0), log_of(out, 1)]
    assert "rank 0/2" in logs[0] and "rank 1/2" in logs[1]
    prints = [FINGERPRINT.search(log).group(1) for log in logs]
    assert prints[0] == prints[1]
    assert len(summaries(logs[0])) == 1
    return prints[0], summaries(logs[0])


@pytest.fixture(scope="module")
def one_launcher(data, tmp_path_factory) -> tuple[str, list]:
    """The reference: ``torchrun --nproc_per_node 2`` on one node."""
    out = tmp_path_factory.mktemp("one_launcher")
    check(run(launcher("torch.distributed.run") + main_args(data, out, batch=2)))
    return outcome(out)


def start_all(commands: list[list[str]], envs: list[dict[str, str]]) -> None:
    """Start the commands at once (each needs the others to join the group), wait, and check each succeeded."""
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd, env in zip(commands, envs, strict=True)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]


@pytest.mark.slow
def test_two_torchrun_nodes_match_one_launcher(data, one_launcher, tmp_path):
    out = tmp_path / "two_nodes"  # one folder for both "nodes", as on a shared file system
    port = str(free_port())
    commands = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node)]
        + ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
        + main_args(data, out, batch=2)
        for node in (0, 1)
    ]
    start_all(commands, [clean_env()] * 2)
    assert outcome(out) == one_launcher


def free_slurm_job_id() -> int:
    """A job id whose derived port (10000 + id % 20000) is free here now."""
    for job_id in random.sample(range(100_000, 10_000_000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 10000 + job_id % 20000))
            except OSError:
                continue
            return job_id
    raise RuntimeError("no free port in 10000-29999")


@pytest.mark.slow
def test_srun_without_torchrun_matches_one_launcher(data, one_launcher, tmp_path):
    """Two plain ``python main.py`` processes as ``srun --ntasks 2`` starts them: only SLURM's variables."""
    out = tmp_path / "srun"
    job_id = free_slurm_job_id()
    base = {k: v for k, v in clean_env().items() if not k.startswith("SLURM_")}  # not this shell's allocation
    assert not set(LAUNCHER_VARS) & base.keys()  # clean_env strips torchrun's: the port comes from the job id
    envs = [
        {**base, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r)}
        | {"SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(job_id)}
        for r in (0, 1)
    ]
    start_all([[sys.executable, *main_args(data, out, batch=2)]] * 2, envs)
    assert outcome(out) == one_launcher
