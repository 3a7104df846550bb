"""User mistakes (an unknown model, an unreachable Hub id, a folder that holds no model, a missing file) end in one
line that names the value and what is allowed: through the python API, the CLI and the recipes. No test here
touches the network: Hub requests are answered in the process, or refused by offline mode."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import datasets
import pytest
import transformers
from conftest import ROOT
from huggingface_hub import constants, set_client_factory
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils._http import default_client_factory

from hf_freezecache.cli import main
from hf_freezecache.data import load_image_classification
from hf_freezecache.models import build_model

try:
    import httpx2 as httpx  # huggingface_hub 2
except ImportError:  # huggingface_hub 1.x
    import httpx

TINY_VIT_CONFIG = {
    "model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "intermediate_size": 64,
}  # fmt: skip


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text.strip(), text
    return text


@pytest.fixture
def hub_answers():
    """huggingface_hub's requests, answered by `hub_answers["status"]` and `["code"]` (its X-Error-Code header)."""
    answer = {}

    def respond(request):
        return httpx.Response(answer["status"], headers={"X-Error-Code": answer["code"]}, json={"error": "refused"})

    set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(respond)))
    yield answer
    set_client_factory(default_client_factory)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if a model is looked up on the Hub."""

    def looked_up(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args[0]!r}")

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", looked_up)


def test_an_unknown_model_name_is_refused_with_the_names_that_exist(no_hub):
    with pytest.raises(ValueError) as error:
        build_model("resnet7", 10)
    message = _one_line(error)
    for text in ("Unknown model 'resnet7'", "resnet20", "resnet32-paper", "'timm:<name>'", "folder", "namespace/name"):
        assert text in message, text
    with pytest.raises(ValueError, match=r"did you mean timm:resnet18"):
        build_model("resnet18", 10)
    with pytest.raises(FileNotFoundError, match=r"Model folder './no_such_model' does not exist"):
        build_model("./no_such_model", 10)


def test_an_unknown_timm_model_points_to_list_models():
    with pytest.raises(ValueError) as error:
        build_model("timm:resnet7", 10)
    message = _one_line(error)
    assert "Unknown timm model 'resnet7'" in message and "timm.list_models(" in message
    assert "did you mean timm:resnet" in message
    with pytest.raises(ValueError, match=r"timm model 'resnet18' does not take timm_kwargs \{'depht': 3\}"):
        build_model("timm:resnet18", 10, timm_kwargs={"depht": 3})


def test_a_hub_id_that_cannot_be_reached_or_found_is_named(offline, hub_answers):
    with pytest.raises(OSError) as error:
        build_model("someone/vit-tiny", 10)
    message = _one_line(error)
    assert "'someone/vit-tiny' is not a local folder" in message and "HF_HUB_OFFLINE" in message
    assert "model folder" in message


@pytest.mark.parametrize(
    "status, code, expected",
    [(404, "RepoNotFound", "was not found on the Hub"), (403, "GatedRepo", "is a gated Hub repository")],
)
def test_a_missing_or_gated_hub_repository_is_named(hub_answers, status, code, expected):
    hub_answers.update(status=status, code=code)
    with pytest.raises(OSError) as error:
        build_model("someone/vit-tiny", 10)
    message = _one_line(error)
    assert "Model 'someone/vit-tiny' is not a local folder" in message and expected in message


def test_an_unreachable_hub_is_told_apart(monkeypatch):
    def unreachable(*args, **kwargs):
        # What transformers raises when the Hub does not answer and nothing is cached.
        cause = LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub.")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.") from cause

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", unreachable)
    with pytest.raises(OSError, match=r"'someone/vit-tiny' .* the Hub is not reachable and it is not in the local"):
        build_model("someone/vit-tiny", 10)


def test_a_folder_that_is_not_a_transformers_model_says_what_it_lacks(tmp_path, monkeypatch):
    cases = {
        "empty": ({}, "has no config.json"),
        "not_json": ({"config.json": "{model_type"}, "config.json transformers cannot read"),
        "no_model_type": ({"config.json": json.dumps({"hidden_size": 8})}, "`model_type`"),
        "no_weights": ({"config.json": json.dumps(TINY_VIT_CONFIG)}, "no file named model.safetensors"),
    }
    for name, (files, expected) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        with pytest.raises(ValueError) as error:
            build_model(str(folder), 10)
        message = _one_line(error)
        assert f"Model folder '{folder}'" in message and expected in message, message
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a file, not a model folder.*--pretrained_weights"):
        build_model(str(weights), 10)
    # Permissions cannot be taken from root, which the tests may run as: the check is what is seen.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=rf"Model folder '{tmp_path / 'empty'}' is not readable"):
        build_model(str(tmp_path / "empty"), 10)


@pytest.mark.parametrize("model", ["resnet20", "timm:resnet18"])
@pytest.mark.parametrize("file", ["weights.th", "model.safetensors"])
def test_pretrained_weights_that_are_missing_or_unreadable_are_named(tmp_path, model, file):
    with pytest.raises(FileNotFoundError, match=rf"--pretrained_weights '.*{file}' does not exist"):
        build_model(model, 10, str(tmp_path / file))
    (tmp_path / file).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as error:
        build_model(model, 10, str(tmp_path / file))
    assert f"--pretrained_weights '{tmp_path / file}'" in _one_line(error)


def test_a_dataset_that_is_no_folder_and_no_reachable_hub_id_is_named(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match=r"Dataset folder '.*missing' does not exist"):
        load_image_classification(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"Dataset folder './missing' does not exist"):
        load_image_classification("./missing")
    (tmp_path / "file.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a file: give a dataset folder or a Hub dataset id"):
        load_image_classification(str(tmp_path / "file.parquet"))
    with pytest.raises(OSError) as error:
        load_image_classification("someone/images")
    message = _one_line(error)
    assert "Dataset 'someone/images' is not a local folder" in message and "give a dataset folder" in message


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--model", "resnet7"], "Unknown model 'resnet7'"),
        (["--model", "timm:resnet7"], "Unknown timm model 'resnet7'"),
        (["--pretrained_weights", "missing.th"], "--pretrained_weights 'missing.th' does not exist"),
        (["--dataset_name", "./missing"], "Dataset folder './missing' does not exist"),
    ],
)
def test_the_cli_answers_a_mistake_in_one_line(tmp_path, capsys, flags, expected):
    status = main(["train", *flags, "--max_train_samples", "8", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("hf-freezecache train: error: ") and expected in line, err
    assert not (tmp_path / "out").exists()


def test_the_cli_answers_an_unreachable_hub_model_in_one_line(tmp_path, capsys, offline):
    flags = ["--model", "someone/vit-tiny", "--position", "1", "--output_dir", str(tmp_path / "cache")]
    status = main(["build-cache", *flags])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and line.startswith("hf-freezecache build-cache: error: Model 'someone/vit-tiny'")


def test_a_recipe_answers_a_mistake_in_one_line(tmp_path):
    """As a user runs it: in a fresh process, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_FREEZECACHE_TRACEBACK", None)
    recipe = str(ROOT / "recipes" / "train_image_classifier.py")
    command = [sys.executable, recipe, "--model", "resnet7", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("train_image_classifier.py: error: Unknown model 'resnet7'")


def test_the_no_trainer_recipe_answers_a_mistake_in_one_line(tmp_path, monkeypatch, capsys):
    recipe = ROOT / "recipes" / "train_image_classifier_no_trainer.py"
    monkeypatch.setattr(sys, "argv", [str(recipe), "--dataset_name", "./missing", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_path(str(recipe), run_name="__main__")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_status.value.code == 2
    assert line == "train_image_classifier_no_trainer.py: error: Dataset folder './missing' does not exist."
