"""A non-editable install carries everything featstore reads at run time: every subpackage, the prompt
templates, the class lists and the demo's sample images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

from conftest import REPO, write_folder


def test_the_wheel_holds_the_data_and_an_installed_copy_runs_labels_paper80(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), REPO],
                   check=True, capture_output=True, cwd=tmp_path)
    [wheel] = list(wheels.glob("featstore-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("templates", "classes"):
        for name in os.listdir(os.path.join(REPO, "data", folder)):
            assert f"featstore/data/{folder}/{name}" in names
    assert any(name.startswith("featstore/data/sample/train/") and name.endswith(".png") for name in names)
    packages = {os.path.relpath(folder, REPO).replace(os.sep, "/")
                for folder, _, files in os.walk(os.path.join(REPO, "featstore")) if "__init__.py" in files}
    missing = {p for p in packages if f"{p}/__init__.py" not in names}
    assert not missing, f"subpackages left out of the wheel (pyproject's packages): {missing}"

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}  # found before the editable install's finder

    def installed(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "featstore", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, check=True)

    where = subprocess.run([sys.executable, "-c", "import featstore; print(featstore.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    assert where.startswith(str(target)), where
    write_folder(tmp_path / "src", per_class=2, seed=5, classes=["circle", "square"])
    store = str(tmp_path / "store")
    installed("encode", str(tmp_path / "src"), "--store", store, "--split", "train", "--model", "random:tiny", "--quiet")
    result = json.loads(installed("labels", store, "--templates", "paper80", "--json").stdout)
    assert (result["classes"], result["templates"]) == (2, 80)
    with open(os.path.join(REPO, "data", "templates", "paper80.txt"), encoding="utf-8") as f:
        shipped = [line.rstrip("\n") for line in f if line.strip()]
    with open(os.path.join(store, "featstore.json"), encoding="utf-8") as f:
        assert json.load(f)["labels"]["templates"] == shipped
