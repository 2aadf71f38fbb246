"""featstore.hardware: what CPU it runs on, and the one-line warning for bf16 on a CPU without native bf16."""

from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq
import pytest
import torch

import featstore.hardware as hardware
from conftest import featstore, write_folder
from featstore.encode import encode

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma {extra}

processor\t: 1
model name\t: a second processor's fields are not read
flags\t\t: avx512_bf16
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd sve {extra}
CPU implementer\t: 0x41
"""


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point hardware at a written /proc/cpuinfo; returns a function that writes it."""
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "CPUINFO", str(path))
    monkeypatch.delenv("FEATSTORE_ASSUME_NO_BF16", raising=False)
    return path.write_text


@pytest.fixture
def fresh_warning(monkeypatch):
    """The once-per-process warning not yet printed, and no testing override from the environment."""
    monkeypatch.setattr(hardware, "_warned", False)
    monkeypatch.delenv("FEATSTORE_ASSUME_NO_BF16", raising=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hw-images")
    write_folder(root, per_class=2, seed=3, classes=["circle", "square"])
    return str(root)


def stored_ids(store: str, split: str) -> list[str]:
    files = glob.glob(os.path.join(store, "**", "*.parquet"), recursive=True)
    return sorted(i for f in files if f"split={split}" in f for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


def test_this_machine_is_described_sanely(monkeypatch):
    monkeypatch.delenv("FEATSTORE_ASSUME_NO_BF16", raising=False)
    c = hardware.cpu_capability()
    assert c["cpu"] and c["cpu"] != "unknown CPU"
    assert 1 <= c["cores"] <= (os.cpu_count() or 1)
    assert c["torch"] == torch.backends.cpu.get_cpu_capability()
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith(("flags", "Features"))).split(":")[1].split()
    assert c["native_bf16"] == any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))
    line = hardware.capability_line(c)
    assert "\n" not in line and f"{c['cores']} cores" in line and f"torch {c['torch']}" in line
    assert ("native bf16: yes" in line) == c["native_bf16"]


@pytest.mark.parametrize("text, extra, flags", [
    (X86, "avx512f avx512_bf16", ["avx512_bf16"]),
    (X86, "amx_tile amx_bf16", ["amx_bf16"]),
    (X86, "avx512f avx512bw", []),  # AVX-512 without its bf16 extension: emulated
    (ARM, "bf16 i8mm", ["bf16"]),
    (ARM, "", []),
])
def test_native_bf16_from_cpu_flags(cpuinfo, text, extra, flags):
    cpuinfo(text.format(extra=extra))
    assert hardware.bf16_flags() == flags
    assert hardware.native_bf16() == bool(flags)
    assert (hardware.bf16_advice("cpu") is None) == bool(flags)
    assert hardware.bf16_advice("cuda") is None


def test_x86_names_family_and_model_and_unknown_flags_count_as_no(cpuinfo, monkeypatch):
    cpuinfo(X86.format(extra=""))
    assert hardware.cpu_model() == "AMD EPYC 7B13 (family 25, model 1)"
    monkeypatch.setattr(hardware, "CPUINFO", "/nonexistent/cpuinfo")
    assert hardware.bf16_flags() is None and not hardware.native_bf16()
    assert "native bf16: unknown" in hardware.capability_line()
    assert hardware.bf16_advice("cpu") is not None


def test_advice_is_one_line_with_reason_and_recommendation(cpuinfo):
    cpuinfo(X86.format(extra="avx2"))
    advice = hardware.bf16_advice("cpu")
    assert "\n" not in advice
    assert "AMD EPYC 7B13" in advice and "without native bf16" in advice and "slower than fp32" in advice
    assert "--precision fp32" in advice and "allow_slow_bf16 = true" in advice


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("featstore: warning:")]


def test_encode_warns_once_for_bf16_only(tmp_path, images, fresh_warning, monkeypatch, capsys):
    monkeypatch.setattr(hardware, "native_bf16", lambda: False)
    store = str(tmp_path / "store")
    for split in ("a", "b"):  # a second encode in the same process does not repeat it
        result = encode(images, store, split, model="random:tiny", precision="bf16", workers=0, progress=False)
        assert result["encoded"] == 4
    stderr = capsys.readouterr().err
    assert len(warnings_in(stderr)) == 1 and "bf16" in warnings_in(stderr)[0]
    assert stored_ids(store, "a") == stored_ids(store, "b") and len(stored_ids(store, "a")) == 4

    monkeypatch.setattr(hardware, "_warned", False)
    encode(images, str(tmp_path / "fp32"), "a", model="random:tiny", precision="fp32", workers=0, progress=False)
    encode(images, str(tmp_path / "meant"), "a", model="random:tiny", precision="bf16", workers=0, progress=False,
           allow_slow_bf16=True)
    assert warnings_in(capsys.readouterr().err) == []
    assert len(stored_ids(str(tmp_path / "meant"), "a")) == 4


def test_encode_stays_quiet_on_a_cpu_with_native_bf16(tmp_path, images, fresh_warning, monkeypatch, capsys):
    monkeypatch.setattr(hardware, "native_bf16", lambda: True)
    encode(images, str(tmp_path / "store"), "a", model="random:tiny", precision="bf16", workers=0, progress=False)
    assert warnings_in(capsys.readouterr().err) == []


def test_cli_warning_is_one_line_and_the_run_completes(tmp_path, images):
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(images, "**", "*"), recursive=True)}
    store = str(tmp_path / "store")
    result = featstore("encode", images, "--store", store, "--split", "train", "--model", "random:tiny",
                       "--precision", "bf16", "--json", "--quiet", env={"FEATSTORE_ASSUME_NO_BF16": "1"})
    assert result.returncode == 0
    assert "Traceback" not in result.stderr
    assert len(warnings_in(result.stderr)) == 1 and warnings_in(result.stderr)[0].count("\n") == 0
    assert json.loads(result.stdout)["encoded"] == 4
    assert len(stored_ids(store, "train")) == 4
    assert before == {p: os.path.getmtime(p) for p in glob.glob(os.path.join(images, "**", "*"), recursive=True)}
