"""Hub upload through a fake HfApi at the network boundary: what is created, what is uploaded, and that
the token never leaves the API object (not in logs, trackers or any written file)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sdxl_pivotal import card as card_module
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.errors import InputError

TOKEN = "hf_FAKEtokenThatMustNeverBePrinted123"


@dataclass
class FakeRepo:
    repo_id: str


@dataclass
class FakeHubApi:
    token: str | None
    calls: list[tuple[str, dict]] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)

    def create_repo(self, **kwargs) -> FakeRepo:
        self.calls.append(("create_repo", kwargs))
        return FakeRepo(kwargs["repo_id"] if "/" in kwargs["repo_id"] else f"someone/{kwargs['repo_id']}")

    def upload_folder(self, **kwargs) -> None:
        """Record which files huggingface_hub would upload, applying the ignore patterns as it does."""
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", kwargs))
        root = Path(kwargs["folder_path"])
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        self.uploaded = sorted(filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]))


@pytest.fixture
def fake_hub(monkeypatch) -> list[FakeHubApi]:
    apis: list[FakeHubApi] = []

    def make(token):
        apis.append(FakeHubApi(token))
        return apis[-1]

    monkeypatch.setattr(card_module, "hub_api", make)
    return apis


def test_push_uploads_outputs_not_checkpoints(run_training, tmp_path, fake_hub, caplog, capsys):
    with caplog.at_level(logging.DEBUG):
        out = run_training(
            tmp_path / "tok-toy",
            *("--max_train_steps", "2", "--checkpointing_steps", "1", "--report_to", "tensorboard"),
            *("--train_text_encoder_ti", "--push_to_hub", "--hub_model_id", "me/tok-toy", "--hub_token", TOKEN),
            *("--validation_prompt", "TOK toy", "--num_validation_images", "1", "--validation_inference_steps", "1"),
        )
    assert [api.token for api in fake_hub] == [TOKEN, TOKEN]
    (create_name, create), (upload_name, upload) = fake_hub[0].calls[0], fake_hub[1].calls[0]
    assert create_name == "create_repo" and create == {"repo_id": "me/tok-toy", "exist_ok": True, "repo_type": "model"}
    assert upload_name == "upload_folder" and upload["repo_id"] == "me/tok-toy" and upload["folder_path"] == str(out)
    assert fake_hub[1].uploaded == [
        "README.md",
        "pytorch_lora_weights.safetensors",
        "tok-toy.safetensors",
        "tok-toy_emb.safetensors",
        "training_config.yaml",
        "validation/final/0.png",
    ]
    card = (out / "README.md").read_text()
    assert 'pipe.load_lora_weights("me/tok-toy", weight_name="pytorch_lora_weights.safetensors")' in card
    assert 'state = load_file(hf_hub_download("me/tok-toy", "tok-toy_emb.safetensors"))' in card

    # The token is nowhere: not printed, not logged, not in any file (tensorboard hparams included).
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err + caplog.text
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_repo_is_created_before_training(run_training, tmp_path, fake_hub, monkeypatch):
    """A bad token or repo name must fail before minutes of training, not after."""
    from sdxl_pivotal import train as train_module

    def no_models(*_):
        raise AssertionError("models loaded before the repo was created")

    monkeypatch.setattr(train_module, "load_sdxl", no_models)

    def refuse(token):
        raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(card_module, "hub_api", refuse)
    with pytest.raises(PermissionError):
        run_training(tmp_path / "run", "--push_to_hub", "--max_train_steps", "1")


def test_hub_token_with_wandb_is_refused(tiny_model, demo_images, tmp_path):
    argv = [
        *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
        *("--instance_prompt", "TOK", "--output_dir", str(tmp_path / "o"), "--hub_token", TOKEN),
    ]
    with pytest.raises(InputError, match="HF_TOKEN") as error:
        parse_args([*argv, "--report_to", "wandb"])
    assert TOKEN not in str(error.value)
    assert parse_args([*argv, "--report_to", "tensorboard"]).hub_token == TOKEN
