"""The hidden-states HDF5 file: schema, crash-safe writer, lazy reader, shard merge.

Schema ``stepprobe-hidden-states`` version 2 (documented in ``docs/hdf5_schema.md``)::

    /                         attributes: kind, schema_version, layout, complete, sites,
                              num_layers, hidden_size, storage_dtype, model, boundary_rule,
                              config, packages, ... (dicts and lists as JSON strings)
    /features/<site>          [num_steps, hidden_size]  storage dtype (float16 by default),
                              chunked along the step axis; one dataset per site
    /features_mean/<site>     optional (version 2): the mean of the site over each step's
                              tokens, for the sites in attribute ``mean_sites``
    /steps/{trace, problem, step, position, rel_position, label}       one row per boundary
    /traces/{problem, sample_index, label, num_steps, num_tokens,
             finish_reason, step_start}                                one row per trace
    /problems/{problem_id, question, gold}                             one row per problem

Version 1 (no step means) reads as version 2 with ``mean_sites`` empty.

Two layouts share that schema. ``single``: one self-contained file (what a finished run,
:func:`write_arrays` and :func:`merge` produce). ``parts``: what a run in progress
leaves: the tables live in the file, and each ``/features/<site>`` is an HDF5 virtual
dataset over finished block files in ``<name>.parts/`` next to it. Both read the same
with h5py or :class:`HiddenStates`.

The package is split along those seams: :mod:`.schema` (constants, attributes, tables,
feature datasets), :mod:`.reader` (:class:`HiddenStates`, :func:`read_header`),
:mod:`.writer` (:func:`write_arrays`, :class:`HiddenStatesWriter` with its parts, commits
and resume, :func:`consolidate_file`) and :mod:`.merge` (:func:`merge`). Import from here.
"""

from __future__ import annotations

from .merge import merge
from .reader import HiddenStates, read_header
from .schema import (FEATURE_GROUP, JSON_ATTRS, KIND, LAYOUT_PARTS, LAYOUT_SINGLE, MEAN_GROUP,  # noqa: F401
                     PROBLEM_FIELDS, READABLE_VERSIONS, SCHEMA_VERSION, STEP_FIELDS, STORAGE_DTYPES, TABLES,
                     TRACE_FIELDS, _check_dtype, chunk_rows, estimate_bytes, feature_names, feature_path, human_bytes,
                     parse_compression, parts_dir)
from .writer import HiddenStatesWriter, TraceRecord, consolidate_file, write_arrays

__all__ = ["KIND", "SCHEMA_VERSION", "HiddenStates", "HiddenStatesWriter", "TraceRecord", "write_arrays",
           "merge", "consolidate_file", "read_header", "estimate_bytes", "parts_dir"]
