"""``python -m pipeline.cli``: the ``pipeline`` command."""

from . import main

if __name__ == "__main__":
    main()
