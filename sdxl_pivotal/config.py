"""Config files: a run's flags in a YAML, TOML or JSON file, and the effective configuration every run writes.

`--config run.yaml` reads a file whose keys are the flag names (without `--`) and whose values are what the
command line would say. The file becomes command-line text placed *before* the real command line, so argparse
parses both the same way (booleans, comma-separated lists, paths relative to the working directory) and the
flags given on the command line win. An unknown key names the closest flag; a value of the wrong type names the
key and the type expected, before anything else runs.

Every run writes its effective configuration (all flags after defaults, never the Hub token) as
`training_config.yaml` into its output folder and each checkpoint: `--config output/training_config.yaml`
runs it again. `--print_config` prints the same text and exits.

This module is imported by args.py before torch loads, so it imports nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from pathlib import Path

from .errors import InputError

logger = logging.getLogger(__name__)

CONFIG_FILE = "training_config.yaml"
SUFFIXES = (".yaml", ".yml", ".toml", ".json")
# Not written to the effective configuration: a secret, and the flags that are about the file itself.
NOT_SAVED = ("hub_token", "config", "print_config")
# Flags whose command-line value is a comma-separated list: a file may give them as a list.
LIST_FLAGS = ("token_abstraction", "lora_unet_blocks", "unet_block_ranks", "unet_block_conv_ranks", "unet_block_lr")
# In the written file, these describe how the run was started, not the training: left unset.
NOT_REPRODUCED = ("resume_from_checkpoint",)
# Set by the launcher per process: not a setting of the training, never reported as changed on resume.
LAUNCHER_FLAGS = ("local_rank",)


def read_config_file(path: Path) -> dict:
    """The key/value mapping of a YAML, TOML or JSON file (chosen by its suffix)."""
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(f"--config {path}: use a .yaml, .yml, .toml or .json file.")
    if not path.is_file():
        raise InputError(f"--config {path} does not exist (or is not a file).")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            values = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as error:  # each parser has its own error type; all mean the same here
        raise InputError(f"--config {path} is not valid {path.suffix.lstrip('.').upper()}: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InputError(f"--config {path} must hold key: value pairs (flag names and values), not a list or value.")
    return values


def _is_boolean(action: argparse.Action) -> bool:
    """Our boolean flags: `--flag`, `--flag true`, `--flag=0` (args._add_bool)."""
    return action.nargs == "?" and action.const is True


def _expected(action: argparse.Action) -> str:
    if _is_boolean(action):
        return "a boolean (true/false)"
    if action.type is int:
        return "an integer"
    if action.type is float:
        return "a number"
    if action.dest in LIST_FLAGS:
        return "a string or a list of strings"
    return "a string (quote it if it looks like a number or a boolean)"


def _value_text(key: str, value: object, action: argparse.Action, source: Path) -> str:
    """The command-line text of a file's value for a flag; raise InputError when it has the wrong type."""
    where = f"--config {source}: key {key!r} (--{action.dest})"
    if key == "datasets":  # a list in the file, JSON text on the command line
        try:
            return json.dumps(parse_datasets(value))
        except InputError as error:
            raise InputError(f"--config {source}: {error}") from None
    if _is_boolean(action):
        ok = isinstance(value, (bool, str))
        text = ("true" if value else "false") if isinstance(value, bool) else value
    elif action.type in (int, float):
        ok = isinstance(value, (int, str)) or (action.type is float and isinstance(value, float))
        ok = ok and not isinstance(value, bool)
        text = str(value)  # str(float) round-trips exactly
    elif action.dest in LIST_FLAGS and isinstance(value, list):
        ok = all(isinstance(item, str) for item in value)
        text = ",".join(value) if ok else ""
    else:
        ok, text = isinstance(value, str), value
    if not ok:
        raise InputError(f"{where} expects {_expected(action)}, got {value!r} ({type(value).__name__}).")
    try:
        parsed = action.type(text) if action.type else text
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise InputError(f"{where} expects {_expected(action)}, got {value!r}.") from None
    if action.choices is not None and parsed not in action.choices:
        raise InputError(f"{where} must be one of {', '.join(map(str, action.choices))}; got {value!r}.")
    return text


def config_argv(parser: argparse.ArgumentParser, values: dict, source: Path) -> list[str]:
    """Command-line text (`--flag=value`, one token each) for the key/value pairs of a config file."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    argv = []
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            closest = difflib.get_close_matches(str(key), list(actions), n=1, cutoff=0.0)
            hint = f"; did you mean {closest[0]!r} (--{closest[0]})?" if closest else "."
            raise InputError(f"--config {source}: unknown key {key!r}{hint}")
        if key == "config":
            raise InputError(f"--config {source}: a config file cannot name another one (key 'config').")
        if value is None:
            if action.default is not None or action.required:
                default = "it is required" if action.required else f"its default is {action.default!r}"
                raise InputError(
                    f"--config {source}: key {key!r} is empty (null); give a value or remove the key ({default})."
                )
            continue  # null: the flag's default, None
        argv.append(f"{action.option_strings[0]}={_value_text(key, value, action, source)}")
    return argv


def with_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> list[str]:
    """The command line with the `--config` file's flags put first (so the command line's own win)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", default=None)
    path = finder.parse_known_args(argv)[0].config
    if path is None:
        return argv
    return config_argv(parser, read_config_file(Path(path)), Path(path)) + argv


def effective_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Every flag's value as parsed (defaults included), in the parser's order, without the Hub token.
    --datasets entries keep only the keys they set (the others mean "the flag's value")."""
    config = {
        action.dest: getattr(args, action.dest)
        for action in parser._actions
        if action.option_strings and action.dest != "help" and action.dest not in NOT_SAVED
    }
    if config.get("datasets"):
        config["datasets"] = [{k: v for k, v in entry.items() if v is not None} for entry in config["datasets"]]
    return config


def config_text(config: dict, header: str = "") -> str:
    """The configuration as YAML (what `--config` reads back to the same values)."""
    import yaml

    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)


def print_config_and_exit(config: dict) -> None:
    """--print_config: the effective configuration on stdout, then exit (nothing is trained)."""
    sys.stdout.write(config_text(config))
    raise SystemExit(0)


def save_run_config(config: dict, folder: Path) -> Path:
    """Write `folder/training_config.yaml`: the run's configuration, to pass back as `--config`."""
    from .export import save_text  # imports torch: only when a run writes its files

    header = (
        "# The effective configuration of an sdxl-pivotal run (every flag, after defaults; no Hub token).\n"
        f"# Run it again: accelerate launch train_dreambooth_lora_sdxl_advanced.py --config {CONFIG_FILE}\n"
        "# (flags given on the command line win; add --resume_from_checkpoint latest to continue this run)\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    reproducible = {key: None if key in NOT_REPRODUCED else value for key, value in config.items()}
    return save_text(config_text(reproducible, header), folder / CONFIG_FILE)


def changed_flags(checkpoint: Path, config: dict) -> list[str]:
    """On resume: the flags that differ from those the checkpoint was written with, as "flag: old -> new"
    (empty for a checkpoint without a config file, from an older version)."""
    saved_file = checkpoint / CONFIG_FILE
    if not saved_file.is_file():
        return []
    saved = read_config_file(saved_file)
    return [
        f"{key}: {saved.get(key)!r} -> {value!r}"
        for key, value in config.items()
        if key in saved and key not in NOT_REPRODUCED + LAUNCHER_FLAGS and saved[key] != value
    ]


def warn_about_changed_flags(checkpoint: Path, config: dict) -> None:
    changes = changed_flags(checkpoint, config)
    if changes:
        logger.warning(
            "Resuming %s with flags that differ from its own (so the run differs from an uninterrupted one): %s",
            checkpoint,
            "; ".join(changes),
        )


# ---------------------------------------------------------------------------------------------- --datasets

# The keys of one --datasets entry, with their types; None means "the flag of the same name" (or, for the
# folder keys, not given). Entries hold the settings kohya's dataset config gives per folder.
ENTRY_KEYS = {
    "image_dir": str,  # a plain folder (captions: sidecar files, else the prompt)
    "dataset_name": str,  # or a datasets ImageFolder / Hub dataset
    "dataset_config_name": str,
    "image_column": str,
    "caption_column": str,
    "instance_prompt": str,
    "class_prompt": str,
    "caption_extension": str,
    "repeats": int,
    "resolution": int,
    "aspect_ratio_bucketing": bool,
    "role": str,
}
ENTRY_DEFAULTS = {"repeats": 1, "role": "instance"}
ROLES = ("instance", "class")
DATASET_ONLY_KEYS = ("dataset_config_name", "image_column", "caption_column")


def _entry(index: int, entry: object) -> dict:
    """One --datasets entry checked for keys and types, with every key present (None: the flag's value)."""
    where = f"--datasets entry {index}"
    if not isinstance(entry, dict):
        raise InputError(f"{where} must be a mapping such as {{image_dir: ./photos, repeats: 2}}, got {entry!r}.")
    for key, value in entry.items():
        if key not in ENTRY_KEYS:
            closest = difflib.get_close_matches(str(key), list(ENTRY_KEYS), n=1, cutoff=0.0)
            raise InputError(
                f"{where}: unknown key {key!r}; did you mean {closest[0]!r}? (keys: {', '.join(ENTRY_KEYS)})"
            )
        kind = ENTRY_KEYS[key]
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            name = {str: "a string", int: "an integer", bool: "a boolean (true/false)"}[kind]
            raise InputError(f"{where}: key {key!r} expects {name}, got {value!r} ({type(value).__name__}).")
    values = {key: entry.get(key, ENTRY_DEFAULTS.get(key)) for key in ENTRY_KEYS}
    if values["role"] not in ROLES:
        raise InputError(f"{where}: role must be instance or class (regularisation images), got {values['role']!r}.")
    if (values["image_dir"] is None) == (values["dataset_name"] is None):
        raise InputError(f"{where}: give exactly one of image_dir (a folder) and dataset_name (a dataset).")
    if values["image_dir"] is not None and any(values[key] is not None for key in DATASET_ONLY_KEYS):
        raise InputError(f"{where}: {', '.join(DATASET_ONLY_KEYS)} apply to dataset_name entries, not image_dir.")
    if values["repeats"] < 1:
        raise InputError(f"{where}: repeats must be at least 1, got {values['repeats']}.")
    resolution = values["resolution"]
    if resolution is not None and (resolution <= 0 or resolution % 8):
        raise InputError(f"{where}: resolution must be a positive multiple of 8 (the VAE's scale), got {resolution}.")
    if values["role"] == "class":
        for key in ("resolution", "aspect_ratio_bucketing", "instance_prompt", "caption_column"):
            if values[key] is not None:
                raise InputError(
                    f"{where}: {key} is for instance entries; class images are captioned with class_prompt "
                    "and trained at the size of the instance image they are paired with."
                )
    return values


def datasets_flag(text: str) -> list[dict]:
    """The argparse type of --datasets (JSON text)."""
    try:
        return parse_datasets(text)
    except ValueError as error:  # InputError and JSON errors: argparse shows the message as is
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_datasets(text: str | list) -> list[dict]:
    """--datasets: a list of entries (JSON text on the command line, a list in a config file)."""
    entries = json.loads(text) if isinstance(text, str) else text
    if not isinstance(entries, list) or not entries:
        raise InputError("--datasets must be a non-empty list of entries, e.g. [{image_dir: ./photos}].")
    return [_entry(i, entry) for i, entry in enumerate(entries)]


def dataset_entries(args: argparse.Namespace, role: str) -> list[dict]:
    """The --datasets entries of one role ("instance" or "class"); none without --datasets."""
    return [entry for entry in args.datasets or () if entry["role"] == role]


def validate_datasets(args: argparse.Namespace) -> None:
    """Check a --datasets list against the other flags and the disk (no image is read, no model loaded)."""
    if args.instance_data_dir or args.dataset_name:
        raise InputError(
            "--datasets lists the training images itself; drop --instance_data_dir / --dataset_name "
            "(or add them to the list as an entry)."
        )
    if not dataset_entries(args, "instance"):
        raise InputError("--datasets has only class entries; add at least one entry of training images.")
    folders: dict[Path, tuple[int, str]] = {}
    for index, entry in enumerate(args.datasets):
        if entry["image_dir"] is None:
            continue
        folder = Path(entry["image_dir"])
        if not folder.is_dir():
            problem = "is a file" if folder.exists() else "does not exist"
            raise InputError(f"--datasets entry {index}: image_dir {folder} {problem}; give a folder of images.")
        earlier = folders.setdefault(folder.resolve(), (index, entry["role"]))
        if earlier[1] != entry["role"]:
            raise InputError(
                f"--datasets entries {earlier[0]} and {index} use the folder {folder} both as training (instance) "
                "and as class (regularisation) images; a folder can have one role only."
            )
    classes = dataset_entries(args, "class")
    if classes and not args.with_prior_preservation:
        raise InputError(
            "--datasets has class (regularisation) entries; set with_prior_preservation: true to train them "
            "with the prior loss, or remove them."
        )
    if classes and args.class_data_dir:
        raise InputError(
            "--datasets has class entries, which replace --class_data_dir; remove class_data_dir (or list it "
            "as an entry with role: class)."
        )
    for index, entry in enumerate(args.datasets):
        if entry["role"] == "class" and not (entry["class_prompt"] or args.class_prompt):
            raise InputError(f"--datasets entry {index} (class images) needs a class_prompt (or --class_prompt).")
    if args.class_data_dir and Path(args.class_data_dir).resolve() in folders:
        raise InputError(
            f"--class_data_dir {args.class_data_dir} is also a --datasets folder; generated class images would "
            "become training images. Pass a separate folder."
        )
