"""The figure runner's command line (scripts/figure_runner/): API workflows over DreamBooth subjects x
prompt lists x seeds on ComfyUI servers owned by Ray actors, then the metrics and the table.

    .comfy/venv/bin/python scripts/run_figure.py --table1 --subjects DREAMBOOTH --checkpoint SD15 \\
        --clip-model CLIP --dino-model DINO --out runs/table1

``--help`` has the rest.
"""

import sys
from pathlib import Path

# eqdiff_core is a package at the repository root: put the root on the path, as for any checkout
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from figure_runner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
