"""Fixture: a `kvcache dev` cluster started from the repository's binary for the test session."""
import os
import pathlib
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _binary() -> str:
    if os.environ.get("KVCACHE_BIN"):
        return os.environ["KVCACHE_BIN"]
    for p in (ROOT / "target/release/kvcache", ROOT / "target/debug/kvcache"):
        if p.exists():
            return str(p)
    subprocess.run(["cargo", "build", "-p", "kvcache"], cwd=ROOT, check=True)
    return str(ROOT / "target/debug/kvcache")


def start_dev(data_dir: str, *flags: str):
    """Start `kvcache dev` (with extra flags); returns (process, coordinator address)."""
    proc = subprocess.Popen([_binary(), "dev", "--listen", "127.0.0.1:0", "--data-dir", data_dir, *flags],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"})
    addr = None
    for _ in range(200):
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip().startswith("coordinator"):
            addr = line.split()[-1]
            break
    assert addr, f"kvcache dev {' '.join(flags)} did not start"
    return proc, addr


def stop_dev(proc) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    assert proc.returncode == 0


@pytest.fixture(scope="session")
def coordinator():
    with tempfile.TemporaryDirectory(prefix="kvcache-py-") as data:
        proc, addr = start_dev(data, "--node-capacity", "256MiB")
        yield addr
        stop_dev(proc)
