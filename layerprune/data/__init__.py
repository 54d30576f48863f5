"""A task's labelled examples, one module per source (see tasks.py for the configs):

* ``examples``: the :class:`Examples` container; raw columns -> texts and labels (:func:`resolve_labels`)
* ``files``: local CSV/TSV/JSONL files, and the task config for ``--data FILE``
* ``glue``: GLUE from a local copy in the classic layout, or the Hugging Face hub
* ``rt_polarity``: the Rotten Tomatoes sentences of Hutto & Gilbert (2014), from PyPI
* ``load``: :func:`load_examples`, one split of any task
"""

from .examples import Examples, resolve_labels
from .files import read_columns, read_texts, task_from_files
from .glue import glue_dir_from_env
from .load import load_examples
from .rt_polarity import (
    RT_POLARITY_LINES,
    RT_POLARITY_SEED,
    RT_POLARITY_SHA256,
    RT_POLARITY_SIZES,
    label_rt_polarity,
    parse_rt_polarity,
    rt_polarity_bytes,
    rt_polarity_examples,
    split_rt_polarity,
)

__all__ = [
    "Examples",
    "load_examples",
    "resolve_labels",
    "read_columns",
    "read_texts",
    "task_from_files",
    "glue_dir_from_env",
    "RT_POLARITY_SHA256",
    "RT_POLARITY_SEED",
    "RT_POLARITY_LINES",
    "RT_POLARITY_SIZES",
    "rt_polarity_bytes",
    "parse_rt_polarity",
    "label_rt_polarity",
    "split_rt_polarity",
    "rt_polarity_examples",
]
