"""(IA)³ (`--adapter ia3`): its modules, its flags, training, resume, pivotal tuning, and its two files.

The kohya file is checked against AUTOMATIC1111's (IA)³ formula (`lycoris_reference.ia3_weight`, written from its
network_ia3.py), module by module and for whole models (the UIs leave biases unscaled); ComfyUI and Forge read no
(IA)³, which the card says.
"""

from __future__ import annotations

import copy
import json
import zlib

import pytest
import torch
from lycoris_reference import ia3_weight
from peft.tuners.ia3 import IA3Layer
from peft_layers import adapter_layers
from run_helpers import assert_same_tensors, lora_file, train_until_first_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_adapters import PARTS, base_models, flags_for, plan_for
from test_formats import assert_outputs_equal, fresh_pipeline, outputs, trained_parts

from sdxl_pivotal.adapters import add_adapters, unet_parameters_by_lr_scale
from sdxl_pivotal.checkpoints import complete_checkpoints
from sdxl_pivotal.errors import InputError
from sdxl_pivotal.formats import diffusers_to_peft, kohya_to_peft, save_diffusers_lora, save_kohya_lora
from sdxl_pivotal.formats.kohya import kohya_file_name, kohya_modules
from sdxl_pivotal.formats.load import load_for_diffusers
from sdxl_pivotal.formats.names import kohya_module_names, modules_by_kohya_name
from sdxl_pivotal.models import load_sdxl

IA3 = ("--adapter", "ia3")
# The paper's modules, by name: the UNet's attention keys and values (scaled at their output) and feed-forward
# down-projection (at its input); the text encoders' keys, and attention output and MLP down-projection at their
# input (out_proj's input = v_proj's output, without v_proj's bias).
OUTPUT_SCALED = {"unet": (".to_k", ".to_v"), "text": (".self_attn.k_proj",)}
INPUT_SCALED = {"unet": (".ff.net.2",), "text": (".self_attn.out_proj", ".mlp.fc2")}


def expected_modules(model: torch.nn.Module, part: str) -> dict[str, bool]:
    """{path: scaled at its input} of the Linear layers (IA)³ must adapt in a model without adapters."""
    kind = "unet" if part == "unet" else "text"
    linear = [path for path, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    expected = {path: False for path in linear if path.endswith(OUTPUT_SCALED[kind])}
    return expected | {path: True for path in linear if path.endswith(INPUT_SCALED[kind])}


def ia3_models(tiny_model, demo_images, tmp_path, *flags: str) -> dict[str, torch.nn.Module]:
    """The tiny SDXL's three models with (IA)³ on each, every vector drawn around 1 (PEFT starts them at 1)."""
    args = flags_for(tiny_model, demo_images, tmp_path, *IA3, "--train_text_encoder", *flags)
    parts = load_sdxl(args)
    add_adapters(parts, args)
    torch.manual_seed(0)
    models = {part: getattr(parts, part) for part in PARTS}
    with torch.no_grad():
        for model in models.values():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
    return models


def with_biases(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """`models` with every Linear bias drawn from its module path (the tiny model's are 0), the same in models with
    or without adapters: where the UIs' (IA)³ and PEFT's would treat biases apart, outputs then differ."""
    with torch.no_grad():
        for model in models.values():
            for path, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    seed = zlib.crc32(path.removesuffix(".base_layer").encode())
                    module.bias.copy_(
                        0.5 * torch.randn(module.bias.shape, generator=torch.Generator().manual_seed(seed))
                    )
    return models


class Models:
    """The three models as `outputs` reads them (with the tiny model's tokenizers)."""

    def __init__(self, models: dict[str, torch.nn.Module], pipe):
        self.unet, self.text_encoder, self.text_encoder_2 = (models[part] for part in PARTS)
        self.tokenizer, self.tokenizer_2 = pipe.tokenizer, pipe.tokenizer_2


def test_ia3_adapts_keys_values_and_feed_forward(tiny_model, demo_images, tmp_path):
    models = ia3_models(tiny_model, demo_images, tmp_path)
    fresh = base_models(tiny_model, demo_images, tmp_path)
    for part in PARTS:
        expected = expected_modules(fresh[part], part)
        layers = adapter_layers(models[part])
        assert expected and set(layers) == set(expected), part
        for path, layer in layers.items():
            assert isinstance(layer, IA3Layer) and layer.is_feedforward == expected[path], path
            base = fresh[part].get_submodule(path)
            shape = (1, base.in_features) if expected[path] else (base.out_features, 1)
            assert layer.ia3_l["default"].shape == shape, path
        trainable = {name for name, p in models[part].named_parameters() if p.requires_grad}
        assert trainable == {f"{path}.ia3_l.default" for path in expected}, "only the vectors train"


def test_ia3_blocks_and_learning_rates(tiny_model, demo_images, tmp_path):
    plan, args = plan_for(tiny_model, demo_images, tmp_path, *IA3, "--lora_unet_blocks", "up_blocks.0.attentions.1")
    assert plan and all(p.startswith("up_blocks.0.attentions.1.") for p in plan)
    assert {m.rank for m in plan.values()} == {None}, "no rank"
    plan, args = plan_for(tiny_model, demo_images, tmp_path, *IA3, "--unet_block_lr", "mid=0.5,down=0")
    assert not any(p.startswith("down_blocks.") for p in plan), "learning rate 0: no adapter"
    parts = load_sdxl(args)
    add_adapters(parts, args)
    groups = unet_parameters_by_lr_scale(parts.unet, plan)
    assert set(groups) == {0.5, 1.0}
    assert groups[0.5] and all(p.numel() > 1 for p in groups[0.5])
    assert sum(p.numel() for ps in groups.values() for p in ps) == sum(
        p.numel() for p in parts.unet.parameters() if p.requires_grad
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--rank", "8"), "--rank does not apply to --adapter ia3: \\(IA\\)³ has no rank"),
        (("--lora_alpha", "2"), "has no alpha"),
        (("--lora_dropout", "0.1"), "has no dropout"),
        (("--lora_target", "attn_ff"), "adapts its own modules"),
        (("--lora_target_regex", "x"), "--lora_target_regex does not apply"),
        (("--conv_rank", "2"), "adapts no convolutions"),
        (("--unet_block_ranks", "down=2"), "choose blocks with --lora_unet_blocks"),
        (("--use_dora",), "--use_dora is a LoRA variant"),
        (("--rank_dropout", "0.1"), "is for --adapter loha or lokr"),
        (("--lokr_factor", "2"), "are for --adapter lokr"),
    ],
)
def test_flags_that_do_not_apply_to_ia3_fail_before_loading(tiny_model, demo_images, tmp_path, flags, message):
    with pytest.raises(InputError, match=message):
        flags_for(tiny_model, demo_images, tmp_path, *IA3, *flags)  # parsing only: no model is loaded


def test_kohya_file_is_what_automatic1111_applies(tiny_model, demo_images, tmp_path):
    """LyCORIS' key rules (`<kohya name>.weight` = l - 1, `.on_input`, no alpha) and AUTOMATIC1111's formula give
    each module PEFT's weight and, with the biases left unscaled as A1111 leaves them, each model PEFT's outputs."""
    models = with_biases(ia3_models(tiny_model, demo_images, tmp_path))
    path = save_kohya_lora(tmp_path, models, "run", "base")
    state = load_file(path)
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "ia3"}
    assert "ss_network_dim" not in metadata, "no rank"

    fresh = with_biases(base_models(tiny_model, demo_images, tmp_path))
    index = modules_by_kohya_name(fresh)
    modules = kohya_modules(state)
    expected = {part: expected_modules(fresh[part], part) for part in PARTS}
    assert {index[name] for name in modules} == {(p, m) for p, paths in expected.items() for m in paths}
    a1111 = {part: copy.deepcopy(model) for part, model in fresh.items()}
    for name, tensors in modules.items():
        part, module_path = index[name]
        assert set(tensors) == {"weight", "on_input"}, name
        assert int(tensors["on_input"]) == expected[part][module_path], name
        vector = models[part].get_submodule(module_path).ia3_l["default"]
        torch.testing.assert_close(tensors["weight"], vector.flatten() - 1, rtol=0, atol=0)
        base = fresh[part].get_submodule(module_path)
        merged = copy.deepcopy(models[part].get_submodule(module_path))
        merged.merge()
        rebuilt = ia3_weight(tensors, base.weight.detach())
        torch.testing.assert_close(rebuilt.float(), merged.get_base_layer().weight, rtol=1e-6, atol=1e-7, msg=name)
        with torch.no_grad():
            a1111[part].get_submodule(module_path).weight.copy_(rebuilt)  # the bias as it is
    pipe = fresh_pipeline(tiny_model)
    assert_outputs_equal(outputs(Models(a1111, pipe)), outputs(Models(models, pipe)), atol=1e-5)


@pytest.mark.parametrize("file_format", ["diffusers", "kohya"])
def test_files_load_back_with_the_same_outputs(file_format, tiny_model, demo_images, tmp_path):
    """`load_for_diffusers` on either file gives a pipeline the adapted models' outputs, with PEFT's (IA)³ layers
    (diffusers' own load_lora_weights reads no (IA)³)."""
    models = ia3_models(tiny_model, demo_images, tmp_path)
    if file_format == "diffusers":
        path = save_diffusers_lora(tmp_path, models)
    else:
        path = save_kohya_lora(tmp_path, models, "run", "base")
    pipe = fresh_pipeline(tiny_model)
    assert load_for_diffusers(pipe, path) == []
    for part in PARTS:
        assert set(adapter_layers(getattr(pipe, part))) == set(adapter_layers(models[part])), part
    expected = outputs(Models(models, pipe))
    assert_outputs_equal(outputs(pipe), expected, atol=0)
    base = outputs(fresh_pipeline(tiny_model))
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(expected, base, strict=True)), "they change it"


def lycoris_file(tmp_path, models, vectors: dict[tuple[str, str], tuple[torch.Tensor, int]]):
    """A LyCORIS (IA)³ file of another trainer, with LyCORIS' key rules: {(part, module path): (w, on_input)}."""
    state = {}
    for (part, path), (weight, on_input) in vectors.items():
        name = kohya_module_names(part, models[part])[path]
        state |= {f"{name}.weight": weight, f"{name}.on_input": torch.tensor(on_input)}
    save_file(state, tmp_path / "other.safetensors", {"ss_network_module": "lycoris.kohya"})
    return tmp_path / "other.safetensors"


def test_another_trainers_lycoris_ia3_file_loads_as_automatic1111_applies_it(tiny_model, demo_images, tmp_path):
    fresh = base_models(tiny_model, demo_images, tmp_path)
    q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"  # no bias: its output scaling is exact
    fc1 = module_path(fresh, "text_encoder", "layers.1.mlp.fc1")  # scaled at its input: the bias is not involved
    vectors = {
        ("unet", q): (0.2 * torch.randn(fresh["unet"].get_submodule(q).out_features), 0),
        ("text_encoder", fc1): (0.2 * torch.randn(fresh["text_encoder"].get_submodule(fc1).in_features), 1),
    }
    pipe = fresh_pipeline(tiny_model)
    load_for_diffusers(pipe, lycoris_file(tmp_path, fresh, vectors))
    for (part, path), (weight, on_input) in vectors.items():
        layer = getattr(pipe, part).get_submodule(path)
        layer.merge()
        base = fresh[part].get_submodule(path).weight.detach()
        expected = ia3_weight({"weight": weight, "on_input": torch.tensor(on_input)}, base)
        torch.testing.assert_close(layer.get_base_layer().weight, expected.float(), rtol=1e-6, atol=1e-7)


def module_path(models: dict[str, torch.nn.Module], part: str, suffix: str) -> str:
    """The path of the module of `part` ending in `suffix`, in the installed transformers layout."""
    return next(path for path in kohya_module_names(part, models[part]) if path.endswith(suffix))


@pytest.mark.parametrize(
    ("part", "suffix"),
    [
        ("text_encoder", "layers.0.self_attn.v_proj"),
        ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ],
)
def test_output_scaling_of_a_layer_with_a_bias_is_refused(part, suffix, tiny_model, demo_images, tmp_path):
    """A1111 / LyCORIS leave such a layer's bias unscaled, PEFT scales it: no file means the same in both."""
    fresh = base_models(tiny_model, demo_images, tmp_path)
    path = module_path(fresh, part, suffix)
    out_features = fresh[part].get_submodule(path).out_features
    file = lycoris_file(tmp_path, fresh, {(part, path): (torch.zeros(out_features), 0)})
    with pytest.raises(ValueError, match="at the output of a layer with a bias has no kohya form"):
        kohya_to_peft(load_file(file), fresh)
    models = ia3_models(tiny_model, demo_images, tmp_path)
    assert save_kohya_lora(tmp_path, models, "ours", "base").is_file(), "ours has no such module"


# (IA)³ scales features the model has: it wants a learning rate far above LoRA's (1e-2 here lowers the tiny model's
# loss by 0.03% in 24 steps, 3e-1 by 1.5%).
STEPS = ("--learning_rate", "3e-1", "--text_encoder_lr", "3e-1", "--checkpointing_steps", "3")


@pytest.mark.slow
def test_ia3_training_lowers_the_loss_loads_back_and_resumes_exactly(
    run_training, tiny_model, demo_images, tmp_path, monkeypatch
):
    from test_training import base_args, eval_loss, pipeline_parts

    flags = (*IA3, "--train_text_encoder")
    out = run_training(tmp_path / "full", *flags, *STEPS, "--max_train_steps", "24")
    vectors = lora_file(out)
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as file:
        metadata = file.metadata()
    fresh = base_models(tiny_model, demo_images, tmp_path)
    loras = diffusers_to_peft(vectors, metadata, fresh)
    for part in PARTS:  # the trained modules are the target set
        trained_modules = {key.removesuffix(".ia3_l") for key in loras[part].state}
        assert trained_modules == set(expected_modules(fresh[part], part)), part
    still = {key for key, v in vectors.items() if torch.equal(v, torch.ones_like(v))}
    # SDXL reads CLIP-L's penultimate layer: its last layer gets no gradient (as a LoRA there stays at zero).
    assert still == {key for key in vectors if key.startswith("text_encoder.text_model.encoder.layers.3.")}, still

    pipe, parts = pipeline_parts(tiny_model)
    args = base_args(tiny_model, demo_images, tmp_path / "eval", *flags)
    before = eval_loss(parts, args)
    load_for_diffusers(pipe, out)
    after = eval_loss(parts, args)
    assert after < 0.99 * before, (before, after)
    trained, _ = trained_parts(tiny_model, demo_images, out, 24, *flags)
    assert_outputs_equal(outputs(pipe), outputs(trained), atol=0)

    # Stop right after checkpoint-3 of a 6-step run; resume: the same vectors as the run without the stop.
    short = (*flags, *STEPS, "--max_train_steps", "6")
    uninterrupted = run_training(tmp_path / "six", *short)
    train_until_first_checkpoint(run_training, monkeypatch, tmp_path / "resumed", *short)
    assert [p.name for p in complete_checkpoints(tmp_path / "resumed")] == ["checkpoint-3"]
    run_training(tmp_path / "resumed", *short, "--resume_from_checkpoint", "latest")
    assert_same_tensors(lora_file(tmp_path / "resumed"), lora_file(uninterrupted))
    kohya = kohya_file_name("resumed"), kohya_file_name("six")
    assert_same_tensors(load_file(tmp_path / "resumed" / kohya[0]), load_file(uninterrupted / kohya[1]))


def test_pivotal_tuning_with_ia3(run_training, tiny_model, demo_images, tmp_path):
    flags = (*IA3, "--train_text_encoder_ti")
    out = run_training(tmp_path / "tok", *flags, *STEPS, "--max_train_steps", "3")
    kohya = load_file(out / kohya_file_name("tok"))
    assert {"bundle_emb.tok.clip_l", "bundle_emb.tok.clip_g"} <= set(kohya)
    assert all(key.startswith(("lora_unet_", "bundle_emb.")) for key in kohya), "(IA)³ on the UNet only"

    pipe = fresh_pipeline(tiny_model)
    tokens = load_for_diffusers(pipe, out)
    assert tokens == ["<s0>", "<s1>"]
    trained, _ = trained_parts(tiny_model, demo_images, out, 3, *flags)
    prompt = "a photo of <s0><s1> toy"
    assert_outputs_equal(outputs(pipe, prompt), outputs(trained, prompt), atol=0)
    untrained = fresh_pipeline(tiny_model)
    load_for_diffusers(untrained, out / "tok_emb.safetensors")  # the embeddings without the (IA)³ vectors
    assert not torch.allclose(outputs(pipe, prompt)[0], outputs(untrained, prompt)[0], atol=1e-5), "UNet trained"


def test_network_weights_continue_an_ia3_file(run_training, tiny_model, demo_images, tmp_path):
    """Both files of an (IA)³ run, loaded with --network_weights and saved after 0 steps, give the same files."""
    from test_kohya_parity import loaded_and_saved

    first = run_training(tmp_path / "first", *IA3, "--train_text_encoder", *STEPS, "--max_train_steps", "1")
    for name in ("pytorch_lora_weights.safetensors", kohya_file_name("first")):
        saved = loaded_and_saved(
            tiny_model, demo_images, tmp_path / name, "--network_weights", str(first / name), "--train_text_encoder"
        )
        assert_same_tensors(lora_file(saved), lora_file(first))
        assert_same_tensors(load_file(saved / kohya_file_name("out")), load_file(first / kohya_file_name("first")))


def test_tools_convert_and_inspect_ia3(tiny_model, demo_images, tmp_path):
    from sdxl_pivotal.tools.convert import convert_lora
    from sdxl_pivotal.tools.inspect import describe_file

    models = ia3_models(tiny_model, demo_images, tmp_path)
    diffusers = save_diffusers_lora(tmp_path / "run", models)
    kohya = save_kohya_lora(tmp_path / "run", models, "run", "base")
    (converted,) = convert_lora(diffusers, tmp_path / "converted.safetensors", base=tiny_model)
    assert_same_tensors(load_file(converted), load_file(kohya))
    (back,) = convert_lora(converted, tmp_path / "back.safetensors", base=tiny_model)
    assert_same_tensors(load_file(back), load_file(diffusers))
    lines = describe_file(kohya)
    assert "format: kohya (LyCORIS: (IA)³), for AUTOMATIC1111 (ComfyUI and Forge read no (IA)³)" in lines
    unet_modules = len(expected_modules(base_models(tiny_model, demo_images, tmp_path)["unet"], "unet"))
    assert f"unet: {unet_modules} modules ({unet_modules} (IA)³)" in lines, "no rank, no alpha"
    assert any(line.startswith("unet: ") for line in describe_file(diffusers))
    with pytest.raises(InputError, match="only LoRA can be resized"):
        from sdxl_pivotal.tools.resize import resize_lora

        resize_lora(kohya, tmp_path / "resized.safetensors", 2, None, tiny_model, False)


def test_card_says_which_uis_load_ia3():
    from test_card import ui_section

    lines = ui_section(adapter="ia3")
    assert "copy `tok-toy.safetensors` into `models/Lora/`" in lines["AUTOMATIC1111"]
    assert lines["Forge"].startswith("**does not load (IA)³:**")
    assert lines["ComfyUI"].startswith("**does not load (IA)³:**") and '"lora key not loaded"' in lines["ComfyUI"]


def test_merge_tool_fuses_ia3_into_the_pipeline(tiny_model, demo_images, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdxl_pivotal.tools.merge import merge_lora

    models = ia3_models(tiny_model, demo_images, tmp_path)
    path = save_diffusers_lora(tmp_path / "run", models)
    merge_lora(path, tiny_model, tmp_path / "merged")
    merged = StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, IA3Layer) for m in merged.unet.modules()), "fused, no adapter layers"
    loaded = fresh_pipeline(tiny_model)
    load_for_diffusers(loaded, path)
    assert_outputs_equal(outputs(merged), outputs(loaded), atol=1e-5)
    with pytest.raises(InputError, match="no scale to change"):
        merge_lora(path, tiny_model, tmp_path / "half", scale=0.5)


@pytest.mark.slow
def test_two_processes_train_and_resume_ia3_exactly(tiny_model, demo_images, tmp_path):
    """(IA)³ with pivotal tuning and per-block learning rates under DDP (2 CPU processes), resumed exactly."""
    from test_multiprocess import torchrun_and_resume

    flags = (*IA3, "--learning_rate", "3e-1", "--unet_block_lr", "mid=0.5")
    full, resumed = torchrun_and_resume(tmp_path, tiny_model, demo_images, *flags)
    assert_same_tensors(lora_file(resumed), lora_file(full))
    right = {key.replace(".resumed.", ".full."): v for key, v in load_file(resumed / "resumed.safetensors").items()}
    assert_same_tensors(right, load_file(full / "full.safetensors"))
