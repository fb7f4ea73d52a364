"""The Space: a browser app that trains an SDXL DreamBooth LoRA with pivotal tuning and shows the training as it
happens. `python app.py` runs it locally (http://127.0.0.1:7860); on a Hugging Face Space it is the `app_file`.

Where things go: runs in $SDXL_PIVOTAL_RUNS (default ./space-runs, or /data/space-runs on a Space with
persistent storage), the embedded tiny SDXL in $SDXL_PIVOTAL_CACHE (default ~/.cache/sdxl-pivotal).
"""

from __future__ import annotations

import os
from pathlib import Path

from sdxl_pivotal.space.ui import SpaceApp


def default_runs_root() -> Path:
    if os.environ.get("SDXL_PIVOTAL_RUNS"):
        return Path(os.environ["SDXL_PIVOTAL_RUNS"])
    return Path("/data/space-runs") if os.access("/data", os.W_OK) else Path("space-runs")


def main() -> None:
    cache = Path(os.environ.get("SDXL_PIVOTAL_CACHE", Path.home() / ".cache" / "sdxl-pivotal"))
    app = SpaceApp(default_runs_root().resolve(), cache)
    app.build().launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        allowed_paths=[str(app.runs_root)],
    )


if __name__ == "__main__":
    main()
