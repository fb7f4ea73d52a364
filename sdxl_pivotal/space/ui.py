"""The Gradio page: images -> what are you training -> captions -> settings -> estimate -> training -> results.

Every handler is a small function over the modules beside this one; state that matters (images, captions, runs)
lives in run folders on the server, so closing the tab loses nothing and reopening the page shows the run again.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from ..args import build_parser, parse_args
from ..caption import DEFAULT_MODEL, Captioner, with_concept
from ..errors import InputError
from ..tiny import pretrained_resolution, save_tiny_sdxl
from . import command as cmd
from .estimate import HARDWARE, cached_memory, estimate, planned_memory
from .presets import PRESETS, preset_settings
from .progress import log_tail, loss_frame, read_progress, validation_images
from .results import TryIt, push_to_hub, result_files, write_results_zip
from .runs import RunManager
from .uploads import MIN_IMAGES, add_uploads, list_images, new_run_folder, read_caption, remove_image, write_caption

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
WORLD_LABEL = f"embedded tiny SDXL trained on a world of shapes ({pretrained_resolution()} px, runs on a CPU)"
TINY_LABEL = "embedded tiny SDXL (random weights, runs on a CPU)"
TINY_FOLDERS = {WORLD_LABEL: "tiny-world", TINY_LABEL: "tiny-sdxl"}  # in the model cache
STATUS_TEXT = {
    "queued": "waiting in the queue",
    "running": "training",
    "finished": "finished",
    "stopped": "stopped: press Resume to continue from the last checkpoint",
    "failed": "failed (see the log): press Resume to continue from the last checkpoint",
}


def ensure_tiny_model(cache_dir: Path, label: str) -> Path:
    """The embedded tiny SDXL `label` (world-trained or random) in `cache_dir`, built (`python -m
    sdxl_pivotal.tiny`'s code) if absent."""
    folder = cache_dir / TINY_FOLDERS[label]
    if not (folder / "model_index.json").is_file():
        partial = cache_dir / f".{folder.name}.partial"
        save_tiny_sdxl(partial, pretrained=label == WORLD_LABEL)
        partial.replace(folder)
    return folder


def app_defaults(has_gpu: bool, model: str) -> dict:
    """Starting values of the app for `model` (a label or an id; the trainer's own defaults are shown beside
    each setting). The world-trained tiny SDXL is trained at the resolution it learned its world at."""
    tiny = model in TINY_FOLDERS
    return {
        "resolution": pretrained_resolution() if model == WORLD_LABEL else 128 if tiny else 1024,
        "train_batch_size": 2 if tiny else 1,
        "gradient_accumulation_steps": 1 if tiny else 4,
        "gradient_checkpointing": not tiny,
        "mixed_precision": "bf16" if has_gpu else "no",
        "learning_rate": 1e-3 if tiny else 1e-4,
        "text_encoder_lr": 1e-3 if tiny else 3e-4,
        "lr_warmup_steps": 0,
        "snr_gamma": 5.0,
        "validation_prompt": "a photo of TOK on the beach",
        "validation_steps": 10 if tiny else 100,
        "num_validation_images": 2,
        "validation_inference_steps": 10 if tiny else 25,
        "checkpointing_steps": 10 if tiny else 100,
        "seed": 0,
    }


def setting_component(action: argparse.Action, value) -> gr.components.Component:
    """A widget for one trainer flag: its name as label, its help and default as info."""
    label = action.option_strings[0]
    info = f"{action.help or ''} (trainer default: {action.default})".strip()
    elem_id = f"flag-{action.dest}"
    if cmd.is_bool(action):
        return gr.Checkbox(value=bool(value), label=label, info=info, elem_id=elem_id)
    if action.choices:
        value = action.type(value) if value is not None and callable(action.type) else value
        return gr.Dropdown(choices=list(action.choices), value=value, label=label, info=info, elem_id=elem_id)
    if action.type in (int, float) and value is not None:
        precision = 0 if action.type is int else None
        return gr.Number(value=value, label=label, info=info, precision=precision, elem_id=elem_id)
    # Text, and numbers whose default is "not set": empty means the trainer's default.
    return gr.Textbox(value="" if value is None else str(value), label=label, info=info, elem_id=elem_id)


def image_row(label: str, elem_id: str, height: int) -> gr.Gallery:
    """A gallery of small images, eight to a row, shown whole (no preview pane)."""
    return gr.Gallery(
        label=label, columns=8, height=height, object_fit="contain", preview=False, fit_columns=False, elem_id=elem_id
    )


def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return cleaned or "my-lora"


class SpaceApp:
    """The app's server-side objects: where runs live, the queue, the tiny model, the try-it pipeline."""

    def __init__(self, runs_root: Path, cache_dir: Path):
        self.runs_root = runs_root
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.has_gpu = torch.cuda.is_available()
        self.num_gpus = torch.cuda.device_count()
        self.tiny_models = {label: ensure_tiny_model(cache_dir, label) for label in TINY_FOLDERS}
        self.manager = RunManager()
        self.manager.load_runs(self.runs_root)
        self.try_it = TryIt()
        self.actions = cmd.trainer_actions()
        self.advanced = cmd.advanced_sections()
        self.dests = list(cmd.COMMON) + [a.dest for _, actions in self.advanced for a in actions]

    # --- settings -> command --------------------------------------------------------------------------------
    def model_path(self, model: str) -> str:
        return str(self.tiny_models[model]) if model in self.tiny_models else model

    def settings(self, values) -> dict:
        """Widget values (in `self.dests` order) -> trainer settings by dest, typed as the parser types them."""
        settings = {d: cmd.coerce(self.actions[d], v) for d, v in zip(self.dests, values, strict=True)}
        settings["pretrained_model_name_or_path"] = self.model_path(settings["pretrained_model_name_or_path"])
        return settings

    def run_command(self, folder: Path | None, name: str, settings: dict) -> list[str]:
        base = Path(folder) if folder else Path("<run folder>")
        owned = {"instance_data_dir": str(base / "images"), "output_dir": str(base / "output" / safe_name(name))}
        if settings.get("with_prior_preservation"):
            owned["class_data_dir"] = str(base / "class-images")
        threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
        return cmd.launch_command(
            cmd.trainer_arguments({**settings, **owned}), self.num_gpus, settings.get("mixed_precision"), threads
        )

    def command_text(self, folder, name, hardware, *values) -> str:
        """The command the app will run."""
        try:
            return cmd.shell_text(self.run_command(folder, name, self.settings(values)))
        except (ValueError, KeyError) as error:
            return f"# invalid setting: {error}"

    def estimate_text(self, folder, name, hardware, *values):
        """The estimate for the chosen hardware: at once, then with the memory planner's figure when it is ready
        (about a minute at SDXL size the first time a command is seen; a listener apart from the command's, so the
        command never waits for it)."""
        try:
            settings = self.settings(values)
            argv = cmd.trainer_arguments(settings)
        except (ValueError, KeyError):
            yield ""
            return
        tiny = settings["pretrained_model_name_or_path"] in {str(path) for path in self.tiny_models.values()}
        chosen = HARDWARE[hardware]
        memory = cached_memory(argv)
        if memory is None:
            yield estimate(settings, tiny, chosen, None).markdown(chosen)
            memory = planned_memory(argv)
        yield estimate(settings, tiny, chosen, memory).markdown(chosen)

    # --- images and captions -------------------------------------------------------------------------------
    def upload(self, files, folder, version):
        folder = Path(folder) if folder else new_run_folder(self.runs_root)
        report = add_uploads(files or [], folder / "images")
        count = len(list_images(folder / "images"))
        lines = [f"Added {len(report.accepted)} image(s); {count} in this run."]
        lines += [f"- {message}" for message in report.rejected]
        return str(folder), version + 1, "\n".join(lines), None

    def caption_all(self, folder, version, model_id, preset):
        if not folder or not list_images(Path(folder) / "images"):
            return version, "Upload images first."
        try:
            captioner = Captioner.load(model_id or DEFAULT_MODEL)
        except InputError as error:
            return version, f"⚠️ {error}"
        concept = PRESETS[preset].concept
        position = PRESETS[preset].caption_position
        for image in list_images(Path(folder) / "images"):
            with Image.open(image) as opened:
                text = captioner.caption([opened])[0]
            write_caption(image, with_concept(text, concept, position))
        return version + 1, f"Captioned with {model_id}."

    # --- training -------------------------------------------------------------------------------------------
    def start(self, folder, name, *values):
        if not folder or len(list_images(Path(folder) / "images")) < MIN_IMAGES:
            raise gr.Error(f"Upload at least {MIN_IMAGES} images first.")
        command = self.run_command(Path(folder), name, self.settings(values))
        try:  # the trainer's own checks, before anything starts
            parse_args(cmd.split_launch(command))
        except InputError as error:
            raise gr.Error(str(error)) from None
        except SystemExit:
            raise gr.Error("The settings do not form a valid command; see the command box.") from None
        run = self.manager.submit(Path(folder), command)
        return run.id, None, 0  # the run id; a fresh upload folder and image list for the next run

    def control(self, run_id, name):
        if not run_id:
            raise gr.Error("No run yet.")
        self.manager.request(run_id, name)
        return f"Requested: {name} (at the next step)."

    def resume(self, run_id):
        if not run_id:
            raise gr.Error("No run yet.")
        try:
            self.manager.resume(run_id)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        return "Resuming from the latest checkpoint."

    def refresh(self, run_id):
        """Everything the training and results sections show, from the run's files."""
        if not run_id or run_id not in self.manager.runs:
            empty = "<div id='progress-text'>no run yet</div>"
            return "No run yet.", empty, loss_frame(None), [], "", gr.update(), []
        run = self.manager.runs[run_id]
        position = self.manager.position(run_id)
        status = STATUS_TEXT[run.status]
        if run.status == "queued" and position:
            status += f" (position {position})"
        progress = read_progress(run.output_dir)
        bar = (
            f"<div id='progress-text'>{progress.summary()}</div>"
            f"<progress id='progress-bar' max='{max(progress.total, 1)}' value='{progress.step}' style='width:100%'>"
            "</progress>"
        )
        images = validation_images(run.output_dir)
        final = [item for item in images if item[1] == "final"]
        download = gr.update()
        if run.status == "finished" and result_files(run.output_dir):
            zip_path = run.folder / f"{run.output_dir.name}.zip"
            if not zip_path.exists():
                write_results_zip(run.output_dir, zip_path)
            download = gr.update(value=str(zip_path), visible=True)
        return (
            f"**Run {run.id}**: {status}",
            bar,
            loss_frame(run.output_dir),
            images,
            log_tail(run.log_path),
            download,
            final,
        )

    def on_load(self, run_id):
        """A reopened page shows the running (or last) run."""
        if run_id:
            return run_id
        latest = self.manager.latest()
        return latest.id if latest else None

    # --- results --------------------------------------------------------------------------------------------
    def generate(self, run_id, prompt, seed, steps):
        if not run_id or self.manager.runs[run_id].status != "finished":
            raise gr.Error("Try it needs a finished run.")
        run = self.manager.runs[run_id]
        flags = build_parser().parse_args(cmd.split_launch(run.command))
        image, used = self.try_it.generate(
            flags.pretrained_model_name_or_path, run.output_dir, flags, prompt, seed, steps
        )
        return image, f"Prompt used: `{used}`"

    def push(self, run_id, repo_id, private, token):
        if not run_id or self.manager.runs[run_id].status != "finished":
            raise gr.Error("Push needs a finished run.")
        if not repo_id.strip():
            raise gr.Error("Give a repo id, e.g. your-name/my-lora.")
        try:
            url = push_to_hub(self.manager.runs[run_id].output_dir, repo_id.strip(), token or None, private)
        except Exception as error:  # the Hub client's errors never contain the token
            return f"⚠️ Push failed: {type(error).__name__}", ""
        return f"Pushed to {url}", ""  # the token field is cleared

    # --- layout ---------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        default_model = SDXL_BASE if self.has_gpu else WORLD_LABEL
        defaults = app_defaults(self.has_gpu, default_model)
        model_choices = [WORLD_LABEL, TINY_LABEL, SDXL_BASE]
        with gr.Blocks(title="sdxl-pivotal: train an SDXL LoRA") as demo:
            folder = gr.State(None)  # the current upload folder (server side only)
            version = gr.State(0)  # bumped when the image list changes
            run_id = gr.State(None)
            gr.Markdown(
                "# sdxl-pivotal — train an SDXL DreamBooth LoRA with pivotal tuning\n"
                "Upload photos, pick what you are training, caption, start. The app runs the real trainer "
                "(`accelerate launch train_dreambooth_lora_sdxl_advanced.py`) and shows it as it trains."
            )

            gr.Markdown("## 1. Images")
            files = gr.File(file_count="multiple", label="Drop 2–150 images or a zip", elem_id="upload")
            upload_message = gr.Markdown(elem_id="upload-message")

            # Every change of the folder comes with a new version: one trigger, so one upload renders the list once
            # (rendering it twice could replace a caption box while it is being typed in).
            @gr.render(inputs=[folder, version], triggers=[version.change, demo.load])
            def image_list(folder_value, _version):
                images = list_images(Path(folder_value) / "images") if folder_value else []
                if not images:
                    gr.Markdown("No images yet.", elem_id="no-images")
                    return
                for row in range(0, len(images), 3):
                    with gr.Row():
                        for path in images[row : row + 3]:
                            with gr.Column(min_width=240):
                                gr.Image(str(path), show_label=False, height=120, interactive=False)
                                box = gr.Textbox(read_caption(path), label=path.name, elem_id=f"caption-{path.stem}")
                                remove = gr.Button("Remove", elem_id=f"remove-{path.stem}", size="sm")
                            box.change(caption_writer(path), inputs=box)
                            remove.click(image_remover(path), inputs=version, outputs=version)

            gr.Markdown("## 2. What are you training?")
            preset = gr.Radio(list(PRESETS), value="object", label="Preset", elem_id="preset")

            gr.Markdown("## 3. Captions")
            with gr.Row():
                caption_model = gr.Textbox(DEFAULT_MODEL, label="Captioning model (transformers)", scale=4)
                caption_button = gr.Button("Caption all images", scale=1, elem_id="caption-all")
            caption_message = gr.Markdown(elem_id="caption-message")

            gr.Markdown("## 4. Settings")
            name = gr.Textbox("my-lora", label="LoRA name (the output files' name)", elem_id="lora-name")
            start_values = {**defaults, **preset_settings("object", 0)}
            widgets = {}
            model_flag = self.actions["pretrained_model_name_or_path"]
            widgets["pretrained_model_name_or_path"] = gr.Dropdown(
                model_choices,
                value=default_model,
                allow_custom_value=True,
                label=model_flag.option_strings[0],
                info=f"{model_flag.help}; the world-trained tiny one is the default without a GPU",
                elem_id="flag-pretrained_model_name_or_path",
            )
            common = [d for d in cmd.COMMON if d != "pretrained_model_name_or_path"]
            for row in range(0, len(common), 3):
                with gr.Row():
                    for dest in common[row : row + 3]:
                        action = self.actions[dest]
                        widgets[dest] = setting_component(action, start_values.get(dest, action.default))
            for title, actions in self.advanced:
                with gr.Accordion(f"Advanced: {title}", open=False):
                    for action in actions:
                        widgets[action.dest] = setting_component(action, start_values.get(action.dest, action.default))
            inputs = [widgets[d] for d in self.dests]
            command_box = gr.Code(
                language="shell", label="The command the app will run", elem_id="command", wrap_lines=True, max_lines=8
            )

            gr.Markdown("## 5. Estimate")
            hardware = gr.Dropdown(
                list(HARDWARE), value="a10g-small" if self.has_gpu else "cpu-basic", label="Hardware"
            )
            estimate_box = gr.Markdown(elem_id="estimate")

            with gr.Column(elem_id="training-section"):
                gr.Markdown("## 6. Training")
                with gr.Row():
                    start_button = gr.Button("Start training", variant="primary", elem_id="start")
                    stop_button = gr.Button("Stop", elem_id="stop")
                    save_button = gr.Button("Save now", elem_id="save-now")
                    sample_button = gr.Button("Sample now", elem_id="sample-now")
                    resume_button = gr.Button("Resume", elem_id="resume")
                status = gr.Markdown(elem_id="status")
                control_message = gr.Markdown(elem_id="control-message")
                progress = gr.HTML(elem_id="progress")
                loss_plot = gr.LinePlot(
                    x="step",
                    y="loss",
                    color="series",
                    color_map={"loss": "#4c78a8", "smoothed": "#f58518"},
                    label="Loss (blue: per step, orange: smoothed)",
                    elem_id="loss-plot",
                    height=300,
                )
                gallery = image_row("Validation images by step", "validation", height=220)
                log = gr.Code(label="Log (last lines)", elem_id="log", lines=10)

            gr.Markdown("## 7. Results")
            final_gallery = image_row("Final samples", "final", height=200)
            download = gr.DownloadButton("Download the LoRA (zip)", visible=False, elem_id="download")
            with gr.Row():
                try_prompt = gr.Textbox("a photo of TOK on the beach", label="Try it: prompt (TOK = your concept)")
                try_seed = gr.Number(0, label="seed", precision=0)
                try_steps = gr.Number(10, label="steps", precision=0)
                try_button = gr.Button("Generate", elem_id="generate")
            try_image = gr.Image(label="Generated", elem_id="try-image", height=256)
            try_message = gr.Markdown(elem_id="try-message")
            with gr.Row():
                repo = gr.Textbox(label="Hub repo id", placeholder="your-name/my-lora", elem_id="hub-repo")
                private = gr.Checkbox(True, label="private")
                token = gr.Textbox(label="Hub token (else HF_TOKEN)", type="password", elem_id="hub-token")
                push_button = gr.Button("Push to the Hub", elem_id="push")
            push_message = gr.Markdown(elem_id="push-message")

            # --- events ---
            upload_event = files.upload(
                self.upload, [files, folder, version], [folder, version, upload_message, files]
            )
            caption_button.click(
                self.caption_all, [folder, version, caption_model, preset], [version, caption_message]
            )
            # The preset's values follow the preset and the number of images; the model's starting values the model.
            preset_outputs = [widgets[d] for d in preset_settings("object", 0)]
            preset.change(preset_values, [preset, folder], preset_outputs)
            upload_event.then(preset_values, [preset, folder], preset_outputs)
            model_outputs = [widgets[d] for d in defaults]
            model_widget = widgets["pretrained_model_name_or_path"]
            model_widget.change(
                lambda model: list(app_defaults(self.has_gpu, model).values()),
                model_widget,
                model_outputs,
            )
            # One listener for every setting (a listener per widget would make the page config huge).
            triggers = [w.change for w in [*inputs, name, hardware]] + [folder.change, demo.load]
            for listener, box in ((self.command_text, command_box), (self.estimate_text, estimate_box)):
                gr.on(triggers, listener, [folder, name, hardware, *inputs], box, show_progress="hidden")
            start_button.click(self.start, [folder, name, *inputs], [run_id, folder, version])
            stop_button.click(lambda r: self.control(r, "stop"), run_id, control_message)
            save_button.click(lambda r: self.control(r, "save"), run_id, control_message)
            sample_button.click(lambda r: self.control(r, "sample"), run_id, control_message)
            resume_button.click(self.resume, run_id, control_message)
            timer = gr.Timer(1.0)
            outputs = [status, progress, loss_plot, gallery, log, download, final_gallery]
            timer.tick(self.refresh, run_id, outputs, show_progress="hidden")
            try_button.click(self.generate, [run_id, try_prompt, try_seed, try_steps], [try_image, try_message])
            push_button.click(self.push, [run_id, repo, private, token], [push_message, token])
            demo.load(self.on_load, run_id, run_id)
        return demo


def preset_values(preset: str, folder: str | None) -> list:
    """The preset's settings for the images uploaded so far, in `preset_settings` order."""
    count = len(list_images(Path(folder) / "images")) if folder else 0
    return list(preset_settings(preset, count).values())


def caption_writer(path: Path):
    def write(text: str) -> None:
        write_caption(path, text)

    return write


def image_remover(path: Path):
    def remove(version: int) -> int:
        remove_image(path.parent, path.name)
        return version + 1

    return remove
