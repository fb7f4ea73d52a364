"""`python -m sdxl_pivotal.tools`: real round trips on the tiny model. merge = the LoRA loaded at that scale (also
for pivotal tuning's new tokens); resize to full rank is lossless and lower ranks keep the energy their singular
values say; extract recovers a planted low-rank difference; convert is exact both ways, also for another trainer's
kohya file; inspect reports what a file holds; the command line fails in one line on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft_layers import adapter_layers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_formats import PARTS, assert_outputs_equal, fresh_pipeline, outputs

from sdxl_pivotal.export import save_safetensors
from sdxl_pivotal.formats import load_for_diffusers, save_diffusers_lora, save_kohya_lora
from sdxl_pivotal.formats.kohya import kohya_modules
from sdxl_pivotal.formats.names import kohya_module_names, modules_by_kohya_name
from sdxl_pivotal.tokens import PivotalTokens
from sdxl_pivotal.tools.cli import SUBCOMMANDS, main
from sdxl_pivotal.tools.extract import extract_lora
from sdxl_pivotal.tools.lowrank import overall_energy
from sdxl_pivotal.tools.resize import resize_lora

PIVOTAL_PROMPT = "a photo of <s0><s1> toy"


def tools(*argv: object) -> int:
    return main([str(arg) for arg in argv])


def random_lora_pipeline(tiny_model: Path, use_dora: bool):
    """The tiny pipeline with random LoRA (or DoRA) on all three models: Linear and Conv2d layers, alpha != rank,
    per-module ranks and alphas."""
    pipe = fresh_pipeline(tiny_model)
    torch.manual_seed(1 if use_dora else 0)
    common = dict(init_lora_weights=False, use_dora=use_dora)
    configs = {
        "unet": LoraConfig(
            r=4,
            lora_alpha=6.0,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
            rank_pattern={"attn2.to_v": 2},
            alpha_pattern={"attn1.to_q": 1.5},
            **common,
        ),
        "text_encoder": LoraConfig(r=4, lora_alpha=2.0, target_modules=["q_proj", "v_proj", "fc1"], **common),
        "text_encoder_2": LoraConfig(r=3, lora_alpha=5.0, target_modules=["k_proj", "out_proj"], **common),
    }
    for part, config in configs.items():
        getattr(pipe, part).add_adapter(config)
    return pipe


@pytest.fixture(scope="module")
def lora_files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """One random LoRA as our kohya and diffusers files, and the outputs of the pipeline that holds it."""
    pipe = random_lora_pipeline(tiny_model, use_dora=False)
    folder = tmp_path_factory.mktemp("lora")
    models = {part: getattr(pipe, part) for part in PARTS}
    return {
        "kohya": save_kohya_lora(folder, models, "run", str(tiny_model)),
        "diffusers": save_diffusers_lora(folder, models),
        "outputs": outputs(pipe),
    }


def pivotal_kohya_file(tiny_model: Path, folder: Path, use_dora: bool) -> Path:
    """A random LoRA (or DoRA) on all three models with pivotal-tuning embeddings bundled, as our kohya file."""
    pipe = random_lora_pipeline(tiny_model, use_dora=use_dora)
    models = {part: getattr(pipe, part) for part in PARTS}
    embeddings = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}
    tokens = PivotalTokens({"TOK": ["<s0>", "<s1>"]})
    return save_kohya_lora(folder, models, "tok-toy", str(tiny_model), embeddings, tokens)


@pytest.fixture(scope="module")
def pivotal_dora_kohya(tiny_model, tmp_path_factory) -> Path:
    return pivotal_kohya_file(tiny_model, tmp_path_factory.mktemp("dora"), use_dora=True)


@pytest.fixture(scope="module")
def pivotal_kohya(tiny_model, tmp_path_factory) -> Path:
    return pivotal_kohya_file(tiny_model, tmp_path_factory.mktemp("pivotal"), use_dora=False)


def loaded(tiny_model: Path, lora: Path, scale: float = 1.0, prompt: str = "a photo of TOK toy"):
    """The outputs of the base pipeline with `lora` loaded by `load_for_diffusers` at `scale`."""
    pipe = fresh_pipeline(tiny_model)
    load_for_diffusers(pipe, lora, adapter_name="lora")
    pipe.set_adapters(["lora"], [scale])
    return outputs(pipe, prompt)


def test_merge_equals_the_lora_loaded_at_that_scale(lora_files, tiny_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    assert (
        tools("merge", lora_files["kohya"], "--base", tiny_model, "--output", tmp_path / "merged", "--scale", 0.7) == 0
    )
    merged = outputs(StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged"))
    expected = loaded(tiny_model, lora_files["kohya"], 0.7)
    # Fused weights round differently from the LoRA applied beside them (float32: ~1e-6 on outputs of ~1e-2);
    # a wrong scale or a missed module changes them by more than 1e-4 (checked below).
    assert_outputs_equal(merged, expected, atol=1e-5)
    base = outputs(fresh_pipeline(tiny_model))
    for at_scale, at_one, before in zip(expected, lora_files["outputs"], base, strict=True):
        assert not torch.allclose(at_scale, at_one, atol=1e-4) and not torch.allclose(at_scale, before, atol=1e-4)


def test_merge_keeps_pivotal_tokens(run_training, tiny_model, tmp_path):
    """A pivotal-tuning run's folder (UNet LoRA + `_emb` file) merged at 0.5: the saved pipeline has the new tokens
    and encodes a prompt with them, and runs its UNet, as the base pipeline with the run loaded at 0.5."""
    from diffusers import StableDiffusionXLPipeline

    run = run_training(tmp_path / "tok-toy", "--train_text_encoder_ti", "--max_train_steps", "1", "--rank", "4")
    assert tools("merge", run, "--base", tiny_model, "--output", tmp_path / "merged", "--scale", 0.5) == 0
    merged = StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged")
    for tokenizer in (merged.tokenizer, merged.tokenizer_2):
        assert tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"]) == [len(tokenizer) - 2, len(tokenizer) - 1]
    expected = loaded(tiny_model, run, 0.5, PIVOTAL_PROMPT)
    assert_outputs_equal(outputs(merged, PIVOTAL_PROMPT), expected)


def delta_of(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A kohya module's update ΔW = (alpha / r) · up · down, as a matrix."""
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    return float(tensors["alpha"]) / down.shape[0] * up.flatten(1).double() @ down.flatten(1).double()


def expected_energy(tensors: dict[str, torch.Tensor], rank: int) -> float:
    """The energy of the best rank-`rank` approximation of a kohya module's ΔW, from its singular values."""
    squares = torch.linalg.svdvals(delta_of(tensors)) ** 2
    return float(squares[:rank].sum() / squares.sum())


@pytest.mark.parametrize("file_format", ["kohya", "diffusers"])
def test_resize_is_lossless_at_full_rank_and_reports_energy(lora_files, tiny_model, tmp_path, file_format):
    source = lora_files[file_format]
    full, report = resize_lora(source, tmp_path / "full.safetensors", rank=4, base=tiny_model)
    assert all(entry.fraction == pytest.approx(1.0, abs=1e-9) for entry in report)
    torch.testing.assert_close(loaded(tiny_model, full[0]), lora_files["outputs"], rtol=1e-5, atol=1e-5)

    original = kohya_modules(load_file(lora_files["kohya"]))
    # rank 2 at most, then as few as keep 60% of each module's energy.
    smaller, report = resize_lora(source, tmp_path / "small.safetensors", rank=2, energy=0.6, base=tiny_model)
    assert (
        tools("resize", source, tmp_path / "small-cli.safetensors", "--rank", 2, "--energy", 0.6, "--base", tiny_model)
        == 0
    )
    assert load_file(smaller[0]).keys() == load_file(tmp_path / "small-cli.safetensors").keys()
    assert report and {entry.module for entry in report} == original.keys()
    kept = total = 0.0
    for entry in report:
        expected_rank = 1 if expected_energy(original[entry.module], 1) >= 0.6 else 2
        assert entry.rank == expected_rank, entry.module
        assert entry.fraction == pytest.approx(expected_energy(original[entry.module], expected_rank), rel=1e-6)
        energy = float(delta_of(original[entry.module]).square().sum())
        kept, total = kept + entry.fraction * energy, total + energy
    assert overall_energy(report) == pytest.approx(kept / total, rel=1e-6) and overall_energy(report) < 0.999
    assert {entry.rank for entry in report} == {1, 2}

    pipe = fresh_pipeline(tiny_model)
    load_for_diffusers(pipe, smaller[0], adapter_name="small")
    assert sum(len(adapter_layers(getattr(pipe, part), "small")) for part in PARTS) == len(report), (
        "every module loads"
    )
    if file_format == "kohya":
        resized = kohya_modules(load_file(smaller[0]))
        for entry in report:
            tensors = resized[entry.module]
            assert float(tensors["alpha"]) == tensors["lora_down.weight"].shape[0] == entry.rank
            # the best rank-k approximation leaves exactly the discarded energy
            residual = delta_of(original[entry.module]) - delta_of(tensors)
            expected_residual = (1 - entry.fraction) * float(delta_of(original[entry.module]).square().sum())
            assert float(residual.square().sum()) == pytest.approx(expected_residual, rel=1e-4, abs=1e-8)
        with safe_open(str(smaller[0]), framework="pt") as file:
            assert file.metadata()["ss_network_dim"] == "2"


def test_resize_keeps_dora_magnitudes_and_bundled_embeddings(pivotal_dora_kohya, tiny_model, tmp_path):
    written, report = resize_lora(pivotal_dora_kohya, tmp_path / "tok-toy.safetensors", rank=4)
    assert all(entry.fraction == pytest.approx(1.0, abs=1e-9) for entry in report)
    original, resized = load_file(pivotal_dora_kohya), load_file(written[0])
    kept = [key for key in original if key.endswith(".dora_scale") or key.startswith("bundle_emb.")]
    assert kept and all(torch.equal(original[key], resized[key]) for key in kept)
    expected = loaded(tiny_model, pivotal_dora_kohya, prompt=PIVOTAL_PROMPT)
    torch.testing.assert_close(loaded(tiny_model, written[0], prompt=PIVOTAL_PROMPT), expected, rtol=1e-5, atol=1e-5)


PLANTED = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.proj_in",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
    "up_blocks.1.resnets.0.conv1",
)


def test_extract_recovers_a_planted_low_rank_difference(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    generator = torch.Generator().manual_seed(0)
    planted = {}
    with torch.no_grad():
        for path in PLANTED:
            weight = unet.get_submodule(path).weight
            up = torch.randn(weight.shape[0], 2, generator=generator)
            down = torch.randn(2, weight[0].numel(), generator=generator)
            planted[path] = 0.05 * up @ down
            weight += planted[path].reshape(weight.shape)
    unet.save_pretrained(tmp_path / "tuned-unet")

    written, report = extract_lora(tiny_model, tmp_path / "tuned-unet", tmp_path / "x.safetensors", rank=2, conv=True)
    names = kohya_module_names("unet", unet)
    modules = kohya_modules(load_file(written[0]))
    assert modules.keys() == {names[path] for path in PLANTED}, "exactly the changed modules"
    for path, delta in planted.items():
        torch.testing.assert_close(delta_of(modules[names[path]]).float(), delta, rtol=1e-4, atol=1e-5)
    assert all(entry.fraction == pytest.approx(1.0) for entry in report)

    _, linear_only = extract_lora(tiny_model, tmp_path / "tuned-unet", tmp_path / "y.safetensors", rank=1)
    assert {entry.module for entry in linear_only} == {names[path] for path in PLANTED[:3]}
    for entry in linear_only:
        sigma = torch.linalg.svdvals(planted[next(p for p in PLANTED if names[p] == entry.module)].double())
        assert entry.fraction == pytest.approx(float(sigma[0] ** 2 / sigma.square().sum()), rel=1e-5)

    argv = ["extract", tmp_path / "x.safetensors", "--base", tiny_model, "--tuned", tmp_path / "tuned-unet"]
    assert tools(*argv, "--rank", 2, "--conv", "--to", "diffusers", "--overwrite") == 0
    pipe = fresh_pipeline(tiny_model)
    load_for_diffusers(pipe, tmp_path / "x.safetensors")
    tuned = fresh_pipeline(tiny_model)
    tuned.unet = unet
    torch.testing.assert_close(outputs(pipe)[0], outputs(tuned)[0], rtol=1e-4, atol=1e-5)


def test_convert_round_trip_is_identical(pivotal_kohya, tiny_model, tmp_path):
    diffusers_file, back = tmp_path / "lora.safetensors", tmp_path / "tok-toy.safetensors"
    assert tools("convert", pivotal_kohya, diffusers_file, "--base", tiny_model) == 0
    emb = tmp_path / "lora_emb.safetensors"
    assert tools("convert", diffusers_file, back, "--base", tiny_model, "--embeddings", emb) == 0
    original, returned = load_file(pivotal_kohya), load_file(back)
    assert original.keys() == returned.keys()
    assert all(
        torch.equal(original[key], returned[key]) and original[key].dtype == returned[key].dtype for key in original
    )
    with safe_open(str(back), framework="pt") as file:
        assert file.metadata()["sdxl_pivotal.tokens"] == '{"TOK": ["<s0>", "<s1>"]}'

    expected = loaded(tiny_model, pivotal_kohya, prompt=PIVOTAL_PROMPT)
    pipe = fresh_pipeline(tiny_model)
    assert load_for_diffusers(pipe, diffusers_file) + load_for_diffusers(pipe, emb) == ["<s0>", "<s1>"]
    assert_outputs_equal(outputs(pipe, PIVOTAL_PROMPT), expected)


def test_convert_refuses_dora_in_comfyui_form_without_base_weights(pivotal_dora_kohya, tiny_model, tmp_path, capsys):
    """Our DoRA kohya file holds ComfyUI's magnitudes, which depend on the base weights; the tools (which build the
    models without weights) say so instead of writing wrong magnitudes."""
    assert tools("convert", pivotal_dora_kohya, tmp_path / "out.safetensors", "--base", tiny_model) != 0
    assert "ComfyUI's form" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def another_trainers_kohya_file(path: Path, alpha: float | None) -> Path:
    """A kohya SDXL LoRA as other trainers write it: SAI names, float16, per-module ranks, and `alpha` for every
    module (None: a different alpha per module); for the text encoders attention and MLP layers, as kohya trains."""
    generator = torch.Generator().manual_seed(0)
    attention = [f"self_attn_{projection}" for projection in ("q_proj", "k_proj", "v_proj", "out_proj")]
    modules = {  # name: (out, in, rank, own alpha)
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (64, 64, 4, 1.0),
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q": (64, 64, 2, 8.0),
        "lora_unet_output_blocks_3_1_proj_out": (64, 64, 4, 2.0),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": (128, 32, 8, 4.0),
        **{f"lora_te1_text_model_encoder_layers_0_{name}": (32, 32, 4, 3.0) for name in attention},
        **{f"lora_te2_text_model_encoder_layers_1_{name}": (32, 32, 2, 16.0) for name in attention},
    }
    state = {}
    for name, (out_features, in_features, rank, own_alpha) in modules.items():
        state[f"{name}.lora_down.weight"] = (0.1 * torch.randn(rank, in_features, generator=generator)).half()
        state[f"{name}.lora_up.weight"] = (0.1 * torch.randn(out_features, rank, generator=generator)).half()
        state[f"{name}.alpha"] = torch.tensor(own_alpha if alpha is None else alpha).half()
    save_file(state, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


def test_convert_another_trainers_kohya_file(tiny_model, tmp_path):
    """Converted to diffusers, another trainer's kohya file loads in diffusers as diffusers loads the kohya file;
    with a different alpha per module (which diffusers' kohya loader ignores), as the weights W + alpha / rank · up ·
    down give."""
    kohya = another_trainers_kohya_file(tmp_path / "theirs.safetensors", alpha=2.0)
    assert tools("convert", kohya, tmp_path / "ours.safetensors", "--base", tiny_model, "--to", "diffusers") == 0
    from_kohya, from_converted = fresh_pipeline(tiny_model), fresh_pipeline(tiny_model)
    from_kohya.load_lora_weights(str(kohya))
    from_converted.load_lora_weights(str(tmp_path / "ours.safetensors"))
    expected = outputs(from_kohya)
    assert_outputs_equal(outputs(from_converted), expected)
    base = outputs(fresh_pipeline(tiny_model))
    assert all(not torch.allclose(e, b, atol=1e-4) for e, b in zip(expected, base, strict=True)), "LoRA has effect"

    kohya = another_trainers_kohya_file(tmp_path / "per-module.safetensors", alpha=None)
    converted = tmp_path / "per-module-ours.safetensors"
    assert tools("convert", kohya, converted, "--base", tiny_model) == 0
    from_converted, fused = fresh_pipeline(tiny_model), fresh_pipeline(tiny_model)
    from_converted.load_lora_weights(str(converted))
    index = modules_by_kohya_name({part: getattr(fused, part) for part in PARTS})
    with torch.no_grad():
        for name, tensors in kohya_modules(load_file(kohya)).items():
            part, path = index[name]
            weight = getattr(fused, part).get_submodule(path).weight
            weight += delta_of({key: value.float() for key, value in tensors.items()}).float()
    torch.testing.assert_close(outputs(from_converted), outputs(fused), rtol=1e-5, atol=1e-5)


def test_inspect_names_format_counts_and_ranks(lora_files, pivotal_dora_kohya, capsys):
    # unet: 4 attention projections x 2 attentions x 11 transformer blocks (88; attn2.to_v at rank 2, attn1.to_q
    # with alpha 1.5), 11 proj_in, 17 resnet conv1; text_encoder: 3 x 4 layers; text_encoder_2: 2 x 4 layers.
    unet = "unet: 116 modules (116 LoRA); rank 4 (x105), 2 (x11); alpha 6 (x105), 1.5 (x11)"
    for file in (lora_files["kohya"], lora_files["diffusers"]):
        assert tools("inspect", file) == 0
        report = capsys.readouterr().out.splitlines()
        assert unet in report, report
        assert "text_encoder: 12 modules (12 LoRA); rank 4; alpha 2" in report
        assert "text_encoder_2: 8 modules (8 LoRA); rank 3; alpha 5" in report
    assert report[1] == "format: diffusers (PEFT; PEFT configs in metadata)"

    assert tools("inspect", pivotal_dora_kohya) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[1] == "format: kohya (LyCORIS: DoRA), for AUTOMATIC1111 / ComfyUI"
    assert "text_encoder_2: 8 modules (8 LoRA); rank 3; alpha 5; DoRA on 8" in report
    assert "embeddings: tok-toy (bundled): clip_l [2, 32], clip_g [2, 32]" in report
    assert "tokens: TOK -> <s0><s1>" in report
    assert "  ss_network_dim: 4" in report


def test_inspect_embeddings_and_hides_secrets(tmp_path, capsys):
    embeddings = {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}
    metadata = {"hub_token": "hf_" + "x" * 34, "note": "y" * 500}
    save_safetensors(embeddings, tmp_path / "a_emb.safetensors", metadata)
    assert tools("inspect", tmp_path / "a_emb.safetensors") == 0
    report = capsys.readouterr().out
    assert "format: embeddings" in report and "clip_l [2, 768], clip_g [2, 1280]" in report
    assert "hf_x" not in report and "  hub_token: <hidden>" in report
    assert "  note: " + "y" * 100 + "... (500 characters)" in report


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_help(subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tools(subcommand, "--help")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m sdxl_pivotal.tools {subcommand}")


def test_bad_input_is_one_line_without_traceback(tiny_model, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    for argv in (
        ("convert", missing, tmp_path / "out.safetensors"),
        ("resize", missing, tmp_path / "out.safetensors", "--rank", 2),
        ("merge", missing, "--base", tiny_model, "--output", tmp_path / "out"),
        ("extract", tmp_path / "out.safetensors", "--base", tiny_model, "--tuned", tmp_path, "--rank", 2),
    ):
        assert tools(*argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("error: "), error
    (tmp_path / "text.safetensors").write_text("not safetensors")
    command = [sys.executable, "-m", "sdxl_pivotal.tools", "inspect", str(tmp_path / "text.safetensors")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'text.safetensors'}: not a readable safetensors file")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("family", ["loha_tucker", "lokr_decomposed"])
def test_convert_round_trips_lycoris_families(family, tiny_model, demo_images, tmp_path):
    """LoHa and LoKr (Tucker convolutions, both LoKr factors low-rank, factor 4): diffusers -> kohya -> diffusers
    gives back the same tensors (LoKr: the same weights, its Tucker convolutions untucked), and both files load
    with the same behaviour."""
    from test_adapters import FAMILIES, random_adapters

    models = random_adapters(tiny_model, demo_images, tmp_path, *FAMILIES[family])
    source = save_diffusers_lora(tmp_path / "source", models)
    kohya, back = tmp_path / "run.safetensors", tmp_path / "back.safetensors"
    assert tools("convert", source, kohya, "--base", tiny_model) == 0
    assert tools("convert", kohya, back, "--base", tiny_model) == 0
    original, returned = load_file(source), load_file(back)
    if family == "lokr_decomposed":
        # The kohya file holds Tucker LoKr convolutions untucked (ComfyUI and Forge fail on `lokr_t2`): the same
        # weights (the behaviour check below), plain low-rank tensors instead of the core.
        assert not any(key.endswith(".lokr_t2") for key in load_file(kohya))
        assert {key for key in original if not key.endswith(".lokr_t2")} == set(returned)
    else:
        assert original.keys() == returned.keys()
        assert all(torch.allclose(original[key], returned[key], rtol=1e-6, atol=1e-7) for key in original)
    assert_outputs_equal(loaded(tiny_model, kohya), loaded(tiny_model, source))
    assert_outputs_equal(loaded(tiny_model, back), loaded(tiny_model, source))
