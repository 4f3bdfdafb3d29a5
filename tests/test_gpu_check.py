"""benchmarks/gpu_check.sh and benchmarks/train_e2e.py on the CPU, so that a GPU session does not meet a typo first:
the script's syntax, every command it would run (from its dry run) parsed by the parser of the program it starts, the
CUDA tests it selects, and the end-to-end benchmark's table and JSON on a tiny dataset."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.helpers import ROOT, check, clean_env, run, write_image_folder

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (``benchmarks`` is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def dry_run_of(report: Path, **env: str) -> tuple[list[list[str]], str]:
    """The commands ``DRY_RUN=1 gpu_check.sh`` prints (``$ cmd`` lines, shell-quoted) and the report it writes."""
    env = clean_env({"DRY_RUN": "1", "PYTHON": sys.executable, "COMPILE": "1", "TRAIN_IMAGES": "8000", **env})
    proc = subprocess.run(["bash", str(SCRIPT), str(report)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("$ ")], report.read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[list[list[str]], str]:
    return dry_run_of(tmp_path_factory.mktemp("gpu_check") / "report.md")


def split(line: str) -> list[str]:
    """A ``printf %q`` command line as its arguments; as one item where shlex cannot read it (``$'...'`` quoting,
    which only the inline ``python -c`` code gets)."""
    try:
        return shlex.split(line)
    except ValueError:
        return [line]


def test_script_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_lists_every_step_and_writes_the_report(dry_run):
    commands, report = dry_run
    joined = [" ".join(c) for c in commands]
    for needle in ("pytest", "imagenet_like.py", "--eval --resume", "--throughput", "train_e2e.py", "benchmark.py"):
        assert any(needle in c for c in joined), f"no command with {needle!r}"
    assert sum("main.py" in c for c in joined) == 3 + HAVE_DALI  # train, eval, throughput; eval with DALI
    assert any("DATA.LOADER dali" in c for c in joined) == any("--pipeline dali" in c for c in joined) == HAVE_DALI
    assert "| step | what | status | seconds |" in report and report.count("| dry run |") == len(commands)
    for section in ("## a. Environment", "## b. CUDA tests", "## d. main.py", "## e. End-to-end", "## f. Train step"):
        assert section in report


def test_without_dali_its_steps_are_skipped_not_failed(tmp_path):
    shadow = tmp_path / "shadow" / "nvidia"  # a regular package named nvidia hides the installed nvidia.* packages
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    commands, report = dry_run_of(tmp_path / "report.md", PYTHONPATH=str(shadow.parent))
    assert not any("dali" in " ".join(c).lower() for c in commands)
    for step in ("d-eval-dali", "e-train-e2e-dali"):
        assert re.search(
            rf"^\| {step} \| .* \| skipped \(NVIDIA DALI does not import: pip install -r requirements-dali.txt",
            report,
            re.M,
        )
    assert "## Failures" not in report


def test_loader_comparison_table(tmp_path):
    """gpu_check.sh's compare_loaders on hand-made train_e2e.py JSON: the ratios and the goal, computed by hand."""

    def rows(*items):
        return json.dumps(
            {
                "rows": [
                    dict(zip(("variant", "pipeline", "real_ips", "real_over_synthetic"), r, strict=True)) for r in items
                ]
            }
        )

    (tmp_path / "torch.json").write_text(
        rows(("tiny", "fast", 1000.0, 0.5), ("tiny", "upstream", 800.0, 0.4), ("small", "fast", 900.0, 0.9))
    )
    (tmp_path / "dali.json").write_text(rows(("tiny", "dali", 1700.0, 0.85), ("small", "dali", 810.0, 0.79)))
    function = re.search(r"^compare_loaders\(\) \{.*?^\}$", SCRIPT.read_text(), re.M | re.S)[0]
    paths = " ".join(shlex.quote(str(tmp_path / f"{name}.json")) for name in ("torch", "dali"))
    out = check(run(["bash", "-c", f"{function}\nPY={shlex.quote(sys.executable)} compare_loaders {paths}"]))
    assert out.stdout.splitlines()[2:] == [
        "| tiny | 1000.0 | 1700.0 | 1.70x | 0.85 | met |",
        "| small | 900.0 | 810.0 | 0.90x | 0.79 | NOT met |",
    ]


def script_args(command: list[str], script: str) -> list[str]:
    """The arguments after ``script`` in ``command``."""
    index = next(i for i, arg in enumerate(command) if arg.endswith(script))
    return command[index + 1 :]


def test_every_python_invocation_parses(dry_run, monkeypatch):
    """Each main.py / benchmarks/*.py command line goes through its program's own argparse parser (and the config
    overrides through the config loader), as the GPU machine would run it."""
    from torch.distributed.run import get_args_parser

    import main
    from config import get_default_config, update_config

    monkeypatch.chdir(ROOT)  # --cfg configs/tiny.yaml is relative to the repo root, where the script runs
    benchmark, train_e2e, imagenet_like = (load_script(n) for n in ("benchmark", "train_e2e", "imagenet_like"))
    written = []
    monkeypatch.setattr(imagenet_like, "make_imagenet_like", lambda *a: written.append(a) or Path(a[0]))
    checked = set()
    for command in dry_run[0]:
        scripts = [arg for arg in command if arg.endswith(".py")]
        if not scripts:
            continue
        script = scripts[0]
        args = script_args(command, script)
        if "torch.distributed.run" in command:
            launch = get_args_parser().parse_args(command[command.index("torch.distributed.run") + 1 :])
            assert launch.training_script == script and launch.training_script_args == args
            assert launch.nproc_per_node == "1" and launch.standalone
        if script == "main.py":
            update_config(get_default_config(), main.parse_option(args))  # unknown --opts keys raise
        elif script == "benchmarks/benchmark.py":
            parsed = benchmark.parse_args(args)
            assert parsed.device == "cuda" and parsed.batch_size == parsed.train_batch_size == 128
            assert parsed.amp and getattr(parsed, "fast_dtype", "auto") == "auto"  # ours: the dtype a run picks
        elif script == "benchmarks/train_e2e.py":
            parsed = train_e2e.parse_args(args)
            assert parsed.device == "cuda"
            for variant in parsed.variant:
                for pipeline in parsed.pipeline:
                    train_e2e.build_config(parsed, variant, pipeline)  # --opts keys and values
        elif script == "benchmarks/imagenet_like.py":
            imagenet_like.main(args)
            assert written[-1][1:4] == (8000, 500, 10)
        else:
            pytest.fail(f"gpu_check.sh runs {script}: add its parser to this test")
        checked.add(script)
    expected = {"main.py", "benchmarks/benchmark.py", "benchmarks/train_e2e.py", "benchmarks/imagenet_like.py"}
    assert checked == expected


def cuda_test_names() -> set[str]:
    """Test functions that need CUDA: those under a decorator that mentions CUDA (a skipif, or a mark holding one)."""
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                decorators = " ".join(ast.unparse(d) for d in node.decorator_list)
                if "cuda" in decorators.lower():
                    names.add(node.name)
    return names


@pytest.mark.slow
def test_the_cuda_test_selection_holds_every_cuda_test(dry_run):
    """The script's pytest command, collected here, selects every test that needs CUDA."""
    command = next(c for c in dry_run[0] if "pytest" in c)
    args = command[command.index("pytest") + 1 :]
    proc = run([sys.executable, "-m", "pytest", "--collect-only", *args], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {line.split("::")[1].split("[")[0] for line in proc.stdout.splitlines() if "::" in line}
    needed = cuda_test_names()
    assert needed and needed <= collected, f"CUDA tests the script misses: {sorted(needed - collected)}"


def test_marked_batches_times_only_the_steps_after_the_mark():
    train_e2e = load_script("train_e2e")
    epochs = []

    def source(epoch: int) -> list[int]:
        epochs.append(epoch)
        return [10 * epoch + i for i in range(3)]

    batches = train_e2e.MarkedBatches(source, total=7, mark=4, device=torch.device("cpu"))
    seen, times = [], []
    for item in batches:
        seen.append(item)
        times.append(time.perf_counter())
        if len(seen) == 4:
            assert batches.marked_at is None  # marked only when the loop asks for batch 5
    assert len(batches) == 7 and seen == [0, 1, 2, 10, 11, 12, 20] and epochs == [0, 1, 2]
    assert times[3] <= batches.marked_at <= times[4]
    assert batches.restarts_after_mark == 1  # epoch 2 began after the mark; epoch 1 before it
    with pytest.raises(ValueError):
        train_e2e.MarkedBatches(source, total=3, mark=3, device=torch.device("cpu"))
    empty = train_e2e.MarkedBatches(lambda e: [], total=2, mark=0, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="nothing"):
        list(empty)


TABLE_ROW = re.compile(r"^\| (tiny) \| (fast|upstream) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$")


@pytest.mark.slow
def test_train_e2e_on_the_cpu_both_pipelines(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=4, n_val=2)  # 12 training images: 3 batches of 4
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "benchmarks/train_e2e.py", "--data-path", str(data), "--device", "cpu", "--img-size", "32"]
    cmd += ["--batch-size", "4", "--steps", "2", "--warmup", "2", "--workers", "0", "--pipeline", "fast"]
    cmd += ["--pipeline", "upstream", "--json", str(out), "--opts", "AMP_OPT_LEVEL", "O0"]
    proc = check(run(cmd, timeout=120))
    rows = {m.group(2): m.groups() for m in map(TABLE_ROW.match, proc.stdout.splitlines()) if m}
    assert set(rows) == {"fast", "upstream"}, proc.stdout
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["data_path"] == str(data)
    assert [r["pipeline"] for r in result["rows"]] == ["fast", "upstream"]
    for r in result["rows"]:
        _, pipeline, workers, real, synthetic, ratio, restarts = rows[r["pipeline"]]
        assert r["variant"] == "tiny" and r["workers"] == int(workers) == 0
        assert r["real_ips"] > 0 and r["synthetic_ips"] > 0 and float(real) > 0 and float(synthetic) > 0
        assert float(real) == round(r["real_ips"], 1) and float(synthetic) == round(r["synthetic_ips"], 1)
        assert float(ratio) == round(r["real_over_synthetic"], 2)
        assert r["real_over_synthetic"] == pytest.approx(r["real_ips"] / r["synthetic_ips"])
        assert r["real_ips"] == pytest.approx(8 / r["real_s"])  # 2 timed steps of 4 images
        assert r["synthetic_ips"] == pytest.approx(8 / r["synthetic_s"])
        assert (r["batch_size"], r["img_size"], r["warmup_steps"], r["timed_steps"]) == (4, 32, 2, 2)
        assert r["precision"].startswith("fp32") and r["fast_path"] and not r["compile"]
        # 4 batches from 3 per epoch: the second epoch starts after the 2 warm-up batches, inside the timed part.
        assert r["loader_batches_per_epoch"] == 3 and r["loader_restarts_timed"] == int(restarts) == 1
        assert r["num_train"] == 12
    assert "fp32 (AMP_OPT_LEVEL O0) | fast path | batch 4 x 1 micro-batch(es) at 32 px" in proc.stdout


@pytest.mark.slow
def test_train_e2e_dali_row_on_the_cpu(tmp_path, capsys):
    """``--pipeline dali`` (DALI's CPU-only mode here): a row like the torch loader's, warm-up 5 by default."""
    pytest.importorskip("nvidia.dali", reason="DALI is optional: pip install -r requirements-dali.txt")
    train_e2e = load_script("train_e2e")
    data = write_image_folder(tmp_path / "data", n_train=4, n_val=2)  # 12 training images: 3 batches of 4
    argv = ["--data-path", str(data), "--device", "cpu", "--img-size", "32", "--batch-size", "4", "--steps", "2"]
    rows = train_e2e.main([*argv, "--workers", "1", "--pipeline", "dali", "--opts", "AMP_OPT_LEVEL", "O0"])
    assert len(rows) == 1
    row = rows[0]
    assert row["pipeline"] == "dali" and row["workers"] == 1 and row["warmup_steps"] == 5
    assert row["real_ips"] == pytest.approx(8 / row["real_s"]) and row["real_ips"] > 0
    # 7 batches from 3 per epoch: epoch 1 begins in the warm-up, epoch 2 (a new pipeline) in the timed steps.
    assert row["loader_batches_per_epoch"] == 3 and row["loader_restarts_timed"] == 1 and row["num_train"] == 12
    assert re.search(r"^\| tiny \| dali \| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 1 \|$", capsys.readouterr().out, re.M)


def test_synthetic_only_upstream_like_precision(capsys):
    """``--synthetic-only`` needs no dataset; fp16 + GradScaler on the straightforward path, as gpu_check.sh asks."""
    train_e2e = load_script("train_e2e")
    argv = ["--synthetic-only", "--device", "cpu", "--img-size", "32", "--batch-size", "2", "--steps", "1"]
    argv += ["--warmup", "1", "--opts", "MODEL.DFVT.FAST_PATH", "False", "AMP_DTYPE", "float16"]
    rows = train_e2e.main(argv)
    assert len(rows) == 1 and rows[0]["pipeline"] is None and rows[0]["real_ips"] is None
    assert rows[0]["synthetic_ips"] > 0 and not rows[0]["fast_path"]
    assert rows[0]["precision"] == "float16 autocast with GradScaler (AMP_DTYPE float16)"
    out = capsys.readouterr().out
    assert re.search(r"^\| tiny \| - \| - \| - \| [\d.]+ \| - \| - \|$", out, re.MULTILINE), out
    assert "straightforward path" in out


@pytest.mark.slow
def test_bad_dataset_is_one_line(tmp_path):
    proc = run([sys.executable, "benchmarks/train_e2e.py", "--data-path", str(tmp_path / "missing"), "--device", "cpu"])
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error: DataError: data path")
        and "Traceback" not in proc.stderr
    )
