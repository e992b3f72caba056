"""rdcd: compact image copy detection (RDCD: relational self-supervised distillation)."""
__version__ = "0.1.0"

from .descriptors import read_descriptors, write_descriptors  # noqa: E402
from .models import list_models, load_model  # noqa: E402


def extract(*args, **kwargs):
    """See :func:`rdcd.extract.extract`."""
    from .extract import extract as _extract

    return _extract(*args, **kwargs)


__all__ = ["__version__", "extract", "load_model", "list_models", "read_descriptors", "write_descriptors"]
