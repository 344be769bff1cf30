import os
import sys


def _drop_checkout_root() -> None:
    """`python -m fastppo` run from a checkout puts the checkout first on sys.path, where our
    top-level ``kernels/`` folder would shadow Hugging Face's ``kernels`` package (transformers
    imports it when it loads a model). fastppo itself is installed, so the entry can go."""
    for entry in list(sys.path):
        root = os.path.abspath(entry or os.getcwd())
        if os.path.isfile(os.path.join(root, "kernels", "__init__.py")) and os.path.isdir(os.path.join(root, "fastppo")):
            sys.path.remove(entry)
            sys.modules.pop("kernels", None)


_drop_checkout_root()

from .cli import main  # noqa: E402

sys.exit(main())
