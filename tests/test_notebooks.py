"""The notebooks run top to bottom with small settings, and their cells' asserts hold.

Each notebook is executed with nbclient in a kernel started from THIS interpreter
(``sys.executable``, through a kernelspec written into a temporary folder), so the test
needs no ``jupyter kernelspec install`` step and cannot pick up another Python's
``python3`` kernel. ``AWQ_JAX_NB_SMALL=1`` shrinks calibration and evaluation.

Notebook 03 runs twice: on the repository's ``docs/benchmarks`` (whatever is there, possibly
nothing) and on a folder of small records in the documented format, so its plotting and
asserting cells run even before the GPU benchmarks have been committed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "awq-jax-test-python"


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A kernelspec for ``sys.executable`` in a private folder (nothing installed globally)."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "awq-jax tests", "language": "python"})
    )
    return KernelSpecManager(kernel_dirs=[str(root)])


def execute(path: Path, kernel_specs: KernelSpecManager, timeout: int) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=timeout,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
            parts.append(str(out.get("data", {}).get("text/markdown", "")))
    return "\n".join(parts)


def n_images(nb) -> int:
    return sum(
        "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
    )


@pytest.fixture(autouse=True)
def small(monkeypatch) -> None:
    monkeypatch.setenv("AWQ_JAX_NB_SMALL", "1")


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_inside_awq.ipynb", "03_kernels.ipynb"])
def test_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: clear outputs"


def test_quickstart(kernel_specs, monkeypatch) -> None:
    nb = execute(NOTEBOOKS / "01_quickstart.ipynb", kernel_specs, timeout=400)
    text = outputs_text(nb)
    assert "Paris" in text
    assert "| AWQ |" in text


def test_inside_awq(kernel_specs) -> None:
    nb = execute(NOTEBOOKS / "02_inside_awq.ipynb", kernel_specs, timeout=300)
    assert n_images(nb) == 4
    assert "AWQ <= RTN in all 90 searches" in outputs_text(nb)


def test_kernels_repository_benchmarks(kernel_specs) -> None:
    nb = execute(NOTEBOOKS / "03_kernels.ipynb", kernel_specs, timeout=300)
    assert "triton (interpret)" in outputs_text(nb)


def test_kernels_with_benchmark_records(kernel_specs, tmp_path, monkeypatch) -> None:
    """The plotting and asserting cells, on records in the documented format."""
    kernels = [
        {"k": k, "n": n, "m": m, "impl": impl, "us": us * (m + 8), "rel_err": 3e-3}
        for k, n in [(4096, 4096), (4096, 14336)]
        for m in [1, 16, 256]
        for impl, us in [("bf16", 4.0), ("xla_int4", 3.0), ("triton", 1.2)]
    ]
    kernels.append({"k": 4096, "n": 4096, "m": 1, "impl": "mosaic", "us": None, "rel_err": None})
    generate = [
        {
            "model": "llama-8b-shaped",
            "dtype": dtype,
            "impl": impl,
            "batch": b,
            "prompt_len": prompt_len,
            "new_tokens": 64,
            "prefill_tok_s": 5000.0 * b,
            "decode_tok_s": rate * b,
            "weight_bytes": size,
        }
        for dtype, impl, rate, size in [
            ("bfloat16", "bf16", 60.0, 16e9),
            ("int4", "triton", 150.0, 6e9),
        ]
        for b in [1, 8]
        for prompt_len in [128, 1024]
    ]
    (tmp_path / "kernels-h100.json").write_text(json.dumps(kernels))
    (tmp_path / "kernels-h200.json").write_text(json.dumps(kernels[:3] + kernels[6:9]))
    # Two runs of one configuration: the notebook keeps the later (the earlier would fail
    # its sanity check).
    stale = {**generate[0], "decode_tok_s": 0.0}
    (tmp_path / "generate-h100.json").write_text(json.dumps([stale, *generate]))
    monkeypatch.setenv("AWQ_JAX_BENCH_DIR", str(tmp_path))
    nb = execute(NOTEBOOKS / "03_kernels.ipynb", kernel_specs, timeout=300)
    assert n_images(nb) >= 2
    text = outputs_text(nb)
    assert "H100 K= 4096 N= 4096 M=   1: best int4 kernel 3.33x bf16" in text
    assert "H200 K= 4096 N= 4096 M=   1: best int4 kernel 3.33x bf16" in text
    assert "int4/triton': '5.59 GiB'" in text  # the weight sizes printed under the plot
