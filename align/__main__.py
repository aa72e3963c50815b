"""``python -m align ...``: the ``align`` command, e.g. under ``accelerate launch -m align
generate ...``."""

from align.cli import app

if __name__ == "__main__":
    app(prog_name="align")
