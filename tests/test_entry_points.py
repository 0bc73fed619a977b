"""What a user runs first: ``python -m kvbucket`` and the demo."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from kvbucket.tools.demo import demo_directory

SRC = Path(__file__).resolve().parents[1] / "src"


def python(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` with this checkout's kvbucket importable."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.pop("PREPEND_PATH", ""), os.fspath(SRC), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *map(os.fspath, args)], capture_output=True, text=True, env=env, timeout=300)


def test_python_dash_m_kvbucket_is_the_command() -> None:
    proc = python("-m", "kvbucket", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: kvbucket ") and "fsck" in proc.stdout
    assert python("-m", "kvbucket", "no-such-command").returncode == 2


@pytest.fixture
def without_numpy(tmp_path: Path) -> str:
    """A folder whose ``numpy`` package fails to import, to put first on the path."""
    package = tmp_path / "no-numpy" / "numpy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('numpy is not installed')\n")
    return os.fspath(package.parent)


def test_demo_removes_its_temp_folder_and_says_what_it_wrote(tmp_path: Path, without_numpy: str) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = python("-m", "kvbucket.tools.demo", "--page-kib", "8", env={"TMPDIR": os.fspath(temp), "PREPEND_PATH": without_numpy})
    assert proc.returncode == 0, proc.stderr
    assert "128 pages byte-exact" in proc.stdout
    assert f"kvbucket demo in {temp}{os.sep}kvbucket-demo-" in proc.stdout and "writes about 3.2 MiB" in proc.stdout
    assert "MiB on disk" in proc.stdout and f"removed {temp}{os.sep}kvbucket-demo-" in proc.stdout
    assert os.listdir(temp) == []


def test_demo_keeps_a_directory_it_was_given(tmp_path: Path, without_numpy: str) -> None:
    store = tmp_path / "kept"
    proc = python("-m", "kvbucket.tools.demo", store, "--page-kib", "4", env={"PREPEND_PATH": without_numpy})
    assert proc.returncode == 0, proc.stderr
    assert f"the store in {store} takes" in proc.stdout and f"removed {store}" not in proc.stdout
    assert "1.meta" in os.listdir(store)


def test_demo_folder_is_removed_when_the_run_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", os.fspath(tmp_path))
    with pytest.raises(RuntimeError, match="step failed"), demo_directory(None) as directory:
        Path(directory, "1.bucket").write_bytes(b"x" * 4096)
        raise RuntimeError("step failed")
    assert os.listdir(tmp_path) == []
    with demo_directory(os.fspath(tmp_path / "given")) as directory:
        os.mkdir(directory)
    assert os.listdir(tmp_path) == ["given"]


PUBLIC_MODULES = {
    "kvbucket": ["BucketStore", "BucketConfig", "ObjectMeta", "OffloadQueue", "RecoveryReport", "StoreStats", "KeyNotFound"],
    "kvbucket.store": ["BucketStore", "StoreStats"],
    "kvbucket.pipeline": ["OffloadQueue", "KeyDoneCallback", "Callback"],
    "kvbucket.config": ["BucketConfig", "parse_size"],
    "kvbucket.errors": ["KvBucketError", "CorruptionError", "CapacityExceeded"],
    "kvbucket.metrics": ["serve_metrics", "exposition"],
    "kvbucket.integrations.sglang": ["KvBucketHiCacheStorage"],
    "kvbucket.integrations.vllm": ["KvBucketTierManager"],
    "kvbucket.integrations.lmcache": ["KvBucketL2Adapter", "KvBucketL2AdapterConfig"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC_MODULES))
def test_public_module_paths_keep_their_names(module: str) -> None:
    """Engine configurations and user code name these paths as strings."""
    imported = importlib.import_module(module)
    missing = [name for name in PUBLIC_MODULES[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"


def test_the_console_script_runs_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    (script,) = [entry for entry in metadata.entry_points(group="console_scripts") if entry.name == "kvbucket"]
    with pytest.raises(SystemExit) as exit_info:
        script.load()(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("Usage: kvbucket ")
