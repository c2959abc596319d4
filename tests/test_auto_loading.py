"""Saved and published MPSM models load in a fresh Python process through the Auto classes and the remote code
they carry, offline: (a) from a directory, (b) by repo id from a pre-filled Hugging Face cache.

The child process runs from a temporary directory with no PYTHONPATH and blocks `import modeling_mpsm` (the package
may be installed), so everything it runs comes from the files `save_pretrained` copied next to the weights. Inputs, weights
and expected scores travel in a .pt file.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import torch

from modeling_mpsm.publishing import assemble_repo
from tiny import TINY, tiny_models, tiny_processor


CAPTIONS = ["A man runs on the grass.", "a red dog", "The dog runs on the red ball"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Run in the child: loads every case of the .pt file with the Auto classes and compares it with what was saved.
CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_mpsm"] = None  # the installed package must not be used: `import modeling_mpsm` now fails
    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor

    for case in torch.load(sys.argv[1]):
        config = AutoConfig.from_pretrained(case["source"], trust_remote_code=True)
        model = AutoModel.from_pretrained(case["source"], trust_remote_code=True).eval()
        assert type(config).__name__ == case["config_class"] and type(model).__name__ == case["model_class"]
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        state = model.state_dict()
        assert state.keys() == case["state_dict"].keys()
        assert all(torch.equal(state[name], value) for name, value in case["state_dict"].items())
        inputs = case["inputs"]
        if case["processor"]:
            processor = AutoProcessor.from_pretrained(case["source"], trust_remote_code=True)
            assert type(processor).__module__.startswith("transformers_modules.")
            inputs = dict(processor(text=case["captions"], **case["images"]))
            for name, value in case["inputs"].items():
                assert torch.equal(inputs[name], value), name
        with torch.no_grad():
            scores = model(**inputs).logits_per_image
        torch.testing.assert_close(scores, case["scores"], rtol=0, atol=1e-6)
        try:  # push_to_hub's import of the package's publishing is guarded: without the package, a clear error
            model.push_to_hub("org/not-uploaded", metrics={"rsum": 0.0})
        except ImportError as error:
            assert "needs the modeling_mpsm package" in str(error), error
        else:
            raise AssertionError("push_to_hub(metrics=) without the package did not refuse")
        print("loaded", case["source"], type(model).__name__)
    """
)


def tiny_inputs(processor):
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(2, 3, 2, 2, generator=generator).sort(dim=2).values * 100  # [(x1, y1), (x2, y2)] pixels
    images = {
        "region_features": torch.randn(2, 3, TINY["img_dim"], generator=generator),
        "boxes": corners.reshape(2, 3, 4),
        "image_sizes": torch.tensor([[100.0, 100.0], [120.0, 100.0]]),
    }
    return images, dict(processor(text=CAPTIONS, **images))


def case(source, model, inputs, processor=False, images=None):
    with torch.no_grad():
        scores = model(**inputs).logits_per_image
    return {
        "source": str(source),
        "config_class": type(model.config).__name__,
        "model_class": type(model).__name__,
        "state_dict": {name: value.clone() for name, value in model.state_dict().items()},
        "inputs": inputs,
        "scores": scores,
        "processor": processor,
        "captions": CAPTIONS,
        "images": images,
    }


def run_child(tmp_path, cases, **env):
    """Run CHILD on `cases` in a fresh interpreter, from `tmp_path`, offline, without PYTHONPATH."""
    torch.save(cases, tmp_path / "cases.pt")
    (tmp_path / "child.py").write_text(CHILD)
    child_env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH" and not key.startswith("HF_")}
    child_env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), **env)
    result = subprocess.run(
        [sys.executable, "child.py", "cases.pt"], cwd=tmp_path, env=child_env, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_saved_models_load_from_a_directory_in_a_fresh_process(tmp_path):
    dis, ensemble = tiny_models()
    _, inputs = tiny_inputs(tiny_processor())
    dis.save_pretrained(tmp_path / "dis")
    ensemble.save_pretrained(tmp_path / "ensemble")
    output = run_child(tmp_path, [case(tmp_path / "dis", dis, inputs), case(tmp_path / "ensemble", ensemble, inputs)])
    assert "MPSMModel" in output and "MPSMEnsembleModel" in output


def fill_hub_cache(cache, repo_id, folder):
    """Lay `folder` out as the Hub cache does for one commit of `repo_id` on the main branch."""
    repo_cache = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_cache / "snapshots" / COMMIT)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(COMMIT)


def test_published_repos_load_by_repo_id_from_the_hub_cache(tmp_path):
    dis, ensemble = tiny_models()
    processor = tiny_processor()
    images, inputs = tiny_inputs(processor)
    cache = tmp_path / "hub"
    cases = []
    for repo_id, model in (("mpsm-org/mpsm-dis-tiny", dis), ("mpsm-org/mpsm-ensemble-tiny", ensemble)):
        checkpoint = tmp_path / repo_id.split("/")[1]
        model.save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
        assemble_repo(checkpoint, tmp_path / "repo", repo_id)  # exactly what publish() uploads
        fill_hub_cache(cache, repo_id, tmp_path / "repo")
        shutil.rmtree(tmp_path / "repo")
        cases.append(case(repo_id, model, inputs, processor=True, images=images))
    assert json.loads((cache / "models--mpsm-org--mpsm-dis-tiny" / "snapshots" / COMMIT / "config.json").read_text())[
        "auto_map"
    ]["AutoModel"] == "modeling_mpsm.MPSMModel"

    output = run_child(tmp_path, cases, HF_HUB_CACHE=str(cache))
    assert "loaded mpsm-org/mpsm-dis-tiny MPSMModel" in output
    assert "loaded mpsm-org/mpsm-ensemble-tiny MPSMEnsembleModel" in output
