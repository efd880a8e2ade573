""".ci/run picks a Python that A1111's torch 2.1.2 has wheels for (3.10/3.11), or stops saying
which one is needed. The real script runs in a copy of the repo's layout with a PATH of fake
interpreters that report a version and log how they were called (and then fail, which stops
the script right after the step under test)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(not BASH or not shutil.which("dirname"), reason="needs bash and dirname")


def fake_python(path: Path, version: str, log: Path, status: int = 3):
    fake(path, f'if [ "$1" = -c ]; then echo {version}; exit 0; fi\n'
               f'echo "$0 $*" >> "{log}"\n'
               f"exit {status}\n")


def fake(path: Path, body: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{BASH}\n{body}")
    path.chmod(0o755)


@pytest.fixture
def world(tmp_path):
    """(repo copy, fake bin folder, call log, runner)."""
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "calls.log"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    bin_dir.mkdir()
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    log.write_text("")

    def run(**env):
        result = subprocess.run([BASH, str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                                env={"PATH": str(bin_dir), "HOME": str(tmp_path), **env})
        return result, log.read_text().splitlines()
    return repo, bin_dir, log, run


def test_only_python_3_12_stops_before_making_anything_and_says_which_python(world):
    repo, bin_dir, log, run = world
    fake_python(bin_dir / "python3", "3.12", log)
    result, calls = run()
    assert result.returncode != 0 and calls == []
    assert "need Python 3.10 or 3.11" in result.stderr
    assert "found: python3 3.12" in result.stderr and "PYTHON=" in result.stderr
    assert not (repo / ".venv").exists()


def test_python3_11_is_preferred_over_a_newer_python3(world):
    repo, bin_dir, log, run = world
    fake_python(bin_dir / "python3", "3.12", log)
    fake_python(bin_dir / "python3.11", "3.11", log)
    fake_python(bin_dir / "python3.10", "3.10", log)
    result, calls = run()
    assert calls == [f"{bin_dir / 'python3.11'} -m venv .venv"]


def test_python3_10_when_there_is_no_3_11_and_python3_when_it_is_supported(world):
    repo, bin_dir, log, run = world
    fake_python(bin_dir / "python3", "3.12", log)
    fake_python(bin_dir / "python3.10", "3.10", log)
    assert run()[1] == [f"{bin_dir / 'python3.10'} -m venv .venv"]
    (bin_dir / "python3.10").unlink()
    fake_python(bin_dir / "python3", "3.11", log)
    assert run()[1][-1] == f"{bin_dir / 'python3'} -m venv .venv"


def test_PYTHON_is_respected_and_checked(world, tmp_path):
    repo, bin_dir, log, run = world
    fake_python(bin_dir / "python3.11", "3.11", log)
    fake_python(tmp_path / "opt" / "py310", "3.10", log)
    fake_python(tmp_path / "opt" / "py313", "3.13", log)
    result, calls = run(PYTHON=str(tmp_path / "opt" / "py310"))
    assert calls == [f"{tmp_path / 'opt' / 'py310'} -m venv .venv"]
    result, calls = run(PYTHON=str(tmp_path / "opt" / "py313"))
    assert result.returncode != 0 and len(calls) == 1   # nothing more was made
    assert f"found: {tmp_path / 'opt' / 'py313'} 3.13" in result.stderr


def test_a_venv_of_a_supported_python_is_kept_and_one_of_3_12_is_made_again(world):
    repo, bin_dir, log, run = world
    fake_python(bin_dir / "python3.11", "3.11", log)
    fake_python(repo / ".venv" / "bin" / "python", "3.11", log)
    result, calls = run()
    assert calls == [".venv/bin/python -m pip install -q --upgrade pip"]   # kept, used
    fake_python(repo / ".venv" / "bin" / "python", "3.12", log)   # a newcomer's first try with python3 3.12
    result, calls = run()
    assert calls[-1] == f"{bin_dir / 'python3.11'} -m venv --clear .venv"
    assert ".venv was made with Python 3.12; making it again with python3.11" in result.stderr


def test_ci_still_ends_by_running_pytest_with_the_arguments():
    last = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert last == 'exec .venv/bin/python -m pytest tests "$@"'


def test_a_whole_run_installs_chromium_without_questions_or_recommends_then_runs_pytest(world):
    repo, bin_dir, log, run = world
    for venv in (".venv", ".venv-gradio4"):
        fake_python(repo / venv / "bin" / "python", "3.11", log, status=0)
    fake(bin_dir / "id", "echo 0\n")   # root: no sudo
    os.symlink(shutil.which("env"), bin_dir / "env")
    fake(bin_dir / "apt-get", f'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND apt-get $*" >> "{log}"\n')
    result, calls = run()
    assert result.returncode == 0, result.stderr
    assert "DEBIAN_FRONTEND=noninteractive apt-get -y -q install --no-install-recommends chromium" in calls
    assert calls[-1].endswith(".venv/bin/python -m pytest tests")
