"""The wheel carries the package and the twistd dropin, and twistd finds it after a plain install."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    [built] = out.glob("relay-*.whl")
    return built


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/relay_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    for module in (
        "relay/__init__.py",
        "relay/tap.py",
        "relay/smtp/server.py",
        "relay/plugins/__init__.py",
        "relay/plugins/maildir.py",
        "relay/plugins/filesystem.py",
    ):
        assert module in names, module
    assert not any(n.startswith("tests/") for n in names)


def test_plain_install_is_found_by_twistd(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    # Only the installed copy on the path: not the checkout.
    probe = (
        f"import sys; sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})];"
        f"sys.path.insert(0, {str(target)!r});"
        "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
        f"import relay; assert relay.__file__.startswith({str(target)!r}), relay.__file__;"
        "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))"
    )
    result = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert "'relay'" in result.stdout.decode()
