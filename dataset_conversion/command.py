"""How ``nnssl_convert`` exposes one dataset as a sub-command.

Each converter module ends with a ``COMMAND``, a :class:`DatasetCommand`: the sub-command name, the default dataset
folder name, the help texts, the published splits ``--paper`` offers, any dataset-specific arguments and the
``convert_<dataset>`` function that does the work. Converters build it with :func:`dataset_command`, which derives
what every converter would otherwise repeat (name, folder name, description) from the converter itself.
:mod:`dataset_conversion.cli` builds its parser from the commands and parses the options shared by all datasets; a
command only passes the parsed arguments on to its converter.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from nnssl.split import SSLSplit

from .cases import DatasetFormat
from .options import ConversionOptions


@dataclass(frozen=True)
class DatasetCommand:
    """How ``nnssl_convert`` exposes one dataset: its sub-command name, default folder name, help text, published
    splits (``papers``, the first is the default of ``--paper``), extra arguments and the conversion call."""

    name: str
    default_dataset_name: str
    summary: str
    convert: Callable[..., SSLSplit]  # convert_<dataset>(raw_dir, output_dir, options, **keyword_arguments)
    papers: tuple[str, ...] = ()
    add_arguments: Callable[..., None] | None = None
    keyword_arguments: tuple[str, ...] = ()  # the dests of add_arguments' options, passed on to convert
    description: str = ""

    def run(self, args, output_dir: Path, options: ConversionOptions) -> SSLSplit:
        """Convert ``args.raw_dir`` as the parsed command line asks."""
        return self.convert(args.raw_dir, output_dir, options, **{k: getattr(args, k) for k in self.keyword_arguments})


def dataset_command(convert: Callable[..., SSLSplit], fmt: DatasetFormat, summary: str, papers: Iterable[str] = (),
                    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                    keyword_arguments: tuple[str, ...] = ()) -> DatasetCommand:
    """The :class:`DatasetCommand` of a converter module, from its ``convert_<name>`` function: the sub-command is
    ``<name>``, the default dataset folder name is ``fmt.name`` and the description is the module's docstring."""
    name = convert.__name__.removeprefix("convert_")
    if name == convert.__name__:
        raise ValueError(f"{convert.__name__}: a converter function is named convert_<dataset>")
    return DatasetCommand(name=name, default_dataset_name=fmt.name, summary=summary, convert=convert,
                          papers=tuple(papers), add_arguments=add_arguments, keyword_arguments=keyword_arguments,
                          description=sys.modules[convert.__module__].__doc__ or "")
