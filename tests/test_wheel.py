"""The package as a Hub user meets it: built as a wheel, installed into a fresh environment without the source tree,
and used from another directory: load -> score -> publish dry run -> the evaluate metric.

The fresh virtual environment sees the test environment's third-party packages through a `.pth` file (so nothing is
downloaded but the build backend) and gets the wheel itself with `--no-deps`; the child runs from an empty temporary
directory and asserts that `modeling_mpsm` comes from the fresh environment's site-packages.
"""

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent(
    """
    import json, os, sys
    import evaluate, numpy as np, torch
    import modeling_mpsm, modeling_mpsm.metrics
    from modeling_mpsm import MPSMConfig, MPSMModel, MPSMProcessor
    from modeling_mpsm.publishing import publish
    from modeling_mpsm.data.vocabulary import SPECIAL_TOKENS, build_tokenizer
    from transformers import AutoModel

    assert modeling_mpsm.__file__.startswith(sys.argv[1]), modeling_mpsm.__file__  # the wheel, not the source tree
    words = SPECIAL_TOKENS + "a man dog red ball runs on the grass".split()
    config = MPSMConfig(img_dim=16, vocab_size=len(words), word_dim=8, embed_size=16, sim_dim=8, kgid_layers=1,
                        srgr_steps=1)
    torch.manual_seed(0)
    MPSMModel(config).save_pretrained("ckpt")
    processor = MPSMProcessor(build_tokenizer({word: i for i, word in enumerate(words)}), num_regions=4,
                              dependency_parser="fallback")
    processor.save_pretrained("ckpt")
    model = AutoModel.from_pretrained("ckpt", trust_remote_code=True).eval()
    inputs = processor(text=["a man runs on the grass", "a red dog", "the dog runs on the red ball"],
                       region_features=torch.randn(3, 4, 16), boxes=torch.rand(3, 4, 2).repeat(1, 1, 2) * 0.5 + 
                       torch.tensor([0, 0, 0.4, 0.4]))
    with torch.no_grad():
        scores = model(**inputs).logits_per_image
    assert scores.shape == (3, 3) and torch.isfinite(scores).all()
    metrics = {"i2t_r1": 1.0, "i2t_r5": 2.0, "i2t_r10": 3.0, "t2i_r1": 4.0, "t2i_r5": 5.0, "t2i_r10": 6.0, "rsum": 21.0,
               "dataset": "synthetic-scenes"}
    json.dump(metrics, open("metrics.json", "w"))
    publish("ckpt", "org/mpsm-dis-test", metrics="metrics.json", dry_run=True)
    recall = evaluate.load(modeling_mpsm.metrics.RECALL_AT_K)
    result = recall.compute(similarities=np.repeat(np.eye(3), 5, axis=1))
    assert result["rsum"] == 600.0, result
    print("WHEEL OK")
    """
)


@pytest.mark.slow
def test_wheel_installed_elsewhere_loads_scores_publishes_and_evaluates(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), REPO], check=True)
    (wheel,) = wheels.glob("modeling_mpsm-*.whl")
    environment = tmp_path / "env"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True)
    fresh_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    # third-party dependencies from this environment; the editable install of the source tree is not visible there
    (tmp_path / "env" / fresh_site.split(str(environment) + os.sep, 1)[1] / "test_deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = subprocess.run([str(python), "-c", CHILD, fresh_site], cwd=workdir, capture_output=True, text=True,
                            env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
                            | {"HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WHEEL OK" in result.stdout
    assert "model-index" in result.stdout and "Dry run: would upload" in result.stdout
    for name in ("configuration_mpsm.py", "modeling_mpsm.py", "processing_mpsm.py", "tokenizer.json"):
        assert name in result.stdout
