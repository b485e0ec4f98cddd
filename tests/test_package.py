"""Packaging rules: the Triton kernels live inside our package, importing does no work."""

import os
import subprocess
import sys

import pytest


def _run(code: str, tmp_path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # cwd outside the repository: only what is installed is importable.
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_triton_kernels_is_not_a_top_level_module(tmp_path):
    out = _run(
        "import importlib.util as u; import sae_fast.triton_kernels as t; "
        "print(u.find_spec('triton_kernels') is None, t.__name__)",
        tmp_path,
    )
    assert out == "True sae_fast.triton_kernels"


def test_import_does_no_work(tmp_path):
    out = _run(
        "import sys, torch, sae_fast; "
        "print(torch.cuda.is_initialized(), 'triton' in sys.modules, 'sae_fast._C' in sys.modules)",
        tmp_path,
    )
    assert out == "False False False"


def test_cli_entry_point(tmp_path):
    out = _run("import sae_fast.cli as c; print(callable(c.main))", tmp_path)
    assert out == "True"


def test_cli_check_main_job(capsys):
    """The README's main job: every backend of decode and the encoders agrees with fp64."""
    from sae_fast import cli

    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "topk_encode + batchtopk_encode check" in out


@pytest.mark.parametrize("name", ["sparse_decode", "topk_encode", "batchtopk_encode", "TopKCodes", "BatchTopKCodes",
                                  "cuda_extension_available", "__version__"])
def test_public_api(name):
    import sae_fast

    assert hasattr(sae_fast, name)
