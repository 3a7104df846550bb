"""Recipe configs: the paper's experiments with their hyper-parameters, the CPU setups, config files and flags."""

import pytest
from conftest import ROOT

from hf_freezecache.models.cifar_resnet import CIFAR_RESNET_VARIANTS
from hf_freezecache.run import parse_run_arguments

PAPER = ROOT / "recipes" / "configs" / "paper"
CPU = ROOT / "recipes" / "configs" / "cpu"

#: Section 4 of the paper, per experiment of Tables 1-2: model, dataset, epochs, initial lr, discard positions.
PAPER_EXPERIMENTS = {
    "resnet32_cifar100_to_cifar10_finetune": ("resnet32-paper", "uoft-cs/cifar10", 80, 0.01, "5,10"),
    "resnet50_imagenet_to_cifar100_finetune": ("microsoft/resnet-50", "uoft-cs/cifar100", 50, 0.01, "3,7,13"),
    "deit_small_imagenet_to_cifar100_finetune": (
        "facebook/deit-small-patch16-224", "uoft-cs/cifar100", 100, 6e-5, "9"
    ),
    "resnet32_cifar100_scratch": ("resnet32-paper", "uoft-cs/cifar100", 160, 0.1, "5,10"),
    "resnet50_tinyimagenet_scratch": ("timm:resnet50", "zh-plus/tiny-imagenet", 100, 0.1, "3,7,13"),
}  # fmt: skip


def test_one_config_per_paper_experiment():
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(PAPER_EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(PAPER_EXPERIMENTS))
def test_paper_config_has_the_papers_hyper_parameters(name):
    model, data, training, freeze = parse_run_arguments([str(PAPER / f"{name}.yaml")])
    expected_model, dataset, epochs, lr, positions = PAPER_EXPERIMENTS[name]
    assert (model.model, data.dataset_name, training.num_train_epochs) == (expected_model, dataset, epochs)
    assert training.learning_rate == pytest.approx(lr)
    # Common to all: SGD with momentum 0.9, cosine decay, batch 64; FreezeOut's schedule with discard, zfp with one
    # tolerance for all positions, chunks of 2 samples.
    assert (training.optim.value, training.optim_args, training.lr_scheduler_type.value) == (
        "sgd",
        "momentum=0.9",
        "cosine",
    )
    assert training.per_device_train_batch_size == 64
    assert (freeze.freeze_policy, freeze.discard, freeze.discard_positions) == ("freezeout", True, positions)
    assert (freeze.cache_codec, freeze.cache_chunk_size) == ("zfp", 2)
    assert freeze.channel_aug_gamma > 0 or freeze.token_aug_alpha > 0  # "w/ Discard & Aug."
    assert model.model in CIFAR_RESNET_VARIANTS or "/" in model.model or model.model.startswith("timm:")


@pytest.mark.parametrize("config", sorted(CPU.glob("*.yaml")), ids=lambda p: p.stem)
def test_cpu_config_points_at_shared_data(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository root, where recipes run
    model, data, training, freeze = parse_run_arguments([str(config)])
    assert (ROOT / data.dataset_name).is_dir(), data.dataset_name
    if model.pretrained_weights:
        assert (ROOT / model.pretrained_weights).is_file(), model.pretrained_weights
    assert freeze.freeze_policy == "none"  # the policy comes from the command line (run_results.sh)


def test_flags_after_a_config_file_override_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: resnet32\nnum_train_epochs: 3\nreport_to: [none]\nfreeze_policy: freezeout\n")
    model, _, training, freeze = parse_run_arguments([str(config), "--num_train_epochs", "7"])
    assert (model.model, training.num_train_epochs, freeze.freeze_policy) == ("resnet32", 7, "freezeout")
    # Options the file does not set keep the recipe's defaults, as on the command line.
    assert training.optim.value == "sgd" and training.learning_rate == 0.1
    json_config = tmp_path / "run.json"
    json_config.write_text('{"model": "resnet44", "timm_kwargs": null}')
    assert parse_run_arguments([str(json_config)])[0].model == "resnet44"


def test_bad_config_files_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_run_arguments([str(tmp_path / "missing.yaml")])
    listing = tmp_path / "list.yaml"
    listing.write_text("- resnet20\n")
    with pytest.raises(ValueError, match="mapping of option names"):
        parse_run_arguments([str(listing)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle: resnet20\n")
    with pytest.raises(ValueError, match="--modle"):
        parse_run_arguments([str(unknown)])


def test_launched_processes_that_do_not_train_together_are_stopped(monkeypatch, tmp_path):
    from hf_freezecache.run import run_training

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, without a process group on the CPU
    arguments = parse_run_arguments(["--output_dir", str(tmp_path), "--max_train_samples", "8"])
    with pytest.raises(ValueError, match="--use_cpu true"):
        run_training(arguments)
