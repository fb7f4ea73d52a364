"""DyLoRA (`--adapter dylora`): a truncation applies the leading ranks at alpha / b (checked against the formula),
each step's rank comes from the seed and the step, bad flags fail before loading, the files cut by
`tools extract-dylora` are ordinary LoRAs at every rank (loaded by our loader and by diffusers', both formats,
applying what the training truncation applied), each truncation of a trained DyLoRA has a far lower loss than the
same truncation of an ordinary LoRA trained alike, resume is exact, and the flags work from a config file."""

from __future__ import annotations

import contextlib
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, inject_adapter_in_model
from run_helpers import assert_same_tensors, lora_file, train_until_first_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file
from test_formats import assert_outputs_equal, fresh_pipeline, outputs
from test_training import base_args, eval_loss, pipeline_parts

from sdxl_pivotal.args import parse_args
from sdxl_pivotal.card import dylora_section
from sdxl_pivotal.dylora import NestedRanks
from sdxl_pivotal.errors import InputError
from sdxl_pivotal.formats import load_for_diffusers
from sdxl_pivotal.formats.kohya import kohya_modules
from sdxl_pivotal.tools.cli import main as tools_main
from sdxl_pivotal.tools.extract_dylora import extract_dylora

RANK, UNIT, CONV_RANK = 16, 4, 8
RANKS = (4, 8, 12, 16)
DYLORA = ("--adapter", "dylora", "--rank", str(RANK), "--dylora_unit", str(UNIT))


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)


def nested_layers(unit: int = 2) -> tuple[TwoLayers, NestedRanks]:
    """A Linear of LoRA rank 8 and a 3x3 Conv2d of rank 4, random factors, alpha 6 and 3."""
    torch.manual_seed(0)
    model = TwoLayers()
    config = LoraConfig(
        r=8,
        lora_alpha=6.0,
        target_modules=["linear", "conv"],
        rank_pattern={"conv": 4},
        alpha_pattern={"conv": 3.0},
        init_lora_weights=False,
    )
    inject_adapter_in_model(config, model)
    return model, NestedRanks([model], unit)


def by_formula(layer, x: torch.Tensor, rank: int, alpha: float) -> torch.Tensor:
    """W x + (alpha / b) · B[:, :b] A[:b] x, b = min(rank, the layer's rank), from the layer's weights."""
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    kept = min(rank, a.shape[0])
    if isinstance(base, torch.nn.Linear):
        return base(x) + alpha / kept * (x @ a[:kept].T @ b[:, :kept].T)
    hidden = torch.nn.functional.conv2d(x, a[:kept], padding=1)
    return base(x) + alpha / kept * torch.nn.functional.conv2d(hidden, b[:, :kept])


def test_truncation_applies_the_leading_ranks_at_alpha_over_b_and_trains_only_them():
    model, nested = nested_layers()
    assert nested.ranks == [2, 4, 6, 8] and nested.max_rank == 8
    x_linear, x_conv = torch.randn(3, 6), torch.randn(2, 3, 5, 5)
    full = (model.linear(x_linear).detach(), model.conv(x_conv).detach())
    for rank in nested.ranks:
        model.zero_grad()
        with nested.truncated(rank):
            y_linear, y_conv = model.linear(x_linear), model.conv(x_conv)
            (y_linear.square().sum() + y_conv.square().sum()).backward()
        with torch.no_grad():
            expected_linear = by_formula(model.linear, x_linear, rank, 6.0)
            expected_conv = by_formula(model.conv, x_conv, rank, 3.0)  # rank 4: min(b, 4)
        torch.testing.assert_close(y_linear, expected_linear, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y_conv, expected_conv, rtol=1e-5, atol=1e-6)
        for layer, layer_rank in ((model.linear, 8), (model.conv, 4)):
            kept = min(rank, layer_rank)
            a_grad, b_grad = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
            assert a_grad[:kept].abs().sum(dim=tuple(range(1, a_grad.dim()))).min() > 0, "all b rows train"
            assert b_grad[:, :kept].abs().sum() > 0
            assert not a_grad[kept:].any() and not b_grad[:, kept:].any(), "rows beyond b get no gradient"
    # Outside a step: the ordinary full-rank LoRA.
    torch.testing.assert_close(model.linear(x_linear), full[0])
    torch.testing.assert_close(model.conv(x_conv), full[1])
    with torch.no_grad():
        torch.testing.assert_close(full[0], by_formula(model.linear, x_linear, 8, 6.0), rtol=1e-5, atol=1e-6)


def test_one_compilation_follows_every_truncation():
    """The masks change in place, so `torch.compile` (as `--compile` uses it) compiles a layer once and still
    applies each step's truncation."""
    from torch._dynamo.testing import CompileCounter

    model, nested = nested_layers()
    x = torch.randn(3, 6)
    counter = CompileCounter()
    compiled = torch.compile(model.linear, backend=counter)
    for rank in (*nested.ranks, 2, None):
        with nested.truncated(rank) if rank else contextlib.nullcontext():
            y = compiled(x)
        with torch.no_grad():
            torch.testing.assert_close(y, by_formula(model.linear, x, rank or 8, 6.0), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_each_step_trains_one_rank_from_the_seed_and_the_step():
    _, nested = nested_layers()
    draws = [nested.sampled_rank(7, step) for step in range(400)]
    assert draws == [nested.sampled_rank(7, step) for step in range(400)], "a pure function of (seed, step)"
    assert set(draws) == {2, 4, 6, 8}
    assert all(60 < draws.count(rank) < 140 for rank in (2, 4, 6, 8)), "uniform over the ranks"
    assert draws != [nested.sampled_rank(8, step) for step in range(400)]


def dylora_flags(tiny_model, demo_images, tmp_path, *flags: str):
    return parse_args(
        [
            *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
            *("--instance_prompt", "a photo of TOK toy", "--output_dir", str(tmp_path / "out"), *flags),
        ]
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--adapter", "dylora", "--rank", "10", "--dylora_unit", "4"), r"--rank 10 is not a multiple .* 8 or 12"),
        (("--adapter", "dylora", "--rank", "2", "--dylora_unit", "4"), r"--rank 2 is not a multiple .* Use 4 there"),
        (("--adapter", "dylora", "--dylora_unit", "0"), "must be at least 1"),
        ((*DYLORA, "--conv_rank", "6"), "--conv_rank 6 is not a multiple"),
        ((*DYLORA, "--unet_block_ranks", "down=4,up=6"), "--unet_block_ranks 6 is not a multiple"),
        (("--dylora_unit", "4"), "--dylora_unit is for --adapter dylora"),
        (("--adapter", "loha", "--dylora_unit", "2"), "--dylora_unit is for --adapter dylora"),
        ((*DYLORA, "--use_dora"), "drop --use_dora"),
        ((*DYLORA, "--train_text_encoder", "--train_text_encoder_frac", "0.5"), "freeze them at one rank"),
    ],
)
def test_bad_dylora_flags_fail_before_loading(tiny_model, demo_images, tmp_path, flags, message):
    with pytest.raises(InputError, match=message):
        dylora_flags(Path("/nonexistent/model"), demo_images, tmp_path, *flags)


def test_unit_defaults_to_one_and_comes_from_a_config_file(demo_images, tmp_path):
    assert dylora_flags("/m", demo_images, tmp_path, "--adapter", "dylora").dylora_unit == 1
    config = tmp_path / "dylora.yaml"
    config.write_text(yaml.safe_dump({"adapter": "dylora", "rank": RANK, "dylora_unit": UNIT}))
    args = dylora_flags("/m", demo_images, tmp_path, "--config", str(config))
    assert (args.adapter, args.rank, args.dylora_unit) == ("dylora", RANK, UNIT)
    config.write_text(yaml.safe_dump({"adapter": "dylora", "rank": RANK, "dylora_unit": 5}))
    with pytest.raises(InputError, match="--rank 16 is not a multiple of --dylora_unit 5"):
        dylora_flags("/m", demo_images, tmp_path, "--config", str(config))


def loss_with(tiny_model: Path, args, lora: Path | None) -> float:
    pipe, parts = pipeline_parts(tiny_model)
    if lora is not None:
        load_for_diffusers(pipe, lora, adapter_name="lora")
    return eval_loss(parts, args)


@pytest.mark.slow
def test_truncations_of_a_dylora_are_far_better_than_an_ordinary_loras(
    run_training, tiny_model, demo_images, tmp_path
):
    """DyLoRA and an ordinary LoRA, same flags, seed and steps, both cut by `extract-dylora`: at every truncation
    (ranks 4, 8 and 12 of 16) DyLoRA's loss is far lower. At full rank (no truncation) the ordinary LoRA's is
    lower (printed, not asserted): DyLoRA trains rank 16 in a quarter of the steps only. Measured at 180 steps:
    0.341 / 0.267 / 0.239 / 0.233 against 0.592 / 0.394 / 0.274 / 0.204 (ratios 0.58 / 0.68 / 0.87); at 60 steps
    rank 12 was not yet lower (0.351 vs 0.338)."""
    flags = (
        *("--rank", str(RANK), "--conv_rank", str(RANK), "--lora_alpha", "4", "--conv_alpha", "4"),
        *("--learning_rate", "1e-2", "--max_train_steps", "180"),
    )
    runs = {
        "dylora": run_training(tmp_path / "dylora", *flags, "--adapter", "dylora", "--dylora_unit", str(UNIT)),
        "lora": run_training(tmp_path / "lora", *flags),
    }
    args = base_args(tiny_model, demo_images, tmp_path / "eval")
    losses = {}
    for name, out in runs.items():
        extract_dylora(out / "pytorch_lora_weights.safetensors", UNIT, tmp_path / f"{name}-ranks", base=tiny_model)
        for rank in RANKS:
            path = tmp_path / f"{name}-ranks" / f"pytorch_lora_weights-r{rank}.safetensors"
            losses[name, rank] = loss_with(tiny_model, args, path)
    print(f"\nbase model loss {loss_with(tiny_model, args, None):.4f}")
    for rank in RANKS:
        print(f"rank {rank:2}: DyLoRA {losses['dylora', rank]:.4f}  LoRA {losses['lora', rank]:.4f}")
    for rank in RANKS[:-1]:
        assert losses["dylora", rank] < 0.9 * losses["lora", rank], (rank, losses)


@pytest.fixture(scope="module")
def dylora_run(tmp_path_factory, tiny_model, demo_images) -> Path:
    """A short DyLoRA run: UNet attention at rank 16, convolutions at rank 8, text encoders at rank 16."""
    from accelerate.state import AcceleratorState, GradientState

    from sdxl_pivotal.train import train

    out = tmp_path_factory.mktemp("dylora") / "tok-toy"
    argv = [
        *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
        *("--instance_prompt", "a photo of TOK toy", "--output_dir", str(out), "--resolution", "64"),
        *("--train_batch_size", "2", "--report_to", "none", "--seed", "0", "--max_train_steps", "3"),
        *("--learning_rate", "1e-2", "--text_encoder_lr", "1e-2", "--lr_warmup_steps", "0"),
        *DYLORA,
        *("--conv_rank", str(CONV_RANK), "--lora_alpha", "6", "--train_text_encoder"),
    ]
    try:
        return train(parse_args(argv))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def truncated_outputs(tiny_model: Path, run: Path, rank: int):
    """The outputs of the pipeline holding the run's full LoRA, under the trainer's own truncation to `rank`."""
    pipe = fresh_pipeline(tiny_model)
    load_for_diffusers(pipe, run, adapter_name="default")
    with NestedRanks([pipe.unet, pipe.text_encoder, pipe.text_encoder_2], UNIT).truncated(rank):
        return outputs(pipe)


def test_extract_writes_an_ordinary_lora_per_rank_in_both_formats(dylora_run, tiny_model, capsys):
    with safe_open(str(dylora_run / "tok-toy.safetensors"), framework="pt") as file:  # kohya's DyLoRA argument
        assert json.loads(file.metadata()["ss_network_args"])["unit"] == str(UNIT)
    # no --unit: the run's kohya file records it
    assert tools_main(["extract-dylora", str(dylora_run), "--base", str(tiny_model)]) == 0
    written = sorted(line.removeprefix("wrote ") for line in capsys.readouterr().out.splitlines())
    expected = [f"{name}-r{rank}.safetensors" for name in ("pytorch_lora_weights", "tok-toy") for rank in RANKS]
    assert [Path(path).name for path in written] == sorted(expected)
    full = kohya_modules(load_file(dylora_run / "tok-toy.safetensors"))
    assert any(t["lora_down.weight"].dim() == 4 for t in full.values()), "convolutions are adapted"
    assert any(name.startswith("lora_te2_") for name in full), "so are the text encoders"
    for rank in RANKS:
        kohya = dylora_run / f"tok-toy-r{rank}.safetensors"
        modules = kohya_modules(load_file(kohya))
        assert modules.keys() == full.keys()
        for name, tensors in modules.items():
            own = full[name]["lora_down.weight"].shape[0]
            kept = min(rank, own)  # the convolutions stop at their rank 8
            assert torch.equal(tensors["lora_down.weight"], full[name]["lora_down.weight"][:kept])
            assert torch.equal(tensors["lora_up.weight"], full[name]["lora_up.weight"][:, :kept])
            # alpha kept: --lora_alpha 6 at rank 16; the convolutions' alpha defaults to their rank
            assert float(tensors["alpha"]) == float(full[name]["alpha"]) == (6.0 if own == RANK else CONV_RANK)
        with safe_open(str(kohya), framework="pt") as file:
            assert file.metadata()["ss_network_dim"] == str(rank)
    full_rank = load_file(dylora_run / f"pytorch_lora_weights-r{RANK}.safetensors")
    assert_same_tensors(full_rank, lora_file(dylora_run))  # the last rank is the trained file itself


@pytest.mark.slow
def test_each_rank_loads_as_the_training_truncation_in_our_loader_and_diffusers(dylora_run, tiny_model, tmp_path):
    """Both files of every rank, through `load_for_diffusers` and through diffusers' `load_lora_weights`, give the
    outputs of the full LoRA under the trainer's own truncation to that rank (the same rows, the same scale)."""
    extract_dylora(dylora_run, UNIT, tmp_path, base=tiny_model)
    for rank in RANKS:
        expected_outputs = truncated_outputs(tiny_model, dylora_run, rank)
        for path in (
            tmp_path / f"tok-toy-r{rank}.safetensors",
            tmp_path / f"pytorch_lora_weights-r{rank}.safetensors",
        ):
            ours, theirs = fresh_pipeline(tiny_model), fresh_pipeline(tiny_model)
            load_for_diffusers(ours, path)
            theirs.load_lora_weights(str(path))
            assert_outputs_equal(outputs(ours), expected_outputs)
            assert_outputs_equal(outputs(theirs), expected_outputs)


def test_extract_refuses_a_unit_that_does_not_divide_the_ranks(dylora_run, tiny_model, tmp_path, capsys):
    kohya = dylora_run / "tok-toy.safetensors"
    assert tools_main(["extract-dylora", str(kohya), "--unit", "5", "--output", str(tmp_path)]) == 2
    assert "not a multiple of --unit 5; pass the run's --dylora_unit" in capsys.readouterr().err
    assert tools_main(["extract-dylora", str(kohya), "--unit", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    diffusers_file = dylora_run / "pytorch_lora_weights.safetensors"  # diffusers' metadata has no kohya arguments
    assert (
        tools_main(["extract-dylora", str(diffusers_file), "--base", str(tiny_model), "--output", str(tmp_path)]) == 2
    )
    assert "record(s) no DyLoRA unit: pass --unit" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.safetensors"))
    extract_dylora(kohya, UNIT, tmp_path)
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        extract_dylora(kohya, UNIT, tmp_path)


def test_resume_after_a_kill_equals_the_uninterrupted_run(run_training, tmp_path, monkeypatch):
    shape = (
        "--rank",
        str(RANK),
        "--conv_rank",
        str(CONV_RANK),
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
    )
    flags = ("--adapter", "dylora", "--dylora_unit", str(UNIT), *shape)
    uninterrupted = run_training(tmp_path / "full", *flags)
    train_until_first_checkpoint(run_training, monkeypatch, tmp_path / "resumed", *flags)
    run_training(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    assert_same_tensors(lora_file(tmp_path / "resumed"), lora_file(uninterrupted))
    plain = lora_file(run_training(tmp_path / "plain", *shape))
    assert any(not torch.equal(plain[key], value) for key, value in lora_file(uninterrupted).items()), (
        "DyLoRA trains truncations, not the plain LoRA"
    )


def test_model_card_says_how_to_get_the_smaller_ranks(dylora_run, tiny_model):
    card = (dylora_run / "README.md").read_text()
    section = card.split("## Smaller ranks (DyLoRA)\n")[1].split("\n## ")[0]
    assert "an ordinary LoRA of rank\n16" in section and "leading ranks 4, 8, 12, ..." in section
    assert f"`python -m sdxl_pivotal.tools extract-dylora tok-toy --unit 4 --base {tiny_model}`" in section
    assert "`tok-toy-r4.safetensors`" in section and "`pytorch_lora_weights-r4.safetensors`" in section
    assert dylora_section(Namespace(adapter="lora")) == "", "only DyLoRA runs have the section"


def test_extract_from_a_checkpoint_keeps_the_bundled_embeddings(run_training, tmp_path):
    flags = ("--train_text_encoder_ti", "--max_train_steps", "1", "--checkpointing_steps", "1")
    out = run_training(tmp_path / "tok-toy", *DYLORA, *flags)
    checkpoint = out / "checkpoint-1"
    written = extract_dylora(checkpoint, UNIT, tmp_path / "ranks")
    assert sorted(path.name for path in written) == sorted(
        f"{name}-r{rank}.safetensors" for name in ("tok-toy", "pytorch_lora_weights") for rank in RANKS
    )
    trained = load_file(checkpoint / "tok-toy.safetensors")
    bundled = [key for key in trained if key.startswith("bundle_emb.")]
    assert bundled
    for rank in RANKS:
        cut = load_file(tmp_path / "ranks" / f"tok-toy-r{rank}.safetensors")
        assert all(torch.equal(cut[key], trained[key]) for key in bundled)
