"""The installed import names: the Triton kernels are ``pretrain.kernels`` (in a wheel and in a checkout), and the
top-level name ``kernels`` — Hugging Face's distribution, which transformers >= 5.25 imports — is never ours."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_on_sys_path_never_shadows_the_kernels_distribution():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pretrain.kernels.reference as r; import kernels; "
            "print(r.__name__, r.__file__); print(getattr(kernels, '__file__', None))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, top_level = done.stdout.splitlines()
    assert ours == f"pretrain.kernels.reference {ROOT / 'kernels' / 'reference.py'}"
    # the distribution when it is installed, else only an empty namespace (None): no module of ours by that name
    assert top_level == "None" or not top_level.startswith(str(ROOT / "kernels"))
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_the_wheel_installs_the_kernels_under_pretrain(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("pretrain-*.whl"))).namelist()
    assert {f"pretrain/kernels/{m}.py" for m in ("attention", "adamw", "norms", "rotary", "cross_entropy",
                                                 "reference", "_common")} <= set(names)
    assert "pretrain/plan/data/published-training-points.csv" in names
    assert not any(n.startswith("kernels/") for n in names)


@pytest.mark.slow
def test_hf_tests_pass_with_the_oldest_transformers_the_extra_allows():
    """The ``hf`` extra's lower bound is tested, not guessed: the conversion tests under that release."""
    done = subprocess.run([sys.executable, "tools/hf_oldest.py", "-q", "-x"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-2000:])
    assert done.stdout.startswith("transformers 4.") and " passed" in done.stdout and " failed" not in done.stdout
