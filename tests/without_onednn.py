"""A pytest plugin (`-p tests.without_onednn`) for a process in which the oneDNN wheels are not
installed, as on the CPUs pip does not install them for (aarch64, macOS): importlib.metadata
finds no such distribution, so the CPU plug-in's shim cannot be built and steps aside."""

import importlib.metadata

HIDDEN = {"onednn-cpu-gomp", "onednn-devel-cpu-gomp"}
_files = importlib.metadata.files


def _files_without_onednn(distribution: str):
    if distribution.lower().replace("_", "-") in HIDDEN:
        raise importlib.metadata.PackageNotFoundError(distribution)
    return _files(distribution)


importlib.metadata.files = _files_without_onednn
